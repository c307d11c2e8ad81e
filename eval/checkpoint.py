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

from generalist import GeneralistForCausalLM, GeneralistTokenizer
from generalist.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE

MODEL_CONFIG_FILE = "config.json"


def is_checkpoint(folder: Path) -> bool:
    return (folder / MODEL_CONFIG_FILE).is_file() and (folder / TOKENIZER_CONFIG_FILE).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint folder somewhere below a run folder.

    "Newest" is by modification time, so a run folder that keeps intermediate checkpoints next to
    the final one resolves to the one written last.
    """
    path = Path(path)
    if is_checkpoint(path):
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path}: no such folder")
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


def load_split(data: str | Path, split: str) -> Dataset:
    """One split of a dataset written with ``save_to_disk`` (a ``DatasetDict`` or a single ``Dataset``)."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"--data {data}: no such dataset folder")
    loaded = load_from_disk(str(data))
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise KeyError(f"--data {data} has no split {split!r}; it has {sorted(loaded)}")
        return loaded[split]
    return loaded


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
