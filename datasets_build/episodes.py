"""The on-disk episode format shared by every control dataset, and its loaders.

One row per whole episode. Fixed columns::

    task (str)  source (str)  seed (int64)  rewards (list[float32], T)
    terminated (bool)  truncated (bool)  episode_return (float64)

plus one column per :class:`~generalist.task_spec.FieldSpec` leaf, named exactly like the leaf
(``observation``, ``observation.image``, ``observation.mission``, ``action``), holding the T
per-step values: observations o_0..o_{T-1} paired with actions a_0..a_{T-1} and rewards
r_0..r_{T-1} (the observation after the last action is dropped).

Image leaves are stored as a list of PNG-encoded ``datasets.Image`` frames: rendered frames are
mostly flat background and compress ~10x, while arrow's nested uint8 tensors would take ~2.4x
the raw bytes (an offset per innermost list). Other array leaves are stored as arrow tensors
with a dynamic first (time) dimension (``Array2D((None, d))``, ``Array3D((None, h, w))``...) in
the leaf's dtype, so that loading with the numpy format gives contiguous ``(T, ...)`` arrays
without a per-element Python conversion.
All tasks of one dataset share one schema, so when tasks disagree on a numeric leaf (CartPole's
``observation`` has 4 values, Pendulum's 3; CartPole's ``action`` is an integer, Pendulum's a
float vector), that column falls back to :data:`FLAT_NUMERIC`: per step, the leaf's values
flattened into a float32 list (exact for discrete values, which are below 2**24). The loaders
reshape and cast every leaf back to its spec's shape and dtype.

Control datasets built here also hold ``expert_<leaf>`` per action leaf: the action the expert
*would* have taken at each visited state (equal to ``<leaf>`` on expert episodes; on noisy and random
ones, the clean action before the noise). Imitation trains on it (DART, Laskey et al. 2017: the
expert's label on states that its noisy executions reached, where a cloned policy's own mistakes
lead), while return conditioning keeps the executed actions.

A dataset folder holds complete shards under ``shards/`` (see :mod:`datasets_build.collector`);
:func:`load_episodes` concatenates them (cheaply: arrow tables are memory-mapped).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from datasets_build.common import BUILD_RECORD, TASK_SPECS
from generalist import integrity
from generalist.task_spec import FieldSpec, TaskSpec

SHARDS_DIR = "shards"
FIXED_COLUMNS = ("task", "source", "seed", "rewards", "terminated", "truncated", "episode_return")
_ARRAY_TYPES = {1: datasets.Array2D, 2: datasets.Array3D, 3: datasets.Array4D, 4: datasets.Array5D}
PNG_COMPRESS_LEVEL = 1
FLAT_NUMERIC = datasets.List(datasets.List(datasets.Value("float32")))


def leaf_feature(leaf: FieldSpec) -> datasets.features.FeatureType:
    """The 🤗 feature that holds T steps of one leaf."""
    if leaf.kind == "text":
        return datasets.Sequence(datasets.Value("string"))
    if leaf.kind == "image":
        return datasets.List(datasets.Image())
    dtype = leaf.dtype
    if leaf.shape == ():
        return datasets.Sequence(datasets.Value(dtype))
    if len(leaf.shape) not in _ARRAY_TYPES:
        raise ValueError(f"{leaf.name}: per-step shape {leaf.shape} has more than 4 dimensions")
    return _ARRAY_TYPES[len(leaf.shape)](shape=(None, *leaf.shape), dtype=dtype)


EXPERT_PREFIX = "expert_"  # expert_<action leaf>: the expert's action at each step (see the module docstring)


def episode_features(specs: TaskSpec | list[TaskSpec], expert_actions: bool = False) -> datasets.Features:
    """The schema of a dataset holding episodes of ``specs`` (see the module docstring); ``expert_actions``:
    with an ``expert_<leaf>`` column per action leaf."""
    specs = [specs] if isinstance(specs, TaskSpec) else list(specs)
    features = {
        "task": datasets.Value("string"),
        "source": datasets.Value("string"),
        "seed": datasets.Value("int64"),
        "rewards": datasets.Sequence(datasets.Value("float32")),
        "terminated": datasets.Value("bool"),
        "truncated": datasets.Value("bool"),
        "episode_return": datasets.Value("float64"),
    }
    leaves: dict[str, list[FieldSpec]] = {}
    for spec in specs:
        for leaf in (*spec.observation_fields, *spec.action_fields):
            leaves.setdefault(leaf.name, []).append(leaf)
    for name, same_name in leaves.items():
        candidates = {repr(leaf_feature(leaf)): leaf_feature(leaf) for leaf in same_name}
        if len(candidates) == 1:
            features[name] = next(iter(candidates.values()))
        elif all(leaf.kind in ("continuous", "discrete") for leaf in same_name):
            features[name] = FLAT_NUMERIC
        else:
            raise ValueError(f"tasks {[s.name for s in specs]} disagree on text/image leaf {name!r}: "
                             f"{sorted(candidates)}; put them in separate datasets")
    if expert_actions:
        for name in {leaf.name for spec in specs for leaf in spec.action_fields}:
            features[EXPERT_PREFIX + name] = features[name]
    return datasets.Features(features)


def stack_leaf(leaf: FieldSpec, values: list[Any], feature: Any) -> np.ndarray | list[str]:
    """T per-step values of one leaf -> what goes into its column of type ``feature``."""
    if leaf.kind == "text":
        return [str(v) for v in values]
    if leaf.kind == "image":
        return [{"bytes": png_bytes(v), "path": None} for v in values]
    if feature == FLAT_NUMERIC:
        return np.asarray(values, dtype=np.float32).reshape(len(values), leaf.size)
    dtype = np.uint8 if leaf.kind == "image" else np.dtype(leaf.dtype)
    return np.asarray(values, dtype=dtype).reshape(len(values), *leaf.shape)


def png_bytes(frame: np.ndarray) -> bytes:
    """PNG-encode one frame ourselves: 🤗 datasets' generic path converts arrays to Python lists
    first and is ~5x slower. Level 1 compresses flat rendered frames almost as well as level 9."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(frame, dtype=np.uint8).squeeze()).save(buffer, format="PNG",
                                                                      compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def episode_return(rewards: np.ndarray) -> float:
    """The one definition of an episode's return: float64 sum of the stored float32 rewards."""
    return float(np.sum(np.asarray(rewards, dtype=np.float32), dtype=np.float64))


