"""One Markdown report of a training run: curves, control scores, captions, perplexity.

    python -m eval.report runs/NAME

Reads what the run and the evaluation scripts left in the run folder and writes
``RUN/report.md`` with its figures in ``RUN/report/``:

===================================  ===========================================================
source (inside RUN)                  section
===================================  ===========================================================
``metrics.json``, ``args.json``      run summary (steps, tokens, throughput, parameters, settings)
``train_metrics.csv``,               learning curves: one line per modality loss, training and
``eval_metrics.csv``                 held-out, and the final losses
``eval/control*.json`` (+ frames)    control scores per task and mode, DT return sweep, a rollout
``eval/caption.json`` (+ grid PNG)   caption metrics and example captions beside their images
``eval/text.json``                   validation perplexity
===================================  ===========================================================

Control results are read as records ``{task, mode, mean_return[, normalized_score]}`` (a list,
``{"results": [...]}`` or ``{task: {mode: {...}}}``), a DT sweep as ``{"dt_sweep": [{task,
target_return, mean_return}]}`` and rollout frames as ``eval/*frames*.npy`` (T, H, W, 3) uint8; without
saved frames one episode is rendered here with :class:`generalist.agent.Agent`.

A section whose inputs are missing says "not run" and how to run it: the report never fills a
gap with a number it did not read. The body has no YAML header and links its figures relative to
the run folder, so it can be appended to a model card as it is.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tyro

from eval import caption as caption_eval
from eval.checkpoint import load_checkpoint, resolve_checkpoint
from eval.control import make_render_env, play_rendered
from eval.plots import frame_strip, plot_dt_sweep, plot_learning_curves
from eval.results import MISSION_CHANGES
from generalist.training.run_folder import RunFolder
from generalist.training.settings import parse
from generalist.vocab import LOSS_MODALITIES

TEXT_RESULTS = "text.json"
EXAMPLE_ROWS = 8
NOT_RUN = "_not run_"
ROLLOUT_FRAMES = 6
RETURN_KEYS = ("mean_return", "return_mean", "return", "mean")  # how a result may name its mean return
NORMALISED_KEYS = ("normalized_score", "normalised_score", "expert_normalized")
PREFERRED_ROLLOUT_TASKS = ("CartPole-v1", "Pendulum-v1", "Acrobot-v1")  # small, readable frames


@dataclass
class RolloutStrip:
    path: Path
    task: str
    mode: str
    episode_return: float
    steps: int


@dataclass
class Args:
    run_dir: tyro.conf.Positional[Path]
    """The run folder (``runs/NAME``) written by ``train.py``."""


# --- reading --------------------------------------------------------------------------------------


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it does not exist (a section that was not run)."""
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def read_csv(path: Path) -> list[dict[str, float]]:
    """Rows of a metrics CSV with every non-empty cell as a float (empty cells are left out)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(f)]


# --- formatting -----------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1e3:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells are formatted with :func:`fmt` and pipes escaped."""
    def cell(v: Any) -> str:
        return (v if isinstance(v, str) else fmt(v)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def image(path: Path, run_dir: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(run_dir).as_posix()})"


def duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


# --- sections -------------------------------------------------------------------------------------


def run_section(run_dir: Path) -> str:
    run = RunFolder(run_dir)
    summary, args = read_json(run.summary), read_json(run.args)
    out = ["## Run"]
    if summary is None and args is None:
        return "\n\n".join(out + [f"{NOT_RUN}: no `{run.summary.name}` or `{run.args.name}` in `{run_dir}` "
                                  "(`python train.py` writes them when training finishes)."])
    if summary:
        rows = [("steps", summary.get("steps")), ("training tokens", summary.get("tokens")),
                ("parameters", summary.get("parameters")), ("processes", summary.get("processes")),
                ("training time", duration(summary["train_wall_s"]) if "train_wall_s" in summary else None),
                ("tokens / s", summary.get("tokens_per_s"))]
        out.append(table(["", "value"], [r for r in rows if r[1] is not None]))
    if args:
        shown = {k: v for k, v in args.items() if not isinstance(v, dict | list) and "token" not in k.lower()}
        out.append("<details><summary>training settings (<code>args.json</code>)</summary>\n\n"
                   + table(["setting", "value"], [(k, f"`{v}`") for k, v in shown.items()]) + "\n\n</details>")
    return "\n\n".join(out)


