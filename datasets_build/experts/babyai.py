"""BabyAI expert: minigrid's own planner, ``minigrid.utils.baby_ai_bot.BabyAIBot``.

The bot keeps a plan (a stack of subgoals) per episode. It is told which action was really taken
(``replan(action_taken)``), so it re-plans after the noisy sources' random actions. A few such
off-plan actions (e.g. dropping an object where the bot cannot model it) make the bot raise; the
episode then continues with a fresh bot, which re-explores from the current state.

Detours (``detour-<p>`` sources, ``collector.py``): a second bot walks up to a *distractor* — an
object the mission does not name — and faces it; half the detours then pick it up. The mission's bot
keeps labelling every step (DART), so the data holds what a policy that only saw the expert's own
states never learns: facing the wrong object, the expert turns away; holding it, the expert drops it.
Why: a model trained on the bot's short PickupLoc episodes (6 steps, almost every ``pickup`` label
given facing the target) learned "pick up what is in front" and picked up a wrong object in 45 of 48
failed episodes (docs/control.md, BabyAI).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from minigrid.utils.baby_ai_bot import BabyAIBot, GoNextToSubgoal

if TYPE_CHECKING:
    from datasets_build.collector import EpisodeKey


class BabyAIExpert:
    def __init__(self, num_envs: int):
        self.bots: list[BabyAIBot | None] = [None] * num_envs
        self.envs: list[gym.Env | None] = [None] * num_envs
        self.taken: list[Any] = [None] * num_envs
        self.detours: list[tuple[BabyAIBot, bool] | None] = [None] * num_envs  # (bot, pick it up at the end)

    def begin(self, slot: int, env: gym.Env, key: EpisodeKey, seed: int) -> None:
        self.envs[slot] = env
        self.bots[slot] = BabyAIBot(env)
        self.taken[slot] = None
        self.detours[slot] = None

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

    def detour(self, slot: int, rng: np.random.Generator, start: bool) -> np.int64 | None:
        """The next action of a walk up to a random distractor (None: there is none, or it is reached)."""
        env = self.envs[slot].unwrapped
        if start:
            self.detours[slot] = None
            named = {id(obj) for obj in getattr(getattr(env.instrs, "desc", None), "obj_set", ())}
            distractors = [obj for obj in env.grid.grid
                           if obj is not None and obj.type in ("key", "ball", "box", "door")
                           and id(obj) not in named and obj is not env.carrying]
            if not distractors or self.bots[slot] is None:
                return None
            bot = BabyAIBot(self.envs[slot])
            bot.vis_mask = self.bots[slot].vis_mask.copy()  # what the mission's bot has seen so far
            bot.stack = [GoNextToSubgoal(bot, distractors[rng.integers(len(distractors))])]
            self.detours[slot] = (bot, bool(rng.random() < 0.5))
        if self.detours[slot] is None:
            return None
        bot, pick_up = self.detours[slot]
        try:
            action = bot.replan(None if start else self.taken[slot])
        except Exception:  # noqa: BLE001 - as in _act: the planner raises plain exceptions
            action = env.actions.done
        if action != env.actions.done and bot.stack:
            return np.int64(action)
        self.detours[slot] = None  # reached: facing the distractor
        front = env.grid.get(*env.front_pos)
        if pick_up and env.carrying is None and front is not None and front.can_pickup():
            return np.int64(env.actions.pickup)
        return None
