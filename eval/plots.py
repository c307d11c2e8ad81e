"""Figures shared by the evaluation scripts and the report: caption grids, frame strips, the DT sweep.

Everything renders with matplotlib's Agg backend into a PNG file, so it works on a headless machine
and inside tests.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

MATCH_COLOUR = "#1a7f37"
MISS_COLOUR = "#b42318"


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns its path."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


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
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.9 * rows), squeeze=False)
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
    fig, axes = plt.subplots(1, len(frames), figsize=(2.4 * len(frames), 2.6), squeeze=False)
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
    fig, ax = plt.subplots(figsize=(6.5, 5))
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
