"""Finding and loading what the evaluation scripts need: a checkpoint and a dataset split.

Every ``eval.*`` entry point takes ``--model`` as either a checkpoint folder (model and tokenizer
written by ``save_pretrained`` side by side) or a run folder that holds one, so that the same path
the training run printed can be pasted into any evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_from_disk

from datasets_build.common import is_built
from datasets_build.registry import load_split_dataset
from generalist import GeneralistForCausalLM, GeneralistTokenizer
from generalist.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE

MODEL_CONFIG_FILE = "config.json"
FINAL_MODEL_DIR = "model"  # where train.py exports the final model inside a run folder
EVAL_DIR = "eval"  # where every eval.* script writes its results inside a run folder
RUN_MARKERS = ("train_metrics.csv", "args.json", "metrics.json")  # files only a run folder has


def is_checkpoint(folder: Path) -> bool:
    return (folder / MODEL_CONFIG_FILE).is_file() and (folder / TOKENIZER_CONFIG_FILE).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, a run folder's final model, or its newest checkpoint.

    ``train.py`` exports the final model to ``RUN/model`` and keeps intermediate checkpoints under
    ``RUN/checkpoints``; a run that was stopped early has only the latter, so the newest one (by
    modification time) is used then.
    """
    path = Path(path)
    if is_checkpoint(path):
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path}: no such folder")
    if is_checkpoint(path / FINAL_MODEL_DIR):
        return path / FINAL_MODEL_DIR
    found = [p.parent for p in path.rglob(MODEL_CONFIG_FILE) if is_checkpoint(p.parent)]
    if not found:
        raise FileNotFoundError(
            f"--model {path}: neither a checkpoint ({MODEL_CONFIG_FILE} + {TOKENIZER_CONFIG_FILE}) nor a folder "
            "containing one")
    return max(found, key=lambda p: (p / MODEL_CONFIG_FILE).stat().st_mtime)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[GeneralistForCausalLM, GeneralistTokenizer, Path]:
    """Model (in eval mode) and tokenizer from a checkpoint or run folder, and the folder used."""
    folder = resolve_checkpoint(path)
    tokenizer = GeneralistTokenizer.from_pretrained(folder)
    model = GeneralistForCausalLM.from_pretrained(folder).to(device).eval()
    if model.config.layout != tokenizer.layout:
        raise ValueError(f"{folder}: the model's vocabulary layout {model.config.layout} does not match its "
                         f"tokenizer's {tokenizer.layout}")
    return model, tokenizer, folder


def default_out(model_arg: str | Path) -> Path:
    """Where results go without ``--out``: the run folder's ``eval/`` (next to eval.control's results).

    ``--model`` may name the run folder or its exported model; results belong to the run either way,
    so that ``python -m eval.report RUN`` finds them. A loose checkpoint gets its own ``eval/``.
    """
    path = Path(model_arg)
    for folder in (path, path.parent):
        if any((folder / marker).exists() for marker in RUN_MARKERS):
            return folder / EVAL_DIR
    return path / EVAL_DIR


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
