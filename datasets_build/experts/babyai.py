"""BabyAI expert: minigrid's own planner, ``minigrid.utils.baby_ai_bot.BabyAIBot``.

The bot keeps a plan (a stack of subgoals) per episode. It is told which action was really taken
(``replan(action_taken)``), so it re-plans after the noisy sources' random actions. A few such
off-plan actions (e.g. dropping an object where the bot cannot model it) make the bot raise; the
episode then continues with a fresh bot, which re-explores from the current state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from minigrid.utils.baby_ai_bot import BabyAIBot

if TYPE_CHECKING:
    from datasets_build.collector import EpisodeKey


class BabyAIExpert:
    def __init__(self, num_envs: int):
        self.bots: list[BabyAIBot | None] = [None] * num_envs
        self.envs: list[gym.Env | None] = [None] * num_envs
        self.taken: list[Any] = [None] * num_envs

    def begin(self, slot: int, env: gym.Env, key: EpisodeKey, seed: int) -> None:
        self.envs[slot] = env
        self.bots[slot] = BabyAIBot(env)
        self.taken[slot] = None

    def observe(self, slot: int, action: Any) -> None:
        self.taken[slot] = int(action)

    def act(self, observations: Any, envs: Sequence[gym.Env]) -> list[Any]:
        return [self._act(slot) for slot in range(len(self.bots))]

    def _act(self, slot: int) -> np.int64:
        bot = self.bots[slot]
        if bot is None:  # idle slot
            return np.int64(0)
        try:
            return np.int64(bot.replan(self.taken[slot]))
        except Exception:  # noqa: BLE001 - the bot's planner raises plain exceptions off its plan
            self.bots[slot] = BabyAIBot(self.envs[slot])
            return np.int64(self.bots[slot].replan())
