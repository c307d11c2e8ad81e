"""Vectorised, resumable collection of whole episodes with experts, noisy experts and random play.

Mixed quality on purpose: a Decision Transformer learns what a return means only if it sees low,
middling and high returns, so every task gets episodes from several *sources*::

    expert        the task's expert policy
    noisy-<eps>   the expert with noise: epsilon-random actions (discrete leaves) or gaussian
                  noise of std eps * half the action range, clipped (continuous leaves)
    burst-<p>     the expert, interrupted by bursts: at each step outside a burst one starts with
                  probability p and holds one random action for ``BURST_STEPS`` steps
    lag-<k>       the expert acting on the observation of k steps before (a late sensor): a
                  consistent, deterministic, worse policy (stateless experts only)
    detour-<p>    the expert, interrupted by detours: at each step outside one, one starts with
                  probability p and the expert's own ``detour`` policy acts for up to ``BURST_STEPS``
                  steps (experts that have one only: BabyAI's goes to face a distractor object)
    twin          the expert in the layout of the expert episode with the same shard and index (its
                  reset seed), the goal rewritten at reset to another one (envs that can: BabyAI's
                  ``RetargetMission`` names another object of the room)
    random        uniformly random actions
    policy-<name> one of the expert's own policies, by name (a checkpoint of a trained agent, e.g.
                  ``policy-medium``; ``experts/mujoco.py``)

Why bursts as well as per-step noise: white noise averages out within a few steps, so the noisy
experts stay close to the expert's own states, while a cloned policy's errors are consistent over
many steps and carry it far away (a Pendulum pumped past the upright energy, spinning). A held
random action reaches such states, and the expert's action recorded there (DART labels,
``episodes.py``) is the recovery a policy needs to learn. And why lagged experts: noise around the
expert averages out in behaviour cloning too (the most frequent action in a state stays the
expert's), so data of noisy experts does not show what return conditioning adds; a late expert is
wrong the same way every time, as the early policies of a replay buffer are (D4RL's medium-replay).
And why detours: a random action rarely leads anywhere a cloned policy will be; a detour is a
*plausible* mistake (walking up to the wrong object), and the expert's labels there say what to do
instead (turn away, drop it), which a policy that only saw the expert's own states never learns.
And why twins: a BabyAI level's success does not need its mission (a policy that visits objects until
the episode ends on the right one succeeds too), so the mission's weight in the loss is small; pairs of
episodes that differ only in the mission make ignoring it cost loss. (Measured, docs/control.md "BabyAI": a quarter
of twins in the ``babyai`` mix did not help and cost greedy OpenDoor, so the default mix has none; the
source stays for experiments.)

Sharding and resumption. The episodes of one (task, source) are split into shards of
``episodes_per_shard``; a shard is written atomically (tmp folder + ``os.replace``) as soon as its
last episode ends. Every episode is identified by (task, source, shard, index) and its reset seed
and noise generator are derived from those and the build seed only, so an interrupted build
resumed later collects exactly the missing shards and produces the same episodes — no
duplicates, no gaps — however many envs run in parallel.

Vectorisation. One ``gymnasium.vector.SyncVectorEnv`` per task with autoreset disabled: whenever
a slot finishes an episode, the collector resets just that slot (``reset_mask``) with the next
episode's seed. Slots carry episodes of different sources at the same time, so a shard's envs
never idle waiting for one slow policy.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial, singledispatch
from pathlib import Path
from typing import Any, Protocol

import datasets
import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.vector.utils import concatenate, create_empty_array, iterate
from tqdm.auto import tqdm

from datasets_build.common import derive_seed, quiet_datasets
from datasets_build.episodes import EXPERT_PREFIX, SHARDS_DIR, episode_features, episode_return, stack_leaf
from generalist.integrity import atomic_folder, clean_staging
from generalist.task_spec import TaskSpec

EXPERT = "expert"
RANDOM = "random"
NOISY_PREFIX = "noisy-"
BURST_PREFIX = "burst-"
BURST_STEPS = 10  # steps a burst holds its random action (0.5 s of Pendulum, 0.2 s of CartPole)
LAG_PREFIX = "lag-"
DETOUR_PREFIX = "detour-"
POLICY_PREFIX = "policy-"
TWIN = "twin"
RETARGET_OPTION = "retarget"  # reset option of envs that can rewrite their goal (twin sources)
# default share of each source in a task's episodes: mostly expert data, a spread of noise levels
# (epsilon for discrete actions / std as a fraction of the half range for continuous ones) and
# random play, so that returns span the whole range from random to expert.
DEFAULT_SOURCE_MIX: dict[str, float] = {
    EXPERT: 0.35,
    f"{NOISY_PREFIX}0.1": 0.15,
    f"{NOISY_PREFIX}0.3": 0.15,
    f"{NOISY_PREFIX}0.6": 0.1,
    f"{BURST_PREFIX}0.05": 0.15,
    RANDOM: 0.1,
}
DEFAULT_EPISODES_PER_SHARD = 16


class Expert(Protocol):
    """A policy over a batch of env slots.

    ``act`` returns one action per slot for the batched observation. Stateful experts (planners such
    as the BabyAI bot, stochastic policies) learn about a new episode through ``begin`` (its key, so
    its source, and its seed) and about the action that was really taken (the expert's or a noisy
    replacement) through ``observe``. An expert that can also act plausibly but wrongly, for
    ``detour-<p>`` sources, has ``detour(slot, rng, start) -> action | None``: the detour's next action
    (``start``: a new one begins), or None when it is over or impossible (the expert acts then).
    """

    def begin(self, slot: int, env: gym.Env, key: EpisodeKey, seed: int) -> None: ...

    def act(self, observations: Any, envs: Sequence[gym.Env]) -> list[Any]: ...

    def observe(self, slot: int, action: Any) -> None: ...


class StatelessExpert:
    """Base class of experts that only look at the current observation."""

    def begin(self, slot: int, env: gym.Env, key: EpisodeKey, seed: int) -> None:
        return None

    def observe(self, slot: int, action: Any) -> None:
        return None

    def act(self, observations: Any, envs: Sequence[gym.Env]) -> list[Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class ControlTask:
    """A task to collect: how to make one env and its expert.

    Attributes:
        name: task name stored in the dataset and the TaskSpec (env id by default).
        make_env: builds one (non-vectorised) env; it must carry its own time limit.
        make_expert: builds the expert for ``num_envs`` slots.
        notes: what the expert is, for the dataset card.
    """

    name: str
    make_env: Callable[[], gym.Env]
    make_expert: Callable[[int], Expert]
    notes: str = ""


@dataclass(frozen=True)
class EpisodeKey:
    task: str
    source: str
    shard: int
    index: int

    def seed(self, build_seed: int) -> int:
        """The reset seed: a twin shares its expert episode's (same layout), every other source has its own."""
        source = EXPERT if self.source == TWIN else self.source
        return derive_seed(build_seed, self.task, source, self.shard, self.index)


