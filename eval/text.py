"""Validation perplexity of a checkpoint on a text dataset.

    python -m eval.text --model runs/NAME --data data/text [--split validation] [--max_length 512]

Perplexity is ``exp(mean NLL)`` over the *text* targets only, taken from the model's own forward
(``labels`` + ``modality_ids``: the per-modality losses it reports for logging), so the number
measures exactly what training optimised and never counts ``<bos>``, padding or other modalities.
Each document is encoded as in training (``<bos> text <eos>``; ``<eos>`` is a text target, as it is
for the training loss). Documents longer than ``max_length`` are cut into consecutive windows of
``max_length`` tokens; the first token of each window has no target, and the others see only the
context inside their window (the usual non-overlapping evaluation: a slight over-estimate of the
perplexity a model with unlimited context would get).

Writes ``OUT/text.json`` (``OUT`` defaults to the run folder's ``eval/``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from eval.checkpoint import default_out, load_checkpoint, load_split, write_json
from generalist import GeneralistForCausalLM, GeneralistTokenizer
from generalist.tokenizer import Sample, slice_sample
from generalist.training.settings import parse

TEXT_TARGET = "text"  # the key of GeneralistCausalLMOutput.modality_losses for text targets


@dataclass
class Args:
    model: Path
    """Checkpoint folder (model + tokenizer), or a run folder holding one."""
    data: Path
    """Text dataset written with ``save_to_disk`` (column ``text``)."""
    split: str = "validation"
    """Which split to evaluate."""
    column: str = "text"
    """Column holding the documents."""
    max_length: int = 512
    """Tokens per window; longer documents are split into several windows."""
    batch_size: int = 8
    """Windows per forward pass."""
    max_samples: int | None = None
    """Evaluate only the first N documents (quick checks)."""
    out: Path | None = None
    """Folder for ``text.json``; defaults to the run folder's ``eval/``."""
    device: str = "cpu"
    """Torch device."""


@dataclass
class PerplexityResult:
    perplexity: float
    """exp(nll)."""
    nll: float
    """Mean negative log-likelihood per text target token, in nats."""
    tokens: int
    """Number of text target tokens scored."""
    documents: int
    windows: int


def windows(samples: Iterable[Sample], max_length: int) -> list[Sample]:
    """Cut each sample into consecutive windows of at most ``max_length`` tokens."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one input and one target), got {max_length}")
    out = []
    for s in samples:
        n = len(s["input_ids"])
        out += [slice_sample(s, start, start + max_length) for start in range(0, n, max_length)]
    return [w for w in out if len(w["input_ids"]) > 1]


@torch.inference_mode()
def perplexity(model: GeneralistForCausalLM, tokenizer: GeneralistTokenizer, texts: Sequence[str],
               max_length: int = 512, batch_size: int = 8, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``texts`` over text targets (see the module docstring)."""
    chunks = windows((tokenizer.encode_text_sample(t) for t in texts), max_length)
    chunks.sort(key=lambda s: len(s["input_ids"]))  # similar lengths together: less padding
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    batches = range(0, len(chunks), batch_size)
    for start in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        batch = tokenizer.collate(chunks[start:start + batch_size])
        out = model(**{k: v.to(device) for k, v in batch.items()})
        if TEXT_TARGET in out.modality_losses:
            count = int(out.modality_counts[TEXT_TARGET])
            total_nll += float(out.modality_losses[TEXT_TARGET]) * count
            total_tokens += count
    if total_tokens == 0:
        raise ValueError(f"no text targets in {len(texts)} documents (all empty?)")
    nll = total_nll / total_tokens
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=total_tokens, documents=len(texts),
                            windows=len(chunks))


def main(args: Args) -> dict:
    model, tokenizer, folder = load_checkpoint(args.model, args.device)
    dataset = load_split(args.data, args.split)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    texts = [t for t in dataset[args.column] if t]
    began = time.perf_counter()
    result = perplexity(model, tokenizer, texts, args.max_length, args.batch_size)
    payload = {
        "task": "text",
        "checkpoint": str(folder),
        "data": str(args.data),
        "split": args.split,
        "max_length": args.max_length,
        **asdict(result),
        "seconds": round(time.perf_counter() - began, 2),
    }
    path = write_json((args.out or default_out(args.model)) / "text.json", payload)
    print(f"perplexity {result.perplexity:.3f} (nll {result.nll:.4f} nats over {result.tokens} text tokens, "
          f"{result.documents} documents) -> {path}")
    return payload


if __name__ == "__main__":
    main(parse(Args, description=__doc__))
