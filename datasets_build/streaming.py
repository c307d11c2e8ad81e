"""Datasets read as streams (a ``datasets.IterableDataset``): data bigger than the disk, never downloaded whole.

    python train.py --mixture user/big-control=1,text=1 --stream          # Hub parquet, streamed
    python train.py --mixture my-parquet-folder=1 --stream --data_root .  # a local Hub-layout folder

What streams: a dataset in the Hub layout (``datasets_build.hub``: parquet under ``data/``, the task
specs in ``task_specs.json``), on the Hub or in a local folder. Only the small ``task_specs.json`` is
downloaded; the parquet is read as it is needed.

How a stream feeds a packer that wants random access. :class:`StreamedSource` keeps a *window* of
``window`` items of the stream (episodes, image–caption pairs or documents) and packs each sequence
from it exactly as the in-memory sources do (:mod:`generalist.packing`). The window slides by one
item every ``advance_every`` sequences, so sequence ``i`` of a rank sees items
``[i // advance_every, i // advance_every + window)`` of that rank's stream. The stream is the
dataset split between ranks (``split_dataset_by_node``), shuffled with the run's seed through a
buffer of ``window`` items (``IterableDataset.shuffle``), epoch after epoch (``set_epoch``). Sequence
``i`` therefore depends only on ``(seed, rank, i)`` as everywhere else, and ``--resume`` reproduces
the data order exactly, at the price of re-reading the stream up to where it stopped (without
decoding what it skips). Each DataLoader worker reads the stream on its own.

Held out: the ``validation``/``test`` split where there is one, else the rows whose place in their
parquet file is a multiple of ``1 / eval_share`` (spread over tasks and sources, since a build stores
rows by task and source); a fixed window of the first ``window`` of them, as held-out batches are the
same at every evaluation.

Mixing within a window needs a shuffled dataset: a parquet file sorted by task streams one task
at a time unless the shuffle buffer spans it. Push big datasets in many shards, which the stream
visits in a shuffled order.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.distributed import split_dataset_by_node

from datasets_build.common import TASK_SPECS
from datasets_build.episodes import episode_from_row, load_task_specs
from datasets_build.hub import is_hub_copy, parquet_files
from generalist.packing import CaptionSource, ControlSource, PackingConfig, Source, TextSource
from generalist.task_spec import TaskSpec
from generalist.tokenizer import GeneralistTokenizer


class StreamedSource:
    """A :class:`generalist.packing.Source` over a sliding window of a stream (see the module docstring).

    Args:
        name: the dataset's name in the mixture.
        open_stream: ``(rank, world_size) -> IterableDataset`` of raw rows, unshuffled.
        build: the in-memory source for a window, from its decoded items.
        decode: a raw row -> an item (an episode, an image–caption pair, a document).
        seed: the shuffle seed (the run's).
    """

    def __init__(self, name: str, open_stream: Callable[[int, int], datasets.IterableDataset],
                 build: Callable[[list[Any]], Source], decode: Callable[[dict], Any], *, seed: int,
                 world_size: int = 1, window: int = 256, advance_every: int = 1):
        if window < 1 or advance_every < 1:
            raise ValueError(f"{name}: window ({window}) and advance_every ({advance_every}) must be >= 1")
        self.name, self.open_stream, self.build, self.decode = name, open_stream, build, decode
        self.seed, self.world_size, self.window, self.advance_every = seed, world_size, window, advance_every
        self._rank: int | None = None
        self._rows: Iterator[dict] | None = None
        self._items: deque = deque()
        self._start = 0  # stream position of the window's first item
        self._source: Source | None = None
        self.rows_read = 0  # raw rows taken from the stream so far (decoded or skipped)

    def __getstate__(self) -> dict:
        """Pickled (a DataLoader worker started by spawn) without the open stream: the copy restarts it."""
        return {**self.__dict__, "_rank": None, "_rows": None, "_items": deque(), "_start": 0, "_source": None}

    def _stream(self, rank: int) -> Iterator[dict]:
        """The rank's rows, shuffled, epoch after epoch."""
        ds = self.open_stream(rank, self.world_size).shuffle(seed=self.seed, buffer_size=self.window)
        for epoch in itertools.count():
            ds.set_epoch(epoch)
            empty = True
            for row in ds:
                empty = False
                self.rows_read += 1
                yield row
            if empty:
                raise ValueError(f"{self.name}: the stream of rank {rank} (of {self.world_size}) holds no rows")

    def at(self, rank: int, index: int) -> Source:
        """The in-memory source that sequence ``index`` of ``rank`` is packed from."""
        start = index // self.advance_every
        if rank != self._rank or start < self._start or self._rows is None:  # restart (a new rank, or back)
            self._rank, self._rows, self._items, self._start, self._source = rank, self._stream(rank), deque(), 0, None
        skip = max(0, start - self._start - len(self._items))
        for _ in range(min(start - self._start, len(self._items))):
            self._items.popleft()
            self._source = None
        next(itertools.islice(self._rows, skip, skip), None)  # consume without decoding
        self._start = start
        while len(self._items) < self.window:
            self._items.append(self.decode(next(self._rows)))
            self._source = None
        if self._source is None:
            self._source = self.build(list(self._items))
        return self._source

    def pack(self, rng: np.random.Generator, tok: GeneralistTokenizer, cfg: PackingConfig) -> tuple[Any, dict]:
        raise TypeError(f"{self.name} is streamed: a Mixture packs it through at(rank, index)")


def _parquet_rows(files: list[str], held_out: bool | None, every: int) -> Iterator[dict]:
    """Rows of parquet files, a record batch at a time (local paths or ``hf://`` URLs through fsspec).

    ``held_out``: only the rows whose place in their file is a multiple of ``every`` (True), only the
    others (False), or all (None) — decided per file, so whatever order the files are streamed in.
    """
    import fsspec
    import pyarrow.parquet as pq

    for name in files:
        with fsspec.open(name, "rb") as f:
            i = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64):
                for row in batch.to_pylist():
                    if held_out is None or (i % every == 0) == held_out:
                        yield row
                    i += 1


