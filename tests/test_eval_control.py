"""eval.control: an env that raises ends only its own episode; scores and IQM."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from eval.control import ErrorAsTermination, iqm, mean_stderr, normalised, rollout
from generalist import GeneralistConfig, GeneralistForCausalLM, TaskSpec
from generalist.agent import Agent
from tests.conftest import TINY_LLAMA


class Flaky(gym.Env):
    """Reward 1 per step, episodes of 5 steps; raises on its 3rd step when ``broken``."""

    observation_space = spaces.Box(-1, 1, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, broken: bool):
        self.broken, self.t = broken, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        if self.broken and self.t == 3:
            raise RuntimeError("simulator exploded")
        return np.zeros(2, np.float32), 1.0, self.t >= 5, False, {}


def test_an_env_error_ends_only_its_episode(tok):
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=TINY_LLAMA))
    envs = gym.vector.SyncVectorEnv([lambda: ErrorAsTermination(Flaky(True)), lambda: ErrorAsTermination(Flaky(False))],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    spec = TaskSpec.from_env(envs, name="flaky", expert_return=5.0, random_return=0.0)
    tok.add_task_spec(spec)
    episodes = rollout(Agent(model, tok, "dt"), envs, spec, episodes=4, seed=0)
    errors = [e for e in episodes if e["error"]]
    good = [e for e in episodes if not e["error"]]
    assert errors and all("simulator exploded" in e["error"] for e in errors)
    assert good and all(e["return"] == 5.0 and e["length"] == 5 for e in good)


def test_scores():
    spec = TaskSpec.from_spaces("s", spaces.Box(-1, 1, (1,)), spaces.Discrete(2), expert_return=10.0, random_return=2.0)
    assert normalised(spec, [2.0, 10.0, 6.0]) == [0.0, 1.0, 0.5]
    assert mean_stderr([1.0, 3.0]) == (2.0, 1.0)
    assert iqm([0, 1, 2, 3, 4, 5, 6, 100]) == pytest.approx(3.5)