def curves_section(run_dir: Path, figures: Path) -> str:
    run = RunFolder(run_dir)
    train_rows, eval_rows = read_csv(run.train_csv), read_csv(run.eval_csv)
    out = ["## Learning curves"]
    if not any(m in r for r in train_rows + eval_rows for m in LOSS_MODALITIES):
        return "\n\n".join(out + [f"{NOT_RUN}: no per-modality losses in `{run.train_csv.name}` / "
                                  f"`{run.eval_csv.name}`."])
    png = plot_learning_curves(train_rows, eval_rows, figures / "learning_curves.png")
    out.append(image(png, run_dir, "learning curves"))
    last = {name: rows[-1] for name, rows in (("train", train_rows), ("held-out", eval_rows)) if rows}
    present = [m for m in LOSS_MODALITIES if any(m in r for r in last.values())]
    header = ["modality"] + [f"{name} loss (step {int(r.get('step', 0)):,})" for name, r in last.items()]
    out.append("Final next-token loss per target modality (nats; perplexity = e^loss):\n\n"
               + table(header, [[m] + [r.get(m) for r in last.values()] for m in present]))
    return "\n\n".join(out)


def render_rollout(checkpoint: Path, path: Path, task: str | None = None, max_steps: int = 200,
                   frames: int = ROLLOUT_FRAMES, seed: int = 0) -> RolloutStrip | None:
    """Roll the checkpoint out for one episode with :class:`generalist.agent.Agent` and save a strip.

    Decision Transformer mode aiming at the task's expert return where the spec has one, Gato mode
    (no prompt) otherwise. Returns None when no task of the tokenizer can be made here.
    """
    from generalist.agent import Agent

    model, tokenizer, _ = load_checkpoint(checkpoint)
    names = [task] if task else sorted(tokenizer.task_specs, key=lambda n: (n not in PREFERRED_ROLLOUT_TASKS, n))
    for name in names:
        env = make_render_env(name)
        if env is None:
            continue
        spec = tokenizer.get_task_spec(name)
        mode = "dt" if spec.expert_return is not None else "gato"
        agent = Agent(model, tokenizer, mode=mode, seed=seed)
        shots, total, steps = play_rendered(agent, env, spec, seed, max_steps)
        keep = np.unique(np.linspace(0, len(shots) - 1, min(frames, len(shots))).round().astype(int))
        title = f"{name}, {mode} mode: return {total:.1f} in {steps} steps"
        frame_strip([shots[i] for i in keep], path, labels=[f"t = {i}" for i in keep], title=title)
        return RolloutStrip(path, name, mode, total, steps)
    return None


def control_records(results: Any) -> list[dict[str, Any]]:
    """Flat ``{task, mode, score...}`` records from eval.control's results.

    Accepts a list of records, ``{"results": [...]}``, or ``{task: {mode: {score...}}}``.
    """
    if isinstance(results, dict) and isinstance(results.get("results"), list | dict):
        results = results["results"]
    if isinstance(results, list):
        return [r for r in results if isinstance(r, dict) and "task" in r and "mode" in r]
    if isinstance(results, dict):
        return [{"task": task, "mode": mode, **scores}
                for task, modes in results.items() if isinstance(modes, dict)
                for mode, scores in modes.items() if isinstance(scores, dict)]
    return []


def _score(record: dict[str, Any], keys: Sequence[str]) -> float | None:
    return next((float(record[k]) for k in keys if isinstance(record.get(k), int | float)), None)


def saved_frames(eval_dir: Path) -> list[np.ndarray]:
    """Rollout frames eval.control saved (``*frames*.npy``: (T, H, W, 3) uint8), if any."""
    for f in sorted(eval_dir.glob("**/*frames*.npy")):
        arr = np.load(f)
        if arr.ndim == 4 and arr.shape[-1] in (3, 4) and len(arr):
            return list(arr)
    return []


