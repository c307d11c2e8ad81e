"""Train a generalist: one causal transformer over text, images, observations, actions, rewards and returns.

    python train.py                          # the demo: build the demo mixture, train ~10 min on CPU, evaluate
    python train.py --preset small           # a bigger model for one GPU
    python train.py --resume                 # continue runs/<run_name> exactly where it stopped
    accelerate launch --config_file accelerate_configs/ddp_cpu_2proc.yaml train.py   # several processes

Read top to bottom: settings, data, model, the loop (log, evaluate, checkpoint), the final model.
Every setting is a flag (``--help``); presets change the defaults, flags override them.

A run folder ``runs/<run_name>/``::

    model/                      the final model: save_pretrained artifacts of model and tokenizer + README.md card
    checkpoints/step_XXXXXXXX/  the same artifacts, plus state/ (accelerate.save_state: optimizer, schedule,
                                RNG of every process), trainer_state.json (step, data-stream position) and
                                manifest.json (size and sha256 of every file); published by an atomic
                                rename, the newest --keep_last kept
    train_metrics.csv           loss per target modality, lr, grad norm, tokens/s, data wait share
    eval_metrics.csv            held-out loss per modality
    tensorboard/                the same scalars (losses under train/, eval/)
    learning_curves.png         loss per modality against training tokens
    metrics.json, args.json     summary (wall time, tokens/s, final losses, evaluation) and settings
    eval/, report.md            results of the eval package on the final model, and its report
    param_hashes/rankN.txt      sha256 of the final parameters on every process (they must agree)

Faults. A run killed at any point (even SIGKILL) resumes with ``--resume`` from its newest complete
checkpoint with the same data order; a half-written checkpoint is a hidden ``.tmp-`` folder that is
never resumed from and is cleaned up. ``--resume`` checks every file of the checkpoint against its
manifest: a truncated or corrupted one is skipped with a warning that names the damaged file, renamed
to ``checkpoints/corrupt-step_XXXXXXXX``, and training resumes from the previous complete checkpoint;
if none is complete, the run refuses to start. A failed checkpoint write (disk full) raises an
``OSError`` naming the checkpoint and leaves the previous ones intact. Conflicting or impossible flags
(``--push_to_hub`` without ``--hub_model_id``, ``--resume`` with ``--overwrite``, an unknown
``--mixture``) stop the run before any work starts.

Data-parallel processes do not split batches: each packs its own shard of the stream, a pure
function of (seed, rank, batch index), which is also what makes ``--resume`` exact.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenize in DataLoader workers instead
# Every batch has its own number of image patches, and oneDNN caches one convolution primitive per
# shape (1024 by default): the patch encoder's memory then grows by gigabytes over a run. A small
# cache bounds it; re-creating a primitive costs milliseconds per step.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")

import matplotlib
import numpy as np
import torch
import tyro
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

import generalist  # noqa: F401  (registers the model type with transformers' Auto classes)
from generalist import GeneralistConfig, GeneralistForCausalLM, GeneralistTokenizer
from generalist.hub import HubPusher, write_model_card
from generalist.packing import CaptionSource, ControlSource, Mixture, PackedStream, PackingConfig, TextSource

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODALITIES = ("text", "caption", "observation", "action", "reward", "return", "value")
CHECKPOINTS_DIR = "checkpoints"
STATE_DIR = "state"  # accelerate.save_state: model, optimizer, scheduler, RNG of every process
TRAINER_STATE = "trainer_state.json"  # step and data-stream position
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"  # size and sha256 of every file of a checkpoint, checked by --resume
CORRUPT_PREFIX = "corrupt-"  # a damaged checkpoint is renamed aside (kept for inspection) on --resume


@dataclass
class Args:
    # --- run ---
    preset: Literal["demo", "control", "small", "base"] = "demo"
    """named defaults: demo (CPU, ~10 min), small (one GPU), base (JAT size, several GPUs); flags override them"""
    run_name: str | None = None
    """folder under output_dir for this run (default: the preset's name)"""
    output_dir: Path = Path("runs")
    """where run folders go"""
    resume: bool = False
    """continue from the newest complete checkpoint of the run folder (model, optimizer, schedule, data position)"""
    overwrite: bool = False
    """delete an existing run folder of the same name and start again"""
    seed: int = 0
    """seed of the model init and of the data stream (each rank draws its own shard from (seed, rank, step))"""

    # --- data ---
    mixture: str = "demo"
    """a mixture of datasets_build.registry.MIXTURES, or `name=weight,name=weight` of datasets under data_root"""
    data_root: Path = Path("data")
    """where built datasets live"""
    build_missing: bool = True
    """build the mixture's missing datasets before training (datasets_build.registry.ensure_built)"""
    tokenizer: str = "tokenizers_cfg/default"
    """tokenizer folder or Hub id; the control datasets' task specs are added to it"""
    seq_len: int = 512
    """tokens per packed training sequence (the context length in training)"""
    batch_size: int = 8
    """sequences per micro-batch and process"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    num_workers: int = 1
    """DataLoader worker processes that tokenize and pack (0: in the training process)"""
    return_prob: float = 0.5
    """probability that a control sequence shows returns-to-go (otherwise every R_t is <no_return>)"""
    prompt_prob: float = 0.25
    """probability that a <no_return> control sequence starts with the end of another episode of the task"""
    prompt_fraction: float = 0.25
    """most of a sequence that the demonstration prompt may take"""
    imitation_threshold: float | None = 0.8
    """<no_return> sequences show only episodes scoring at least this (expert-normalised; Gato filters at 0.8);
    None: every episode (behaviour cloning of the whole dataset)"""

    # --- model ---
    backbone: str = "llama"
    """transformers model_type of the backbone (any causal LM config transformers can build)"""
    hidden_size: int = 192
    """backbone width"""
    num_layers: int = 4
    """backbone depth"""
    num_heads: int = 4
    """attention heads"""
    intermediate_size: int = 512
    """MLP width"""
    init_from: str | None = None
    """start from the weights of this checkpoint (folder or Hub id) instead of a fresh init"""

    # --- optimisation ---
    total_steps: int = 450
    """optimizer steps"""
    lr: float = 2e-3
    """peak learning rate (AdamW)"""
    min_lr_ratio: float = 0.1
    """the cosine schedule ends at lr * min_lr_ratio"""
    warmup_steps: int = 20
    """linear warm-up steps"""
    weight_decay: float = 0.1
    """AdamW weight decay of matrices (not of norms, biases and embeddings)"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 on a CUDA GPU that has it, else full precision (or what `accelerate launch` was given)"""
    cpu: bool = False
    """train on the CPU even where a GPU is present (without one the CPU is used anyway, gloo between processes)"""

    # --- logging, evaluation, checkpoints ---
    log_every: int = 10
    """steps between logged training losses (CSV, TensorBoard)"""
    eval_every: int = 50
    """steps between held-out losses (0: only at the end)"""
    eval_batches: int = 4
    """held-out batches per process per evaluation"""
    save_every: int = 100
    """steps between checkpoints (0: only at the end)"""
    keep_last: int = 2
    """checkpoints kept (the newest)"""
    run_eval: bool = True
    """after training, run the eval package (rollouts, captions, text) on the final model when it is installed"""
    eval_episodes: int = 5
    """control episodes per task in the final evaluation"""
    eval_samples: int = 64
    """images to caption and documents to score per dataset in the final evaluation"""

    # --- hub ---
    push_to_hub: bool = False
    """push the model, tokenizer and model card to the 🤗 Hub at every checkpoint and at the end"""
    hub_model_id: str | None = None
    """user/name of the Hub repo (needed with --push_to_hub)"""
    hub_private: bool = False
    """create the Hub repo as private"""
    hub_token: str | None = None
    """Hub token (default: HF_TOKEN or the cached login)"""
    hub_retries: int = 4
    """retries of a failed push (the run goes on either way; the local checkpoint is never touched)"""
    hub_backoff_s: float = 2.0
    """wait before the first retry, doubled at each next one"""


PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},  # the Args defaults: sized for two CPU cores and about ten minutes
    # core control + pixel variants only, sized for <= 30 minutes on two CPU cores (issue "Control that works")
    "control": dict(mixture="control", total_steps=2000, eval_every=250, save_every=250, eval_episodes=20),
    "small": dict(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536, seq_len=1024,
                  batch_size=16, total_steps=20_000, lr=1e-3, warmup_steps=500, num_workers=4,
                  log_every=50, eval_every=1000, save_every=1000, eval_batches=16),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, seq_len=1024,
                 batch_size=32, total_steps=100_000, lr=3e-4, warmup_steps=2000, num_workers=8,
                 log_every=100, eval_every=2000, save_every=2000, eval_batches=32),
}


