"""Train a generalist: one causal transformer over text, images, observations, actions, rewards and returns.

    python train.py                          # the demo: build the demo mixture, train ~10 min on CPU, evaluate
    python train.py --preset small           # a bigger model for one GPU
    python train.py --resume                 # continue runs/<run_name> exactly where it stopped
    accelerate launch --config_file accelerate_configs/ddp_cpu_2proc.yaml train.py   # several processes

Read top to bottom: settings, data, model, the loop (log, evaluate, checkpoint), the final model.
Every setting is a flag (``--help``); presets change the defaults, flags override them. What a run
folder ``runs/<run_name>/`` holds is listed in ``generalist/training/run_folder.py``; after training
``python -m eval runs/<run_name>`` (``eval/__main__.py``) evaluates the final model and writes
``report.md``.

Faults. A run killed at any point (even SIGKILL) resumes with ``--resume`` from its newest checkpoint
that verifies against its manifest (a damaged one is named and set aside), with the same data order
and its saved settings (``args.json``; a flag that contradicts them is refused, naming it). A failed
checkpoint write (disk full) raises an ``OSError`` naming it and leaves the previous ones intact
(``generalist/training/checkpoints.py``). Conflicting or impossible flags (``--push_to_hub`` without
``--hub_model_id``, ``--resume`` with ``--overwrite``, an unknown ``--mixture``) stop the run before
any work starts.

Data-parallel processes do not split batches: each packs its own shard of the stream, a pure
function of (seed, rank, batch index), which is also what makes ``--resume`` exact.
"""

# Over 400 lines: a third of them document the settings (one docstring per flag, which --help shows);
# the rest is one pass from settings to the final model, kept in one file so that it reads top to bottom.

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.tracking import get_available_trackers
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, get_cosine_with_min_lr_schedule_with_warmup

from datasets_build.hub import is_hub_dataset_id
from datasets_build.sources import DataFiles, EpisodeRows, load_sources, parse_mixture, parse_weights
from eval.plots import plot_learning_curves
from generalist import GeneralistConfig, GeneralistForCausalLM, GeneralistTokenizer
from generalist.hub import CARD_FILE, HubPusher, update_card_results, write_model_card
from generalist.packing import Mixture, PackedStream, PackingConfig, SampleBy
from generalist.training import checkpoints, settings
from generalist.training.metrics import MetricLog, ModalityLosses, held_out_losses
from generalist.training.run_folder import RunFolder
from generalist.vocab import DEFAULT_LOSS_WEIGHTS

# --- settings -------------------------------------------------------------------------------------