def shard_dirs(folder: Path) -> list[Path]:
    """Complete shards of a dataset folder, in a stable order (hidden tmp folders excluded)."""
    root = folder / SHARDS_DIR
    if not root.exists():
        return []
    return sorted(p.parent for p in root.rglob("dataset_info.json") if not p.parent.name.startswith("."))


def load_shard(shard: Path) -> datasets.Dataset:
    """One shard; a truncated or corrupted one is an ``OSError`` naming the shard folder.

    Sizes are checked against the shard's manifest (:mod:`generalist.integrity`; a ``stat`` per
    file, so opening a large dataset stays cheap) and arrow validates the record batches it maps.
    """
    try:
        if (problem := integrity.verify(shard, hashes=False)) is not None:
            raise OSError(problem)
        part = datasets.load_from_disk(str(shard))
        part.data.validate()
        return part
    except Exception as e:  # pyarrow and datasets raise many types; the cause is kept
        folder = next((p.parent for p in shard.parents if p.name == SHARDS_DIR), shard.parent)
        raise OSError(
            f"episode shard {shard} is truncated or corrupted ({type(e).__name__}: {e}); delete that folder "
            f"and {folder / BUILD_RECORD}, then run the same build again: it collects only the missing "
            "shards") from e


def load_shards(folder: Path) -> datasets.Dataset:
    """Every episode of a built control dataset: its shards, or the one parquet split of a Hub copy."""
    from datasets_build.hub import is_hub_copy, load_hub_splits

    if is_hub_copy(folder):
        return load_hub_splits(folder)["train"]
    parts = [load_shard(p) for p in shard_dirs(folder)]
    if not parts:
        raise FileNotFoundError(f"no episode shards under {folder / SHARDS_DIR}")
    # tasks with different leaves have different columns; concatenate fills missing ones with None
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def load_task_specs(folder: Path) -> dict[str, TaskSpec]:
    payload = json.loads((folder / TASK_SPECS).read_text())
    return {name: TaskSpec.from_dict(d) for name, d in payload.items()}


