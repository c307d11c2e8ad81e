"""Caption held-out images with a checkpoint and score the captions.

    python -m eval.caption --model runs/NAME --data data/captions [--split test] [--max_samples N] \
        [--beam K] [--out DIR]

Captions come from :func:`generalist.modes.caption` (greedy, or beam search with ``--beam K > 1``),
the same decoding path a user calls. They are scored against the dataset's caption with

* corpus BLEU-4 (sacrebleu, 0..100),
* CIDEr-D (Vedantam et al. 2015, 0..10 per image; see :mod:`eval.metrics`). Its document
  frequencies are fitted on the references of the evaluated split, one reference per image here,
  so the number is comparable across models on the same split and not with published COCO figures,
* exact match after lower-casing and dropping punctuation.

The held-out split of our caption set contains attribute/object *compositions* never seen in
training, so these numbers measure generalisation, not recall.

Writes ``OUT/caption.json`` (metrics + every caption) and ``OUT/caption_examples.png`` (a grid of
images with generated and reference captions); ``OUT`` defaults to the run folder's ``eval/``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from eval.checkpoint import default_out, load_checkpoint, load_split, write_json
from eval.metrics import CiderD, bleu, exact_match, normalize
from eval.plots import CaptionExample, caption_grid
from generalist import GeneralistForCausalLM, GeneralistTokenizer
from generalist.engine import Engine
from generalist.modes import caption
from generalist.training.settings import parse

RESULTS_FILE = "caption.json"
EXAMPLES_FILE = "caption_examples.png"


@dataclass
class Args:
    model: Path
    """Checkpoint folder (model + tokenizer), or a run folder holding one."""
    data: Path
    """Caption dataset written with ``save_to_disk`` (columns ``image`` and ``caption``)."""
    split: str = "test"
    """Which split to caption (``test`` holds the held-out compositions)."""
    max_samples: int | None = None
    """Caption only the first N images (quick checks)."""
    beam: int = 1
    """Beam width; 1 is greedy decoding."""
    max_new_tokens: int = 32
    """Longest caption, in text tokens."""
    batch_size: int = 16
    """Images decoded together (each is one row of the engine's KV cache; x beam width with beams)."""
    examples: int = 12
    """Images shown in the example grid."""
    out: Path | None = None
    """Folder for ``caption.json`` and ``caption_examples.png``; defaults to the run folder's ``eval/``."""
    device: str = "cpu"
    """Torch device."""
    seed: int = 0
    """Seed of the decoding engine (only matters for sampled decoding)."""


@dataclass
class CaptionScores:
    bleu: float
    """Corpus BLEU-4, 0..100."""
    cider_d: float
    """Mean per-image CIDEr-D, 0..10."""
    exact_match: float
    """Fraction of captions equal to the reference after normalisation."""
    samples: int


def score_captions(generated: Sequence[str], references: Sequence[Sequence[str]]
                   ) -> tuple[CaptionScores, list[float]]:
    """Corpus scores and the per-image CIDEr-D of ``generated`` against ``references``."""
    per_image = CiderD(references).scores(generated)
    scores = CaptionScores(
        bleu=bleu(generated, references),
        cider_d=sum(per_image) / len(per_image),
        exact_match=exact_match(generated, references),
        samples=len(generated),
    )
    return scores, per_image


def generate_captions(model: GeneralistForCausalLM, tokenizer: GeneralistTokenizer, images: Sequence,
                      beam: int = 1, max_new_tokens: int = 32, batch_size: int = 16, seed: int = 0,
                      progress: bool = True) -> list[str]:
    """One caption per image, decoded in batches with :func:`generalist.modes.caption`."""
    if beam < 1:
        raise ValueError(f"--beam must be >= 1, got {beam}")
    engine = Engine(model, seed=seed)
    out: list[str] = []
    for start in tqdm(range(0, len(images), batch_size), desc="captioning", unit="batch", disable=not progress):
        out += caption(engine, tokenizer, images[start:start + batch_size], max_new_tokens=max_new_tokens,
                       beam_width=beam)
    return [c.strip() for c in out]


def main(args: Args) -> dict:
    model, tokenizer, folder = load_checkpoint(args.model, args.device)
    dataset = load_split(args.data, args.split)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"--data {args.data} split {args.split!r} is empty")
    images, refs = dataset["image"], dataset["caption"]
    began = time.perf_counter()
    generated = generate_captions(model, tokenizer, images, args.beam, args.max_new_tokens, args.batch_size,
                                  args.seed)
    seconds = time.perf_counter() - began
    references = [[r] for r in refs]
    scores, per_image = score_captions(generated, references)
    out = args.out or default_out(args.model)
    shown = [CaptionExample(images[i], generated[i], refs[i], normalize(generated[i]) == normalize(refs[i]))
             for i in range(min(args.examples, len(images)))]
    grid = caption_grid(shown, out / EXAMPLES_FILE) if shown else None
    payload = {
        "task": "caption",
        "checkpoint": str(folder),
        "data": str(args.data),
        "split": args.split,
        "decoding": {"beam": args.beam, "max_new_tokens": args.max_new_tokens},
        "metrics": asdict(scores),
        "references_per_image": 1,
        "cider_d_note": "document frequencies fitted on this split's references (one per image)",
        "seconds": round(seconds, 2),
        "captions_per_second": round(len(generated) / seconds, 2) if seconds else None,
        "examples_png": grid.name if grid else None,
        "captions": [{"index": i, "reference": r, "generated": g, "cider_d": round(c, 4),
                      "exact": normalize(g) == normalize(r)}
                     for i, (g, r, c) in enumerate(zip(generated, refs, per_image, strict=True))],
    }
    path = write_json(out / RESULTS_FILE, payload)
    print(f"BLEU {scores.bleu:.2f}  CIDEr-D {scores.cider_d:.3f}  exact {scores.exact_match:.1%} "
          f"over {scores.samples} images ({args.split}) -> {path}")
    return payload


if __name__ == "__main__":
    main(parse(Args, description=__doc__))
