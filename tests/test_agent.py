"""Agent: acts in real gymnasium vector envs, handles resets, slides its context window."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from generalist import GeneralistConfig, GeneralistForCausalLM, TaskSpec
from generalist.agent import Agent
from generalist.modes import TTConfig, demonstration_prompt
from tests.conftest import TINY_LLAMA


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA)).eval()


def _envs(task: str, n: int, mode=gym.vector.AutoresetMode.SAME_STEP) -> gym.vector.SyncVectorEnv:
    return gym.vector.SyncVectorEnv([lambda: gym.make(task)] * n, autoreset_mode=mode)


def _rollout(agent: Agent, envs, steps: int, seed: int = 0) -> int:
    obs, _ = envs.reset(seed=seed)
    finished = 0
    for _ in range(steps):
        actions = agent.act(obs)
        assert envs.action_space.contains(actions)
        obs, rewards, terminated, truncated, _ = envs.step(actions)
        agent.observe(rewards, terminated, truncated)
        finished += int((terminated | truncated).sum())
        assert agent.state.length <= agent.context_length
    return finished


@pytest.mark.parametrize("mode", ["gato", "dt", "tt"])
@pytest.mark.parametrize("task", ["CartPole-v1", "Pendulum-v1"])
def test_agent_acts_in_a_vector_env(model, tok, task, mode):
    envs = _envs(task, 3)
    spec = TaskSpec.from_env(envs, name=task, expert_return=100.0, random_return=0.0)
    tok.add_task_spec(spec)
    prompt = None
    if mode == "gato":
        rng = np.random.default_rng(0)
        demo = {"observations": {"observation": rng.normal(size=(4, *envs.single_observation_space.shape))},
                "actions": {"action": np.stack([envs.single_action_space.sample() for _ in range(4)])},
                "rewards": np.ones(4)}
        prompt = demonstration_prompt(tok, spec, demo)
    agent = Agent(model, tok, mode, temperature=1.0, tt_config=TTConfig(beam_width=4, horizon=2))
    agent.reset(spec, num_envs=3, prompt=prompt)
    _rollout(agent, envs, 6)


def test_sliding_window_and_resets_past_the_context_length(model, tok):
    envs = _envs("CartPole-v1", 4)  # random play ends CartPole episodes within ~10-40 steps
    spec = TaskSpec.from_env(envs, expert_return=500.0, random_return=20.0)
    tok.add_task_spec(spec)
    agent = Agent(model, tok, "dt", temperature=1.0, context_length=64)
    agent.reset(spec, num_envs=4)
    finished = _rollout(agent, envs, 60)
    assert agent.refills > 5 and finished > 0  # 60 steps x 8 tokens is far past 64 tokens


def test_window_refill_equals_a_fresh_prefill(model, tok):
    """After the window slides, the next decision is the one a fresh agent with that context makes."""
    envs = _envs("Pendulum-v1", 2)
    spec = TaskSpec.from_env(envs, expert_return=0.0, random_return=-1200.0)
    tok.add_task_spec(spec)
    agent = Agent(model, tok, "gato", context_length=48, window_keep=0.5)
    agent.reset(spec, num_envs=2)
    obs, _ = envs.reset(seed=0)
    for _ in range(12):
        obs, rewards, terminated, truncated, _ = envs.step(agent.act(obs))
        agent.observe(rewards, terminated, truncated)
    assert agent.refills >= 1
    contexts = [agent._context(i, 10**6) for i in range(2)]  # everything the agent remembers
    kept = agent.state.attention_mask.sum(1).tolist()
    # the cache holds each row's last whole steps (plus the tail of the last step)
    for i, ctx in enumerate(contexts):
        assert kept[i] <= len(ctx["input_ids"]) + spec.action_size + 1


def test_next_step_autoreset_and_unbatched_use(model, tok):
    envs = _envs("CartPole-v1", 2, gym.vector.AutoresetMode.NEXT_STEP)
    spec = TaskSpec.from_env(envs, expert_return=500.0, random_return=20.0)
    tok.add_task_spec(spec)
    agent = Agent(model, tok, "dt", temperature=1.0, autoreset="next_step", context_length=128)
    agent.reset(spec, num_envs=2)
    assert _rollout(agent, envs, 50) > 0

    env = gym.make("Pendulum-v1")
    single = TaskSpec.from_env(env, expert_return=0.0, random_return=-1200.0)
    tok.add_task_spec(single)
    agent = Agent(model, tok, "dt", expert_returns=True)
    agent.reset(single, num_envs=None)
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        action = agent.act(obs)
        assert env.action_space.contains(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        agent.observe(reward, terminated, truncated)
