"""Built datasets as 🤗 Hub datasets: push one, and open a pushed one as training opens a local one.

    python -m datasets_build push --dataset control-core --repo_id user/control-core [--out data]
    python train.py --mixture user/control-core=1,text=1       # a Hub id and a local dataset alike

A Hub copy holds what a local build holds, in the Hub's own form: the episodes as parquet under
``data/<task>/`` (one config per task, and ``default`` for all of them; caption and text datasets: each
split under ``data/``), the task specs *inside* the repo (``task_specs.json``, and the task list in
the card's YAML), ``build.json`` (how it was made), and a ``DatasetCard`` whose YAML states the
license, task category, size, the ``configs`` that ``datasets.load_dataset(repo_id)`` reads, and the
expert / random reference returns. :func:`open_hub_dataset` downloads a repo (``snapshot_download``,
cached) and returns a folder that :func:`datasets_build.sources.load_sources` opens like a local build,
so a pushed and reloaded dataset trains exactly like the original (``tests/test_datasets_hub.py``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
from huggingface_hub import DatasetCard, DatasetCardData

from datasets_build.common import BUILD_RECORD, CARD, TASK_SPECS
from datasets_build.episodes import load_shards, load_task_specs
from generalist.hub import is_repo_id, push_folder

PARQUET_DIR = "data"  # <split>-00000-of-00001.parquet, the layout the Hub's dataset viewer reads
TASK_CATEGORY = {"control": "reinforcement-learning", "caption": "image-to-text", "text": "text-generation"}


def _size_category(rows: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if rows < limit:
            return name
    return "1M<n<10M"


def hub_layout(folder: Path, staging: Path) -> dict[str, Any]:
    """Write ``folder`` (a built dataset) into ``staging`` as the Hub copy; returns the card's metadata."""
    from datasets_build.sources import dataset_kind, open_splits

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such dataset folder; build it first (python -m datasets_build NAME)")
    kind = dataset_kind(folder)
    splits = {"train": load_shards(folder)} if kind == "control" else open_splits(folder)
    (staging / PARQUET_DIR).mkdir(parents=True)
    configs = []
    if kind == "control":  # one folder (and config) per task, in the order load_shards reads the shards
        tasks = splits["train"]["task"]
        for task in sorted(set(tasks), key=task_folder):
            rows = [i for i, t in enumerate(tasks) if t == task]
            splits["train"].select(rows).to_parquet(
                str(staging / PARQUET_DIR / task_folder(task) / "train-00000-of-00001.parquet"))
            configs.append({"config_name": task_folder(task), "data_files": [
                {"split": "train", "path": f"{PARQUET_DIR}/{task_folder(task)}/train-*.parquet"}]})
        configs.insert(0, {"config_name": "default", "default": True, "data_files": [
            {"split": "train", "path": f"{PARQUET_DIR}/*/train-*.parquet"}]})
    else:
        for split, ds in splits.items():
            ds.to_parquet(str(staging / PARQUET_DIR / f"{split}-00000-of-00001.parquet"))
        configs = [{"config_name": "default", "data_files": [
            {"split": s, "path": f"{PARQUET_DIR}/{s}-*.parquet"} for s in sorted(splits)]}]
    for name in (TASK_SPECS, BUILD_RECORD):
        if (folder / name).is_file():
            shutil.copy(folder / name, staging / name)
    rows = sum(len(ds) for ds in splits.values())
    meta: dict[str, Any] = {"kind": kind, "rows": rows, "splits": sorted(splits), "configs": configs}
    if kind == "control":
        specs = load_task_specs(folder)
        meta["tasks"] = {name: {"expert_return": s.expert_return, "random_return": s.random_return}
                         for name, s in specs.items()}
    return meta


def dataset_card(folder: Path, repo_id: str, meta: dict[str, Any]) -> DatasetCard:
    """The local card's text under YAML metadata the Hub understands."""
    data = DatasetCardData(
        license="apache-2.0", pretty_name=folder.name, task_categories=[TASK_CATEGORY[meta["kind"]]],
        size_categories=[_size_category(meta["rows"])], tags=["generalist", meta["kind"], *meta.get("tasks", {})],
        configs=meta["configs"],
        generalist={"kind": meta["kind"], "task_specs_file": TASK_SPECS if meta["kind"] == "control" else None,
                    "reference_returns": meta.get("tasks")},
    )
    body = (folder / CARD).read_text() if (folder / CARD).is_file() else f"# {folder.name}\n"
    load = (f"\n## Load\n\n```python\nfrom datasets_build.hub import open_hub_dataset\n"
            f"folder = open_hub_dataset({repo_id!r})   # then train.py --mixture {repo_id}=1\n```\n\n"
            f"or the episodes alone: `datasets.load_dataset({repo_id!r})`; task specs in `{TASK_SPECS}`.\n")
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body.rstrip()}\n{load}")


def push_dataset(folder: Path, repo_id: str, *, token: str | None = None, private: bool = False,
                 retries: int = 4) -> bool:
    """Push a built dataset to ``repo_id`` (a dataset repo); True when it landed."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        meta = hub_layout(folder, staging)
        dataset_card(folder, repo_id, meta).save(staging / CARD)
        return push_folder(staging, repo_id, token=token, private=private, retries=retries, repo_type="dataset",
                           commit_message=f"Upload generalist dataset {folder.name}")


def is_hub_dataset_id(name: str, root: Path) -> bool:
    """``user/name`` that is not a dataset folder under ``root``."""
    return not (Path(root) / name).exists() and is_repo_id(name)


def open_hub_dataset(repo_id: str, revision: str | None = None) -> Path:
    """Download (or reuse the cached copy of) a pushed dataset; a folder :func:`load_sources` can open."""
    try:
        return Path(huggingface_hub.snapshot_download(repo_id=repo_id, repo_type="dataset", revision=revision))
    except Exception as e:
        raise FileNotFoundError(f"--mixture {repo_id}: no such local dataset, and the 🤗 Hub dataset could not be "
                                f"downloaded ({type(e).__name__}: {e})") from e


def task_folder(task: str) -> str:
    """A task's folder (and config name) under ``data/``, as ``shards/`` names it."""
    return task.replace("/", "_")


def parquet_files(folder: Path) -> dict[str, list[str]]:
    """``{split: files}`` of a Hub copy: ``data/<split>-*.parquet`` or, per task, ``data/<task>/<split>-*.parquet``
    (sorted by path: tasks in the order the local build stores them)."""
    files: dict[str, list[str]] = {}
    for f in sorted((Path(folder) / PARQUET_DIR).rglob("*.parquet")):
        files.setdefault(f.name.split("-", 1)[0], []).append(str(f))
    return files


def is_hub_copy(folder: Path) -> bool:
    return bool(parquet_files(folder))


def load_hub_splits(folder: Path) -> dict[str, datasets.Dataset]:
    """The splits of a Hub copy."""
    files = parquet_files(folder)
    loaded = datasets.load_dataset("parquet", data_files=files)
    return dict(loaded)