def source_noise(source: str) -> float | None:
    """Noise level of a source name: 0 for the expert (and its named policies), None for random, eps / p
    for ``noisy-eps`` / ``burst-p`` / ``detour-p``."""
    if source in (EXPERT, TWIN) or (source.startswith(POLICY_PREFIX) and len(source) > len(POLICY_PREFIX)):
        return 0.0
    if source == RANDOM:
        return None
    if source_lag(source):
        return 0.0
    for prefix in (NOISY_PREFIX, BURST_PREFIX, DETOUR_PREFIX):
        if source.startswith(prefix):
            level = float(source.removeprefix(prefix))
            if not 0.0 < level <= 1.0:
                raise ValueError(f"noise level of source {source!r} must be in (0, 1]")
            return level
    raise ValueError(f"unknown source {source!r}; use {EXPERT!r}, {RANDOM!r}, {TWIN!r}, '{NOISY_PREFIX}<level>', "
                     f"'{BURST_PREFIX}<probability>', '{DETOUR_PREFIX}<probability>', '{LAG_PREFIX}<steps>' or "
                     f"'{POLICY_PREFIX}<name>'")


def source_lag(source: str) -> int:
    """Steps of delay of a ``lag-<k>`` source's observations (0 for every other source)."""
    if not source.startswith(LAG_PREFIX):
        return 0
    lag = source.removeprefix(LAG_PREFIX)
    if not lag.isdigit() or int(lag) < 1:
        raise ValueError(f"delay of source {source!r} must be a whole number of steps >= 1")
    return int(lag)


