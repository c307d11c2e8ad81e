"""Built datasets as the packer's sources: what training and its evaluation read from ``--data_root``.

A mixture is a registry name or ``name=weight,name=weight``. Each dataset becomes a train and a
held-out :mod:`generalist.packing` source of its kind (control, caption or text). Rows are read
lazily, when the packer draws them, so that opening a mixture costs no time and no memory.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow.compute as pc

from datasets_build.common import TASK_SPECS
from datasets_build.episodes import EXPERT_PREFIX, iter_episodes, load_episodes
from generalist.packing import CaptionSource, ControlSource, TextSource
from generalist.task_spec import TaskSpec

Kind = Literal["control", "caption", "text"]


class Column(Sequence):
    """One column of a 🤗 dataset as a lazy sequence (rows are read when drawn, not up front)."""

    def __init__(self, dataset: datasets.Dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(i)][self.column]


class EpisodeRows(Sequence):
    """Random access to the episodes of a control dataset, in ``iter_episodes``' format.

    Decoding an episode reads all of its steps (a pixel episode is megabytes) although a sequence
    uses a window of it, so decoded episodes are kept, up to ``cache_bytes`` per worker process.
    """

    def __init__(self, dataset: datasets.Dataset, specs: dict[str, TaskSpec], indices: np.ndarray,
                 cache_bytes: int = 1 << 30):
        self.dataset, self.specs, self.indices = dataset, specs, indices
        self.cache: OrderedDict[int, dict] = OrderedDict()
        self.cache_bytes, self.cached_bytes = cache_bytes, 0

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def has_expert_actions(self) -> bool:
        """Whether the dataset records the expert's action at every step (``expert_<leaf>`` columns)."""
        return any(c.startswith(EXPERT_PREFIX) for c in self.dataset.column_names)

    def __getitem__(self, i: int) -> dict:
        row = int(self.indices[i])
        if row in self.cache:
            self.cache.move_to_end(row)
            return self.cache[row]
        episode = next(iter_episodes(self.dataset.select([row]), self.specs))
        self.cache[row] = episode
        self.cached_bytes += _nbytes(episode)
        while self.cached_bytes > self.cache_bytes and len(self.cache) > 1:
            self.cached_bytes -= _nbytes(self.cache.popitem(last=False)[1])
        return episode


def _nbytes(episode: dict) -> int:
    arrays = [*episode["observations"].values(), *episode["actions"].values(), episode["rewards"]]
    return sum(a.nbytes if isinstance(a, np.ndarray) else 64 * len(a) for a in arrays)