def parse_args(argv: Sequence[str] | None = None) -> Args:
    """``--preset`` picks the defaults that the other flags then override."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    preset = pre.parse_known_args(argv)[0].preset
    default = dataclasses.replace(Args(), preset=preset, **PRESETS[preset])
    return tyro.cli(Args, default=default, args=argv, description=__doc__, use_underscores=True)


def command_line(args: Args) -> str:
    """The shortest ``python train.py`` command that gives ``args`` (flags that differ from the preset)."""
    default = dataclasses.replace(Args(), **PRESETS[args.preset])
    flags = [] if args.preset == "demo" else [f"--preset {args.preset}"]
    for f in dataclasses.fields(Args):
        value = getattr(args, f.name)
        if f.name in ("preset", "resume", "overwrite", "hub_token") or value == getattr(default, f.name):
            continue
        if isinstance(value, bool):
            flags.append(f"--{f.name}" if value else f"--no_{f.name}")
        elif value is not None:
            flags.append(f"--{f.name} {shlex.quote(str(value))}")
    return " ".join(["python train.py", *flags])


# --- data -----------------------------------------------------------------------------------------


class Column(Sequence):
    """One column of a 🤗 dataset as a lazy sequence (rows are read when drawn, not up front)."""

    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[int(i)][self.column]


class EpisodeRows(Sequence):
    """Random access to the episodes of a control dataset, in ``iter_episodes``' format.

    Decoding an episode reads all of its steps (a pixel episode is megabytes) although a sequence
    uses a window of it, so decoded episodes are kept, up to ``cache_bytes`` per worker process.
    """

    def __init__(self, dataset, specs, indices: np.ndarray, cache_bytes: int = 1 << 30):
        self.dataset, self.specs, self.indices = dataset, specs, indices
        self.cache: OrderedDict[int, dict] = OrderedDict()
        self.cache_bytes, self.cached_bytes = cache_bytes, 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        from datasets_build import iter_episodes

        row = int(self.indices[i])
        if row in self.cache:
            self.cache.move_to_end(row)
            return self.cache[row]
        episode = next(iter_episodes(self.dataset.select([row]), self.specs))
        self.cache[row] = episode
        self.cached_bytes += _nbytes(episode)
        while self.cached_bytes > self.cache_bytes and len(self.cache) > 1:
            self.cached_bytes -= _nbytes(self.cache.popitem(last=False)[1])
        return episode


def _nbytes(episode: dict) -> int:
    arrays = [*episode["observations"].values(), *episode["actions"].values(), episode["rewards"]]
    return sum(a.nbytes if isinstance(a, np.ndarray) else 64 * len(a) for a in arrays)


def parse_mixture(mixture: str) -> dict[str, float]:
    """A registry mixture name, or ``name=weight,name=weight``."""
    if "=" not in mixture:
        from datasets_build.registry import MIXTURES

        if mixture not in MIXTURES:
            raise ValueError(f"--mixture {mixture!r}: not one of {sorted(MIXTURES)} and not `name=weight,...`")
        return dict(MIXTURES[mixture])
    weights = {}
    for part in mixture.split(","):
        name, _, weight = part.partition("=")
        try:
            weights[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--mixture: bad weight in {part!r}; expected name=weight") from None
    return weights


def load_sources(weights: dict[str, float], root: Path, eval_share: float = 0.1):
    """Train and held-out sources of every dataset, and the task specs of the control ones.

    Control datasets (a folder with ``task_specs.json``) hold out every ``1/eval_share``-th episode
    of every task — spread over the expert, noisy and random sources alike (rows are stored by
    source, so "the last episodes" would be only random ones); caption and text datasets use their
    ``test``/``validation`` split.
    """
    import datasets

    train, held_out, specs = [], [], {}
    for name in weights:
        folder = root / name
        if (folder / "task_specs.json").exists():
            from datasets_build import load_episodes

            ds, task_specs = load_episodes(folder)
            specs.update(task_specs)
            tasks = np.asarray(ds["task"])
            train_idx, eval_idx = [], []
            for task in np.unique(tasks):
                idx = np.flatnonzero(tasks == task)
                if len(idx) < 10:  # tiny sets: evaluate on train
                    train_idx += list(idx)
                    eval_idx += list(idx)
                    continue
                held = np.zeros(len(idx), bool)
                held[:: round(1 / eval_share)] = True
                train_idx += list(idx[~held])
                eval_idx += list(idx[held])
            for out, idx in ((train, train_idx), (held_out, eval_idx)):
                idx = np.asarray(sorted(idx))
                out.append(ControlSource(name, EpisodeRows(ds, task_specs, idx), list(tasks[idx]),
                                         sources=list(np.asarray(ds["source"])[idx]),
                                         returns=np.asarray(ds["episode_return"], np.float64)[idx]))
            continue
        if not folder.exists():
            raise FileNotFoundError(f"dataset {name!r} not found at {folder}; build it or pass --data_root")
        # datasets_build writes caption/text datasets under <name>/data; a bare save_to_disk folder works too
        dd = datasets.load_from_disk(str(folder / "data" if (folder / "data").is_dir() else folder))
        splits = dd if isinstance(dd, datasets.DatasetDict) else {"train": dd}
        train_ds = splits["train"]
        eval_ds = next((splits[s] for s in ("validation", "test") if s in splits), train_ds)
        if "caption" in train_ds.column_names:
            train.append(CaptionSource(name, train_ds))
            held_out.append(CaptionSource(name, eval_ds))
        elif "text" in train_ds.column_names:
            train.append(TextSource(name, Column(train_ds, "text")))
            held_out.append(TextSource(name, Column(eval_ds, "text")))
        else:
            raise ValueError(f"{folder}: neither a control, caption (image, caption) nor text (text) dataset; "
                             f"columns {train_ds.column_names}")
    return train, held_out, specs


# --- checkpoints ----------------------------------------------------------------------------------


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint exists only once renamed from its tmp dir)."""
    root = run_dir / CHECKPOINTS_DIR
    return sorted(p for p in root.glob("step_*") if (p / TRAINER_STATE).exists()) if root.exists() else []


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record size and sha256 of every file of a checkpoint (checked by :func:`verify_checkpoint`)."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(files, indent=2))