@dataclass
class Args:
    # --- run ---
    preset: Literal["demo", "control", "control-lowq", "babyai", "locomotion", "small", "base"] = "demo"
    """named defaults: demo (CPU, ~10 min), small (one GPU), base (JAT size, several GPUs); flags override them"""
    run_name: str | None = None
    """folder under output_dir for this run (default: the preset's name)"""
    output_dir: Path = Path("runs")
    """where run folders go"""
    resume: bool = False
    """continue from the newest complete checkpoint of the run folder (model, optimizer, schedule, data position)
    with the run's saved settings; flags may change only MAY_CHANGE_ON_RESUME"""
    overwrite: bool = False
    """delete an existing run folder of the same name and start again"""
    seed: int = 0
    """seed of the model init and of the data stream (each rank draws its own shard from (seed, rank, step))"""

    # --- data ---
    mixture: str = "demo"
    """a mixture of datasets_build.registry.MIXTURES, or `name=weight,name=weight` of datasets under data_root"""
    data_root: Path = Path("data")
    """where built datasets live"""
    stream: bool = False
    """read Hub datasets and local parquet (Hub-layout) folders as streams instead of downloading them: a window
    of --stream_window items slides along the shuffled stream (datasets_build/streaming.py); local builds are read
    from disk as always"""
    stream_window: int = 256
    """items (episodes, captions, documents) a streamed dataset keeps in memory and packs from"""
    build_missing: bool = True
    """build the mixture's missing datasets before training (datasets_build.registry.ensure_built)"""
    tokenizer: str | None = None
    """tokenizer folder or Hub id (default: the byte-level BPE shipped with the package); the control datasets'
    task specs are added to it"""
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
    expert_labels: bool = True
    """imitation sequences take the expert's action at each state as the label where the dataset records it
    (DART: its noisy executions' states, the expert's labels); return-conditioned ones keep the executed actions"""
    hidden_action_prob: float = 0.5
    """share of control sequences whose action inputs are <hidden_action> (labels kept): the policy view Gato
    and DT modes act in, so that they read states instead of repeating their last action (0: off)"""
    task_weights: str | None = None
    """`task=weight,...`: a control task's episodes start this many times more sequences than their count alone
    gives (PackingConfig.task_weights); tasks not named weigh 1"""
    sample_by: SampleBy = "episodes"
    """within a task, draw episodes uniformly or in proportion to their length (every step equally likely, as
    DT and TT sample D4RL; PackingConfig.sample_by)"""
    dt_window_steps: int | None = None
    """return-conditioned sequences as independent windows of this many steps (DT's K; 1: RvS), which DT mode
    then attends to (PackingConfig.dt_window_steps); None: whole episodes. Needs a rotary backbone (llama)"""

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
    value_features: int = 6
    """continuous tokens also embed their bin's place on the mu-law axis (GeneralistConfig.value_features; 0: off)"""
    bin_embeddings: bool = True
    """continuous inputs also get their bin's own embedding row (Gato); off: the value features alone embed them
    (GeneralistConfig.bin_embeddings)"""
    observation_loss_weight: float = DEFAULT_LOSS_WEIGHTS["observation"]
    """loss weight of observation tokens (actions, rewards, returns and text weigh 1): the world model TT plans
    with; lower it where observations are long and only the policy matters (BabyAI's 148 tokens per step)"""
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
    """steps between logged training losses (CSV and the --report_to trackers)"""
    report_to: tuple[Literal["tensorboard", "trackio", "wandb", "none"], ...] = ("tensorboard",)
    """experiment trackers (accelerate's) that get the metrics besides the CSV; several allowed; none: CSV only"""
    eval_every: int = 50
    """steps between held-out losses (0: only at the end)"""
    eval_batches: int = 4
    """held-out batches per process per evaluation"""
    save_every: int = 100
    """steps between checkpoints (0: only at the end)"""
    keep_last: int = 2
    """checkpoints kept (the newest)"""
    run_eval: bool = True
    """after training, evaluate the final model with `python -m eval RUN` (rollouts, captions, text, report.md)"""
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
    hub_timeout_s: float = 1800.0
    """a push still running after this long (a stalled connection) is abandoned with a warning; the next goes on"""


