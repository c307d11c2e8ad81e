"""Finding and loading what the evaluation scripts need: a checkpoint and a dataset split.

Every ``eval.*`` entry point takes ``--model`` as a checkpoint folder (model and tokenizer written
by ``save_pretrained`` side by side), a run folder that holds one (so that the path the training run
printed can be pasted into any evaluation), or a 🤗 Hub repo id (``user/name``, downloaded once into
the Hub cache), so that a pushed checkpoint is evaluated exactly like a local one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from datasets import Dataset, DatasetDict, load_from_disk

from datasets_build.common import is_built
from datasets_build.registry import load_split_dataset
from generalist import GeneralistForCausalLM, GeneralistTokenizer, integrity
from generalist.hub import is_repo_id
from generalist.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from generalist.training.run_folder import RunFolder

MODEL_CONFIG_FILE = "config.json"


def is_checkpoint(folder: Path) -> bool:
    return (folder / MODEL_CONFIG_FILE).is_file() and (folder / TOKENIZER_CONFIG_FILE).is_file()


def is_hub_id(path: str | Path) -> bool:
    """``user/name`` that is not a local path: a Hub repo id."""
    return not Path(path).exists() and is_repo_id(str(path))


def download(repo_id: str, revision: str | None = None) -> Path:
    """The files of a model repo on the Hub (cached by ``huggingface_hub``), as a local folder."""
    try:
        return Path(huggingface_hub.snapshot_download(repo_id=repo_id, revision=revision, repo_type="model"))
    except Exception as e:  # offline, unknown repo, no access: say both readings of the argument
        raise FileNotFoundError(f"--model {repo_id}: no such local folder, and the 🤗 Hub repo could not be "
                                f"downloaded ({type(e).__name__}: {e})") from e


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, the newest checkpoint below ``path`` that verifies, or a Hub repo's files.

    In a run folder that is the final model (``RUN/model``, written last) or, for a run stopped
    early, its newest intermediate checkpoint. "Newest" is by the time the folder was published; a
    damaged one (:func:`generalist.integrity.verify` against its manifest) is skipped with a warning
    naming the damaged file, as ``train.py --resume`` does, and staging or set-aside folders are
    never candidates.
    """
    if is_hub_id(path):
        path = download(str(path))
    path = Path(path)
    if is_checkpoint(path):
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path}: no such folder")
    found = [p.parent for p in path.rglob(MODEL_CONFIG_FILE) if is_checkpoint(p.parent)
             and not any(part.startswith((".", integrity.CORRUPT_PREFIX)) for part in p.relative_to(path).parts)]
    if not found:
        raise FileNotFoundError(
            f"--model {path}: neither a checkpoint ({MODEL_CONFIG_FILE} + {TOKENIZER_CONFIG_FILE}) nor a folder "
            "containing one")
    newest_first = sorted(found, key=_published_at, reverse=True)
    chosen, damaged = integrity.newest_intact(newest_first)
    for folder, problem in damaged:
        print(f"WARNING: skipping damaged checkpoint {folder}: {problem}", file=sys.stderr)
    if chosen is None:
        raise FileNotFoundError(f"--model {path}: no checkpoint below it verifies: "
                                + "; ".join(problem for _, problem in damaged))
    return chosen


def _published_at(folder: Path) -> float:
    """When a checkpoint was completed: its manifest is written last (else its config, for older folders)."""
    marker = folder / integrity.MANIFEST
    return (marker if marker.is_file() else folder / MODEL_CONFIG_FILE).stat().st_mtime


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32"
                    ) -> tuple[GeneralistForCausalLM, GeneralistTokenizer, Path]:
    """Model (in eval mode, its weights in ``dtype``) and tokenizer from a checkpoint or run folder, and the
    folder used."""
    folder = resolve_checkpoint(path)
    tokenizer = GeneralistTokenizer.from_pretrained(folder)
    model = GeneralistForCausalLM.from_pretrained(folder).to(device, getattr(torch, dtype)).eval()
    if model.config.layout != tokenizer.layout:
        raise ValueError(f"{folder}: the model's vocabulary layout {model.config.layout} does not match its "
                         f"tokenizer's {tokenizer.layout}")
    return model, tokenizer, folder


def default_out(model_arg: str | Path) -> Path:
    """Where results go without ``--out``: the run folder's ``eval/`` (next to eval.control's results).

    ``--model`` may name the run folder or its exported model; results belong to the run either way,
    so that ``python -m eval.report RUN`` finds them. A loose checkpoint gets its own ``eval/``, a Hub
    checkpoint ``eval/<user>--<name>`` here.
    """
    if is_hub_id(model_arg):
        return Path("eval") / str(model_arg).replace("/", "--")
    path = Path(model_arg)
    for folder in (path, path.parent):
        if RunFolder(folder).is_run():
            return RunFolder(folder).eval
    return RunFolder(path).eval


def load_split(data: str | Path, split: str) -> Dataset:
    """One split of a dataset written with ``save_to_disk`` (a ``DatasetDict`` or a single ``Dataset``).

    ``data`` is either the saved dataset itself or a dataset folder built by ``datasets_build``.
    """
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"--data {data}: no such dataset folder")
    # a datasets_build folder is opened the way training opens it
    loaded = load_split_dataset(data.name, data.parent) if is_built(data) else load_from_disk(str(data))
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise KeyError(f"--data {data} has no split {split!r}; it has {sorted(loaded)}")
        return loaded[split]
    return loaded


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
