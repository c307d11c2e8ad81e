"""Soak benchmark of training: memory and step time over a long ``train.py`` run.

    python bench/train_soak.py                           # 5,000 steps of the demo model (about 1.5 h here)
    python bench/train_soak.py --steps 200 --plot soak.png
    python bench/train_soak.py --run runs/control         # the curves of a run that already exists

A user trains for hours: DataLoader workers keep their decoded-episode caches, batches carry a
different number of image patches each, checkpoints and held-out evaluations interrupt the loop. This
runs ``python train.py`` (the demo preset unless ``--flags`` say otherwise, no final evaluation) for
``steps`` steps and reads what every run logs at each ``log_every`` step in ``train_metrics.csv``: the
resident memory of the trainer and its workers (``rss_mib``) and the throughput (``tokens_per_s``,
from which the time per step). Drift is measured after ``warmup`` (a share of the run), as in
``bench/agent_soak.py``; exit status 1 when memory grows by more than 5 %.
"""

from __future__ import annotations

import csv
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from generalist.training.run_folder import RunFolder
from generalist.training.settings import parse

try:  # run as a script, bench/ is on sys.path
    from soak import drift_report
except ImportError:  # imported as bench.train_soak (the tests)
    from bench.soak import drift_report

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    steps: int = 5000
    """optimizer steps of the run"""
    run: Path | None = None
    """analyse this existing run folder instead of training one"""
    output_dir: Path = Path("runs")
    """where the soak run goes"""
    run_name: str = "soak"
    """its folder under output_dir (the one analysed; a --run_name inside --flags is refused)"""
    flags: str = ""
    """more train.py flags, e.g. '--preset control --data_root data'"""
    warmup: float = 0.1
    """share of the run before the reference record"""
    plot: Path | None = None
    """also draw the curves into this PNG"""


def curves(run: RunFolder) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, RSS (MiB) and ms per step from a run's ``train_metrics.csv``."""
    with run.train_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("rss_mib")]
    if len(rows) < 2:
        raise SystemExit(f"{run.train_csv}: fewer than two rows with rss_mib (a run of an older version?)")
    steps = np.array([int(r["step"]) for r in rows])
    tokens = np.array([float(r["tokens"]) for r in rows])
    per_step = np.diff(tokens, prepend=0) / np.diff(steps, prepend=0)  # tokens per step in each log window
    ms = 1000 * per_step / np.array([float(r["tokens_per_s"]) for r in rows])
    return steps, np.array([float(r["rss_mib"]) for r in rows]), ms


def main(args: Args) -> int:
    if args.run is None:
        if "--run_name" in args.flags:  # train.py would take the last one, and another run would be analysed
            raise SystemExit("bench/train_soak.py: give the run's name as --run_name, not inside --flags")
        cmd = [sys.executable, "train.py", "--run_name", args.run_name, "--output_dir", str(args.output_dir),
               "--overwrite", "--total_steps", str(args.steps), "--no_run_eval",
               "--save_every", str(max(1, args.steps // 5)), *shlex.split(args.flags)]
        print("running:", shlex.join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    run = RunFolder(args.run or args.output_dir / args.run_name)
    steps, rss, ms = curves(run)
    print(f"\n{run.root}: {steps[-1]} steps, {len(steps)} records")
    for k in np.linspace(0, len(steps) - 1, min(len(steps), 11)).astype(int):
        print(f"step {steps[k]:>6}  RSS {rss[k]:8.1f} MiB  {ms[k]:8.1f} ms/step")
    drift = drift_report(steps, rss, ms, warmup=args.warmup, unit="step", plot=args.plot,
                         title=f"Training soak: {run.root.name}")
    return 0 if drift <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main(parse(Args, description=__doc__)))
