"""Training throughput of GeneralistForCausalLM against its bare backbone, and the data pipeline's share.

    python bench/train.py                     # the demo preset's model and context, demo data if built
    python bench/train.py --preset small --batch_size 4

Prints ratios from one run (the training figures of docs/speed.md):

- ``generalist / backbone tokens/s`` (goal >= 0.9): one optimizer step (forward, backward, AdamW) of
  ``GeneralistForCausalLM`` on a packed mixed batch, against ``AutoModelForCausalLM.from_config(
  config.text_config)`` on the same ``input_ids`` (same token count, same vocabulary). Steps of
  the two alternate so that machine noise hits both alike; medians are compared. The same ratio on
  a text-only batch separates the wrapper's own cost from the cost of embedding image patches.
- ``data share`` (goal <= 5 %): the share of a training step spent waiting for the next batch
  from the DataLoader workers that tokenize and pack, and, for scale, what building a batch would
  cost in the training process itself.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from datasets_build import synthetic
from datasets_build.sources import load_sources, parse_mixture
from generalist import GeneralistForCausalLM, GeneralistTokenizer
from generalist.packing import CaptionSource, ControlSource, Mixture, PackedStream, PackingConfig, TextSource
from generalist.training.settings import parse
from generalist.vocab import Modality

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    preset: str = "demo"
    """train.py preset whose model size and context are measured"""
    batch_size: int | None = None
    """sequences per batch (default: the preset's)"""
    steps: int = 6
    """timed steps per model (after 2 warm-up steps)"""
    data_steps: int = 12
    """training steps timed with the DataLoader feeding them"""
    num_workers: int | None = None
    """DataLoader workers (default: the preset's)"""
    data_root: Path = ROOT / "data"
    """built datasets; the preset's mixture is used if it is built there, otherwise tiny in-memory data"""


def sources(args, data_root: Path):
    """The preset's mixture if it is built, otherwise tiny synthetic data of every kind."""
    weights = parse_mixture(args.mixture)
    if all((data_root / name).exists() for name in weights):
        srcs, _, specs = load_sources(weights, data_root)
        return srcs, [weights[s.name] for s in srcs], specs
    print(f"note: {args.mixture!r} is not built under {data_root}; using tiny synthetic data")
    eps = synthetic.episodes(24)
    srcs = [TextSource("text", synthetic.texts(200)), CaptionSource("captions", synthetic.captions(64)),
            ControlSource("control", eps, [e["task"] for e in eps])]
    return srcs, [1.0, 1.0, 2.0], synthetic.task_specs()


def timed_step(model, optimizer, batch) -> float:
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def compare(generalist, backbone, batch: dict, steps: int) -> tuple[float, float]:
    """Median seconds per optimizer step of each model, alternating."""
    bb_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    opt_g = torch.optim.AdamW(generalist.parameters(), 1e-4)
    opt_b = torch.optim.AdamW(backbone.parameters(), 1e-4)
    g, b = [], []
    for i in range(steps + 2):
        tg, tb = timed_step(generalist, opt_g, batch), timed_step(backbone, opt_b, bb_batch)
        if i >= 2:
            g.append(tg)
            b.append(tb)
    return statistics.median(g), statistics.median(b)


def main(bench: Args) -> None:
    sys.path.insert(0, str(ROOT))  # train.py is a script next to the packages, not one of them
    import train  # the training script's presets and model

    train.keep_freed_memory_in_heap()  # as train.py does: the step's buffers stay mapped between steps
    torch.manual_seed(0)
    args = train.parse_args(["--preset", bench.preset])
    if bench.batch_size:
        args = dataclasses.replace(args, batch_size=bench.batch_size)
    workers = args.num_workers if bench.num_workers is None else bench.num_workers
    srcs, weights, specs = sources(args, bench.data_root)
    tok = GeneralistTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else GeneralistTokenizer.default()
    for spec in specs.values():
        tok.add_task_spec(spec)
    mix = Mixture(srcs, weights, tok, PackingConfig(seq_len=args.seq_len))
    batch = mix.batch(args.seed, 0, 0, args.batch_size)
    config = train.model_config(args, tok)
    generalist = GeneralistForCausalLM(config).train()
    backbone = AutoModelForCausalLM.from_config(config.text_config).train()
    tokens = batch["input_ids"].numel()
    n_img = int((batch["modality_ids"] == Modality.IMAGE).sum())
    print(f"{args.preset}: {sum(p.numel() for p in generalist.parameters()) / 1e6:.2f}M parameters, "
          f"batch {tuple(batch['input_ids'].shape)} = {tokens} tokens ({n_img} image patches), "
          f"{torch.get_num_threads()} threads")

    g, b = compare(generalist, backbone, batch, bench.steps)
    print(f"mixed batch:  generalist {tokens / g:,.0f} tok/s  backbone {tokens / b:,.0f} tok/s  "
          f"ratio {b / g:.3f}  (goal >= 0.9)")
    text_only = dict(batch)
    ids = batch["input_ids"].clone()
    ids[ids == tok.image_id] = tok.pad_id  # same token count, no patches to embed
    text_only.update(input_ids=ids, labels=torch.where(batch["attention_mask"] == 1, ids, -100),
                     patches=batch["patches"][:0], patch_positions=batch["patch_positions"][:0])
    g2, b2 = compare(generalist, backbone, text_only, bench.steps)
    print(f"no images:    generalist {tokens / g2:,.0f} tok/s  backbone {tokens / b2:,.0f} tok/s  "
          f"ratio {b2 / g2:.3f}  (the wrapper alone)")

    # data: what the training step waits for, with tokenization in DataLoader workers
    t0 = time.perf_counter()
    for k in range(4):
        mix.batch(args.seed, 0, 100 + k, args.batch_size)
    build = (time.perf_counter() - t0) / 4
    loader = iter(DataLoader(PackedStream(mix, args.batch_size, args.seed, start_batch=1000), batch_size=None,
                             num_workers=workers, prefetch_factor=4 if workers else None))
    opt = torch.optim.AdamW(generalist.parameters(), 1e-4)
    next(loader)  # workers started
    waits, steps = [], []
    for _ in range(bench.data_steps):
        t0 = time.perf_counter()
        nxt = next(loader)
        waits.append(time.perf_counter() - t0)
        steps.append(timed_step(generalist, opt, nxt))
    wait, step = sum(waits), sum(steps)
    print(f"data:         waiting for batches {wait / (wait + step):.1%} of step time with {workers} worker(s) "
          f"(goal <= 5%); building a batch in-process would be {build / (step / len(steps)):.1%} of a step "
          f"({build * 1000:.0f} ms)")


if __name__ == "__main__":
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")  # as train.py: patch counts vary per batch
    main(parse(Args, description=__doc__))
