"""Text corpus: CPython's own documentation topics (``pydoc_data.topics.topics``), local and free.

Each topic (``"assert"``, ``"class"``, ``"formatstrings"``...) is split into paragraphs that are
packed into documents of at most :data:`MAX_CHARS` characters, so a row fits a small model's
context. Topics, not rows, are split between ``train`` and ``validation`` (deterministically, by a
hash of the topic name), and chunks that recur verbatim across topics are kept once (in train), so
validation text is really unseen.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import datasets

from datasets_build.base import BuildOptions, DatasetKind, prepare_folder
from datasets_build.common import (
    derive_seed,
    now_iso,
    package_versions,
    quiet_datasets,
    write_card,
)
from generalist.integrity import atomic_folder

MAX_CHARS = 2000
VALIDATION_PERCENT = 10
_BLANK_LINES = re.compile(r"\n\s*\n")


def pack_paragraphs(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Greedily pack a topic's paragraphs into chunks of at most ``max_chars`` (longer paragraphs
    are cut at line breaks, then hard-wrapped)."""
    pieces: list[str] = []
    for paragraph in _BLANK_LINES.split(text.strip()):
        while len(paragraph) > max_chars:
            cut = paragraph.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(paragraph[:cut])
            paragraph = paragraph[cut:].lstrip("\n")
        if paragraph.strip():
            pieces.append(paragraph)
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > max_chars:
            chunks.append(current)
            current = piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


@dataclass
class TextDatasetBuilder:
    name: str = "text"
    description: str = ("CPython's documentation topics (`pydoc_data.topics.topics`, shipped with "
                        "Python) packed into documents of at most 2000 characters; split by topic.")
    kind: DatasetKind = "text"

    def build(self, root: Path, options: BuildOptions) -> Path:
        from pydoc_data.topics import topics

        folder, done = prepare_folder(root, self.name, options)
        if done:
            return folder
        start = time.perf_counter()
        splits: dict[str, list[str]] = {"train": [], "validation": []}
        seen: set[str] = set()  # a few boilerplate paragraphs recur across topics: keep one copy
        for topic in sorted(topics, key=lambda t: derive_seed(options.seed, self.name, t) % 100 < VALIDATION_PERCENT):
            in_validation = derive_seed(options.seed, self.name, topic) % 100 < VALIDATION_PERCENT
            for chunk in pack_paragraphs(topics[topic]):
                if chunk not in seen:
                    seen.add(chunk)
                    splits["validation" if in_validation else "train"].append(chunk)
        data = datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()})
        with atomic_folder(folder / "data") as tmp, quiet_datasets():
            data.save_to_disk(str(tmp))
        record = {
            "name": self.name, "builder": "datasets_build.text.TextDatasetBuilder",
            "command": options.command, "seed": options.seed, "build_date": now_iso(),
            "build_time_s": round(time.perf_counter() - start, 2),
            "rows": {k: len(v) for k, v in splits.items()},
            "characters": {k: sum(map(len, v)) for k, v in splits.items()},
            "topics": len(topics), "versions": package_versions(),
        }
        write_card(folder, self.name, self.description, record, {
            "Format": "`DatasetDict` under `data/` with splits `train` / `validation`, column `text`. "
                      "Load with `datasets_build.registry.load_dataset('text', root)`.",
        })
        return folder
