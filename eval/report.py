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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tyro  # noqa: E402

from eval import caption as caption_eval  # noqa: E402
from eval.checkpoint import EVAL_DIR  # noqa: E402
from generalist.vocab import MODALITY_NAMES  # noqa: E402

REPORT_FILE = "report.md"
FIGURES_DIR = "report"
TRAIN_CSV = "train_metrics.csv"
EVAL_CSV = "eval_metrics.csv"
SUMMARY_FILE = "metrics.json"
ARGS_FILE = "args.json"
TEXT_RESULTS = "text.json"
# modalities that can be a loss target (pad, special and image placeholders never are)
LOSS_MODALITIES = tuple(m for m in MODALITY_NAMES if m not in ("pad", "special", "image"))
EXAMPLE_ROWS = 8
NOT_RUN = "_not run_"


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
        if abs(value) >= 1e5:
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
    summary, args = read_json(run_dir / SUMMARY_FILE), read_json(run_dir / ARGS_FILE)
    out = ["## Run"]
    if summary is None and args is None:
        return "\n\n".join(out + [f"{NOT_RUN}: no `{SUMMARY_FILE}` or `{ARGS_FILE}` in `{run_dir}` "
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


def plot_learning_curves(train_rows: list[dict[str, float]], eval_rows: list[dict[str, float]], path: Path) -> Path:
    """One line per modality loss against training tokens: training solid, held-out dashed with markers."""
    x_key = "tokens" if any("tokens" in r for r in train_rows + eval_rows) else "step"
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colours = plt.get_cmap("tab10")
    for i, m in enumerate(LOSS_MODALITIES):
        for rows, style, label in ((train_rows, "-", m), (eval_rows, "o--", f"{m} (held-out)")):
            pts = [(r[x_key], r[m]) for r in rows if m in r and x_key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=colours(i), label=label, markersize=3, linewidth=1.4)
    ax.set_xlabel("training tokens" if x_key == "tokens" else "step")
    ax.set_ylabel("next-token cross entropy (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("loss per target modality")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_section(run_dir: Path, figures: Path) -> str:
    train_rows, eval_rows = read_csv(run_dir / TRAIN_CSV), read_csv(run_dir / EVAL_CSV)
    out = ["## Learning curves"]
    if not any(m in r for r in train_rows + eval_rows for m in LOSS_MODALITIES):
        return "\n\n".join(out + [f"{NOT_RUN}: no per-modality losses in `{TRAIN_CSV}` / `{EVAL_CSV}`."])
    png = plot_learning_curves(train_rows, eval_rows, figures / "learning_curves.png")
    out.append(image(png, run_dir, "learning curves"))
    last = {name: rows[-1] for name, rows in (("train", train_rows), ("held-out", eval_rows)) if rows}
    present = [m for m in LOSS_MODALITIES if any(m in r for r in last.values())]
    header = ["modality"] + [f"{name} loss (step {int(r.get('step', 0)):,})" for name, r in last.items()]
    out.append("Final next-token loss per target modality (nats; perplexity = e^loss):\n\n"
               + table(header, [[m] + [r.get(m) for r in last.values()] for m in present]))
    return "\n\n".join(out)


def control_section(run_dir: Path, figures: Path) -> str:
    out = ["## Control"]
    found = sorted((run_dir / EVAL_DIR).glob("control*.json"))
    if not found:
        return "\n\n".join(out + [f"{NOT_RUN}: `python -m eval.control --model {run_dir}`."])
    raise NotImplementedError(f"control results {found} not yet readable")


def caption_section(run_dir: Path) -> str:
    results = read_json(run_dir / EVAL_DIR / caption_eval.RESULTS_FILE)
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
    if results.get("examples_png") and (run_dir / EVAL_DIR / results["examples_png"]).is_file():
        out.append(image(run_dir / EVAL_DIR / results["examples_png"], run_dir, "example captions"))
    rows = [(c["reference"], c["generated"] or "(empty)", c["cider_d"], c["exact"])
            for c in results.get("captions", [])[:EXAMPLE_ROWS]]
    if rows:
        out.append(table(["reference", "generated", "CIDEr-D", "exact"], rows))
    return "\n\n".join(out)


def text_section(run_dir: Path) -> str:
    results = read_json(run_dir / EVAL_DIR / TEXT_RESULTS)
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
    figures = run_dir / FIGURES_DIR
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
    path = Path(run_dir) / REPORT_FILE
    path.write_text(build_report(run_dir))
    return path


def main(args: Args) -> Path:
    path = write_report(args.run_dir)
    print(f"report -> {path}")
    return path


if __name__ == "__main__":
    main(tyro.cli(Args))