def load_episodes(path_or_name: str | Path, root: str | Path = "data") -> tuple[datasets.Dataset, dict[str, TaskSpec]]:
    """Load a built control dataset: its episodes and ``{task name: TaskSpec}``.

    ``path_or_name`` is a dataset folder or a registered dataset name looked up under ``root``.
    """
    folder = Path(path_or_name)
    if not (folder / TASK_SPECS).exists():
        folder = Path(root) / str(path_or_name)
    if not (folder / TASK_SPECS).exists():
        raise FileNotFoundError(
            f"{path_or_name!r} is not a built control dataset (no {TASK_SPECS} in {folder}); "
            f"build it with `python -m datasets_build {Path(str(path_or_name)).name} --out {root}`"
        )
    return load_shards(folder), load_task_specs(folder)


def iter_episodes(dataset: datasets.Dataset | datasets.IterableDataset, specs: dict[str, TaskSpec]
                  ) -> Iterator[dict[str, Any]]:
    """Yield episodes as the tokenizer's ``encode_episode`` takes them (:func:`episode_from_row` of each row).

    Each item: ``{"task", "source", "observations": {leaf: (T, ...) array or list[str]},
    "actions": {leaf: (T, ...) array}, "rewards": float32 (T,), "terminated", "truncated"}``.
    Arrays come back in the leaf's dtype (uint8 for images).
    """
    for i, row in enumerate(dataset.with_format("numpy")):
        yield episode_from_row(row, specs, i)


def episode_from_row(row: dict[str, Any], specs: dict[str, TaskSpec], i: int | None = None) -> dict[str, Any]:
    """One dataset row (numpy or python values) as an episode.

    A row that does not match its task's spec (unknown task, missing column, wrong shape or number
    of steps) is a ``ValueError`` naming the row, the task, the column and what was expected.
    """
    where = "episode row" if i is None else f"episode row {i}"
    task = str(row["task"])
    if task not in specs:
        raise ValueError(f"{where}: task {task!r} has no task spec; the dataset's specs are {sorted(specs)}")
    spec = specs[task]
    rewards = np.asarray(row["rewards"], dtype=np.float32)
    leaves = {}
    for f in (*spec.observation_fields, *spec.action_fields):
        if row.get(f.name) is None:
            raise ValueError(f"{where} ({task}): no column {f.name!r}, which the task spec declares; "
                             f"columns: {sorted(k for k, v in row.items() if v is not None)}")
        try:
            leaves[f.name] = _leaf_value(f, row[f.name])
        except ValueError as e:
            raise ValueError(f"{where} ({task}), column {f.name!r}: does not match the task spec's "
                             f"{f.space_type} of per-step shape {f.shape} ({e})") from None
        if len(leaves[f.name]) != len(rewards):
            raise ValueError(f"{where} ({task}), column {f.name!r}: {len(leaves[f.name])} steps but "
                             f"{len(rewards)} rewards; every column holds one value per step")
    episode = {
        "task": spec.name,
        "source": str(row["source"]),
        "observations": {f.name: leaves[f.name] for f in spec.observation_fields},
        "actions": {f.name: leaves[f.name] for f in spec.action_fields},
        "rewards": rewards,
        "terminated": bool(row["terminated"]),
        "truncated": bool(row["truncated"]),
    }
    if all(row.get(EXPERT_PREFIX + f.name) is not None for f in spec.action_fields):
        episode["expert_actions"] = {f.name: _leaf_value(f, row[EXPERT_PREFIX + f.name]) for f in spec.action_fields}
    return episode


def _leaf_value(leaf: FieldSpec, value: Any) -> np.ndarray | list[str]:
    if leaf.kind == "text":
        return [str(v) for v in value]
    if leaf.kind == "image":  # decoded frames (PIL images or arrays)
        frames = [np.asarray(frame, dtype=np.uint8) for frame in value]
        return np.stack(frames).reshape(len(frames), *leaf.shape)
    dtype = np.dtype(leaf.dtype)
    if isinstance(value, np.ndarray) and value.dtype == object:  # ragged-typed list of per-step lists
        value = np.stack(value) if len(value) else np.zeros((0, leaf.size))
    array = np.asarray(value, dtype=dtype)
    return array.reshape(len(array), *leaf.shape)