def control_section(run_dir: Path, figures: Path, rollout: bool = True) -> str:
    out = ["## Control"]
    eval_dir = RunFolder(run_dir).eval
    found = sorted(eval_dir.glob("control*.json"))
    records = [r for f in found for r in control_records(read_json(f))]
    if not records:
        out.append(f"{NOT_RUN}: no control results in `{eval_dir.name}/` "
                   f"(`python -m eval {run_dir}` runs every evaluation; `train.py` runs it after training).")
    else:
        def column(r: dict) -> str:  # a run shown changed missions (--swap_mission, --blank_mission): its own column
            return str(r["mode"]) + "".join(f" ({label})" for key, (label, _) in MISSION_CHANGES.items() if key in r)

        modes = sorted({column(r) for r in records})
        by_task: dict[str, dict[str, dict]] = {}
        for r in records:
            by_task.setdefault(str(r["task"]), {})[column(r)] = r
        normalised = any(_score(r, NORMALISED_KEYS) is not None for r in records)
        out.append("Mean episode return per task and decoding mode"
                   + (" (expert-normalised score in brackets: 0 = random, 1 = expert)." if normalised else "."))

        def cell(r: dict | None) -> str:
            if r is None:
                return "–"
            ret, norm = _score(r, RETURN_KEYS), _score(r, NORMALISED_KEYS)
            text = fmt(ret, 1) if ret is not None else "–"
            return f"{text} ({norm:.2f})" if norm is not None else text

        out.append(table(["task"] + modes, [[task] + [cell(by_task[task].get(m)) for m in modes]
                                            for task in sorted(by_task)]))
    sweep = []
    for f in found:
        data = read_json(f)
        if isinstance(data, dict):
            sweep += [r for r in data.get("dt_sweep", []) if isinstance(r, dict) and "target_return" in r]
    if sweep:
        out.append(image(plot_dt_sweep(sweep, figures / "dt_sweep.png"), run_dir, "DT return sweep"))
    elif records:
        out.append(f"DT return sweep: {NOT_RUN}.")
    frames = saved_frames(eval_dir)
    strip = figures / "rollout.png"
    if frames:
        keep = np.unique(np.linspace(0, len(frames) - 1, min(ROLLOUT_FRAMES, len(frames))).round().astype(int))
        frame_strip([frames[i] for i in keep], strip, labels=[f"t = {i}" for i in keep])
        out.append("A rollout saved by eval.control:\n\n" + image(strip, run_dir, "rollout"))
    elif rollout and (made := _own_rollout(run_dir, strip)) is not None:
        out.append(f"One episode rendered for this report ({made.task}, {made.mode} mode, return "
                   f"{made.episode_return:.1f} in {made.steps} steps):\n\n" + image(strip, run_dir, "rollout"))
    else:
        out.append(f"Rollout strip: {NOT_RUN}.")
    videos = sorted((eval_dir / "videos").glob("*.gif"))
    if videos:  # eval.control --video: one episode per task
        out.append("Rollout videos (`eval.control --video`):\n\n" + "\n".join(
            f"- `{v.stem}`: ![{v.stem}]({v.relative_to(run_dir).as_posix()})" for v in videos))
    return "\n\n".join(out)


def _own_rollout(run_dir: Path, path: Path) -> RolloutStrip | None:
    """Render one episode when eval.control saved no frames; None without a checkpoint or a makeable task."""
    try:
        checkpoint = resolve_checkpoint(run_dir)
    except FileNotFoundError:
        return None
    return render_rollout(checkpoint, path)


def caption_section(run_dir: Path) -> str:
    eval_dir = RunFolder(run_dir).eval
    results = read_json(eval_dir / caption_eval.RESULTS_FILE)
    out = ["## Image captioning"]
    if results is None:
        return "\n\n".join(out + [f"{NOT_RUN}: `python -m eval.caption --model {run_dir} --data data/<captions>`."])
    m, dec = results["metrics"], results.get("decoding", {})
    beam = dec.get("beam", 1)
    out.append(
        f"Split `{results['split']}` of `{results['data']}` ({m['samples']:,} images, one reference each), "
        f"{'greedy decoding' if beam == 1 else f'beam search (width {beam})'}. CIDEr-D's document frequencies "
        "are fitted on this split's references, so it compares models on this split, not with COCO figures.")
    out.append(table(["BLEU-4", "CIDEr-D", "exact match", "captions / s"],
                     [[m["bleu"], m["cider_d"], f"{m['exact_match']:.1%}", results.get("captions_per_second")]]))
    if results.get("examples_png") and (eval_dir / results["examples_png"]).is_file():
        out.append(image(eval_dir / results["examples_png"], run_dir, "example captions"))
    rows = [(c["reference"], c["generated"] or "(empty)", c["cider_d"], c["exact"])
            for c in results.get("captions", [])[:EXAMPLE_ROWS]]
    if rows:
        out.append(table(["reference", "generated", "CIDEr-D", "exact"], rows))
    return "\n\n".join(out)


def text_section(run_dir: Path) -> str:
    results = read_json(RunFolder(run_dir).eval / TEXT_RESULTS)
    out = ["## Text"]
    if results is None:
        return "\n\n".join(out + [f"{NOT_RUN}: `python -m eval.text --model {run_dir} --data data/<text>`."])
    out.append(f"Split `{results['split']}` of `{results['data']}`, windows of {results['max_length']} tokens; "
               "perplexity over text targets only.")
    out.append(table(["perplexity", "NLL (nats / token)", "text tokens", "documents"],
                     [[results["perplexity"], results["nll"], results["tokens"], results["documents"]]]))
    return "\n\n".join(out)


# --- the report -----------------------------------------------------------------------------------


def build_report(run_dir: Path) -> str:
    """The report's Markdown (figures written under ``RUN/report/`` on the way)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    figures = RunFolder(run_dir).report_figures
    sections = [
        f"# Evaluation report: `{run_dir.name}`",
        run_section(run_dir),
        curves_section(run_dir, figures),
        control_section(run_dir, figures),
        caption_section(run_dir),
        text_section(run_dir),
    ]
    return "\n\n".join(sections) + "\n"


def write_report(run_dir: Path) -> Path:
    path = RunFolder(Path(run_dir)).report
    path.write_text(build_report(run_dir))
    return path


def main(args: Args) -> Path:
    path = write_report(args.run_dir)
    print(f"report -> {path}")
    return path


if __name__ == "__main__":
    main(parse(Args, description=__doc__))
