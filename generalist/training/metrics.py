"""Training metrics: per-modality losses summed over processes, and their CSV + TensorBoard log.

The model reports a mean loss and a token count per target modality for each batch
(``GeneralistCausalLMOutput.modality_losses`` / ``modality_counts``). A logged loss is the
token-weighted mean over every batch and process since the last log, so a modality that is rare in
the mixture is neither dropped nor over-weighted. The learning-curve figure drawn from these logs
is ``eval.plots.plot_learning_curves``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from generalist.integrity import TMP_PREFIX
from generalist.vocab import LOSS_MODALITIES

if TYPE_CHECKING:
    from accelerate import Accelerator



class MetricLog:
    """Rows of metrics in a CSV and, under ``prefix/``, in experiment trackers (``Accelerator.log``).

    On resume the CSV keeps the rows up to the resumed step, so that the steps a killed run logged
    after its last checkpoint are logged once, by the resumed run, with the same values.
    """

    def __init__(self, path: Path, log: Callable[..., Any] | None, prefix: str, resume_step: int | None = None):
        self.path, self.log, self.prefix = Path(path), log, prefix
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.exists():
            with self.path.open() as f:
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

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._write()
        if self.log is not None:
            self.log({f"{self.prefix}/{k}": float(v) for k, v in row.items() if k != "step" and v != ""},
                     step=int(row["step"]))


class ModalityLosses:
    """Token-weighted sums of the loss per target modality, kept on the device until reduced."""

    def __init__(self, device: torch.device | str):
        self.sums = torch.zeros(len(LOSS_MODALITIES), device=device)
        self.counts = torch.zeros(len(LOSS_MODALITIES), device=device)

    def add(self, out: Any) -> None:
        """One batch's per-modality losses (means and counts, as the model reports them)."""
        for i, m in enumerate(LOSS_MODALITIES):
            if m in out.modality_losses:
                n = out.modality_counts[m].to(self.counts.dtype)
                self.sums[i] += out.modality_losses[m].detach().float() * n
                self.counts[i] += n

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        """Mean loss per modality over every process since the last reset (collective), then reset."""
        sums, counts = accelerator.reduce(self.sums, "sum"), accelerator.reduce(self.counts, "sum")
        self.sums.zero_()
        self.counts.zero_()
        return {m: (sums[i] / counts[i]).item() for i, m in enumerate(LOSS_MODALITIES) if counts[i] > 0}


@torch.no_grad()
def held_out_losses(accelerator: Accelerator, model: torch.nn.Module, batches: Any) -> dict[str, float]:
    """Loss per modality on held-out ``batches`` (an iterable of model inputs), with the model in eval mode."""
    model.eval()
    losses = ModalityLosses(accelerator.device)
    for batch in batches:
        with accelerator.autocast():
            losses.add(model(**{k: v.to(accelerator.device) for k, v in batch.items()}))
    model.train()
    return losses.reduce(accelerator)