class DataFiles:
    """The files the sources read lazily (memory-mapped arrow shards), with their sizes when the run began.

    Why: a shard truncated or replaced while training reads it fails deep inside a DataLoader worker
    (a memory-mapped page past the new end of file is a SIGBUS, which kills the worker with no word
    about which file). :meth:`check` compares the files with the snapshot and stops naming them.
    """

    def __init__(self, sources: Sequence[Any]):
        self.sizes: dict[str, int] = {}
        for src in sources:
            data = next((getattr(src, a) for a in ("episodes", "texts", "items") if hasattr(src, a)), None)
            for f in getattr(getattr(data, "dataset", data), "cache_files", None) or []:
                self.sizes[f["filename"]] = Path(f["filename"]).stat().st_size

    def changed(self) -> list[str]:
        """``"path (was N bytes, now M)"`` for every file that is not as it was (or is gone)."""
        out = []
        for name, size in self.sizes.items():
            now = Path(name).stat().st_size if Path(name).exists() else None
            if now != size:
                out.append(f"{name} (was {size:,} bytes, now {'missing' if now is None else f'{now:,}'})")
        return out

    def check(self, error: BaseException | None = None) -> None:
        """Stop naming the files that changed under the run (truncated, replaced, deleted), if any."""
        if changed := self.changed():
            raise SystemExit(f"train.py: training data changed while the run read it: {'; '.join(changed)}. Restore "
                             "or rebuild the dataset, then --resume (the data order is a function of the step, so "
                             "the resumed run reads what this one would have)") from error

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Any failure inside (e.g. "DataLoader worker ... is killed by signal: Bus error", which surfaces
        wherever the main process is) is reported as the changed files when there are any."""
        try:
            yield
        except Exception as e:
            self.check(e)
            raise


def parse_mixture(mixture: str) -> dict[str, float]:
    """A registry mixture or dataset name, or ``name=weight,name=weight`` -> ``{dataset: weight}``."""
    if "=" not in mixture:
        from datasets_build.registry import MIXTURES, resolve

        try:
            return dict(resolve(mixture))
        except KeyError:
            raise ValueError(f"--mixture {mixture!r}: not a dataset, not one of {sorted(MIXTURES)} and not "
                             "`name=weight,...`") from None
    return parse_weights(mixture, "--mixture")


def parse_weights(text: str, flag: str) -> dict[str, float]:
    """``name=weight,name=weight`` -> ``{name: weight}``; a bad part is an error naming ``flag``."""
    weights = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        try:
            weights[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"{flag}: bad weight in {part!r}; expected name=weight") from None
    return weights


def open_splits(folder: Path) -> dict[str, datasets.Dataset]:
    """The splits of a caption or text dataset: ``<folder>/data`` as datasets_build writes it, or a bare
    ``save_to_disk`` folder."""
    if not folder.exists():
        raise FileNotFoundError(f"dataset {folder.name!r} not found at {folder}; build it or pass --data_root")
    from datasets_build.hub import is_hub_copy, load_hub_splits

    if is_hub_copy(folder):
        return load_hub_splits(folder)
    loaded = datasets.load_from_disk(str(folder / "data" if (folder / "data").is_dir() else folder))
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def dataset_kind(folder: Path, splits: dict[str, datasets.Dataset] | None = None) -> Kind:
    """Control (a folder with task specs), caption (``image``, ``caption``) or text (``text``)."""
    if (folder / TASK_SPECS).exists():
        return "control"
    columns = (splits or open_splits(folder))["train"].column_names
    if "caption" in columns:
        return "caption"
    if "text" in columns:
        return "text"
    raise ValueError(f"{folder}: neither a control, caption (image, caption) nor text (text) dataset; "
                     f"columns {columns}")


def load_sources(weights: dict[str, float], root: Path, eval_share: float = 0.1, stream: dict | None = None
                 ) -> tuple[list, list, dict[str, TaskSpec]]:
    """Train and held-out sources of every dataset, and the task specs of the control ones.

    Control datasets hold out every ``1/eval_share``-th episode of every task — spread over the
    expert, noisy and random sources alike (rows are stored by source, so "the last episodes" would
    be only random ones); caption and text datasets use their ``validation``/``test`` split.
    ``stream``: Hub datasets and local parquet (Hub-layout) folders are read as streams instead,
    with these keyword arguments of :func:`datasets_build.streaming.streamed_sources` (``seed``,
    ``world_size``, ``window``...); local builds are read from disk as always.
    """
    from datasets_build.hub import is_hub_copy, is_hub_dataset_id, open_hub_dataset
    from datasets_build.streaming import streamed_sources

    train, held_out, specs = [], [], {}
    for name in weights:
        if stream is not None and (is_hub_dataset_id(name, root) or is_hub_copy(Path(root) / name)):
            streamed_train, streamed_held_out, streamed_specs = streamed_sources(name, root, eval_share=eval_share,
                                                                                 **stream)
            train.append(streamed_train)
            held_out.append(streamed_held_out)
            specs.update(streamed_specs)
            continue
        folder = open_hub_dataset(name) if is_hub_dataset_id(name, root) else Path(root) / name
        if (folder / TASK_SPECS).exists():
            ds, task_specs = load_episodes(folder)
            specs.update(task_specs)
            tasks, sources = np.asarray(ds["task"]), np.asarray(ds["source"])
            returns = np.asarray(ds["episode_return"], np.float64)
            lengths = pc.list_value_length(ds.with_format("arrow")["rewards"]).to_numpy()  # (episodes,)
            train_idx, eval_idx = [], []
            for task in np.unique(tasks):
                idx = np.flatnonzero(tasks == task)
                if len(idx) < 10:  # tiny sets: evaluate on train
                    train_idx += list(idx)
                    eval_idx += list(idx)
                    continue
                held = np.zeros(len(idx), bool)
                held[:: round(1 / eval_share)] = True
                train_idx += list(idx[~held])
                eval_idx += list(idx[held])
            for out, idx in ((train, train_idx), (held_out, eval_idx)):
                idx = np.asarray(sorted(idx))
                rows = EpisodeRows(ds, task_specs, idx)
                out.append(ControlSource(name, rows, list(tasks[idx]), sources=list(sources[idx]), returns=returns[idx],
                                         expert_labelled=rows.has_expert_actions, lengths=lengths[idx]))
            continue
        splits = open_splits(folder)
        train_ds = splits["train"]
        eval_ds = next((splits[s] for s in ("validation", "test") if s in splits), train_ds)
        if dataset_kind(folder, splits) == "caption":
            train.append(CaptionSource(name, train_ds))
            held_out.append(CaptionSource(name, eval_ds))
        else:
            train.append(TextSource(name, Column(train_ds, "text")))
            held_out.append(TextSource(name, Column(eval_ds, "text")))
    return train, held_out, specs