def verify_checkpoint(folder: Path) -> str | None:
    """None if ``folder`` is a whole checkpoint, else what is wrong with it, naming the file."""
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{folder / TRAINER_STATE} is unreadable ({e!r})"
    if not (folder / MANIFEST).exists():  # written by an older train.py: nothing more to check
        return None
    try:
        files = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"{folder / MANIFEST} is unreadable ({e!r})"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{path} is truncated or corrupted: {path.stat().st_size} bytes, expected {meta['bytes']}"
        if file_digest(path) != meta["sha256"]:
            return f"{path} is corrupted: its sha256 differs from {MANIFEST}"
    return None


def select_resume_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the newer ones that did not (with the reason).

    The rule for ``--resume``: a damaged checkpoint is skipped with a warning naming the damaged file,
    and training resumes from the previous complete one (the data stream is a function of the step,
    so the data order is the same). If no checkpoint verifies, the run refuses to start.
    """
    damaged = []
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt, damaged
        damaged.append((ckpt, problem))
    return None, damaged


def remove_dir(folder: Path) -> None:
    """Delete a folder so that a kill midway never leaves a half-deleted folder under its name."""
    if folder.exists():
        doomed = folder.with_name(f"{TMP_PREFIX}deleting-{folder.name}")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def validate_args(args: Args) -> dict[str, float]:
    """Reject conflicting or impossible settings before any work starts; returns the mixture weights."""
    problems = []
    if args.push_to_hub and not args.hub_model_id:
        problems.append("--push_to_hub needs --hub_model_id user/name")
    if args.resume and args.overwrite:
        problems.append("--resume continues the run folder and --overwrite deletes it; pass only one")
    for name in ("total_steps", "batch_size", "grad_accum", "seq_len", "keep_last", "log_every", "eval_batches"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("save_every", "eval_every", "num_workers", "warmup_steps", "hub_retries"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} must be >= 0, got {getattr(args, name)}")
    weights: dict[str, float] = {}
    try:
        weights = parse_mixture(args.mixture)
    except ValueError as e:
        problems.append(str(e))
    if "=" in args.mixture:  # datasets named directly are never built here: they must exist
        missing = [name for name in weights if not (args.data_root / name).is_dir()]
        if missing:
            found = sorted(p.name for p in args.data_root.iterdir() if p.is_dir()) if args.data_root.is_dir() else []
            problems.append(f"--mixture: no dataset {', '.join(map(repr, missing))} under --data_root "
                            f"{args.data_root}; it holds {found}")
    if problems:
        raise SystemExit("train.py: " + "; ".join(problems))
    return weights


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder below ``folder`` to disk, so that the rename publishes whole files."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def export_model(accelerator: Accelerator, model, tok: GeneralistTokenizer, folder: Path) -> None:
    """``save_pretrained`` artifacts of model and tokenizer side by side (collective: all ranks call it)."""
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP / DeepSpeed shards
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state_dict)
        tok.save_pretrained(folder)


def param_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# --- metrics --------------------------------------------------------------------------------------


class MetricLog:
    """Rows of metrics in a CSV (rewritten up to the resumed step on resume) and in TensorBoard."""

    def __init__(self, path: Path, writer, resume_step: int | None):
        self.path, self.writer = path, writer
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.exists():
            with path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._write()

    def _write(self) -> None:
        """Rewrite the CSV through a tmp file and a rename: a kill midway never truncates the log."""
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path.with_name(TMP_PREFIX + self.path.name)
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys or ["step"])
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def add(self, row: dict[str, Any], prefix: str) -> None:
        self.rows.append(row)
        self._write()
        for k, v in row.items():
            if k != "step" and v != "" and self.writer is not None:
                self.writer.add_scalar(f"{prefix}/{k}", float(v), int(row["step"]))


def reduce_modalities(accelerator: Accelerator, sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Token-weighted mean loss per modality over all processes (collective)."""
    sums, counts = accelerator.reduce(sums, "sum"), accelerator.reduce(counts, "sum")
    return {m: (sums[i] / counts[i]).item() for i, m in enumerate(MODALITIES) if counts[i] > 0}


