"""Learning-curve figures of a sweep, drawn with matplotlib without a display."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from kitsjobs.tracking.runs import SCORE_KEY, RunRecord

logger = logging.getLogger(__name__)

CURVE_KEYS = (("loss", "training loss"), (SCORE_KEY, "validation Dice (mean of regions)"))


def plot_learning_curves(runs: list[RunRecord], path: Path, best_run: Optional[RunRecord]) -> Path:
    """Draw the loss and validation Dice of every run against the optimizer step, in one PNG.

    The best run is drawn thicker, its label ends with "(best)", and a star
    marks its best validation Dice.

    Args:
        runs: the runs to draw; runs without history are left out.
        path: PNG file to write; missing folders are created.
        best_run: the run to mark, or None.

    Returns:
        ``path``.
    """
    # A bare Figure renders PNG through Agg without pyplot's global state or a display.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5), layout="constrained")
    axes = figure.subplots(1, len(CURVE_KEYS))
    for axis, (key, title) in zip(axes, CURVE_KEYS):
        for run in runs:
            steps, values = run.curve(key)
            if not steps:
                continue
            is_best = run is best_run
            label = f"{run.name}: {' '.join(run.overrides) or 'no overrides'}"[:60] + (" (best)" if is_best else "")
            axis.plot(steps, values, marker="." if len(steps) < 30 else None,
                      linewidth=2.8 if is_best else 1.2, zorder=3 if is_best else 2, label=label)
        if key == SCORE_KEY and best_run is not None and best_run.best() is not None:
            step, value = best_run.best()  # type: ignore[misc]
            axis.plot([step], [value], marker="*", markersize=16, color="black", zorder=4, linestyle="none",
                      label=f"best: {value:.4f} at step {step}")
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
