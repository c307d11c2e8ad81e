"""Soak benchmark of :class:`generalist.Agent`: memory and decision time over a long batched run.

    python bench/agent_soak.py                          # 10,000 decisions x 32 Pendulum envs
    python bench/agent_soak.py --decisions 500 --num_envs 4 --plot soak.png

A user's evaluation or deployment runs the Agent for hours: contexts slide, episodes end and
restart, caches are re-prefilled. This plays ``decisions`` steps of ``num_envs`` environments in a
``SyncVectorEnv`` through ``agent.act`` / ``agent.observe`` (Gato mode, a seeded tiny model whose
trained context is ``context_length``, so the window slides every few dozen steps and every
Pendulum episode, 200 steps, ends by truncation and restarts its row), and records every
``every`` decisions the process's resident memory (RSS) and the median decision time since the
previous record.

It prints the curve and two drift figures measured after ``warmup`` (a fraction of the run: the
allocator's pools and oneDNN's primitive cache fill first): RSS at the end against RSS at warm-up
(goal: <= 5 %), and the median decision time of the last tenth against that of the tenth after
warm-up. ``--plot`` also draws both curves. Exit status 1 when the memory goal is missed, so that a
leak fails a scripted run.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import psutil
import torch

from generalist import Agent, GeneralistConfig, GeneralistForCausalLM, GeneralistTokenizer, TaskSpec
from generalist.training.settings import parse

try:  # a decision is timed as bench/decode.py times it; run as a script, bench/ is on sys.path
    from decode import timed_step
    from soak import drift_report
except ImportError:  # imported as bench.agent_soak (the tests)
    from bench.decode import timed_step
    from bench.soak import drift_report

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    decisions: int = 10_000
    """vector-env steps (each one decision for every env)"""
    num_envs: int = 32
    """environments stepped together"""
    env: str = "Pendulum-v1"
    """gymnasium id (its episodes should end now and then, and run longer than the context)"""
    context_length: int = 256
    """the model's trained context: the Agent's window slides within it"""
    every: int = 100
    """decisions between records"""
    warmup: float = 0.1
    """share of the run before the reference record"""
    threads: int = 2
    """torch.set_num_threads"""
    plot: Path | None = None
    """also draw the curves into this PNG"""


def main(args: Args) -> int:
    torch.set_num_threads(args.threads)
    tok = GeneralistTokenizer.default()
    env = gym.make(args.env)
    spec = TaskSpec.from_env(env, name=args.env, expert_return=0.0, random_return=-1.0)
    env.close()
    tok.add_task_spec(spec)
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(),
                                                   context_length=args.context_length)).eval()
    agent = Agent(model, tok, "gato")
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(args.env)] * args.num_envs,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    agent.reset(spec, num_envs=args.num_envs)
    obs, _ = envs.reset(seed=0)
    process = psutil.Process()
    records: list[tuple[int, float, float]] = []  # (decision, RSS MiB, median ms since the last record)
    times: list[float] = []
    episodes = 0
    for k in range(1, args.decisions + 1):
        obs, _, terminated, truncated, agent_s, _ = timed_step(agent, envs, obs)
        times.append(agent_s)
        episodes += int(np.sum(terminated | truncated))
        if k % args.every == 0 or k == args.decisions:
            records.append((k, process.memory_info().rss / 2**20, 1000 * statistics.median(times)))
            times = []
            print(f"decision {k:>6}  RSS {records[-1][1]:8.1f} MiB  {records[-1][2]:6.2f} ms/decision  "
                  f"episodes {episodes}  window slides {agent.refills}", flush=True)
    envs.close()

    ks, rss, ms = (np.array(c) for c in zip(*records, strict=True))
    print(f"\n{args.decisions} decisions x {args.num_envs} envs ({args.env}, context {args.context_length}): "
          f"{episodes} episodes ended, the window slid {agent.refills} times")
    drift = drift_report(ks, rss, ms, warmup=args.warmup, unit="decision", plot=args.plot,
                         title=f"Agent soak: {args.num_envs} x {args.env}, context {args.context_length}")
    return 0 if drift <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main(parse(Args, description=__doc__)))
