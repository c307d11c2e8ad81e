"""Import existing offline-RL data into the episode format: Minari datasets and D4RL-style arrays.

Minari. ``import_minari("D4RL/door/human-v2", out)`` reads a dataset that is already on disk under
the Minari root (``$MINARI_DATASETS_PATH``, default ``~/.minari/datasets``) — nothing is
downloaded. Its observation and action spaces give the TaskSpec; Minari stores T+1 observations per
episode, the last one (after the final action) is dropped. ``expert_return`` / ``random_return``
come from the dataset's ``ref_max_score`` / ``ref_min_score`` when it has them, otherwise they stay
``None`` (unknown) — they are never guessed from the data.

D4RL-style HDF5 / NumPy. A file (``.hdf5``/``.h5`` or ``.npz``) with flat arrays over all steps::

    observations (N, obs_dim)  actions (N, act_dim)  rewards (N,)  terminals (N,)  timeouts (N,)

Step i pairs observations[i] with actions[i] and rewards[i]; an episode ends after a step with
``terminals`` (-> terminated) or ``timeouts`` (-> truncated) set. Steps after the last episode end
form no complete episode and are dropped (the card counts them). ``timeouts`` may be missing
(older D4RL files); then only terminals split episodes. Observation space: unbounded ``Box``;
action space: ``Box(-1, 1)`` when all actions are inside it (D4RL's convention), else the data's
per-dimension min/max.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from datasets_build.base import BuildOptions, prepare_folder
from datasets_build.collector import _write_shard
from datasets_build.common import (
    TASK_SPECS,
    markdown_table,
    nice_scale,
    now_iso,
    package_versions,
    write_card,
    write_json_atomic,
)
from datasets_build.episodes import SHARDS_DIR, episode_features, episode_return, stack_leaf
from generalist.integrity import clean_staging
from generalist.task_spec import TaskSpec

IMPORT_EPISODES_PER_SHARD = 256
RETURN_TARGET = 10.0
REWARD_TARGET = 1.0
D4RL_KEYS = ("observations", "actions", "rewards", "terminals")


def _episode_row(spec: TaskSpec, source: str, index: int, observations: Any, actions: Any,
                 rewards: np.ndarray, terminated: bool, truncated: bool, features) -> dict[str, Any]:
    """One row from whole-episode arrays (observations already cut to T steps)."""
    rewards = np.asarray(rewards, dtype=np.float32)
    steps = len(rewards)
    row: dict[str, Any] = {"task": spec.name, "source": source, "seed": index, "rewards": rewards,
                           "terminated": bool(terminated), "truncated": bool(truncated),
                           "episode_return": episode_return(rewards)}
    leaves = {**spec.flatten_observation(observations), **spec.flatten_action(actions)}
    for leaf in (*spec.observation_fields, *spec.action_fields):
        values = leaves[leaf.name]
        row[leaf.name] = stack_leaf(leaf, [values[t] for t in range(steps)], features[leaf.name])
    return row


def write_imported(folder: Path, spec: TaskSpec, rows: Iterable[dict[str, Any]], *, title: str,
                   description: str, options: BuildOptions, extra: dict[str, Any] | None = None) -> Path:
    """Write imported episode rows as shards, then the task spec (scales filled in) and the card."""
    start = time.perf_counter()
    features = episode_features(spec)
    clean_staging(folder / SHARDS_DIR)
    returns, steps, max_reward, shard, batch = [], 0, 0.0, 0, []

    def flush() -> None:
        nonlocal shard, batch
        path = folder / SHARDS_DIR / spec.name.replace("/", "_") / f"import-{shard:05d}"
        if not path.exists():  # a resumed import skips complete shards
            _write_shard(path, batch, features)
        shard, batch = shard + 1, []

    for row in rows:
        returns.append(row["episode_return"])
        steps += len(row["rewards"])
        max_reward = max(max_reward, float(np.abs(row["rewards"]).max(initial=0.0)))
        batch.append(row)
        if len(batch) == IMPORT_EPISODES_PER_SHARD:
            flush()
    if batch:
        flush()
    if not returns:
        raise ValueError(f"{title}: no complete episode to import")
    anchors = [abs(r) for r in (spec.expert_return, spec.random_return) if r is not None]
    typical = max(anchors) if anchors else float(np.max(np.abs(returns)))
    spec = replace(spec, return_scale=nice_scale(RETURN_TARGET, typical),
                   reward_scale=nice_scale(REWARD_TARGET, max_reward))
    write_json_atomic(folder / TASK_SPECS, {spec.name: spec.to_dict()})
    returns_array = np.asarray(returns)
    record = {
        "name": folder.name, "builder": f"datasets_build.offline ({title})", "command": options.command,
        "seed": options.seed, "build_date": now_iso(), "build_time_s": round(time.perf_counter() - start, 2),
        "episodes": len(returns), "steps": steps, "expert_return": spec.expert_return,
        "random_return": spec.random_return, "mean_return": float(returns_array.mean()),
        **(extra or {}), "versions": package_versions(),
    }
    table = markdown_table(["task", "episodes", "steps", "mean return", "min", "max", "expert (ref)",
                            "random (ref)", "return_scale", "reward_scale"],
                           [[spec.name, len(returns), steps, float(returns_array.mean()),
                             float(returns_array.min()), float(returns_array.max()), spec.expert_return,
                             spec.random_return, spec.return_scale, spec.reward_scale]])
    write_card(folder, folder.name, description, record, {"Episodes": table})
    return folder


# --- Minari ---


def _minari_episode_rows(dataset: Any, spec: TaskSpec, source: str) -> Iterator[dict[str, Any]]:
    features = episode_features(spec)
    for episode in dataset.iterate_episodes():
        steps = len(episode.rewards)
        observations = _cut(episode.observations, steps)
        yield _episode_row(spec, source, int(episode.id), observations, episode.actions, episode.rewards,
                           bool(episode.terminations[-1]), bool(episode.truncations[-1]), features)


def _cut(tree: Any, steps: int) -> Any:
    """Drop the final observation (after the last action) from a possibly nested structure."""
    if isinstance(tree, dict):
        return {k: _cut(v, steps) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_cut(v, steps) for v in tree)
    return tree[:steps]


MINARI_DATASET_ID = "minari_dataset_id"  # TaskSpec.extra key of an imported Minari dataset's id


def recover_minari_env(dataset_id: str) -> gym.Env:
    """The evaluation environment of a locally stored Minari dataset (its ``eval_env`` when it has one,
    else the environment it was collected in), as ``minari`` itself recovers it."""
    import minari

    return minari.load_dataset(dataset_id).recover_environment(eval_env=True)


def import_minari(dataset_id: str, root: Path, options: BuildOptions, name: str | None = None) -> Path:
    """Import a locally stored Minari dataset into ``root / name`` (default: the id, '/' -> '_')."""
    import minari

    folder, done = prepare_folder(root, name or dataset_id.replace("/", "_"), options)
    if done:
        return folder
    dataset = minari.load_dataset(dataset_id)
    metadata = dict(dataset.storage.metadata)
    spec = TaskSpec.from_spaces(dataset_id, dataset.observation_space, dataset.action_space,
                                expert_return=_optional_float(metadata.get("ref_max_score")),
                                random_return=_optional_float(metadata.get("ref_min_score")))
    # the task is named by its Minari id, which gymnasium does not know: evaluation recovers the
    # environment through minari (eval.control.make_env)
    spec.extra[MINARI_DATASET_ID] = dataset_id
    return write_imported(folder, spec, _minari_episode_rows(dataset, spec, f"minari:{dataset_id}"),
                          title=f"minari {dataset_id}", options=options,
                          description=f"Minari dataset `{dataset_id}` imported from the local Minari "
                                      "root into the generalist episode format.",
                          extra={"minari_dataset_id": dataset_id,
                                 "minari_algorithm": metadata.get("algorithm_name")})


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(np.asarray(value).reshape(-1)[0])


# --- D4RL-style arrays ---


def read_d4rl_arrays(path: Path) -> dict[str, np.ndarray]:
    """The flat arrays of a D4RL-style ``.hdf5``/``.h5`` or ``.npz`` file; observations and actions as float32
    ``(N, dim)`` (files may store them flatter, or in float16)."""
    path = Path(path)
    if path.suffix in (".hdf5", ".h5"):
        import h5py

        with h5py.File(path, "r") as f:
            arrays = {k: np.asarray(f[k]) for k in (*D4RL_KEYS, "timeouts") if k in f}
    elif path.suffix == ".npz":
        with np.load(path) as f:
            arrays = {k: np.asarray(f[k]) for k in (*D4RL_KEYS, "timeouts") if k in f}
    else:
        raise ValueError(f"{path}: expected a .hdf5, .h5 or .npz file")
    missing = [k for k in D4RL_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}; a D4RL-style file needs {list(D4RL_KEYS)}")
    for key in ("observations", "actions"):
        arrays[key] = arrays[key].astype(np.float32).reshape(len(arrays[key]), -1)
    return arrays


def d4rl_episode_bounds(terminals: np.ndarray, timeouts: np.ndarray | None) -> list[tuple[int, int, bool, bool]]:
    """``(start, stop, terminated, truncated)`` of every complete episode."""
    terminals = np.asarray(terminals, dtype=bool).reshape(-1)
    timeouts = np.zeros_like(terminals) if timeouts is None else np.asarray(timeouts, dtype=bool).reshape(-1)
    bounds, start = [], 0
    for end in np.flatnonzero(terminals | timeouts):
        bounds.append((start, int(end) + 1, bool(terminals[end]), bool(timeouts[end] and not terminals[end])))
        start = int(end) + 1
    return bounds


def export_d4rl(folder: Path, path: Path) -> Path:
    """Write a built single-task dataset as a D4RL-style ``.hdf5``/``.npz`` file (the layout above):
    ``terminals`` where an episode terminated, ``timeouts`` where it was truncated, as D4RL keeps them
    apart. Observations and actions must each be one numeric leaf (a ``Box``), as D4RL's are. Not written:
    D4RL v2's ``next_observations`` and ``infos/*`` (qpos, qvel, action log-probs), which no importer here reads."""
    from datasets_build.episodes import iter_episodes, load_episodes

    dataset, specs = load_episodes(Path(folder))
    if len(specs) != 1:
        raise ValueError(f"{folder}: a D4RL file holds one task, this dataset has {sorted(specs)}")
    (spec,) = specs.values()
    if len(spec.observation_fields) != 1 or len(spec.action_fields) != 1:
        raise ValueError(f"{folder}: D4RL files have one observation and one action array; task {spec.name!r} "
                         f"has observation leaves {[f.name for f in spec.observation_fields]} and action leaves "
                         f"{[f.name for f in spec.action_fields]}")
    obs_leaf, act_leaf = spec.observation_fields[0].name, spec.action_fields[0].name
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*D4RL_KEYS, "timeouts")}
    for episode in iter_episodes(dataset, specs):
        steps = len(episode["rewards"])
        parts["observations"].append(np.asarray(episode["observations"][obs_leaf], np.float32).reshape(steps, -1))
        parts["actions"].append(np.asarray(episode["actions"][act_leaf], np.float32).reshape(steps, -1))
        parts["rewards"].append(np.asarray(episode["rewards"], np.float32))
        if not (episode["terminated"] or episode["truncated"]):
            raise ValueError(f"{folder}: an episode of {steps} steps neither terminated nor was truncated; in "
                             "D4RL arrays it would run into the next one")
        end = np.zeros(steps, dtype=bool)
        end[-1] = True
        parts["terminals"].append(end & bool(episode["terminated"]))
        parts["timeouts"].append(end & bool(episode["truncated"]) & (not episode["terminated"]))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".hdf5", ".h5"):
        import h5py

        with h5py.File(path, "w") as f:
            for key, value in arrays.items():
                f.create_dataset(key, data=value, compression="gzip")
    elif path.suffix == ".npz":
        np.savez_compressed(path, **arrays)
    else:
        raise ValueError(f"{path}: expected a .hdf5, .h5 or .npz file")
    return path


