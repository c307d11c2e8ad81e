"""Control datasets: the task catalogue and the builder that collects, scales and documents them.

After collection, each task's spec gets the numbers the tokenizer and the evaluation need, all
measured on the collected episodes:

* ``expert_return`` / ``random_return``: mean episode return of the ``expert`` / ``random`` sources
  (the anchors of expert-normalised scores and the default Decision Transformer target);
* ``return_scale``: so that ``max(|expert|, |random|) * return_scale <= RETURN_TARGET`` — returns
  then fall where the mu-law bins are fine;
* ``reward_scale``: so that the largest ``|r| * reward_scale`` is about 1 (a sparse goal bonus,
  e.g. MountainCarContinuous' +100, must not be clipped; mu-law keeps small rewards resolved).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from datasets_build.base import BuildOptions, DatasetKind, prepare_folder
from datasets_build.collector import (
    DEFAULT_SOURCE_MIX,
    EXPERT,
    RANDOM,
    RETARGET_OPTION,
    CollectStats,
    ControlTask,
    collect_task,
    plan_episodes,
    split_episodes,
    task_spec,
)
from datasets_build.common import (
    TASK_SPECS,
    markdown_table,
    nice_scale,
    now_iso,
    package_versions,
    write_card,
    write_json_atomic,
)
from datasets_build.episodes import episode_features, load_shards
from datasets_build.experts.classic import (
    AcrobotEnergyPump,
    CartPoleLQR,
    MountainCarPump,
    PendulumSwingUp,
)
from datasets_build.wrappers import ExpertOnKey, PixelsAndState
from generalist.task_spec import TaskSpec

RETURN_TARGET = 10.0  # |typical return| * return_scale stays at or below this
REWARD_TARGET = 1.0  # the largest |per-step reward| * reward_scale is about this (never clipped)
RAW_PROBE_SECONDS = 1.0  # time spent measuring raw env.step speed per task, for the card
RAW_PROBE_MAX_STEPS = 5000
BUILD_CONFIG = "build_config.json"


# --- the task catalogue ---


def _classic(env_id: str, expert: Callable[[int], Any], notes: str) -> ControlTask:
    return ControlTask(env_id, partial(gym.make, env_id), expert, notes)


CORE_TASKS: tuple[ControlTask, ...] = (
    _classic("CartPole-v1", CartPoleLQR, "discrete-time LQR on the linearised cart-pole, bang-bang"),
    _classic("Acrobot-v1", AcrobotEnergyPump, "energy pumping: torque along the second joint's velocity"),
    _classic("MountainCar-v0", MountainCarPump, "energy pumping: push along the velocity"),
    _classic("MountainCarContinuous-v0", partial(MountainCarPump, continuous=True),
             "energy pumping: full throttle along the velocity"),
    _classic("Pendulum-v1", PendulumSwingUp, "energy-shaping swing-up, PD near upright"),
)


def _make_pixels(env_id: str) -> gym.Env:
    return PixelsAndState(gym.make(env_id, render_mode="rgb_array"))


def _on_state(expert_class: Callable[[int], Any], num_envs: int) -> ExpertOnKey:
    return ExpertOnKey(expert_class(num_envs), key="state")


PIXEL_TASKS: tuple[ControlTask, ...] = (
    ControlTask("Pendulum-v1-pixels", partial(_make_pixels, "Pendulum-v1"),
                partial(_on_state, PendulumSwingUp),
                "Pendulum-v1 with a 64x64 rendered frame next to the state; expert: swing-up + PD"),
    ControlTask("CartPole-v1-pixels", partial(_make_pixels, "CartPole-v1"), partial(_on_state, CartPoleLQR),
                "CartPole-v1 with a 64x64 rendered frame next to the state; expert: LQR"),
)

BABYAI_LEVELS = ("BabyAI-GoToRedBallGrey-v0", "BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0",
                 "BabyAI-OpenDoor-v0")
METAWORLD_TASKS = ("reach-v3", "push-v3", "drawer-open-v3", "button-press-topdown-v3")


class QuietReset(gym.Wrapper):
    """BabyAI's level generator prints every rejected layout ("Sampling rejected: ..."); keep
    the build log readable."""

    def reset(self, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()):
            return self.env.reset(**kwargs)


class CompactGrid(gym.ObservationWrapper):
    """MiniGrid's 7x7x3 grid (object, colour, state per cell) as a 7x7 grid of one id per cell.

    Why: each grid value is a token, so the raw grid makes a BabyAI step 168 tokens and a 512-token
    context holds 3 steps, too few for a level such as PickupLoc whose mission names objects by where
    they were at the start. One id per cell (``object + 11 * (colour + 6 * state)``, 198 values, the
    same information) makes a step 63-70 tokens.
    """

    def __init__(self, env: gym.Env):
        from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX

        super().__init__(env)
        self._sizes = (len(OBJECT_TO_IDX), len(COLOR_TO_IDX), len(STATE_TO_IDX))
        grid = env.observation_space["image"]
        self.observation_space = gym.spaces.Dict({
            **env.observation_space.spaces,
            "image": gym.spaces.Box(0, int(np.prod(self._sizes)) - 1, grid.shape[:2], np.uint8)})

    def observation(self, observation: dict) -> dict:
        grid = observation["image"].astype(np.int64)  # (7, 7, 3)
        objects, colours, _ = self._sizes
        cell = grid[..., 0] + objects * (grid[..., 1] + colours * grid[..., 2])  # (7, 7)
        return {**observation, "image": cell.astype(np.uint8)}


MISSION_VERBS = {"GoToInstr": "go to", "PickupInstr": "pick up", "OpenInstr": "open"}  # one-object instructions


def other_object(level: gym.Env, rng: np.random.Generator) -> Any | None:
    """A random object of a BabyAI level's target kind (a door for a door) whose colour and type no
    target has, or None when the room holds none. Raises for instructions that name several objects."""
    if (instrs := type(getattr(level, "instrs", None)).__name__) not in MISSION_VERBS:
        raise ValueError(f"needs a BabyAI level whose instruction names one object ({sorted(MISSION_VERBS)}); "
                         f"{level.spec.id if level.spec else level} has {instrs}")
    desc = level.instrs.desc
    targets = {(o.color, o.type) for o in desc.obj_set}
    kinds = ("door",) if desc.type == "door" else ("key", "ball", "box")
    others = [o for o in level.grid.grid if o is not None and o.type in kinds and (o.color, o.type) not in targets]
    return others[rng.integers(len(others))] if others else None


def instruction_for(level: gym.Env, obj: Any) -> Any:
    """The level's kind of instruction (go to / pick up / open) naming ``obj`` by colour and type; its
    ``surface(level)`` is the mission as BabyAI writes it ("the" for a unique match, "a" otherwise)."""
    from minigrid.envs.babyai.core.verifier import ObjDesc

    return type(level.instrs)(ObjDesc(obj.type, obj.color))


class RetargetMission(gym.Wrapper):
    """BabyAI whose reset, given ``options={RETARGET_OPTION: True}``, rewrites the level's *goal* to another
    object of the target's kind (``other_object``): the instruction, its verifier (so the reward follows) and
    the mission the agent reads. The layout is the one the seed made, so a ``twin`` episode
    (``collector.py``) and the expert episode of the same seed differ only in their mission and what the
    bot does about it. ``info["retargeted"]`` says whether it happened (a room without another object
    keeps its goal); its presence tells the collector that the env can retarget at all.
    """

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        options = dict(options or {})
        retarget = options.pop(RETARGET_OPTION, False)
        obs, info = self.env.reset(seed=seed, options=options)
        level = self.env.unwrapped
        other = other_object(level, level.np_random) if retarget else None
        if other is not None:
            level.instrs = instruction_for(level, other)
            level.instrs.reset_verifier(level)
            level.mission = level.instrs.surface(level)
            obs = level.gen_obs()
        return obs, {**info, "retargeted": other is not None}


def _make_babyai(env_id: str, render_mode: str | None = None) -> gym.Env:
    import minigrid  # noqa: F401 - registers the BabyAI-* env ids

    return CompactGrid(RetargetMission(QuietReset(gym.make(env_id, render_mode=render_mode))))


def _babyai_expert(num_envs: int):
    from datasets_build.experts.babyai import BabyAIExpert

    return BabyAIExpert(num_envs)


def babyai_tasks() -> tuple[ControlTask, ...]:
    return tuple(ControlTask(level, partial(_make_babyai, level), _babyai_expert,
                             "minigrid's BabyAIBot planner") for level in BABYAI_LEVELS)


def _make_metaworld(env_name: str) -> gym.Env:
    from datasets_build.experts.metaworld import make_metaworld_env

    return make_metaworld_env(env_name)


def _metaworld_expert(num_envs: int, env_name: str):
    from datasets_build.experts.metaworld import MetaWorldExpert

    return MetaWorldExpert(num_envs, env_name)


def metaworld_tasks() -> tuple[ControlTask, ...]:
    return tuple(ControlTask(f"metaworld/{name}", partial(_make_metaworld, name),
                             partial(_metaworld_expert, env_name=name),
                             f"metaworld.policies scripted policy for {name}, clipped to [-1, 1]")
                 for name in METAWORLD_TASKS)


def make_task_env(name: str, render_mode: str | None = None) -> gym.Env:
    """A fresh env of a task by its dataset name: the catalogue's factory (pixel variants, BabyAI,
    Meta-World), else ``gym.make(name)`` for any registered gymnasium id. ``render_mode`` (e.g.
    ``"rgb_array"``, for videos) reaches BabyAI and plain gymnasium ids; the others keep their own."""
    for task in PIXEL_TASKS:  # these render already: the frame is part of their observation
        if task.name == name:
            return task.make_env()
    if name in BABYAI_LEVELS:
        return _make_babyai(name, render_mode)  # the data's observation wrappers, rendering or not
    if name.startswith("metaworld/"):
        return _make_metaworld(name.removeprefix("metaworld/"))
    return gym.make(name, render_mode=render_mode)  # the core tasks are plain gymnasium ids too


# --- the builder ---


@dataclass
class ControlDatasetBuilder:
    """Collects mixed-quality episodes of several tasks into one dataset folder."""

    name: str
    tasks: Callable[[], Sequence[ControlTask]]
    description: str
    default_episodes: int
    source_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SOURCE_MIX))
    kind: DatasetKind = "control"
    expert_actions: bool = True  # record the expert's action next to the taken one (DART labels)
    sources_note: str = ("`noisy-e`: epsilon-random actions with probability e (discrete) or gaussian noise of "
                         "std e x half the action range, clipped (continuous).")

    def episode_counts(self, options: BuildOptions) -> dict[str, int]:
        """Episodes per source, for every task."""
        return split_episodes(options.episodes or self.default_episodes, self.source_mix)

    def reference_returns(self, task: ControlTask, sources: np.ndarray, returns: np.ndarray) -> tuple[float, float]:
        """(expert, random) return of a task: the means of its ``expert`` and ``random`` episodes."""
        return float(returns[sources == EXPERT].mean()), float(returns[sources == RANDOM].mean())

    def build(self, root: Path, options: BuildOptions) -> Path:
        folder, done = prepare_folder(root, self.name, options)
        if done:
            return folder
        start = time.perf_counter()
        counts = self.episode_counts(options)
        tasks = list(self.tasks())
        self._check_config(folder, tasks, counts, options)

        specs = {task.name: task_spec(task) for task in tasks}
        features = episode_features(list(specs.values()), expert_actions=self.expert_actions)
        stats: dict[str, CollectStats] = {}
        for task in tasks:
            specs[task.name], stats[task.name] = collect_task(
                task, folder, counts, seed=options.seed, num_envs=options.num_envs,
                episodes_per_shard=options.episodes_per_shard, max_shards=options.max_shards,
                progress=options.progress, features=features)
        planned = [p for t in tasks for p in plan_episodes(t.name, counts, options.episodes_per_shard)]
        if not all((folder / p).exists() for p in planned):
            return folder  # interrupted on purpose (max_shards); a later build resumes
        self._finish(folder, tasks, specs, stats, options, time.perf_counter() - start)
        return folder

    def _check_config(self, folder: Path, tasks: list[ControlTask], counts: dict[str, int],
                      options: BuildOptions) -> None:
        """Refuse to resume a folder that was started with different episode settings."""
        config = {"tasks": [t.name for t in tasks], "episodes_per_source": counts,
                  "episodes_per_shard": options.episodes_per_shard, "seed": options.seed}
        path = folder / BUILD_CONFIG
        if path.exists():
            previous = json.loads(path.read_text())
            if previous != config:
                raise ValueError(f"{folder} was started with {previous}, not {config}; "
                                 "rebuild with --overwrite or choose another --out")
        else:
            write_json_atomic(path, config)

    def _finish(self, folder: Path, tasks: list[ControlTask], specs: dict[str, TaskSpec],
                stats: dict[str, CollectStats], options: BuildOptions, seconds: float) -> None:
        dataset = load_shards(folder)
        columns = dataset.select_columns(["task", "source", "rewards", "episode_return"]).with_format("numpy")
        all_tasks = np.asarray(columns["task"]).astype(str)
        all_sources = np.asarray(columns["source"]).astype(str)
        all_returns = np.asarray(columns["episode_return"], dtype=np.float64)
        all_rewards = columns["rewards"]
        table: list[list[Any]] = []
        for task in tasks:
            mine = all_tasks == task.name
            sources, returns = all_sources[mine], all_returns[mine]
            rewards = np.concatenate([np.asarray(all_rewards[i], dtype=np.float64) for i in np.flatnonzero(mine)])
            expert_return, random_return = self.reference_returns(task, sources, returns)
            specs[task.name] = replace(
                specs[task.name],
                expert_return=expert_return,
                random_return=random_return,
                return_scale=nice_scale(RETURN_TARGET, max(abs(expert_return), abs(random_return))),
                reward_scale=nice_scale(REWARD_TARGET, float(np.abs(rewards).max())),
            )
            raw = raw_steps_per_second(task)
            s = stats[task.name]
            table.append([task.name, len(returns), len(rewards), expert_return, random_return,
                          float(returns.min()), float(returns.max()), float(returns.mean()),
                          specs[task.name].return_scale, specs[task.name].reward_scale, raw,
                          s.steps_per_second if s.steps else "resumed"])
        write_json_atomic(folder / TASK_SPECS, {name: spec.to_dict() for name, spec in specs.items()})

        per_source = {source: int((all_sources == source).sum()) for source in dict.fromkeys(all_sources)}
        record = {
            "name": self.name,
            "builder": f"{type(self).__module__}.{type(self).__qualname__}({self.name!r})",
            "command": options.command,
            "seed": options.seed,
            "build_date": now_iso(),
            "build_time_s": round(seconds, 2),
            "episodes": len(dataset),
            "steps": int(sum(row[2] for row in table)),
            "episodes_per_source": per_source,
            "num_envs": options.num_envs,
            "tasks": {row[0]: {"episodes": row[1], "steps": row[2], "expert_return": row[3],
                               "random_return": row[4], "min_return": row[5], "max_return": row[6],
                               "mean_return": row[7], "return_scale": row[8], "reward_scale": row[9],
                               "raw_env_steps_per_s": row[10], "collector_steps_per_s": row[11]}
                      for row in table},
            "versions": package_versions(),
        }
        header = ["task", "episodes", "steps", "expert return", "random return", "min", "max", "mean",
                  "return_scale", "reward_scale", "raw env steps/s (1 env)",
                  f"collector steps/s ({options.num_envs} envs)"]
        experts = "\n".join(f"- **{t.name}**: {t.notes}" for t in tasks)
        sources = ", ".join(f"`{s}` ({n} episodes)" for s, n in per_source.items())
        write_card(folder, f"{self.name}", self.description, record, {
            "Tasks and returns": markdown_table(header, table),
            "Experts": experts,
            "Sources": f"{sources}. {self.sources_note}",
            "Format": "One row per episode; see `datasets_build/episodes.py`. Load with "
                      "`datasets_build.load_episodes(folder)` and `iter_episodes`.",
        })


def raw_steps_per_second(task: ControlTask) -> float:
    """Speed of bare ``env.step`` with random actions on one env (the collector's upper bound)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = task.make_env()
        env.reset(seed=0)
        env.action_space.seed(0)
        steps, start = 0, time.perf_counter()
        while steps < RAW_PROBE_MAX_STEPS and time.perf_counter() - start < RAW_PROBE_SECONDS:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            steps += 1
            if terminated or truncated:
                env.reset()
        elapsed = time.perf_counter() - start
        env.close()
    return steps / elapsed
