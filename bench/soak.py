"""What the soak benchmarks share: drift of memory and time after warm-up, printed and plotted."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def drift_report(xs: np.ndarray, rss: np.ndarray, ms: np.ndarray, *, warmup: float, unit: str, title: str,
                 plot: Path | None = None) -> float:
    """Print RSS at the end against RSS after ``warmup`` (a share of the run: the allocator's pools and
    oneDNN's primitive cache fill first) and the median time of the last tenth against the tenth after
    warm-up; with ``plot``, draw both curves. Returns the RSS drift (0.05 = +5 %)."""
    ref = min(int(np.searchsorted(xs, warmup * xs[-1])), len(xs) - 1)
    tenth = max(1, len(xs) // 10)
    drift = float(rss[-1] / rss[ref] - 1.0)
    time_drift = float(np.median(ms[-tenth:]) / np.median(ms[ref: ref + tenth]) - 1.0)
    print(f"RSS after warm-up ({unit} {xs[ref]}): {rss[ref]:.1f} MiB; at the end {rss[-1]:.1f} MiB; "
          f"drift {100 * drift:+.1f} % (goal <= 5 %); peak {rss.max():.1f} MiB")
    print(f"time: {np.median(ms[ref: ref + tenth]):.2f} ms/{unit} after warm-up, {np.median(ms[-tenth:]):.2f} ms "
          f"in the last tenth ({100 * time_drift:+.1f} %)")
    if plot is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
        a.plot(xs, rss)
        a.axvline(xs[ref], ls=":", c="grey")
        a.set_ylabel("RSS (MiB)")
        a.set_title(title)
        b.plot(xs, ms)
        b.set_ylabel(f"ms / {unit} (median)")
        b.set_xlabel(f"{unit}s")
        fig.tight_layout()
        fig.savefig(plot, dpi=100)
        print(f"plot: {plot}")
    return drift
