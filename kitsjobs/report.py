"""Compare the runs of a sweep: ``python -m kitsjobs.report SWEEP_DIR``.

Writes ``SWEEP_DIR/report.md`` and ``SWEEP_DIR/report/learning_curves.png`` from
the run folders alone (history.jsonl, metrics.json, config.yaml,
.hydra/overrides.yaml and sweep.json when present); it needs neither W&B nor
Slurm. The best run is the one with the highest validation Dice in its history.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from kitsjobs.cli import user_path
from kitsjobs.errors import UserError
from kitsjobs.fsutil import atomic_write_text
from kitsjobs.metrics import METRIC_COLUMNS
from kitsjobs.tracking.figures import plot_learning_curves
from kitsjobs.tracking.runs import SCORE_KEY, RunRecord, find_runs

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
FIGURE_FOLDER = "report"
CURVES_FILE = "learning_curves.png"


def best_run(runs: list[RunRecord]) -> Optional[RunRecord]:
    """Return the run with the highest validation Dice in its history, or None when no run validated."""
    scored = [run for run in runs if run.best() is not None]
    if not scored:
        return None
    return max(scored, key=lambda run: run.best()[1])  # type: ignore[index]


def _number(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4f}"


def _cell(text: str) -> str:
    # A table cell may not hold a pipe or a line break.
    return text.replace("|", "\\|").replace("\n", " ")


def runs_table(runs: list[RunRecord], best: Optional[RunRecord]) -> list[str]:
    """Build the Markdown table of runs: overrides, status, steps, best and final metrics."""
    header = ["run", "overrides", "status", "last step", "best val Dice (step)", "final val Dice", "final loss",
              *METRIC_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        best_point = run.best()
        best_text = f"{best_point[1]:.4f} ({best_point[0]})" if best_point else ""
        name = f"**{run.name}** (best)" if run is best else run.name
        cells = [name, _cell(" ".join(run.overrides) or "(none)"), run.status, str(run.last_step), best_text,
                 _number(run.final(SCORE_KEY)), _number(run.final("loss")),
                 *(_number(run.metrics.get(column)) for column in METRIC_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(sweep_dir: Path) -> Path:
    """Write ``report.md`` and its figure into ``sweep_dir``; return the report's path.

    Raises:
        UserError: if ``sweep_dir`` is not a folder or contains no run.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep folder {sweep_dir} not found; pass the folder that contains the task folders, "
                        "e.g. multirun/2026-01-31/12-00-00")
    runs = find_runs(sweep_dir)
    if not runs:
        raise UserError(f"{sweep_dir} contains no run folder (none with history.jsonl, config.yaml or .hydra/); "
                        "pass a sweep folder or a run folder")
    best = best_run(runs)
    figure = plot_learning_curves(runs, sweep_dir / FIGURE_FOLDER / CURVES_FILE, best)

    lines = [f"# Sweep report: {sweep_dir.resolve().name}", "",
             f"{len(runs)} run(s) in `{sweep_dir.resolve()}`. "
             "Metric columns are the validation means of metrics.json (best checkpoint); "
             "val Dice is the mean Dice over the three KiTS23 regions logged during training.", ""]
    if best is not None:
        step, value = best.best()  # type: ignore[misc]
        lines += [f"Best run: **{best.name}** ({' '.join(best.overrides) or 'no overrides'}), "
                  f"validation Dice {value:.4f} at step {step}.", ""]
    else:
        lines += ["No run has logged a validation Dice yet.", ""]
    lines += runs_table(runs, best)
    lines += ["", "## Learning curves", "", f"![learning curves]({FIGURE_FOLDER}/{CURVES_FILE})", ""]

    path = sweep_dir / REPORT_FILE
    atomic_write_text(path, "\n".join(lines))
    logger.info("report written to %s (figure %s)", path, figure)
    return path


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse the command line of ``python -m kitsjobs.report``."""
    parser = argparse.ArgumentParser(
        prog="python -m kitsjobs.report",
        description="Write SWEEP_DIR/report.md: a table of the runs and their learning curves.",
    )
    parser.add_argument("sweep_dir", type=user_path, help="sweep folder (multirun/DATE/TIME) or one run folder")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; return 0 on success and 2 on bad input."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = write_report(args.sweep_dir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
