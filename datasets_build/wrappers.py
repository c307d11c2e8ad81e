"""Observation wrappers that put rendered frames next to the state, so images meet control."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image

from generalist.vocab import DEFAULT_IMAGE_SIZE

if TYPE_CHECKING:
    from datasets_build.collector import EpisodeKey


def offscreen_rendering() -> None:
    """Use SDL's offscreen drivers unless the user chose others; call before an env first renders.

    gymnasium's classic-control renderer starts pygame (SDL); headless, SDL complains about the
    missing display and sound on stderr in every worker. Offscreen drivers render the same frames
    quietly. Called by whoever renders rather than at import, so importing this module changes nothing.
    """
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")


def resize_frame(frame: np.ndarray, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """An (H, W, 3) uint8 frame -> (size, size, 3) uint8; area filter keeps thin poles visible."""
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


class PixelsAndState(gym.ObservationWrapper):
    """``obs -> {"image": rendered frame (size, size, 3) uint8, "state": obs}``.

    The env must be made with ``render_mode="rgb_array"``. The image is a ``Box(0, 255, uint8)`` of
    shape (H, W, 3) with H, W >= 16, which ``TaskSpec`` treats as an image field, so one episode
    holds image patches and continuous values in the same token sequence.
    """

    def __init__(self, env: gym.Env, size: int = DEFAULT_IMAGE_SIZE):
        super().__init__(env)
        if env.render_mode != "rgb_array":
            raise ValueError(f"PixelsAndState needs render_mode='rgb_array', got {env.render_mode!r}")
        offscreen_rendering()
        self.size = size
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, (size, size, 3), np.uint8),
            "state": env.observation_space,
        })

    def observation(self, observation):
        return {"image": resize_frame(self.env.render(), self.size), "state": observation}


class ExpertOnKey:
    """Run a state-based expert on one key of a Dict observation (e.g. ``"state"`` of
    :class:`PixelsAndState`), so the pixel variant of a task gets the same expert."""

    def __init__(self, expert: Any, key: str = "state"):
        self.expert, self.key = expert, key

    def begin(self, slot: int, env: gym.Env, key: EpisodeKey, seed: int) -> None:
        self.expert.begin(slot, env, key, seed)

    def observe(self, slot: int, action: Any) -> None:
        self.expert.observe(slot, action)

    def act(self, observations: dict[str, Any], envs: Sequence[gym.Env]) -> list[Any]:
        return self.expert.act(observations[self.key], envs)
