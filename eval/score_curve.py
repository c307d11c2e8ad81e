"""Score against training tokens: every saved checkpoint of one or more runs (seeds), played by ``eval.control``.

A loss curve says the model fits its data; this says whether it learns to *act*, and when. Each
checkpoint under ``RUN/checkpoints/step_*`` is rolled out (``--episodes`` per task, the mode and any
other ``eval.control`` flags as given) and scored expert-normalised, and D4RL-normalised for the
locomotion tasks. Train with ``--save_every N --keep_last K`` (K at least total_steps / N) to keep
the checkpoints.

    python -m eval.score_curve --runs runs/loco-hm-s0 runs/loco-hm-s1 --mode dt --tasks Hopper-v5 \\
        --name hopper_medium_dt
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from generalist.training.settings import parse


@dataclass
class Args:
    runs: tuple[Path, ...]
    """run folders (one per seed); their checkpoints/step_* are evaluated"""
    mode: Literal["gato", "dt", "tt"] = "dt"
    tasks: tuple[str, ...] | None = None
    """default: every task of the model"""
    episodes: int = 10
    """episodes per task per checkpoint"""
    out: Path = Path("docs/results")
    name: str = "score_curve"
    """writes OUT/curve_NAME.json and .png; each eval.control run goes to OUT/curves/"""
    control_flags: str = ""
    """more eval.control flags as one string, e.g. --control_flags='--threads 1 --target_return 1400'"""


def checkpoints(run: Path) -> list[Path]:
    from generalist.training.checkpoints import checkpoint_dirs

    found = checkpoint_dirs(run / "checkpoints")
    if not found:
        raise SystemExit(f"{run}: no checkpoints/step_* (train with --save_every N --keep_last K to keep them)")
    return found


def main(argv: Sequence[str] | None = None) -> dict:
    from eval.control import main as control_main
    from eval.plots import save_figure

    args = parse(Args, argv, description=__doc__)
    curves: dict[str, list[dict]] = {}
    for run in args.runs:
        found = checkpoints(run)
        flags = ["--model", *map(str, found), "--mode", args.mode, "--episodes", str(args.episodes),
                 "--out", str(args.out / "curves"), "--name", f"{args.name}_{run.name}",
                 *shlex.split(args.control_flags)]
        if args.tasks:
            flags += ["--tasks", *args.tasks]
        summary = control_main(flags)
        points = []
        for folder, records in zip(found, summary["per_checkpoint"], strict=True):
            state = json.loads((folder / "trainer_state.json").read_text())
            scored = [r for r in records if "normalized_score" in r]
            point = {"step": state["step"], "tokens": state["tokens_seen"], "checkpoint": str(folder),
                     "normalized_score": float(np.mean([r["normalized_score"] for r in scored])) if scored else None}
            if d4rl := [r["d4rl_score"] for r in records if "d4rl_score" in r]:
                point["d4rl_score"] = float(np.mean(d4rl))
            points.append(point)
        curves[str(run)] = points
    record = {"command": "python -m eval.score_curve " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "mode": args.mode, "episodes_per_task": args.episodes, "runs": curves}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"curve_{args.name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    record["plot"] = str(save_figure(_plot(curves, args), args.out / f"curve_{args.name}.png"))
    print(f"wrote {path} and {record['plot']}")
    return record


# the least a curve's y-axis spans, in its score's units (D4RL points; expert-normalised: 1 = the expert)
MIN_Y_SPAN = {"d4rl_score": 10.0, "normalized_score": 0.1}


def _plot(curves: dict[str, list[dict]], args: Args):
    from matplotlib.figure import Figure

    d4rl = any("d4rl_score" in p for points in curves.values() for p in points)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    key, label = ("d4rl_score", "D4RL-normalised score") if d4rl else ("normalized_score", "expert-normalised score")
    for run, points in curves.items():
        ax.plot([p["tokens"] / 1e6 for p in points], [p.get(key) for p in points], "o-", label=Path(run).name)
    ax.set(xlabel="training tokens (M)", ylabel=label)
    low, high = ax.get_ylim()  # a flat curve drawn flat: autoscale would stretch a 0.03-point wobble over the axis
    if high - low < (span := MIN_Y_SPAN[key]):
        ax.set_ylim((low + high - span) / 2, (low + high + span) / 2)
    ax.set_title(f"{args.name}\n{args.mode} mode, {args.episodes} episodes per checkpoint and task", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
