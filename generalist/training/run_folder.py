"""The layout of a run folder ``runs/<run_name>/``, defined once for its writer and its readers.

``train.py`` writes it, ``python -m eval RUN`` evaluates it, ``eval.report`` summarises it; each
takes the paths from :class:`RunFolder` instead of spelling file names itself::

    model/                      the final model: save_pretrained artifacts of model and tokenizer + README.md card
    checkpoints/step_XXXXXXXX/  the same, plus the training state (see generalist.training.checkpoints)
    train_metrics.csv           loss per target modality, lr, grad norm, tokens/s, data wait share, RSS
    eval_metrics.csv            held-out loss per modality
    tensorboard/<run name>/     the same scalars (train/, eval/), with --report_to tensorboard
    learning_curves.png         loss per modality against training tokens
    metrics.json, args.json     summary (wall time, tokens/s, final losses, evaluation) and settings
    README.md                   the final model's card
    param_hashes/rankN.txt      sha256 of the final parameters on every process (they must agree)
    eval/, report.md, report/   what ``python -m eval RUN`` writes: results, the report and its figures
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# files only a run folder has: how a reader tells a run folder from a loose checkpoint
RUN_MARKERS = ("train_metrics.csv", "args.json", "metrics.json")


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def train_csv(self) -> Path:
        return self.root / "train_metrics.csv"

    @property
    def eval_csv(self) -> Path:
        return self.root / "eval_metrics.csv"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def curves(self) -> Path:
        return self.root / "learning_curves.png"

    @property
    def summary(self) -> Path:
        return self.root / "metrics.json"

    @property
    def args(self) -> Path:
        return self.root / "args.json"

    @property
    def card(self) -> Path:
        return self.root / "README.md"

    @property
    def param_hashes(self) -> Path:
        return self.root / "param_hashes"

    @property
    def hub_staging(self) -> Path:
        return self.root / ".hub-staging"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def report_figures(self) -> Path:
        return self.root / "report"

    def is_run(self) -> bool:
        return any((self.root / marker).exists() for marker in RUN_MARKERS)
