"""How should a greedy continuous action be read from the predicted bins? Measured through the Agent.

    python bench/greedy_decoding.py --model runs/control-s0/model --task Pendulum-v1

Plays ``--episodes`` episodes (batched) in Gato mode with three readings of each continuous action
token: the most probable bin (``argmax``), the predicted median (``median``, what the Agent does),
and a sample (``sample``, temperature 1). Prints the mean return and the share of actions at the
Box bound. With mu-law bins the argmax is biased toward the extremes (bins are far wider at large
magnitudes, and clipped data piles mass into the end bins): on Pendulum it saturated 85-100 % of
actions and played below random, the median none (docs/control.md, "What held learning back").
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from generalist import Agent, GeneralistForCausalLM, GeneralistTokenizer
from generalist.modes import GatoMode
from generalist.modes.control import ControlStep, continuous_flags
from generalist.training.settings import parse


@dataclass
class Args:
    model: str
    """checkpoint folder (model + tokenizer)"""
    task: str = "Pendulum-v1"
    """a task of the model with a continuous (Box) action"""
    episodes: int = 10
    """episodes per rule, all batched"""
    seed: int = 0
    threads: int = 1


class ReadingRule(GatoMode):
    """Gato mode whose continuous action tokens are read by one rule."""

    def __init__(self, rule: str):
        super().__init__(temperature=1.0 if rule == "sample" else 0.0)
        self.rule = rule

    def decide(self, step: ControlStep) -> np.ndarray:
        ranges = step.tok.action_token_ranges(step.spec)
        step.engine.feed(step.state, step.chunks, ranges[0])
        median = continuous_flags(step.tok, ranges) if self.rule == "median" else None
        return step.engine.generate(step.state, ranges, self.temperature, feed_last=False, median=median).numpy()


def play(model, tok, task: str, rule: str, episodes: int, seed: int) -> tuple[float, float]:
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(task)] * episodes,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    agent = Agent(model, tok, ReadingRule(rule), seed=seed)
    agent.reset(task, num_envs=episodes)
    high = np.abs(envs.single_action_space.high)
    obs, _ = envs.reset(seed=seed)
    returns, done, saturated, actions = np.zeros(episodes), np.zeros(episodes, bool), 0, 0
    while not done.all():
        action = agent.act(obs)
        live = ~done
        saturated += int((np.abs(action[live]) >= 0.99 * high).sum())
        actions += int(action[live].size)
        obs, rewards, terminated, truncated, _ = envs.step(action)
        agent.observe(rewards, terminated, truncated)
        returns += rewards * live
        done |= terminated | truncated
    return float(returns.mean()), saturated / max(1, actions)


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    model = GeneralistForCausalLM.from_pretrained(args.model).eval()
    tok = GeneralistTokenizer.from_pretrained(args.model)
    print(f"{args.task}, {args.episodes} episodes per rule, Gato mode (unprompted), {args.model}")
    for rule in ("argmax", "median", "sample"):
        mean, share = play(model, tok, args.task, rule, args.episodes, args.seed)
        print(f"{rule:>7}: return {mean:9.1f}   actions at the bound {share:6.1%}")


if __name__ == "__main__":
    main(parse(Args, description=__doc__))
