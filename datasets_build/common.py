"""Helpers every builder shares: deterministic seeds, build records, atomic small files.

Why atomic writes: a build can be interrupted at any point (Ctrl-C, OOM, a crashed env). Every
shard and every finished dataset folder is written with :func:`generalist.integrity.atomic_folder`
(a hidden staging folder, a manifest of sizes and sha256, then one ``os.replace``), the scheme
checkpoints and model weights use too. A folder that exists under its final name is therefore
always complete, and a rebuild can skip it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from generalist.integrity import TMP_PREFIX

BUILD_RECORD = "build.json"  # written last: its presence marks a dataset as completely built
CARD = "README.md"
TASK_SPECS = "task_specs.json"
# packages whose versions decide what a build produces; recorded in every dataset card
RECORDED_PACKAGES = ("generalist", "numpy", "datasets", "gymnasium", "minigrid", "metaworld", "mujoco",
                     "minari", "pillow", "torch")


def stable_hash(text: str) -> int:
    """A hash of ``text`` that is the same in every process (``hash()`` is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def derive_seed(*parts: int | str) -> int:
    """A 31-bit seed derived deterministically from ``parts`` (ints and strings).

    Used for episode seeds from (build seed, task, source, shard, index): the same episode gets the
    same seed whatever the number of envs, the order of collection or an interruption in between.
    """
    entropy = [p if isinstance(p, int) else stable_hash(p) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0] >> 1)


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence 🤗 datasets' per-save progress bars (ours already show progress)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def nice_scale(target: float, magnitude: float) -> float:
    """``target / magnitude`` rounded down to 1, 2 or 5 times a power of ten (readable in cards).

    Rounding *down* keeps ``magnitude * scale <= target``; a zero magnitude gives scale 1.
    """
    if not np.isfinite(magnitude) or magnitude <= 0:
        return 1.0
    raw = target / magnitude
    exponent = np.floor(np.log10(raw))
    mantissa = raw / 10**exponent
    step = max(m for m in (1.0, 2.0, 5.0) if m <= mantissa + 1e-9)
    return float(step * 10**exponent)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_card(folder: Path, title: str, description: str, record: dict[str, Any],
               sections: dict[str, str] | None = None) -> None:
    """Write the dataset card (README.md) and its machine-readable twin (build.json).

    ``build.json`` is written last, so it only exists for a completely built dataset.
    """
    lines = [f"# {title}", "", description.strip(), "", "## How it was built", ""]
    command = record.get("command", "")
    if command:
        lines += ["```", command, "```", ""]
    for key in ("builder", "seed", "build_time_s", "build_date", "episodes", "steps", "rows"):
        if key in record:
            lines.append(f"- **{key}**: {record[key]}")
    lines += ["", "Package versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()), ""]
    for heading, body in (sections or {}).items():
        lines += [f"## {heading}", "", body.strip(), ""]
    write_text_atomic(folder / CARD, "\n".join(lines))
    write_json_atomic(folder / BUILD_RECORD, record)


def is_built(folder: Path) -> bool:
    return (folder / BUILD_RECORD).exists()
