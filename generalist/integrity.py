"""One integrity scheme for every folder we write and read back: model weights, training
checkpoints, dataset shards.

Why one: runs are killed at any point (SIGKILL, OOM, a full disk) and files are damaged after the
fact (a truncated copy, a flipped byte). Each writer used to guard against that its own way; now
all of them follow the same four rules, so a reader can trust one check:

1. write into a hidden staging folder next to the final one (:func:`staging_dir`, ``.tmp-NAME``),
2. list every file's size and sha256 in ``manifest.json`` (:func:`write_manifest`) and flush files
   and folders to disk (:func:`fsync_tree`),
3. publish by ``os.replace`` (:func:`publish`), atomic on one filesystem: a folder under its final
   name is complete, and a killed write leaves only a ``.tmp-`` folder that nobody reads,
4. check a folder against its manifest before use (:func:`verify`, which names the damaged file),
   and among candidates take the newest that verifies (:func:`newest_intact`), setting damaged ones
   aside (:func:`set_aside`) rather than deleting them.

:func:`atomic_folder` bundles 1-3 for a single writer. This module imports only the standard
library, so every layer (the library, ``train.py``, ``eval``, ``datasets_build``) can use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.json"
# {file name: sha256} of weight files, written by save_pretrained before the manifest existed; read, never written
LEGACY_CHECKSUMS = "checksums.json"
TMP_PREFIX = ".tmp-"  # a staging folder: never read, removed by clean_staging
CORRUPT_PREFIX = "corrupt-"  # a folder that failed verification, kept for inspection
# Files outside the manifest: a model card is documentation that evaluation rewrites after the
# checkpoint is published (its scores), and nothing reads it as data.
UNCHECKED = frozenset({"README.md"})


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (weights and optimizer states are large)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, files: Iterable[Path] | None = None) -> Path:
    """Record size and sha256 of ``files`` (default: every file below ``folder``) in ``folder/manifest.json``."""
    folder = Path(folder)
    chosen = sorted(folder.rglob("*") if files is None else (folder / f for f in files))
    entries = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
               for p in chosen if p.is_file() and p.name != MANIFEST and p.name not in UNCHECKED}
    path = folder / MANIFEST
    path.write_text(json.dumps(entries, indent=2))
    return path


def read_manifest(folder: Path) -> dict[str, dict] | None:
    """``{relative path: {"bytes", "sha256"}}``, or None when the folder has no manifest.

    Raises ``ValueError`` naming the file when the manifest itself is unreadable.
    """
    folder = Path(folder)
    for name in (MANIFEST, LEGACY_CHECKSUMS):
        path = folder / name
        if path.is_file():
            try:
                entries = json.loads(path.read_text())
                if not isinstance(entries, dict):
                    raise ValueError(f"expected an object, got {type(entries).__name__}")
            except (OSError, ValueError) as e:
                raise ValueError(f"{path} is unreadable ({e!r})") from e
            return {k: v if isinstance(v, dict) else {"sha256": v} for k, v in entries.items()}
    return None


def verify(folder: Path, include: Callable[[str], bool] | None = None, *, hashes: bool = True) -> str | None:
    """None if every listed file (those ``include`` accepts) is whole, else what is wrong, naming the file.

    A folder without a manifest (written before this scheme) has nothing to check and passes.
    ``hashes=False`` checks sizes only: it catches truncation for the price of a ``stat``, where
    hashing would read every byte (used for dataset shards, which are read on every training start).
    """
    folder = Path(folder)
    try:
        entries = read_manifest(folder)
    except ValueError as e:
        return str(e)
    for name, meta in (entries or {}).items():
        if Path(name).name in UNCHECKED or (include is not None and not include(name)):
            continue
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if "bytes" in meta and size != meta["bytes"]:
            return f"{path} is truncated or corrupted: {size} bytes, expected {meta['bytes']}"
        if hashes and sha256_file(path) != meta["sha256"]:
            return f"{path} is corrupted: its sha256 differs from {MANIFEST}"
    return None


def newest_intact(candidates: Iterable[Path], check: Callable[[Path], str | None] = verify
                  ) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The first of ``candidates`` (give them newest first) that passes ``check``, and the ones before it
    that did not, each with what is wrong. The fallback rule every reader follows."""
    damaged = []
    for folder in candidates:
        problem = check(folder)
        if problem is None:
            return folder, damaged
        damaged.append((folder, problem))
    return None, damaged


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder below ``folder`` to disk, so that the rename publishes whole files."""
    folder = Path(folder)
    for path in [*sorted(folder.rglob("*"), reverse=True), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def staging_dir(final: Path, owner: str = "") -> Path:
    """The hidden folder ``final`` is written in before :func:`publish`. Processes that write one
    folder together share it (no ``owner``); independent writers pass their own ``owner``."""
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{final.name}{'-' + owner if owner else ''}")


def remove_dir(folder: Path) -> None:
    """Delete a folder so that a kill midway never leaves a half-deleted folder under its name."""
    folder = Path(folder)
    if folder.exists():
        doomed = folder.with_name(f"{TMP_PREFIX}deleting-{folder.name}")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def publish(tmp: Path, final: Path) -> Path:
    """Flush ``tmp`` and rename it to ``final`` (replacing a folder of that name) in one step."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    remove_dir(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def fsync_dir(folder: Path) -> None:
    """Flush one folder's entries (a rename is durable only once its parent folder is flushed)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(final: Path, *, manifest: bool = True) -> Iterator[Path]:
    """Yield a private staging folder; on success write its manifest and publish it as ``final``.

    On an exception the staging folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(final, owner=str(os.getpid()))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if manifest:
            write_manifest(tmp)
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_staging(parent: Path) -> None:
    """Delete the staging folders a killed writer left in ``parent``."""
    parent = Path(parent)
    if parent.exists():
        for tmp in parent.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)


def set_aside(folder: Path) -> Path:
    """Rename a damaged folder to ``corrupt-NAME`` (out of every reader's way, kept for inspection)."""
    folder = Path(folder)
    target = folder.with_name(CORRUPT_PREFIX + folder.name)
    remove_dir(target)
    os.replace(folder, target)
    return target