PRESETS: dict[str, dict[str, Any]] = {  # the first is the default
    "demo": {},  # the Args defaults: sized for two CPU cores and about ten minutes
    # core control + pixel variants only, sized for <= 30 minutes on two CPU cores (issue "Control that works")
    "control": dict(mixture="control", total_steps=2000, eval_every=250, save_every=250, eval_episodes=20,
                    task_weights="Pendulum-v1=3,Pendulum-v1-pixels=3"),
    # low-quality data (5 % expert): imitation sees every episode and its executed actions (plain behaviour
    # cloning), so the gap to return conditioning (DT) and planning (TT) is what those modes add; episodes are
    # drawn by length, every step equally likely, as D4RL's BC and DT sample (measured: CartPole's 500-step expert
    # episodes learnt on both seeds by both modes, where drawn by episode they were 5 % of its sequences;
    # docs/control.md, "Low-quality data"); return-conditioned sequences as one-step windows (RvS; measured on 2
    # seeds x 20 episodes: DT's return sweep follows its target on 3 of 5 tasks, 1 of 5 on whole episodes, and DT
    # and TT lead cloning by +0.29 and +0.33; docs/control.md, "DT trained on one-step windows")
    "control-lowq": dict(mixture="control-lowq", imitation_threshold=None, expert_labels=False, total_steps=1500,
                         eval_every=250, save_every=250, eval_episodes=20, sample_by="steps", dt_window_steps=1),
    # BabyAI in Gato mode (issue "Control that works"): ~50 observation tokens per step (a 70-token step), so
    # observations weigh little and most sequences are imitation (the expert's labels on every episode, as in
    # control); 1,024-token sequences (as many tokens per batch) hold ~14 steps, most of an expert's episode
    # (measured at 1,500 steps, greedy: GoToLocal 0.75 -> 1.00, OpenDoor 0.60 -> 0.78 success; PickupLoc, whose
    # mission names objects by where they were at the start, did not improve - docs/control.md, BabyAI). 2,000
    # steps on the data with detours solve GoToRedBallGrey, GoToLocal and OpenDoor greedily on 2 seeds, as 3,000 did
    # before (docs/control.md, BabyAI: without reading the mission, which --swap_mission shows); ~41 min alone on 2
    # CPU cores
    "babyai": dict(mixture="babyai", observation_loss_weight=0.1, return_prob=0.25, total_steps=2000,
                   seq_len=1024, batch_size=4, eval_every=250, save_every=250, eval_episodes=20),
    # one D4RL-style dataset per model, as the DT / TT papers train (`--mixture walker2d-medium-replay` for
    # another): no expert labels in the data, every episode imitated; sized for <= 60 minutes on two CPU cores
    "locomotion": dict(mixture="hopper-medium", imitation_threshold=None, expert_labels=False, total_steps=4000,
                       eval_every=500, save_every=500, eval_episodes=20),
    "small": dict(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536, seq_len=1024,
                  batch_size=16, total_steps=20_000, lr=1e-3, warmup_steps=500, num_workers=4,
                  log_every=50, eval_every=1000, save_every=1000, eval_batches=16),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, seq_len=1024,
                 batch_size=32, total_steps=100_000, lr=3e-4, warmup_steps=2000, num_workers=8,
                 log_every=100, eval_every=2000, save_every=2000, eval_batches=32),
}
# What --resume lets a flag change: how long to train and how it is logged, evaluated, published or
# fed; never what is trained (model, data, optimisation, seed), which the checkpoint was made for.
MAY_CHANGE_ON_RESUME = frozenset({
    "resume", "overwrite", "output_dir", "run_name", "data_root", "build_missing", "num_workers", "total_steps",
    "log_every", "report_to", "eval_every", "eval_batches", "save_every", "keep_last", "run_eval", "eval_episodes",
    "eval_samples", "push_to_hub", "hub_model_id", "hub_private", "hub_token", "hub_retries", "hub_backoff_s",
    "hub_timeout_s"})


def parse_args(argv: Sequence[str] | None = None) -> Args:
    """``--preset`` picks the defaults that the other flags override; ``--resume`` restores the run's."""
    args = settings.parse_with_presets(Args, PRESETS, argv, description=__doc__)
    if args.resume:
        args = settings.restore(args, argv, run_folder(args).args, MAY_CHANGE_ON_RESUME)
    return args


def run_folder(args: Args) -> RunFolder:
    return RunFolder(args.output_dir / (args.run_name or args.preset))


# windows restart their position ids (training) but DT mode reads them at the episode's positions
DT_WINDOWS_NEED_ROTARY = ("--dt_window_steps needs a backbone with rotary position embeddings, which see only relative "
                          "positions; {backbone!r} has none (use --backbone llama)")


