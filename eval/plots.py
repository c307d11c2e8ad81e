"""Every figure of the project: learning curves, caption grids, frame strips, the DT sweep.

Figures are built as ``matplotlib.figure.Figure`` objects, never through pyplot, and written to PNG
files by matplotlib's Agg renderer: that works on a headless machine and inside tests, and importing
this module leaves the caller's matplotlib backend and pyplot state alone.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from generalist.vocab import LOSS_MODALITIES

MATCH_COLOUR = "#1a7f37"
MISS_COLOUR = "#b42318"


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Lay out and write a figure (creating the folder); returns its path."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_learning_curves(train_rows: Sequence[dict[str, Any]], eval_rows: Sequence[dict[str, Any]],
                         path: Path) -> Path:
    """Loss per target modality against training tokens (or steps), training solid and held-out dashed.

    One panel per modality that has a value: their losses differ by orders of magnitude (text
    ~3 nats, a well-learned action ~0.1), so a shared axis would flatten all but the largest. Rows
    as ``train_metrics.csv`` / ``eval_metrics.csv`` hold them (numbers or the CSV's strings).
    """
    def points(rows: Sequence[dict[str, Any]], x_key: str, m: str) -> list[tuple[float, float]]:
        return [(float(r[x_key]), float(r[m])) for r in rows
                if r.get(m) not in (None, "") and r.get(x_key) not in (None, "")]

    x_key = "tokens" if any("tokens" in r for r in [*train_rows, *eval_rows]) else "step"
    shown = [m for m in LOSS_MODALITIES if points(train_rows, x_key, m) or points(eval_rows, x_key, m)]
    if not shown:
        raise ValueError("plot_learning_curves: no per-modality loss in the rows")
    columns = min(4, len(shown))
    rows = -(-len(shown) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.4 * rows))
    axes = fig.subplots(rows, columns, squeeze=False, sharex=True)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, m in zip(axes.flat, shown, strict=False):
        for table, style, label in ((train_rows, "-", "train"), (eval_rows, "o--", "held-out")):
            if pts := points(table, x_key, m):
                ax.plot(*zip(*pts, strict=True), style if len(pts) > 1 else "o", label=label, markersize=3,
                        linewidth=1.4)
        ax.set_title(m)
        ax.set_ylabel("cross entropy (nats)")
        ax.grid(alpha=0.3)
        ax.set_xlabel("training tokens" if x_key == "tokens" else "step")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("next-token loss per target modality")
    return save_figure(fig, path)


@dataclass
class CaptionExample:
    image: Image.Image | np.ndarray
    generated: str
    reference: str
    exact: bool


def caption_grid(examples: Sequence[CaptionExample], path: Path, columns: int = 4, wrap: int = 28) -> Path:
    """Images with the generated caption (green if it matches the reference, red if not) and the reference."""
    if not examples:
        raise ValueError("caption_grid needs at least one example")
    columns = min(columns, len(examples))
    rows = -(-len(examples) // columns)
    fig = Figure(figsize=(3.2 * columns, 3.9 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, ex in zip(axes.flat, examples, strict=False):
        ax.imshow(np.asarray(ex.image))
        gen = textwrap.fill(f"model: {ex.generated or '(empty)'}", wrap)
        ref = textwrap.fill(f"truth: {ex.reference}", wrap)
        ax.set_title(gen, fontsize=8, color=MATCH_COLOUR if ex.exact else MISS_COLOUR, loc="left")
        ax.text(0, -0.04, ref, transform=ax.transAxes, fontsize=8, va="top", ha="left")
    return save_figure(fig, path)


def frame_strip(frames: Sequence[np.ndarray], path: Path, labels: Sequence[str] | None = None,
                title: str | None = None) -> Path:
    """A row of rendered frames (H, W, 3 uint8), e.g. evenly spaced steps of one rollout."""
    if not len(frames):
        raise ValueError("frame_strip needs at least one frame")
    fig = Figure(figsize=(2.4 * len(frames), 2.6))
    axes = fig.subplots(1, len(frames), squeeze=False)
    for i, (ax, frame) in enumerate(zip(axes[0], frames, strict=True)):
        ax.imshow(np.asarray(frame))
        ax.axis("off")
        if labels is not None:
            ax.set_title(labels[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=100)


def plot_dt_sweep(sweep: Sequence[dict], path: Path) -> Path:
    """Decision Transformer return conditioning: achieved (mean ± s.e.) against target return per task,
    with the diagonal a perfectly obedient agent would follow. Rows as ``eval.control`` writes them."""
    fig = Figure(figsize=(6.5, 5))
    ax = fig.subplots()
    for task in sorted({r["task"] for r in sweep}):
        pts = sorted((r for r in sweep if r["task"] == task), key=lambda r: r["target_return"])
        ax.errorbar([r["target_return"] for r in pts], [r["mean_return"] for r in pts],
                    yerr=[r.get("stderr_return", 0.0) for r in pts], marker="o", capsize=3, label=task)
        lo, hi = pts[0]["target_return"], pts[-1]["target_return"]
        ax.plot([lo, hi], [lo, hi], ":", color="grey")
    ax.set_xlabel("target return (DT prompt)")
    ax.set_ylabel("achieved return (mean ± s.e.)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Decision Transformer: return conditioning (dotted: achieved = target)")
    return save_figure(fig, path)
