"""MuJoCo locomotion policies trained here with SAC (``train_locomotion.py``), run without the RL library.

The committed weights (``locomotion/<task>/{expert,medium}.safetensors``) are sbx's
SquashedGaussianActor: ReLU MLP layers ``Dense_0 .. Dense_{n-3}``, then ``Dense_{n-2}`` the Gaussian's
mean and ``Dense_{n-1}`` its log-std (clipped to [-20, 2]); the action is ``tanh`` of a sample,
rescaled to the action space. A few lines of NumPy, so rebuilding the datasets needs neither JAX
nor sbx.

Which policy an episode runs is its source: ``expert`` or ``policy-medium``. Actions are *sampled*
from the policy, as D4RL collected its data with the trained stochastic SAC policies, from a
generator seeded by the episode seed. Each slot's action is computed on its own (a 1-row product):
a float32 matrix product's last bits depend on the batch size, and MuJoCo amplifies them, so
batching slots would make an episode depend on which episodes ran beside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from safetensors.numpy import load_file

from datasets_build.collector import EXPERT, POLICY_PREFIX

if TYPE_CHECKING:
    from datasets_build.collector import EpisodeKey

WEIGHTS_DIR = Path(__file__).parent / "locomotion"
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # sbx SquashedGaussianActor
MEDIUM = "medium"
MEDIUM_REPLAY_FILE = "medium_replay.npz"  # the real replay buffer up to the medium snapshot (D4RL arrays)


class SACActor:
    """One squashed-Gaussian policy from its safetensors weights."""

    def __init__(self, path: Path):
        arrays = load_file(str(path))
        layers = sorted({key.split(".")[0] for key in arrays}, key=lambda name: int(name.split("_")[1]))
        weights = [(arrays[f"{name}.kernel"].astype(np.float32), arrays[f"{name}.bias"].astype(np.float32))
                   for name in layers]
        self.hidden, (self.mean_w, self.mean_b), (self.log_std_w, self.log_std_b) = weights[:-2], *weights[-2:]
        self.action_dim = self.mean_b.shape[0]

    def __call__(self, observations: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Actions in [-1, 1] for a batch of observations (B, obs_dim): ``tanh(mean + std * noise)``,
        the mode when ``noise`` is None."""
        x = np.asarray(observations, dtype=np.float32)
        for kernel, bias in self.hidden:
            x = np.maximum(x @ kernel + bias, 0.0)
        mean = x @ self.mean_w + self.mean_b  # (B, act_dim)
        if noise is None:
            return np.tanh(mean)
        log_std = np.clip(x @ self.log_std_w + self.log_std_b, LOG_STD_MIN, LOG_STD_MAX)
        return np.tanh(mean + np.exp(log_std) * noise)


def play(env: gym.Env, policy: Callable[[np.ndarray], np.ndarray], seed: int) -> float:
    """Return of one episode of ``policy`` (observation -> action) from ``env.reset(seed=seed)``."""
    obs, _ = env.reset(seed=seed)
    done, total = False, 0.0
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total, done = total + float(reward), terminated or truncated
    return total


@cache
def training_record(task: str) -> dict[str, Any]:
    """``training.json`` of a task's committed policies (command, curve, chosen steps, returns)."""
    path = WEIGHTS_DIR / task / "training.json"
    if not path.exists():
        raise FileNotFoundError(f"no trained policies for {task!r} in {WEIGHTS_DIR} (train them with "
                                f"`python -m datasets_build.experts.train_locomotion --task {task}`)")
    return json.loads(path.read_text())


def policy_path(task: str, name: str) -> Path:
    """The weights of policy ``name`` (``expert``, ``medium``) of ``task``."""
    path = WEIGHTS_DIR / task / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{task}: no policy {name!r} ({path} is missing)")
    return path


class SACPolicies:
    """The collector's expert for a locomotion task: each slot runs the policy its episode's source names."""

    def __init__(self, num_envs: int, task: str, action_space: gym.spaces.Box):
        self.task, self.low, self.high = task, action_space.low, action_space.high
        self.actors: dict[str, SACActor] = {}
        self.slot_policy: list[str | None] = [None] * num_envs
        self.slot_rng: list[np.random.Generator | None] = [None] * num_envs

    def begin(self, slot: int, env: gym.Env, key: EpisodeKey, seed: int) -> None:
        # `policy-<name>` sources run that policy; every other source (noisy, random) starts from the expert's
        name = key.source.removeprefix(POLICY_PREFIX) if key.source.startswith(POLICY_PREFIX) else EXPERT
        if name not in self.actors:
            self.actors[name] = SACActor(policy_path(self.task, name))
        self.slot_policy[slot] = name
        self.slot_rng[slot] = np.random.default_rng([seed, 1])  # the env uses `seed` itself

    def observe(self, slot: int, action: Any) -> None:
        return None

    def act(self, observations: np.ndarray, envs: Sequence[gym.Env]) -> list[np.ndarray]:
        actions = []
        for i, name in enumerate(self.slot_policy):
            if name is None:
                actions.append(np.zeros(len(self.low), dtype=np.float32))
                continue
            noise = self.slot_rng[i].standard_normal((1, len(self.low)))
            unit = self.actors[name](observations[i: i + 1], noise)[0]  # one row: see the module docstring
            actions.append((self.low + (unit + 1.0) * 0.5 * (self.high - self.low)).astype(np.float32))
        return actions