def split_episodes(total: int, mix: dict[str, float]) -> dict[str, int]:
    """Split ``total`` episodes over sources by weight (largest remainders; every source >= 1)."""
    weights = np.array(list(mix.values()), dtype=np.float64)
    exact = total * weights / weights.sum()
    counts = np.maximum(np.floor(exact).astype(int), 1)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    for i in order[: max(0, total - int(counts.sum()))]:
        counts[i] += 1
    return dict(zip(mix, map(int, counts), strict=True))


# --- actions of the random and noisy sources, one registered function per action space type ---


@singledispatch
def random_action(space: spaces.Space, rng: np.random.Generator) -> Any:
    raise NotImplementedError(f"no random action for action space {space!r}")


@random_action.register(spaces.Discrete)
def _(space: spaces.Discrete, rng: np.random.Generator) -> np.int64:
    return np.int64(space.start + rng.integers(space.n))


@random_action.register(spaces.MultiDiscrete)
def _(space: spaces.MultiDiscrete, rng: np.random.Generator) -> np.ndarray:
    return (space.start + rng.integers(space.nvec)).astype(space.dtype)


@random_action.register(spaces.Box)
def _(space: spaces.Box, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(space.low, space.high).astype(space.dtype)


@random_action.register(spaces.Dict)
def _(space: spaces.Dict, rng: np.random.Generator) -> dict:
    return {k: random_action(s, rng) for k, s in space.spaces.items()}


@singledispatch
def noisy_action(space: spaces.Space, action: Any, level: float, rng: np.random.Generator) -> Any:
    raise NotImplementedError(f"no noisy action for action space {space!r}")


@noisy_action.register(spaces.Discrete)
@noisy_action.register(spaces.MultiDiscrete)
def _(space, action, level: float, rng: np.random.Generator):
    return random_action(space, rng) if rng.random() < level else action


@noisy_action.register(spaces.Box)
def _(space: spaces.Box, action, level: float, rng: np.random.Generator) -> np.ndarray:
    half_range = (space.high - space.low) / 2.0
    noisy = np.asarray(action, dtype=np.float64) + rng.normal(0.0, 1.0, space.shape) * level * half_range
    return np.clip(noisy, space.low, space.high).astype(space.dtype)


@noisy_action.register(spaces.Dict)
def _(space: spaces.Dict, action, level: float, rng: np.random.Generator) -> dict:
    return {k: noisy_action(s, action[k], level, rng) for k, s in space.spaces.items()}


def source_action(space: spaces.Space, expert_action: Any, episode: _Episode,
                  detour: Callable[[np.random.Generator, bool], Any | None] | None = None) -> Any:
    """The action an episode's source takes, given the expert's (bursts and detours keep their state in
    the episode; ``detour`` is the expert's detour policy for this slot)."""
    source, rng = episode.key.source, episode.rng
    level = source_noise(source)
    if level is None:
        return random_action(space, rng)
    if level == 0.0:
        return expert_action
    if source.startswith(DETOUR_PREFIX):
        if detour is None:
            raise ValueError(f"{episode.key.task}: source {source!r} needs an expert with a `detour` policy")
        start = episode.burst_left == 0 and rng.random() < level
        if start or episode.burst_left > 0:
            action = detour(rng, start)
            episode.burst_left = 0 if action is None else (BURST_STEPS if start else episode.burst_left) - 1
            if action is not None:
                return action
        return expert_action
    if source.startswith(BURST_PREFIX):
        if episode.burst_left == 0 and rng.random() < level:
            episode.burst_left, episode.burst_action = BURST_STEPS, random_action(space, rng)
        if episode.burst_left > 0:
            episode.burst_left -= 1
            return episode.burst_action
        return expert_action
    return noisy_action(space, expert_action, level, rng)


# --- collection ---


@dataclass
class _Episode:
    key: EpisodeKey
    seed: int
    rng: np.random.Generator
    leaves: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    rewards: list[float] = field(default_factory=list)
    burst_left: int = 0  # steps the current burst / detour may still last (burst-<p>, detour-<p> sources)
    burst_action: Any = None
    seen: deque = field(default_factory=deque)  # the last k + 1 observations (lag-<k> sources)


@dataclass
class CollectStats:
    episodes: int = 0
    steps: int = 0
    seconds: float = 0.0
    shards_written: int = 0
    shards_skipped: int = 0

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("nan")


def shard_path(folder: Path, key: EpisodeKey) -> Path:
    return folder / SHARDS_DIR / key.task.replace("/", "_") / f"{key.source}-{key.shard:05d}"


def plan_episodes(task: str, counts: dict[str, int], episodes_per_shard: int) -> dict[Path, list[EpisodeKey]]:
    """Every episode of a task, grouped by shard folder (relative to the dataset folder)."""
    plan: dict[Path, list[EpisodeKey]] = {}
    for source, count in counts.items():
        source_noise(source)  # validates the name early
        for shard in range(-(-count // episodes_per_shard)):
            n = min(episodes_per_shard, count - shard * episodes_per_shard)
            keys = [EpisodeKey(task, source, shard, i) for i in range(n)]
            plan[shard_path(Path(), keys[0])] = keys
    return plan


def make_vector_env(task: ControlTask, num_envs: int) -> SyncVectorEnv:
    return SyncVectorEnv([task.make_env for _ in range(num_envs)], autoreset_mode=AutoresetMode.DISABLED)


def task_spec(task: ControlTask) -> TaskSpec:
    """The spec of a task, from one throwaway env (scales are filled in after collection)."""
    env = task.make_env()
    try:
        return TaskSpec.from_env(env, name=task.name)
    finally:
        env.close()


def collect_task(
    task: ControlTask,
    folder: Path,
    counts: dict[str, int],
    *,
    seed: int,
    num_envs: int,
    episodes_per_shard: int = DEFAULT_EPISODES_PER_SHARD,
    max_shards: int | None = None,
    progress: bool = True,
    features: datasets.Features | None = None,
) -> tuple[TaskSpec, CollectStats]:
    """Collect the missing shards of one task into ``folder/shards/<task>/``.

    Args:
        counts: episodes per source.
        max_shards: stop after writing this many shards (used to simulate an interrupted build).
        features: the dataset's schema when it holds several tasks (see ``episode_features``).
    Returns:
        the task's spec (scales not filled in yet) and collection statistics.
    """
    spec = task_spec(task)
    features = features or episode_features(spec, expert_actions=True)
    stats = CollectStats()

    plan = plan_episodes(task.name, counts, episodes_per_shard)
    clean_staging(folder / SHARDS_DIR / task.name.replace("/", "_"))
    pending = {path: keys for path, keys in plan.items() if not (folder / path).exists()}
    stats.shards_skipped = len(plan) - len(pending)
    queue = deque(key for keys in pending.values() for key in keys)
    if not queue:
        return spec, stats
    shard_of = {key: path for path, keys in pending.items() for key in keys}
    finished: dict[Path, dict[EpisodeKey, dict]] = defaultdict(dict)

    num_envs = max(1, min(num_envs, len(queue)))
    envs = make_vector_env(task, num_envs)
    expert = task.make_expert(num_envs)
    lags = {source_lag(source) for source in counts} - {0}
    if lags and not isinstance(getattr(expert, "expert", expert), StatelessExpert):
        raise ValueError(f"{task.name}: lag-<k> sources ask the expert about past observations, which only a "
                         f"stateless expert can answer; {type(expert).__name__} keeps state")
    action_space = envs.single_action_space
    detour = getattr(expert, "detour", None)  # the expert's plausible mistakes (detour-<p> sources), if any
    slots: list[_Episode | None] = [None] * num_envs

    def start(mask: np.ndarray) -> Any:
        """Reset the masked slots with their next episode's seed (idle slots get a dummy seed); twins are
        reset apart, with the retarget option."""
        seeds: list[int | None] = [None] * num_envs
        twins = np.zeros(num_envs, dtype=bool)
        for i in np.flatnonzero(mask):
            if queue:
                key = queue.popleft()
                episode_seed = key.seed(seed)
                slots[i] = _Episode(key, episode_seed, np.random.default_rng(episode_seed),
                                    seen=deque(maxlen=source_lag(key.source) + 1))
                seeds[i] = episode_seed
                twins[i] = key.source == TWIN
            else:
                slots[i] = None
                seeds[i] = 0
        obs = None
        for group, options in ((mask & ~twins, {}), (twins, {RETARGET_OPTION: True})):
            if group.any():
                obs, info = envs.reset(seed=seeds, options={"reset_mask": group, **options})
                if options and "retargeted" not in info:
                    raise ValueError(f"{task.name}: source {TWIN!r} needs an env that can rewrite its goal "
                                     f"(reset option {RETARGET_OPTION!r}, e.g. BabyAI's RetargetMission)")
        for i in np.flatnonzero(mask):
            if slots[i] is not None:
                expert.begin(int(i), envs.envs[i], slots[i].key, slots[i].seed)
        return obs

    bar = tqdm(total=len(shard_of), desc=task.name, unit="ep", disable=not progress, leave=False)
    start_time = time.perf_counter()
    try:
        obs = start(np.ones(num_envs, dtype=bool))
        while any(s is not None for s in slots) and (max_shards is None or stats.shards_written < max_shards):
            per_slot_obs = list(iterate(envs.observation_space, obs))
            expert_actions = expert.act(obs, envs.envs)
            late_actions = expert_actions
            if lags:  # lag-<k> slots: the expert's answer to their observation of k steps before
                late = []
                for i, episode in enumerate(slots):
                    lagged = episode is not None and source_lag(episode.key.source) > 0
                    if lagged:
                        episode.seen.append(per_slot_obs[i])  # keeps the last k + 1
                    late.append(episode.seen[0] if lagged else per_slot_obs[i])
                late_actions = expert.act(concatenate(envs.single_observation_space, late,
                                                      create_empty_array(envs.single_observation_space, num_envs)),
                                          envs.envs)
            actions = []
            for i, episode in enumerate(slots):
                if episode is None:  # idle slot: any valid action, its data is discarded
                    actions.append(random_action(action_space, np.random.default_rng(0)))
                    continue
                action = source_action(action_space, late_actions[i], episode, detour and partial(detour, i))
                actions.append(action)
                for name, value in spec.flatten_observation(per_slot_obs[i]).items():
                    episode.leaves[name].append(value)
                for name, value in spec.flatten_action(action).items():
                    episode.leaves[name].append(value)
                for name, value in spec.flatten_action(expert_actions[i]).items():  # DART labels (episodes.py)
                    episode.leaves[EXPERT_PREFIX + name].append(value)
            obs, rewards, terminated, truncated, _ = envs.step(_batch_actions(action_space, actions))
            done = np.zeros(num_envs, dtype=bool)
            for i, episode in enumerate(slots):
                if episode is None:
                    done[i] = terminated[i] or truncated[i]
                    continue
                expert.observe(i, actions[i])
                episode.rewards.append(float(rewards[i]))
                stats.steps += 1
                if terminated[i] or truncated[i]:
                    done[i] = True
                    path = shard_of[episode.key]
                    finished[path][episode.key] = _episode_row(spec, episode, terminated[i], truncated[i],
                                                               features)
                    stats.episodes += 1
                    bar.update(1)
                    if len(finished[path]) == len(pending[path]):
                        done_rows = finished.pop(path)
                        _write_shard(folder / path, [done_rows[k] for k in pending[path]], features)
                        stats.shards_written += 1
            if done.any():
                obs = start(done)
    finally:
        stats.seconds = time.perf_counter() - start_time
        bar.close()
        envs.close()
    return spec, stats


def _batch_actions(space: spaces.Space, actions: list[Any]) -> Any:
    if isinstance(space, spaces.Dict):
        return {k: _batch_actions(s, [a[k] for a in actions]) for k, s in space.spaces.items()}
    return np.stack([np.asarray(a, dtype=space.dtype) for a in actions])


def _episode_row(spec: TaskSpec, episode: _Episode, terminated: bool, truncated: bool,
                 features: datasets.Features) -> dict[str, Any]:
    rewards = np.asarray(episode.rewards, dtype=np.float32)
    row: dict[str, Any] = {
        "task": spec.name,
        "source": episode.key.source,
        "seed": episode.seed,
        "rewards": rewards,
        "terminated": bool(terminated),
        "truncated": bool(truncated),
        "episode_return": episode_return(rewards),
    }
    for leaf in (*spec.observation_fields, *spec.action_fields):
        row[leaf.name] = stack_leaf(leaf, episode.leaves[leaf.name], features[leaf.name])
    for leaf in spec.action_fields:
        if EXPERT_PREFIX + leaf.name in features:
            row[EXPERT_PREFIX + leaf.name] = stack_leaf(leaf, episode.leaves[EXPERT_PREFIX + leaf.name],
                                                        features[EXPERT_PREFIX + leaf.name])
    return row


def _write_shard(final: Path, rows: list[dict[str, Any]], features: datasets.Features) -> None:
    columns = {name: [row.get(name) for row in rows] for name in features}
    with atomic_folder(final) as tmp, quiet_datasets():
        datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp))