def validate_args(args: Args) -> dict[str, float]:
    """Reject conflicting or impossible settings before any work starts; returns the mixture weights."""
    problems = []
    if args.push_to_hub and not args.hub_model_id:
        problems.append("--push_to_hub needs --hub_model_id user/name")
    if args.resume and args.overwrite:
        problems.append("--resume continues the run folder and --overwrite deletes it; pass only one")
    for name in ("total_steps", "batch_size", "grad_accum", "seq_len", "keep_last", "log_every", "eval_batches",
                 "stream_window"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("save_every", "eval_every", "num_workers", "warmup_steps", "hub_retries"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not args.init_from:  # a fine-tuned checkpoint's backbone is checked once it is loaded
        try:
            backbone = AutoConfig.for_model(args.backbone)
        except ValueError:
            problems.append(f"--backbone {args.backbone!r} is no transformers model_type (e.g. llama, qwen2, gpt2)")
        else:
            if args.dt_window_steps and getattr(backbone, "rope_parameters", None) is None:
                problems.append(DT_WINDOWS_NEED_ROTARY.format(backbone=args.backbone))
    if "none" in args.report_to and len(args.report_to) > 1:
        problems.append(f"--report_to none means no tracker; got it with {[t for t in args.report_to if t != 'none']}")
    available = {str(t) for t in get_available_trackers()}  # accelerate drops a missing one without a word
    for tracker in trackers(args):
        if tracker not in available:
            problems.append(f"--report_to {tracker}: the {tracker} package is not installed (pip install {tracker})")
    weights: dict[str, float] = {}
    try:
        weights = parse_mixture(args.mixture)
    except ValueError as e:
        problems.append(str(e))
    if "=" in args.mixture:  # datasets named directly are never built here: they must exist
        missing = [name for name in weights if not (args.data_root / name).is_dir()
                   and not is_hub_dataset_id(name, args.data_root)]  # a Hub dataset is downloaded by load_sources
        if missing:
            found = sorted(p.name for p in args.data_root.iterdir() if p.is_dir()) if args.data_root.is_dir() else []
            problems.append(f"--mixture: no dataset {', '.join(map(repr, missing))} under --data_root "
                            f"{args.data_root}; it holds {found}")
    if problems:
        raise SystemExit("train.py: " + "; ".join(problems))
    return weights


def resident_mib() -> float:
    """Resident memory of this process and its DataLoader workers (MiB): a leak shows in the CSV."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a worker may be gone by now
            total += child.memory_info().rss
    return total / 2**20


def keep_freed_memory_in_heap() -> None:
    """Let glibc reuse freed memory for the next step instead of returning it to the OS (``mallopt``).

    A training step allocates the same large buffers every time (the (batch x seq_len, vocab) logits
    and their gradient: 67 MB at the ``control`` preset). By default glibc serves every block over 32 MB
    with a fresh ``mmap`` and hands it back at ``free``, and trims the heap's top once 2x its threshold
    is free there, so every step wrote its buffers into new pages: one page fault per 4 KiB (the
    profile of a step had 40 % of it in ``fill_`` / ``log_softmax`` of fresh (4096, 4103) buffers, and
    the process spent 25 s of a 60-step run in the kernel). With blocks up to 1 GiB served from the heap
    and no automatic trim, the buffers stay mapped: the ``control`` preset's steps ran 1.19x faster on
    this project's 2-core CPU and the preset trained in 29.0-29.9 min (docs/speed.md). The
    memory a run holds is then bounded by :func:`release_freed_memory` at every logged step. The
    setting is the process's: ``train.py`` runs in its own.
    """
    if (libc := _libc()) is not None:
        with contextlib.suppress(AttributeError):  # musl and others have no mallopt
            libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GiB come from the heap
            libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never trim automatically


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    Batches of varying size (image patches), evaluations and checkpoints allocate and free buffers of
    many sizes; glibc keeps freed memory in its heaps, where later allocations fragment it, and a long
    run's resident memory rose in steps (the 10,000-step soak: +9.1 %, +38 MiB after step 9,500). With
    a trim at every logged step the same soak stayed in one band (+2.4 %; docs/speed.md).
    """
    if (libc := _libc()) is not None:
        with contextlib.suppress(AttributeError):  # musl and others have no malloc_trim
            libc.malloc_trim(0)


@functools.cache
def _libc():
    """glibc, looked up once (``find_library`` runs ``ldconfig``), or ``None`` off Linux."""
    import ctypes
    import ctypes.util

    if sys.platform.startswith("linux") and (name := ctypes.util.find_library("c")):
        with contextlib.suppress(OSError):
            return ctypes.CDLL(name)
    return None


def trackers(args: Args) -> list[str]:
    return [t for t in args.report_to if t != "none"]


def model_config(args: Args, tok: GeneralistTokenizer) -> GeneralistConfig:
    """The model the flags describe, with the tokenizer's vocabulary layout and image size."""
    return GeneralistConfig(
        text_config={"model_type": args.backbone, "hidden_size": args.hidden_size,
                     "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
                     "num_key_value_heads": args.num_heads, "intermediate_size": args.intermediate_size,
                     "max_position_embeddings": max(2048, args.seq_len), "tie_word_embeddings": False},
        vocab_layout=tok.layout.to_dict(), image_size=tok.image_size, context_length=args.seq_len,
        prompt_length=int(args.prompt_fraction * args.seq_len), value_features=args.value_features,
        bin_embeddings=args.bin_embeddings, hidden_action_prob=args.hidden_action_prob,
        dt_context_steps=args.dt_window_steps, loss_weights={"observation": args.observation_loss_weight})


# --- main: data, model, the loop, the final model -------------------------------------------------


def main(args: Args) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenize in DataLoader workers instead
    # Every batch has its own number of image patches, and oneDNN caches one convolution primitive per
    # shape (1024 by default): the patch encoder's memory then grows by gigabytes over a run. A small
    # cache bounds it; re-creating a primitive costs milliseconds per step.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    keep_freed_memory_in_heap()  # before the first large buffer and before DataLoader workers fork
    weights = validate_args(args)
    run = run_folder(args)
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
        log_with=trackers(args) or None,
        project_config=ProjectConfiguration(project_dir=str(run.root), logging_dir=str(run.tensorboard)),
    )
    is_main = accelerator.is_main_process
    set_seed(args.seed)
    resume_from = checkpoints.open_run_folder(accelerator, run, resume=args.resume, overwrite=args.overwrite)

    # --- data: build what is missing (main process), then every process opens it ---
    if is_main and args.build_missing and "=" not in args.mixture:
        from datasets_build.registry import ensure_built

        t0 = time.perf_counter()
        ensure_built(args.mixture, args.data_root)
        accelerator.print(f"datasets ready in {time.perf_counter() - t0:.0f}s")
    accelerator.wait_for_everyone()
    stream = dict(seed=args.seed, world_size=accelerator.num_processes, window=args.stream_window)
    train_sources, eval_sources, specs = load_sources(weights, args.data_root, stream=stream if args.stream else None)
    data_files = DataFiles(train_sources + eval_sources)  # to name a shard truncated under the run
    if args.expert_labels:  # a dataset built before expert actions were recorded silently imitates the noise
        for src in train_sources:
            if isinstance(getattr(src, "episodes", None), EpisodeRows) and not src.episodes.has_expert_actions:
                accelerator.print(f"WARNING: {src.name} records no expert actions (built by an earlier version): its "
                                  "imitation sequences learn the executed actions; rebuild it with "
                                  f"`python -m datasets_build {src.name} --overwrite` for --expert_labels")
    tok = GeneralistTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else GeneralistTokenizer.default()
    for spec in specs.values():
        tok.add_task_spec(spec)

    # --- model, optimizer, schedule ---
    if args.init_from:
        model = GeneralistForCausalLM.from_pretrained(args.init_from)
        if len(model.config.layout.special_tokens) > len(tok.layout.special_tokens):
            tok.with_all_special_tokens()  # the checkpoint has special tokens a saved tokenizer predates
        if args.hidden_action_prob and tok.hidden_action_id is None:
            raise ValueError(f"--init_from {args.init_from}: its vocabulary has no <hidden_action> token (an earlier "
                             "version's model); fine-tune it with --hidden_action_prob 0")
        model.config.hidden_action_prob = args.hidden_action_prob
        model.config.dt_context_steps = args.dt_window_steps
    else:
        model = GeneralistForCausalLM(model_config(args, tok.with_all_special_tokens()))
    if model.config.layout != tok.layout:
        raise ValueError(f"model vocabulary {model.config.layout} does not match the tokenizer's {tok.layout}")
    if args.dt_window_steps and getattr(model.config.text_config, "rope_parameters", None) is None:
        raise ValueError(DT_WINDOWS_NEED_ROTARY.format(backbone=model.config.text_config.model_type))
    task_weights = parse_weights(args.task_weights, "--task_weights") if args.task_weights else None
    if task_weights:  # a misspelt task would silently weigh nothing
        known = {task for s in train_sources for task in getattr(s, "by_task", {})}
        if unknown := sorted(set(task_weights) - known):
            raise ValueError(f"--task_weights: {unknown} is no task of the mixture's (non-streamed) control datasets; "
                             f"they have {sorted(known)}")
    packing = PackingConfig(seq_len=args.seq_len, return_prob=args.return_prob, prompt_prob=args.prompt_prob,
                            prompt_fraction=args.prompt_fraction, imitation_threshold=args.imitation_threshold,
                            hidden_action_prob=args.hidden_action_prob, expert_labels=args.expert_labels,
                            task_weights=task_weights, sample_by=args.sample_by,
                            dt_window_steps=args.dt_window_steps)
    src_weights = [weights[s.name] for s in train_sources]
    train_mix = Mixture(train_sources, src_weights, tok, packing)
    eval_mix = Mixture(eval_sources, src_weights, tok, packing)
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
        accelerator.load_state(str(resume_from / checkpoints.STATE_DIR))
        state = checkpoints.read_trainer_state(resume_from)
        step, tokens_seen, elapsed_before = state["step"], state["tokens_seen"], state["elapsed_s"]
        accelerator.print(f"resumed from {resume_from} at step {step}")
    stream = PackedStream(train_mix, args.batch_size, args.seed, rank=accelerator.process_index,
                          start_batch=step * args.grad_accum)
    loader = iter(DataLoader(stream, batch_size=None, num_workers=args.num_workers,
                             prefetch_factor=4 if args.num_workers else None))

    # --- logging, model card, hub ---
    resumed_at = step if resume_from is not None else None
    if trackers(args):  # TensorBoard under run/tensorboard/<run name>; a resumed run overwrites its lost steps
        accelerator.init_trackers(run.root.name, config=settings.flat_config(args),
                                  init_kwargs={"tensorboard": {"purge_step": resumed_at}})
    if is_main:
        settings.save(args, run.args)
        log = accelerator.log if trackers(args) else None
        train_log = MetricLog(run.train_csv, log, "train", resumed_at)
        eval_log = MetricLog(run.eval_csv, log, "eval", resumed_at)
    reproduce = settings.command_line(args, PRESETS)
    if accelerator.num_processes > 1:
        reproduce = f"accelerate launch --num_processes {accelerator.num_processes} {reproduce.removeprefix('python ')}"
    hub = None
    if args.push_to_hub and is_main:
        hub = HubPusher(args.hub_model_id, run.hub_staging, token=args.hub_token, private=args.hub_private,
                        retries=args.hub_retries, backoff_s=args.hub_backoff_s, timeout_s=args.hub_timeout_s)
    last_metrics: dict[str, dict[str, float]] = {}

    def card(folder: Path) -> None:
        write_model_card(folder, model_id=args.hub_model_id or run.root.name, mixture=weights, metrics=last_metrics,
                         reproduce=reproduce, tasks=sorted(specs),
                         summary={"parameters": f"{n_params / 1e6:.2f}M", "steps": step,
                                  "training tokens": f"{tokens_seen:,}",
                                  "context": args.seq_len, "processes": accelerator.num_processes,
                                  "backbone": f"{args.backbone} {args.num_layers}x{args.hidden_size}"})

    def save_checkpoint() -> None:
        trainer_state = {"tokens_seen": tokens_seen, "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                         "data": {"seed": args.seed, "next_batch": step * args.grad_accum,
                                  "batch_size": args.batch_size, "world_size": accelerator.num_processes}}
        final = checkpoints.save_checkpoint(accelerator, model, tok, run.checkpoints, step, trainer_state,
                                            args.keep_last, card)
        if hub is not None:
            hub.submit(final, f"step {step}")

    # --- the loop ---
    model.train()
    losses = ModalityLosses(accelerator.device)
    loss_sum, loss_n, tokens_window, grad_norm = torch.zeros((), device=accelerator.device), 0, 0, float("nan")
    wait_s, overhead_s, start_tokens = 0.0, 0.0, tokens_seen  # overhead: evaluation and checkpoints
    t_start = t_window = time.perf_counter()
    bar = tqdm(total=args.total_steps, initial=step, disable=not is_main, desc=run.root.name, dynamic_ncols=True)
    with data_files.guard():  # a worker killed by a truncated shard (SIGBUS) is reported naming the file
        while step < args.total_steps:
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
                losses.add(out)
                loss_sum += out.loss.detach().float()
                loss_n += 1
                batch_tokens = int(batch["attention_mask"].numel()) * accelerator.num_processes
                tokens_seen, tokens_window = tokens_seen + batch_tokens, tokens_window + batch_tokens
            scheduler.step()
            step += 1
            bar.update(1)

            if step % args.log_every == 0 or step == args.total_steps:
                last_metrics["train"] = losses.reduce(accelerator)
                mean_loss = accelerator.reduce(loss_sum, "mean").item() / loss_n
                now = time.perf_counter()
                tps = tokens_window / (now - t_window)
                if is_main:
                    train_log.add({"step": step, "tokens": tokens_seen, "loss": mean_loss, **last_metrics["train"],
                                   "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                                   "tokens_per_s": tps, "data_wait_share": wait_s / (now - t_window),
                                   "rss_mib": resident_mib()})
                    bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tps:,.0f}")
                loss_sum.zero_()
                loss_n, tokens_window, wait_s, t_window = 0, 0, 0.0, now
            t_other = time.perf_counter()  # evaluation and checkpoints are not training throughput
            if (args.eval_every and step % args.eval_every == 0) or step == args.total_steps:
                data_files.check()  # held-out batches are read in this process: a truncated shard would kill it
                batches = (eval_mix.batch(args.seed + 1_000_003, accelerator.process_index, b, args.batch_size)
                           for b in range(args.eval_batches))  # the same held-out batches every time
                last_metrics["held-out"] = held_out_losses(accelerator, model, batches)
                if is_main:
                    eval_log.add({"step": step, "tokens": tokens_seen, **last_metrics["held-out"]})
            if (args.save_every and step % args.save_every == 0) or step == args.total_steps:
                save_checkpoint()
            if step % args.log_every == 0:
                release_freed_memory()
            t_window += time.perf_counter() - t_other
            overhead_s += time.perf_counter() - t_other
    bar.close()
    session_s = time.perf_counter() - t_start
    wall = elapsed_before + session_s
    train_tps = (tokens_seen - start_tokens) / max(session_s - overhead_s, 1e-9)

    # --- the final model: publish, curves, card, summary; then its evaluation and the hub push ---
    checkpoints.publish_model(accelerator, model, tok, run.model, card)
    run.param_hashes.mkdir(exist_ok=True)
    (run.param_hashes / f"rank{accelerator.process_index}.txt").write_text(
        checkpoints.param_hash(accelerator.unwrap_model(model)))
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {"run_dir": str(run.root), "steps": step, "tokens": tokens_seen,
                               "train_wall_s": wall, "tokens_per_s": train_tps, "eval_and_checkpoint_s": overhead_s,
                               "parameters": n_params, "processes": accelerator.num_processes,
                               "final": last_metrics}
    if is_main:
        if train_log.rows or eval_log.rows:
            plot_learning_curves(train_log.rows, eval_log.rows, run.curves)
        shutil.copy(run.model / "README.md", run.card)
        run.summary.write_text(json.dumps(summary, indent=2, default=str))
        accelerator.print(
            f"done: {step} steps, {tokens_seen:,} tokens in {wall / 60:.1f} min ({train_tps:,.0f} tok/s)\n"
            + "\n".join(f"  {split:>8}: " + "  ".join(f"{m} {v:.3f}" for m, v in row.items())
                        for split, row in last_metrics.items())
            + f"\nmodel, tokenizer and card: {run.model}\ncurves: {run.curves}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if is_main:
        if args.run_eval:  # a separate process: its memory, imports and failures stay out of this one
            print("evaluating the final model: python -m eval", run.root, flush=True)
            code = subprocess.run([sys.executable, "-m", "eval", str(run.root)], check=False).returncode
            summary["evaluation"] = json.loads(run.summary.read_text()).get("evaluation", f"failed: exit code {code}")
            for result in sorted(run.eval.glob("control_*.json")):  # the scores go into the card before it ships
                update_card_results(run.model / CARD_FILE, json.loads(result.read_text())["per_checkpoint"][0])
            shutil.copy(run.model / CARD_FILE, run.card)
        if hub is not None:
            hub.submit(run.model, f"final model, step {step}")
            summary["hub_pushes"] = hub.close()
    return summary


def cli() -> None:
    """The ``generalist-train`` console script."""
    main(parse_args())


if __name__ == "__main__":
    cli()
