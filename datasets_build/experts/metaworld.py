"""Meta-World v3 experts: the scripted policies that metaworld ships (``metaworld.policies``).

Two things are made explicit here so the data is reproducible and valid:

* Task (goal / object placement) choice. Meta-World's ``RandomTaskSelectWrapper`` draws the task
  from the env's generator *before* ``reset(seed)`` reseeds it, so the task of an episode would
  depend on the env's history. :class:`SeededTaskSelect` turns that off and picks the task from
  the reset seed instead.
* Action bounds. Some scripted policies exceed [-1, 1] (metaworld warns so); actions are clipped to
  the action space, as the env would do.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from datasets_build.collector import StatelessExpert


def policy_class_name(env_name: str) -> str:
    """``"button-press-topdown-v3"`` -> ``"SawyerButtonPressTopdownV3Policy"``."""
    words = env_name.removesuffix("-v3").replace("-", " ").title().replace(" ", "")
    return f"Sawyer{words}V3Policy"


class SeededTaskSelect(gym.Wrapper):
    """Choose the Meta-World task (one of its 50 goal/object placements) from the reset seed."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        env.get_wrapper_attr("toggle_sample_tasks_on_reset")(False)
        self.tasks = env.get_wrapper_attr("tasks")

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            index = np.random.default_rng(seed).integers(len(self.tasks))
            self.env.unwrapped.set_task(self.tasks[index])
        return self.env.reset(seed=seed, options=options)


def make_metaworld_env(env_name: str) -> gym.Env:
    import metaworld  # noqa: F401 - registers the Meta-World/* env ids

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make("Meta-World/MT1", env_name=env_name, seed=0, disable_env_checker=True)
    return SeededTaskSelect(env)


class MetaWorldExpert(StatelessExpert):
    def __init__(self, num_envs: int, env_name: str):
        import metaworld.policies

        self.policy = getattr(metaworld.policies, policy_class_name(env_name))()

    def act(self, observations: np.ndarray, envs: Sequence[gym.Env]) -> list[Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Constant(s) may be too high": we clip below
            actions = [self.policy.get_action(o) for o in np.asarray(observations)]
        return [np.clip(a, -1.0, 1.0).astype(np.float32) for a in actions]