def accumulate(out, sums: torch.Tensor, counts: torch.Tensor) -> None:
    """Add one batch's per-modality losses (means and counts, as the model reports them) in place."""
    for i, m in enumerate(MODALITIES):
        if m in out.modality_losses:
            n = out.modality_counts[m].to(counts.dtype)
            sums[i] += out.modality_losses[m].float() * n
            counts[i] += n


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, mixture: Mixture, args: Args) -> dict[str, float]:
    """Held-out loss per modality on the same batches every time (seeded apart from training)."""
    model.eval()
    sums = torch.zeros(len(MODALITIES), device=accelerator.device)
    counts = torch.zeros(len(MODALITIES), device=accelerator.device)
    for b in range(args.eval_batches):
        batch = mixture.batch(args.seed + 1_000_003, accelerator.process_index, b, args.batch_size)
        with accelerator.autocast():
            out = model(**{k: v.to(accelerator.device) for k, v in batch.items()})
        accumulate(out, sums, counts)
    model.train()
    return reduce_modalities(accelerator, sums, counts)


def plot_curves(train_rows: list[dict], eval_rows: list[dict], path: Path) -> None:
    """Learning curves per modality (training and held-out) against training tokens."""
    fig, axes = plt.subplots(2, 4, figsize=(17, 7), sharex=True)
    for ax in axes.flat[len(MODALITIES):]:
        ax.axis("off")
    for ax, m in zip(axes.flat, MODALITIES, strict=False):
        for rows, label, style in ((train_rows, "train", "-"), (eval_rows, "held-out", "o--")):
            pts = [(float(r["tokens"]), float(r[m])) for r in rows if r.get(m) not in (None, "")]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=label, markersize=3)
        ax.set_title(m)
        ax.set_ylabel("cross entropy (nats)")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("training tokens")
    axes.flat[0].legend()
    fig.suptitle("generalist: next-token loss per target modality")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def final_evaluation(export_dir: Path, run_dir: Path, sources: Sequence, args: Args) -> dict[str, Any]:
    """Run the ``eval`` package on the final model, one script per kind of dataset; never fails the run.

    Each script writes its JSON into ``run_dir/eval``; ``eval.report`` then gathers them with the
    curves into ``run_dir/report.md``. A missing script or a failure is recorded, not raised:
    evaluation is a report on the trained model, not a gate in front of it.
    """
    import importlib

    results: dict[str, Any] = {}
    out = run_dir / "eval"
    jobs = []
    for source in sources:
        data = args.data_root / source.name
        if isinstance(source, CaptionSource):
            jobs.append((f"caption/{source.name}", "eval.caption",
                         dict(model=export_dir, data=data, max_samples=args.eval_samples, out=out)))
        elif isinstance(source, TextSource):
            jobs.append((f"text/{source.name}", "eval.text",
                         dict(model=export_dir, data=data, max_samples=args.eval_samples, out=out)))
    control = [s for s in sources if isinstance(s, ControlSource)]
    if control:  # rollouts of every task: Decision Transformer, and Gato prompted with a dataset episode
        rollout = ["--model", str(export_dir), "--out", str(out), "--episodes", str(args.eval_episodes),
                   "--num-envs", str(args.eval_episodes)]
        jobs.append(("control/dt", "eval.control", [*rollout, "--mode", "dt"]))
        jobs.append(("control/gato", "eval.control", [*rollout, "--mode", "gato",
                                                       "--demos", str(args.data_root / control[0].name)]))
    for name, module_name, kwargs in jobs:
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(module_name)
            if isinstance(kwargs, list):  # an argparse entry point
                result = module.main(kwargs)
            else:
                fields = {f.name for f in dataclasses.fields(module.Args)}
                result = module.main(module.Args(**{k: v for k, v in kwargs.items() if k in fields}))
            shown = {k: v for k, v in (result if isinstance(result, dict) else {}).items()
                     if isinstance(v, int | float) or k == "metrics"}  # scalars, not per-sample lists
            results[name] = {"seconds": round(time.perf_counter() - t0, 1), **shown}
        except ImportError as e:
            results[name] = f"not run: {e}"
        except Exception as e:  # keep the trained model and the other evaluations either way
            results[name] = f"failed: {e!r}"
    try:
        from eval.report import write_report

        results["report"] = str(write_report(run_dir))
    except Exception as e:
        results["report"] = f"not written: {e!r}"
    return results


