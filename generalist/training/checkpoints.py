"""Training checkpoints: written whole or not at all, checked before resuming, rotated.

``checkpoints/step_XXXXXXXX/`` holds the ``save_pretrained`` artifacts of model and tokenizer and
the model card (so any checkpoint loads like a final model), ``state/`` (``accelerate.save_state``:
optimizer, schedule, RNG of every process), ``trainer_state.json`` (step, data-stream position) and
``manifest.json``. It follows :mod:`generalist.integrity`: written in a hidden ``.tmp-`` folder,
listed in the manifest, flushed, published by an atomic rename; the newest ``keep_last`` are kept.

``--resume`` takes the newest checkpoint that verifies (:func:`select_resume_checkpoint`); a
damaged one is named and set aside as ``corrupt-step_XXXXXXXX``. A failed write (disk full) raises
an ``OSError`` naming the checkpoint and leaves the previous ones intact. The final model is
published the same way (:func:`publish_model`).

Functions that take an ``accelerator`` are collective: every process calls them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from generalist import integrity
from generalist.training.run_folder import RunFolder

if TYPE_CHECKING:
    from accelerate import Accelerator

    from generalist.tokenizer import GeneralistTokenizer

STATE_DIR = "state"  # accelerate.save_state: model, optimizer, scheduler, RNG of every process
TRAINER_STATE = "trainer_state.json"  # step and data-stream position
STEP_PREFIX = "step_"


def checkpoint_dirs(checkpoints: Path) -> list[Path]:
    """Published checkpoints in ``checkpoints``, oldest first (one exists only once renamed from its tmp dir)."""
    checkpoints = Path(checkpoints)
    if not checkpoints.exists():
        return []
    return sorted(p for p in checkpoints.glob(STEP_PREFIX + "*") if (p / TRAINER_STATE).exists())


def verify_checkpoint(folder: Path) -> str | None:
    """None if ``folder`` is a whole checkpoint, else what is wrong with it, naming the file."""
    try:
        int(json.loads((folder / TRAINER_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{folder / TRAINER_STATE} is unreadable ({e!r})"
    return integrity.verify(folder)


def select_resume_checkpoint(checkpoints: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the newer ones that did not (with the reason).

    The rule for ``--resume``: a damaged checkpoint is skipped and training resumes from the previous
    complete one (the data stream is a function of the step, so the data order is the same).
    """
    return integrity.newest_intact(reversed(checkpoint_dirs(checkpoints)), verify_checkpoint)


def open_run_folder(accelerator: Accelerator, run: RunFolder, *, resume: bool, overwrite: bool) -> Path | None:
    """Create (``overwrite``: recreate) the run folder; with ``resume``, the checkpoint to resume from (collective).

    A folder that already holds checkpoints is never reused silently. On resume, damaged checkpoints
    newer than the chosen one are named and set aside; if none is whole the run refuses to start.
    """
    if checkpoint_dirs(run.checkpoints) and not (resume or overwrite):
        raise SystemExit(f"{run.root} already holds checkpoints; pass --resume to continue it, --overwrite to "
                         "start again, or --run_name to start another run")
    if accelerator.is_main_process:
        if overwrite and run.root.exists():
            shutil.rmtree(run.root)
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        integrity.clean_staging(run.checkpoints)  # left by a killed save or rotation
    accelerator.wait_for_everyone()
    if not resume:
        return None
    resume_from, damaged = select_resume_checkpoint(run.checkpoints)
    for ckpt, problem in damaged:
        accelerator.print(f"WARNING: skipping damaged checkpoint {ckpt.name}: {problem}"
                          + (f"; falling back to {resume_from.name}" if resume_from else ""))
    if damaged and resume_from is None:
        raise SystemExit(f"--resume: no complete checkpoint in {run.checkpoints}: "
                         + "; ".join(p for _, p in damaged) + ". Start again with --overwrite.")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for ckpt, _ in damaged:  # out of the way of rotation, kept for inspection
            integrity.set_aside(ckpt)
    accelerator.wait_for_everyone()
    return resume_from


def read_trainer_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / TRAINER_STATE).read_text())


def export_model(accelerator: Accelerator, model: torch.nn.Module, tokenizer: GeneralistTokenizer,
                 folder: Path) -> None:
    """``save_pretrained`` artifacts of model and tokenizer side by side (collective)."""
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP / DeepSpeed shards
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state_dict)
        tokenizer.save_pretrained(folder)


def _write_and_publish(accelerator: Accelerator, final: Path, fill: Callable[[Path], None],
                       fill_main: Callable[[Path], None]) -> None:
    """Write ``final`` through a shared staging folder: ``fill`` on every process, then ``fill_main``
    on the main one, the manifest, and the atomic rename (collective)."""
    tmp = integrity.staging_dir(final)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        fill(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            fill_main(tmp)
            integrity.write_manifest(tmp)
            integrity.publish(tmp, final)
    finally:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space when a write failed
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator: Accelerator, model: torch.nn.Module, tokenizer: GeneralistTokenizer,
                    checkpoints: Path, step: int, trainer_state: dict[str, Any], keep_last: int,
                    write_card: Callable[[Path], None]) -> Path:
    """Model, tokenizer, card and the full training state at ``step``, published whole; older ones
    beyond ``keep_last`` are removed only afterwards (collective)."""
    final = Path(checkpoints) / f"{STEP_PREFIX}{step:08d}"

    def everyone(tmp: Path) -> None:
        accelerator.save_state(str(tmp / STATE_DIR))
        export_model(accelerator, model, tokenizer, tmp)

    def main_only(tmp: Path) -> None:
        write_card(tmp)
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))

    try:
        _write_and_publish(accelerator, final, everyone, main_only)
    except OSError as e:
        previous = checkpoint_dirs(checkpoints)
        raise OSError(e.errno, f"writing checkpoint {final} failed ({e.strerror or e}); nothing was published and "
                      + (f"the previous checkpoint {previous[-1]} is intact: free space and --resume"
                         if previous else "there is no earlier checkpoint")) from e
    if accelerator.is_main_process:
        for old in checkpoint_dirs(checkpoints)[:-keep_last]:
            integrity.remove_dir(old)
    accelerator.wait_for_everyone()
    return final


def publish_model(accelerator: Accelerator, model: torch.nn.Module, tokenizer: GeneralistTokenizer,
                  folder: Path, write_card: Callable[[Path], None]) -> Path:
    """The final model: ``save_pretrained`` artifacts and card, published like a checkpoint (collective)."""
    _write_and_publish(accelerator, Path(folder), lambda tmp: export_model(accelerator, model, tokenizer, tmp),
                       write_card)
    return Path(folder)


def param_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer by name: processes that trained the same model agree."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
