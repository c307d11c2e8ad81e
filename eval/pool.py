"""Several ``eval.control`` result files as one: the same checkpoints on other tasks, or other checkpoints (seeds)
on the same tasks.

    python -m eval.pool --files docs/results/control_lowq_steps_tt_cartpole.json \\
        docs/results/control_lowq_steps_tt_mcc.json --name control_lowq_steps_tt_pooled

Why: a Trajectory Transformer evaluation takes minutes to hours per task on a CPU, so it is run task by task
(``eval.control --tasks T``) or seed by seed, one process per core, and the IQM over the tasks (rliable,
stratified bootstrap over checkpoints) needs them together. The files must come from the same mode, and either
from the same checkpoints in the same order (compared by the last two parts of each path, run folder / model, so
the same runs evaluated from another working folder pool), each task in one file only, or from distinct
checkpoints on the same tasks. The pooled file records the command of every file it was made from, and
``python -m eval.results`` renders it as any other table.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eval.control import aggregate, pooled_results, report_saved, save_result
from eval.headline import EPISODES_COUNTED, counted_by_share
from generalist.training.settings import parse


@dataclass
class Args:
    files: tuple[Path, ...]
    """eval.control result files (JSON) to pool"""
    name: str
    """stem of the pooled file: <out>/<name>.json"""
    out: Path = Path("docs/results")
    """folder of the pooled file and its performance-profile plot"""


def pool(results: Sequence[dict], files: Sequence[Path]) -> tuple[list[str], list[list[dict]], list[str]]:
    """(checkpoints, per checkpoint: its records, tasks in order) of files that hold either the same checkpoints on
    other tasks (TT run task by task) or other checkpoints on the same tasks (seeds run in processes of their
    own); a clear error for files that do neither."""
    if len({r["mode"] for r in results}) > 1:
        raise SystemExit(f"eval.pool: the files differ in 'mode' ({', '.join(sorted({r['mode'] for r in results}))})")
    runs = [[Path(m).parts[-2:] for m in r["models"]] for r in results]  # the same runs from another folder match
    task_lists = [[entry["task"] for entry in r["results"]] for r in results]
    if all(run == runs[0] for run in runs):  # the same checkpoints, a task set each
        tasks: list[str] = []
        for path, names in zip(files, task_lists, strict=True):
            for task in names:
                if task in tasks:
                    raise SystemExit(f"eval.pool: {task} is in more than one file (again in {path})")
                tasks.append(task)
        per_checkpoint = [[rec for r in results for rec in r["per_checkpoint"][k]] for k in range(len(runs[0]))]
        return list(results[0]["models"]), per_checkpoint, tasks
    every_run = [run for file_runs in runs for run in file_runs]
    if all(names == task_lists[0] for names in task_lists) and len(set(every_run)) == len(every_run):
        return ([m for r in results for m in r["models"]], [run for r in results for run in r["per_checkpoint"]],
                task_lists[0])
    raise SystemExit("eval.pool: the files differ in 'models' and do not hold the same tasks of other checkpoints; "
                     "pool the same checkpoints (in the same order) on other tasks, or other checkpoints on the "
                     "same tasks")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(Args, argv, description=__doc__)
    results = [json.loads(Path(f).read_text()) for f in args.files]
    models, per_checkpoint, tasks = pool(results, args.files)
    first = results[0]
    summary = {"command": "python -m eval.pool " + " ".join(argv if argv is not None else sys.argv[1:]),
               "pooled_from": [r["command"] for r in results], "models": models,
               "dtype": first.get("dtype"), "mode": first["mode"],
               "episodes_per_checkpoint": sorted({r["episodes_per_checkpoint"] for r in results}),
               **({"episodes_counted": EPISODES_COUNTED} if all(map(counted_by_share, results)) else {}),
               "results": pooled_results(per_checkpoint, tasks, first["mode"]),
               "iqm": aggregate(per_checkpoint, tasks),
               "references": {task: ref for r in results for task, ref in r["references"].items()},
               "per_checkpoint": per_checkpoint, "dt_sweep": []}
    args.out.mkdir(parents=True, exist_ok=True)
    report_saved(summary, save_result(summary, args.out, args.name))
    return summary


if __name__ == "__main__":
    main()