def import_d4rl(path: Path, task: str, root: Path, options: BuildOptions, name: str | None = None) -> Path:
    """Import a D4RL-style array file as task ``task`` into ``root / name`` (default: file stem)."""
    path = Path(path)
    folder, done = prepare_folder(root, name or path.stem, options)
    if done:
        return folder
    arrays = read_d4rl_arrays(path)
    low, high = arrays["actions"].min(axis=0), arrays["actions"].max(axis=0)
    if low.min() >= -1.0 and high.max() <= 1.0:
        low, high = -np.ones_like(low), np.ones_like(high)
    spec = TaskSpec.from_spaces(task, spaces.Box(-np.inf, np.inf, arrays["observations"].shape[1:], np.float32),
                                spaces.Box(low, high, dtype=np.float32))
    rows, dropped = d4rl_rows(spec, arrays, f"d4rl:{path.stem}")
    return write_imported(folder, spec, rows, title=f"d4rl {path.name}", options=options,
                          description=f"D4RL-style arrays from `{path.name}` imported as task `{task}`.",
                          extra={"source_file": str(path), "dropped_trailing_steps": dropped})


def d4rl_rows(spec: TaskSpec, arrays: dict[str, np.ndarray], source: str) -> tuple[Iterator[dict[str, Any]], int]:
    """Episode rows of D4RL arrays (as :func:`read_d4rl_arrays` returns them), and how many trailing steps
    belong to no complete episode (dropped)."""
    features = episode_features(spec)
    bounds = d4rl_episode_bounds(arrays["terminals"], arrays.get("timeouts"))
    rows = (_episode_row(spec, source, i, arrays["observations"][a:b], arrays["actions"][a:b],
                         arrays["rewards"][a:b], term, trunc, features)
            for i, (a, b, term, trunc) in enumerate(bounds))
    return rows, len(arrays["rewards"]) - (bounds[-1][1] if bounds else 0)