def model_config(args: Args, tok: GeneralistTokenizer) -> GeneralistConfig:
    """The model the flags describe, with the tokenizer's vocabulary layout and image size."""
    return GeneralistConfig(
        text_config={"model_type": args.backbone, "hidden_size": args.hidden_size,
                     "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
                     "num_key_value_heads": args.num_heads, "intermediate_size": args.intermediate_size,
                     "max_position_embeddings": max(2048, args.seq_len), "tie_word_embeddings": False},
        vocab_layout=tok.layout.to_dict(), image_size=tok.image_size, context_length=args.seq_len,
        prompt_length=int(args.prompt_fraction * args.seq_len))


# --- main -----------------------------------------------------------------------------------------


def main(args: Args) -> dict[str, Any]:
    weights = validate_args(args)
    run_name = args.run_name or args.preset
    run_dir = args.output_dir / run_name
    mixed_precision = args.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION") or (
            "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no")
    accelerator = Accelerator(
        # accelerate only picks CPU multi-processing (gloo) when told to use the CPU
        cpu=args.cpu or not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=mixed_precision,
        # a batch without images leaves the patch encoder without gradients
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    is_main = accelerator.is_main_process
    set_seed(args.seed)

    # --- the run folder ---
    ckpts = checkpoint_dirs(run_dir)
    if ckpts and not (args.resume or args.overwrite):
        raise SystemExit(f"{run_dir} already holds checkpoints; pass --resume to continue it, --overwrite to "
                         "start again, or --run_name to start another run")
    if is_main:
        if args.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        (run_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
        for tmp in (run_dir / CHECKPOINTS_DIR).glob(TMP_PREFIX + "*"):  # left by a killed save or rotation
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    resume_from = None
    if args.resume:
        resume_from, damaged = select_resume_checkpoint(run_dir)
        for ckpt, problem in damaged:
            accelerator.print(f"WARNING: skipping damaged checkpoint {ckpt.name}: {problem}"
                              + (f"; falling back to {resume_from.name}" if resume_from else ""))
        if damaged and resume_from is None:
            raise SystemExit(f"--resume: no complete checkpoint in {run_dir / CHECKPOINTS_DIR}: "
                             + "; ".join(p for _, p in damaged) + ". Start again with --overwrite.")
        accelerator.wait_for_everyone()
        if is_main:
            for ckpt, _ in damaged:  # out of the way of rotation, kept for inspection
                os.replace(ckpt, ckpt.with_name(CORRUPT_PREFIX + ckpt.name))
        accelerator.wait_for_everyone()

    # --- data: build what is missing (main process), then every process loads it ---
    if is_main and args.build_missing and "=" not in args.mixture:
        from datasets_build.registry import ensure_built

        t0 = time.perf_counter()
        ensure_built(args.mixture, args.data_root)
        accelerator.print(f"datasets ready in {time.perf_counter() - t0:.0f}s")
    accelerator.wait_for_everyone()
    train_sources, eval_sources, specs = load_sources(weights, args.data_root)
    tok = GeneralistTokenizer.from_pretrained(args.tokenizer)
    for spec in specs.values():
        tok.add_task_spec(spec)
    packing = PackingConfig(seq_len=args.seq_len, return_prob=args.return_prob, prompt_prob=args.prompt_prob,
                            prompt_fraction=args.prompt_fraction, imitation_threshold=args.imitation_threshold)
    src_weights = [weights[s.name] for s in train_sources]
    train_mix = Mixture(train_sources, src_weights, tok, packing)
    eval_mix = Mixture(eval_sources, src_weights, tok, packing)

    # --- model, optimizer, schedule ---
    if args.init_from:
        model = GeneralistForCausalLM.from_pretrained(args.init_from)
    else:
        model = GeneralistForCausalLM(model_config(args, tok))
    if model.config.layout != tok.layout:
        raise ValueError(f"model vocabulary {model.config.layout} does not match the tokenizer's {tok.layout}")
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, args.warmup_steps, args.total_steps, min_lr_rate=args.min_lr_ratio)
    # The data loader is *not* prepared: every rank packs its own shard of the stream (see packing.py),
    # so accelerate must not split or dispatch batches (patches are flat over the batch).
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    if resume_from is not None:
        accelerator.load_state(str(resume_from / STATE_DIR))
        state = json.loads((resume_from / TRAINER_STATE).read_text())
        step, tokens_seen, elapsed_before = state["step"], state["tokens_seen"], state["elapsed_s"]
        accelerator.print(f"resumed from {resume_from} at step {step}")

    stream = PackedStream(train_mix, args.batch_size, args.seed, rank=accelerator.process_index,
                          start_batch=step * args.grad_accum)
    loader = iter(DataLoader(stream, batch_size=None, num_workers=args.num_workers,
                             prefetch_factor=4 if args.num_workers else None))

    # --- logging ---
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run_dir / "tensorboard", purge_step=step if resume_from else None)
        (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2, default=str))
        train_log = MetricLog(run_dir / "train_metrics.csv", writer, step if resume_from else None)
        eval_log = MetricLog(run_dir / "eval_metrics.csv", writer, step if resume_from else None)
    reproduce = command_line(args)
    if accelerator.num_processes > 1:
        reproduce = f"accelerate launch --num_processes {accelerator.num_processes} {reproduce.removeprefix('python ')}"
    hub = None
    if args.push_to_hub and is_main:
        hub = HubPusher(args.hub_model_id, run_dir / ".hub-staging", token=args.hub_token, private=args.hub_private,
                         retries=args.hub_retries, backoff_s=args.hub_backoff_s)

    def card(folder: Path, metrics: dict[str, dict[str, float]]) -> None:
        write_model_card(folder, model_id=args.hub_model_id or run_name, mixture=weights, metrics=metrics,
                         reproduce=reproduce, tasks=sorted(specs),
                         summary={"parameters": f"{n_params / 1e6:.2f}M", "steps": step,
                                  "training tokens": f"{tokens_seen:,}",
                                  "context": args.seq_len, "processes": accelerator.num_processes,
                                  "backbone": f"{args.backbone} {args.num_layers}x{args.hidden_size}"})

    last_metrics: dict[str, dict[str, float]] = {}

    def save_checkpoint() -> Path:
        """model + tokenizer (save_pretrained) + full training state, published by an atomic rename.

        Everything is written into a hidden tmp folder, listed with sizes and sha256 in
        ``manifest.json``, flushed, then renamed into place; older checkpoints are rotated away only
        after that. A failed write (disk full) deletes the tmp folder and raises an ``OSError`` that
        names the checkpoint; the previous checkpoints are untouched.
        """
        final = run_dir / CHECKPOINTS_DIR / f"step_{step:08d}"
        tmp = final.with_name(TMP_PREFIX + final.name)
        try:
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp / STATE_DIR))
            export_model(accelerator, model, tok, tmp)
            accelerator.wait_for_everyone()
            if is_main:
                card(tmp, last_metrics)
                (tmp / TRAINER_STATE).write_text(json.dumps({
                    "step": step, "tokens_seen": tokens_seen,
                    "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                    "data": {"seed": args.seed, "next_batch": step * args.grad_accum, "batch_size": args.batch_size,
                             "world_size": accelerator.num_processes}}, indent=2))
                write_manifest(tmp)
                fsync_tree(tmp)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)  # free the space; the tmp folder was never published
            previous = checkpoint_dirs(run_dir)
            raise OSError(e.errno, f"writing checkpoint {final} failed ({e.strerror or e}); nothing was published and "
                          + (f"the previous checkpoint {previous[-1]} is intact: free space and --resume"
                             if previous else "there is no earlier checkpoint")) from e
        if is_main:
            remove_dir(final)  # a checkpoint of the same step from before a fallback resume
            os.replace(tmp, final)
            fsync_tree(final.parent)
            for old in checkpoint_dirs(run_dir)[:-args.keep_last]:
                remove_dir(old)
            if hub is not None:
                hub.submit(final, f"step {step}")
        accelerator.wait_for_everyone()
        return final

    # --- the loop ---
    model.train()
    n_mod = len(MODALITIES)
    sums, counts = torch.zeros(n_mod, device=accelerator.device), torch.zeros(n_mod, device=accelerator.device)
    loss_sum, loss_n, tokens_window, grad_norm = torch.zeros((), device=accelerator.device), 0, 0, float("nan")
    wait_s, overhead_s, start_tokens = 0.0, 0.0, tokens_seen  # overhead: evaluation and checkpoints
    t_start = t_window = time.perf_counter()
    bar = tqdm(total=args.total_steps, initial=step, disable=not is_main, desc=run_name, dynamic_ncols=True)
    while step < args.total_steps:
        step_tokens = 0
        for _ in range(args.grad_accum):
            t_wait = time.perf_counter()
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(loader).items()}
            wait_s += time.perf_counter() - t_wait
            with accelerator.accumulate(model), accelerator.autocast():
                out = model(**batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            accumulate(out, sums, counts)
            loss_sum += out.loss.detach().float()
            loss_n += 1
            step_tokens += int(batch["attention_mask"].numel()) * accelerator.num_processes
        scheduler.step()
        step += 1
        tokens_seen += step_tokens
        tokens_window += step_tokens
        bar.update(1)

        if step % args.log_every == 0 or step == args.total_steps:
            losses = reduce_modalities(accelerator, sums, counts)
            mean_loss = accelerator.reduce(loss_sum, "mean").item() / loss_n
            now = time.perf_counter()
            tps = tokens_window / (now - t_window)
            if is_main:
                train_log.add({"step": step, "tokens": tokens_seen, "loss": mean_loss, **losses,
                               "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                               "tokens_per_s": tps, "data_wait_share": wait_s / (now - t_window)}, "train")
                bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tps:,.0f}")
            last_metrics["train"] = losses
            sums.zero_(), counts.zero_(), loss_sum.zero_()
            loss_n, tokens_window, wait_s, t_window = 0, 0, 0.0, now
        if (args.eval_every and step % args.eval_every == 0) or step == args.total_steps:
            t_eval = time.perf_counter()
            losses = evaluate(accelerator, model, eval_mix, args)
            if is_main:
                eval_log.add({"step": step, "tokens": tokens_seen, **losses}, "eval")
            last_metrics["held-out"] = losses
            t_window += time.perf_counter() - t_eval  # evaluation time is not training throughput
            overhead_s += time.perf_counter() - t_eval
        if (args.save_every and step % args.save_every == 0) or step == args.total_steps:
            t_save = time.perf_counter()
            save_checkpoint()
            t_window += time.perf_counter() - t_save
            overhead_s += time.perf_counter() - t_save
    bar.close()
    session_s = time.perf_counter() - t_start
    wall = elapsed_before + session_s
    train_tps = (tokens_seen - start_tokens) / max(session_s - overhead_s, 1e-9)

    # --- the final model: export, plots, evaluation, card, hub ---
    export_dir = run_dir / "model"
    if is_main:
        shutil.rmtree(export_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    export_model(accelerator, model, tok, export_dir)
    hash_dir = run_dir / "param_hashes"
    hash_dir.mkdir(exist_ok=True)
    (hash_dir / f"rank{accelerator.process_index}.txt").write_text(param_hash(accelerator.unwrap_model(model)))
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {"run_dir": str(run_dir), "steps": step, "tokens": tokens_seen,
                               "train_wall_s": wall, "tokens_per_s": train_tps,
                               "eval_and_checkpoint_s": overhead_s,
                               "parameters": n_params, "processes": accelerator.num_processes,
                               "final": last_metrics}
    if is_main:
        plot_curves(train_log.rows, eval_log.rows, run_dir / "learning_curves.png")
        card(export_dir, last_metrics)
        shutil.copy(export_dir / "README.md", run_dir / "README.md")
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
        writer.close()
        accelerator.print(
            f"done: {step} steps, {tokens_seen:,} tokens in {wall / 60:.1f} min ({summary['tokens_per_s']:,.0f} tok/s)"
            "\n" + "\n".join(f"  {split:>8}: " + "  ".join(f"{m} {v:.3f}" for m, v in row.items())
                             for split, row in last_metrics.items())
            + f"\nmodel, tokenizer and card: {export_dir}\ncurves: {run_dir / 'learning_curves.png'}")
        if args.run_eval:
            accelerator.print("evaluating the final model ...")
            summary["evaluation"] = final_evaluation(export_dir, run_dir, eval_sources, args)
            (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
        if hub is not None:
            hub.submit(export_dir, f"final model, step {step}")
            summary["hub_pushes"] = hub.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main(parse_args())
