"""What every dataset builder shares: build options and the builder interface."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from datasets_build.common import is_built

DatasetKind = Literal["control", "captions", "text"]


@dataclass(frozen=True)
class BuildOptions:
    """Options common to all builders (the CLI fills them; tests pass tiny values).

    Attributes:
        episodes: control episodes per task (all sources together); None = the builder's default.
        num_envs: envs stepped together per task (SyncVectorEnv slots).
        seed: build seed; every episode seed and every generated sample derives from it.
        episodes_per_shard: episodes of one (task, source) per atomically written shard.
        overwrite: delete an existing dataset folder and build again.
        progress: show tqdm progress bars.
        max_shards: stop each task after writing this many shards, leaving the build unfinished
            (simulates an interruption; a later build resumes it).
        samples: rows of generated (caption) datasets; None = the builder's default.
        command: the command line that started the build, recorded in the card.
    """

    episodes: int | None = None
    num_envs: int = 8
    seed: int = 0
    episodes_per_shard: int = 16
    overwrite: bool = False
    progress: bool = True
    max_shards: int | None = None
    samples: int | None = None
    command: str = ""


class Builder(Protocol):
    """A named dataset that can build itself into ``root / name``."""

    name: str
    kind: DatasetKind
    description: str

    def build(self, root: Path, options: BuildOptions) -> Path:
        """Build (or finish building) the dataset; returns its folder. Skips a complete build."""
        ...


def prepare_folder(root: Path, name: str, options: BuildOptions) -> tuple[Path, bool]:
    """The dataset folder, and whether it is already completely built (and not to be overwritten)."""
    folder = Path(root) / name
    if options.overwrite and folder.exists():
        shutil.rmtree(folder)
    return folder, is_built(folder)
