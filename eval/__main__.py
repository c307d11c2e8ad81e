"""Evaluate a training run: every evaluation its mixture calls for, then its report.

    python -m eval runs/NAME [--episodes N] [--samples N] [--data_root DIR]
    generalist-eval runs/NAME                  # the same, as the installed console script
    generalist-eval control --model user/name  # python -m eval.control (also caption, text, report, results,
                                               # score_curve)

``train.py`` runs this after training (unless ``--no_run_eval``); run it yourself on any run folder,
finished or stopped early. It evaluates the run's newest model that verifies (``RUN/model``, or the
newest intact checkpoint of a run stopped early; see :func:`eval.checkpoint.resolve_checkpoint`) on
the datasets of the run's mixture (read from ``RUN/args.json``):

==========  ====================================================================================
caption     :mod:`eval.caption` on the held-out split (BLEU-4, CIDEr-D, exact match)
text        :mod:`eval.text` on the validation split (perplexity)
control     :mod:`eval.control` rollouts of every task: Decision Transformer, and Gato prompted
            with an expert episode of the task from the run's control datasets; for BabyAI levels also
            Gato shown another object's mission (``--swap_mission``: does the agent read its mission?) and
            its mission without the object (``--blank_mission``: does it use the object named?)
==========  ====================================================================================

Results go to ``RUN/eval/``, the report to ``RUN/report.md`` (:mod:`eval.report`), and a line per
evaluation (its seconds and scores, or why it did not run) to ``"evaluation"`` in
``RUN/metrics.json``. Each script is called through its public ``main``, imported only when it runs,
and a failure is recorded, never raised: an evaluation reports on a trained model, it is not a gate
in front of it, and one broken script must not cost the others.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tyro

from generalist.tokenizer import TASK_SPECS_FILE
from generalist.training.run_folder import RunFolder
from generalist.training.settings import parse

DEFAULT_EPISODES = 5  # train.py's eval_episodes and eval_samples defaults, for a run without args.json
DEFAULT_SAMPLES = 64


@dataclass
class Args:
    run_dir: tyro.conf.Positional[Path]
    """The run folder (``runs/NAME``) written by ``train.py``."""
    episodes: int | None = None
    """Control episodes per task and mode (default: the run's ``eval_episodes``)."""
    samples: int | None = None
    """Images to caption and documents to score per dataset (default: the run's ``eval_samples``)."""
    data_root: Path | None = None
    """Where the run's datasets are (default: the run's ``data_root``)."""


def jobs(args: Args, model: Path, out: Path) -> dict[str, Callable[[], Any]]:
    """One call of a script's public ``main`` per evaluation the run's mixture calls for, by name."""
    from datasets_build.sources import dataset_kind, parse_mixture

    run = RunFolder(args.run_dir)
    saved = json.loads(run.args.read_text()) if run.args.is_file() else {}
    if "mixture" not in saved:
        raise FileNotFoundError(f"{run.args}: no saved mixture, so no datasets to evaluate on")
    data_root = args.data_root or Path(saved.get("data_root", "data"))
    episodes = args.episodes or saved.get("eval_episodes", DEFAULT_EPISODES)
    samples = args.samples or saved.get("eval_samples", DEFAULT_SAMPLES)
    calls: dict[str, Callable[[], Any]] = {}
    control: list[Path] = []
    for name in parse_mixture(saved["mixture"]):
        folder = data_root / name
        kind = dataset_kind(folder)
        if kind == "control":
            control.append(folder)
        elif kind == "caption":
            calls[f"caption/{name}"] = lambda folder=folder: _caption(model, folder, samples, out)
        else:
            calls[f"text/{name}"] = lambda folder=folder: _text(model, folder, samples, out)
    if control:
        rollouts = ["--model", str(model), "--out", str(out), "--episodes", str(episodes)]
        calls["control/dt"] = lambda: _control(rollouts)
        calls["control/gato"] = lambda: _control([*rollouts, "--mode", "gato", "--demos", *map(str, control)])
        specs = model / TASK_SPECS_FILE
        if babyai := [t for t in (json.loads(specs.read_text()) if specs.is_file() else {}) if t.startswith("BabyAI-")]:
            # does the agent read its mission? success shown another object's mission (eval.control --swap_mission)
            # and does it use the object its mission names? success with the object left out (--blank_mission)
            for flag, name in (("--swap_mission", "swapped_mission"), ("--blank_mission", "blanked_mission")):
                calls[f"control/gato_{name}"] = lambda flag=flag, name=name: _control(
                    [*rollouts, "--mode", "gato", "--tasks", *babyai, flag, "--name", f"control_gato_{name}"])
    return calls


def _caption(model: Path, data: Path, samples: int, out: Path) -> dict:
    from eval import caption

    return caption.main(caption.Args(model=model, data=data, max_samples=samples, out=out))


def _text(model: Path, data: Path, samples: int, out: Path) -> dict:
    from eval import text

    return text.main(text.Args(model=model, data=data, max_samples=samples, out=out))


def _control(argv: list[str]) -> dict:
    from eval import control

    return control.main(argv)


def evaluate_run(args: Args) -> dict[str, Any]:
    """Run every evaluation of the run and write its report; returns what each one gave (or why not)."""
    from eval.checkpoint import resolve_checkpoint

    run = RunFolder(args.run_dir)
    results: dict[str, Any] = {}
    try:
        model = resolve_checkpoint(run.root)
        results["model"] = str(model)
        calls = jobs(args, model, run.eval)
    except Exception as e:  # no model, no settings, a dataset gone: the report still says what there is
        results["setup"] = f"failed: {e!r}"
        calls = {}
    for name, call in calls.items():
        t0 = time.perf_counter()
        try:
            result = call()
            shown = {k: v for k, v in (result if isinstance(result, dict) else {}).items()
                     if isinstance(v, int | float) or k == "metrics"}  # scalars, not per-sample lists
            results[name] = {"seconds": round(time.perf_counter() - t0, 1), **shown}
        except ImportError as e:
            results[name] = f"not run: {e}"
        except (Exception, SystemExit) as e:  # a script's argparse exits on flags it no longer takes
            results[name] = f"failed: {e!r}"
        print(f"eval {name}: {results[name]}")
    try:
        from eval.report import write_report

        results["report"] = str(write_report(run.root))
    except Exception as e:
        results["report"] = f"not written: {e!r}"
    _record(run, results)
    return results


def _record(run: RunFolder, results: dict[str, Any]) -> None:
    """Put the results under ``"evaluation"`` in ``RUN/metrics.json`` (replaced atomically)."""
    summary = json.loads(run.summary.read_text()) if run.summary.is_file() else {}
    summary["evaluation"] = results
    tmp = run.summary.with_name(f".tmp-{run.summary.name}")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(run.summary)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return evaluate_run(parse(Args, argv, description=__doc__))


SUBCOMMANDS = ("control", "caption", "text", "report", "results", "score_curve")


def cli(argv: Sequence[str] | None = None) -> None:
    """``generalist-eval RUN`` (this module), or ``generalist-eval control|caption|text|report|results|score_curve ...``
    (``python -m eval.<name>``): one console script for every evaluation."""
    import importlib
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(f"eval.{argv[0]}")
        sys.argv = [f"generalist-eval {argv[0]}", *argv[1:]]
        result = module.main(argv[1:]) if argv[0] in ("control", "results", "score_curve") else module.main(
            parse(module.Args, argv[1:], description=module.__doc__))
        if isinstance(result, int):
            raise SystemExit(result)
        return
    main(argv)


if __name__ == "__main__":
    main()