@dataclass(frozen=True)
class ParquetStream:
    """``(rank, world) -> IterableDataset`` over parquet files (each file a shard, so that ranks and the
    shuffle split them), optionally only the held-out rows. Rows are decoded by the features the parquet
    footer records (images to PIL). A picklable object, not a closure: DataLoader workers started by
    spawn (macOS, Windows) receive the sources pickled.

    Built on ``IterableDataset.from_generator`` rather than ``load_dataset(..., streaming=True)``, whose
    parquet reader sleeps 5 s whenever an iterator stops (datasets 5, an Arrow shutdown workaround):
    at every epoch's end and every restart."""

    files: tuple[str, ...]
    held_out: bool | None
    every: int

    def features(self) -> datasets.Features:
        import fsspec
        import pyarrow.parquet as pq

        with fsspec.open(self.files[0], "rb") as f:
            return datasets.Features.from_arrow_schema(pq.read_schema(f))

    def __call__(self, rank: int, world_size: int) -> datasets.IterableDataset:
        ds = datasets.IterableDataset.from_generator(
            _parquet_rows, features=self.features(),
            gen_kwargs={"files": list(self.files), "held_out": self.held_out, "every": self.every})
        return split_dataset_by_node(ds, rank=rank, world_size=world_size) if world_size > 1 else ds


def _control_window(name: str, episodes: list[dict]) -> Source:
    return ControlSource(name, episodes, [e["task"] for e in episodes], sources=[e["source"] for e in episodes],
                         returns=[float(e["episode_return"]) for e in episodes],
                         expert_labelled=all("expert_actions" in e for e in episodes))


def _control_item(specs: dict[str, TaskSpec], row: dict) -> dict:
    return {**episode_from_row(row, specs), "episode_return": float(row["episode_return"])}


def _caption_item(row: dict) -> dict:
    return {"image": row["image"], "caption": row["caption"]}


def _text_item(row: dict) -> str:
    return row["text"]


def stream_files(name: str, root: Path) -> tuple[dict[str, list[str]], dict[str, TaskSpec] | None]:
    """Parquet files per split of a local Hub-layout folder or a Hub dataset id, and its task specs (control)."""
    folder = Path(root) / name
    if folder.is_dir():
        if not is_hub_copy(folder):
            raise ValueError(f"--stream: {folder} holds no parquet under data/ (a local build is read from disk "
                             "anyway; `python -m datasets_build push` writes the streamable layout)")
        return parquet_files(folder), load_task_specs(folder) if (folder / TASK_SPECS).is_file() else None
    import huggingface_hub

    fs = huggingface_hub.HfFileSystem()
    files = {}
    for f in sorted(fs.glob(f"datasets/{name}/data/**/*.parquet")):
        files.setdefault(Path(f).name.split("-", 1)[0], []).append(f"hf://{f}")
    if not files:
        raise FileNotFoundError(f"--stream: no parquet under data/ in the Hub dataset {name}")
    try:  # the one file downloaded
        specs_folder = Path(huggingface_hub.hf_hub_download(name, TASK_SPECS, repo_type="dataset")).parent
    except huggingface_hub.errors.EntryNotFoundError:
        return files, None
    return files, load_task_specs(specs_folder)


def streamed_sources(name: str, root: Path, *, seed: int, world_size: int = 1, window: int = 256,
                     advance_every: int = 1, eval_share: float = 0.1
                     ) -> tuple[StreamedSource, StreamedSource, dict[str, TaskSpec]]:
    """Train and held-out streamed sources of one dataset (control, caption or text), and its task specs."""
    files, specs = stream_files(name, root)
    every = round(1 / eval_share)
    kw: dict[str, Any] = dict(seed=seed, world_size=world_size, window=window, advance_every=advance_every)
    # held out: a fixed window (the first `window` held-out items), as the held-out batches are the same every time
    held_kw = {**kw, "advance_every": 1 << 62}
    if specs is not None:  # control: episodes
        build, decode = partial(_control_window, name), partial(_control_item, specs)
        train = StreamedSource(name, ParquetStream(tuple(files["train"]), False, every), build, decode, **kw)
        held_out = StreamedSource(name, ParquetStream(tuple(files["train"]), True, every), build, decode, **held_kw)
        return train, held_out, specs
    held_files = next((files[s] for s in ("validation", "test") if s in files), None)
    columns = list(ParquetStream(tuple(files["train"]), None, every).features())
    if "caption" in columns:
        build, decode = partial(CaptionSource, name), _caption_item
    elif "text" in columns:
        build, decode = partial(TextSource, name), _text_item
    else:
        raise ValueError(f"--stream: {name} is neither a control (task_specs.json), caption nor text dataset; "
                         f"columns {columns}")
    train = StreamedSource(name, ParquetStream(tuple(files["train"]), None if held_files else False, every), build,
                           decode, **kw)
    held_out = StreamedSource(name, ParquetStream(tuple(held_files or files["train"]), None if held_files else True,
                                                  every), build, decode, **held_kw)
    return train, held_out, {}


__all__ = ["StreamedSource", "stream_files", "streamed_sources"]
