"""Several ``eval.control`` result files of the same checkpoints, one task set each, as one result file.

    python -m eval.pool --files docs/results/control_lowq_steps_tt_cartpole.json \\
        docs/results/control_lowq_steps_tt_mcc.json --name control_lowq_steps_tt_pooled

Why: a Trajectory Transformer evaluation takes minutes to hours per task on a CPU, so it is run task by task
(``eval.control --tasks T``), and the IQM over the tasks (rliable, stratified bootstrap over checkpoints) needs
them together. The files must come from the same checkpoints, in the same order (compared by the last two parts
of each path, run folder / model, so the same runs evaluated from another working folder pool), and the same mode;
each task may appear in one file only. The pooled file records the command of every file it was made from, and
``python -m eval.results`` renders it as any other table.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eval.control import aggregate, pooled_results, report_saved, save_result
from generalist.training.settings import parse


@dataclass
class Args:
    files: tuple[Path, ...]
    """eval.control result files (JSON) to pool"""
    name: str
    """stem of the pooled file: <out>/<name>.json"""
    out: Path = Path("docs/results")
    """folder of the pooled file and its performance-profile plot"""


def pool(results: Sequence[dict], files: Sequence[Path]) -> tuple[list[list[dict]], list[str]]:
    """(per checkpoint: every file's records, tasks in order); a clear error for files that do not pool."""
    for what in ("models", "mode"):  # checkpoints by their last two path parts: the same runs from another folder
        seen = {json.dumps([Path(m).parts[-2:] for m in r[what]] if what == "models" else r[what]) for r in results}
        if len(seen) > 1:
            raise SystemExit(f"eval.pool: the files differ in {what!r} ({', '.join(sorted(seen))}); only results of "
                             "the same checkpoints, in the same order, in one mode pool")
    tasks: list[str] = []
    for path, result in zip(files, results, strict=True):
        for entry in result["results"]:
            if entry["task"] in tasks:
                raise SystemExit(f"eval.pool: {entry['task']} is in more than one file (again in {path})")
            tasks.append(entry["task"])
    per_checkpoint = [[rec for r in results for rec in r["per_checkpoint"][k]]
                      for k in range(len(results[0]["models"]))]
    return per_checkpoint, tasks


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(Args, argv, description=__doc__)
    results = [json.loads(Path(f).read_text()) for f in args.files]
    per_checkpoint, tasks = pool(results, args.files)
    first = results[0]
    summary = {"command": "python -m eval.pool " + " ".join(argv if argv is not None else sys.argv[1:]),
               "pooled_from": [r["command"] for r in results], "models": first["models"],
               "dtype": first.get("dtype"), "mode": first["mode"],
               "episodes_per_checkpoint": sorted({r["episodes_per_checkpoint"] for r in results}),
               "results": pooled_results(per_checkpoint, tasks, first["mode"]),
               "iqm": aggregate(per_checkpoint, tasks),
               "references": {task: ref for r in results for task, ref in r["references"].items()},
               "per_checkpoint": per_checkpoint, "dt_sweep": []}
    args.out.mkdir(parents=True, exist_ok=True)
    report_saved(summary, save_result(summary, args.out, args.name))
    return summary


if __name__ == "__main__":
    main()
