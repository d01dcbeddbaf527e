"""Read what a sweep's run folders hold: overrides, history, final metrics and a status.

Works from the files alone (``history.jsonl``, ``metrics.json``, ``config.yaml``,
``.hydra/overrides.yaml`` and the sweep manifest ``sweep.json`` when present),
so a report needs neither W&B nor Slurm.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from kitsjobs.tracking.runinfo import read_overrides

logger = logging.getLogger(__name__)

MANIFEST_FILE = "sweep.json"
SCORE_KEY = "val_dice"
"""History key that ranks runs: mean validation Dice over the KiTS23 regions."""


@dataclass
class RunRecord:
    """One run of a sweep as its folder shows it.

    Attributes:
        name: the task folder's name (the task index in a sweep).
        folder: the task folder; may not exist for a task that never started.
        overrides: command-line overrides of the task.
        history: history.jsonl lines in step order.
        metrics: the ``mean`` section of metrics.json (KiTS23 columns), empty when missing.
        max_steps: ``trainer.max_steps`` from config.yaml, None when unknown.
    """

    name: str
    folder: Path
    overrides: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    max_steps: Optional[int] = None

    @property
    def last_step(self) -> int:
        """The last optimizer step in the history (0 when there is none)."""
        return int(self.history[-1]["step"]) if self.history else 0

    @property
    def status(self) -> str:
        """``finished`` (metrics.json written), ``trained`` (last step reached),
        ``stopped at step N`` (history ends early: running, requeued or failed) or ``not started``."""
        if self.metrics:
            return "finished"
        if not self.history:
            return "not started"
        if self.max_steps is not None and self.last_step >= self.max_steps:
            return "trained"
        return f"stopped at step {self.last_step}"

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        """Return the steps and finite values of one history key."""
        points = [(int(line["step"]), float(line[key])) for line in self.history
                  if isinstance(line.get(key), (int, float)) and math.isfinite(line[key])]
        return [step for step, _ in points], [value for _, value in points]

    def best(self, key: str = SCORE_KEY) -> Optional[tuple[int, float]]:
        """Return (step, value) of the highest value of ``key``, or None when it was never logged."""
        steps, values = self.curve(key)
        if not values:
            return None
        index = max(range(len(values)), key=values.__getitem__)
        return steps[index], values[index]

    def final(self, key: str) -> Optional[float]:
        """Return the last logged value of ``key``, or None."""
        _, values = self.curve(key)
        return values[-1] if values else None


def read_history(path: Path) -> list[dict[str, Any]]:
    """Read history.jsonl; a line that is not valid JSON (a torn last write) is skipped with a warning."""
    lines = []
    if not path.is_file():
        return lines
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            logger.warning("%s:%d is not valid JSON; skipped", path, number)
            continue
        if isinstance(line, dict) and "step" in line:
            lines.append(line)
    return sorted(lines, key=lambda line: line["step"])


def read_run(folder: Path, overrides: Optional[list[str]] = None) -> RunRecord:
    """Read one run folder; ``overrides`` (from the sweep manifest) replace those of ``.hydra/``."""
    folder = Path(folder)
    record = RunRecord(name=folder.name, folder=folder, overrides=overrides or read_overrides(folder))
    record.history = read_history(folder / "history.jsonl")
    metrics_path = folder / "metrics.json"
    if metrics_path.is_file():
        try:
            record.metrics = dict(json.loads(metrics_path.read_text()).get("mean", {}))
        except (json.JSONDecodeError, AttributeError) as error:
            logger.warning("%s is not a kitsjobs metrics file (%s); ignored", metrics_path, error)
    config_path = folder / "config.yaml"
    if config_path.is_file():
        config = yaml.safe_load(config_path.read_text()) or {}
        max_steps = config.get("trainer", {}).get("max_steps") if isinstance(config, dict) else None
        record.max_steps = int(max_steps) if isinstance(max_steps, int) else None
    return record


def find_runs(sweep_dir: Path) -> list[RunRecord]:
    """Read every run of a sweep folder, or the single run when ``sweep_dir`` is a run folder.

    Tasks listed in ``sweep.json`` come first in manifest order (with the
    manifest's overrides, also for tasks whose folder does not exist yet), then
    any other subfolder holding ``history.jsonl``, ``config.yaml`` or ``.hydra/``.
    """
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / "history.jsonl").is_file() or (sweep_dir / "config.yaml").is_file():
        return [read_run(sweep_dir)]

    runs: list[RunRecord] = []
    seen: set[Path] = set()
    for task in _manifest_tasks(sweep_dir):
        folder = (sweep_dir / str(task.get("folder", ""))).resolve()
        seen.add(folder)
        runs.append(read_run(folder, [str(value) for value in task.get("overrides", [])]))
    others = [path for path in sweep_dir.iterdir() if path.is_dir() and path.resolve() not in seen
              and any((path / name).exists() for name in ("history.jsonl", "config.yaml", ".hydra"))]
    for folder in sorted(others, key=_folder_order):
        runs.append(read_run(folder))
    return runs


def _manifest_tasks(sweep_dir: Path) -> list[dict[str, Any]]:
    path = sweep_dir / MANIFEST_FILE
    if not path.is_file():
        return []
    try:
        tasks = json.loads(path.read_text()).get("tasks", [])
    except (json.JSONDecodeError, AttributeError) as error:
        logger.warning("%s is not a sweep manifest (%s); reading the task folders only", path, error)
        return []
    return [task for task in tasks if isinstance(task, dict) and task.get("folder")]


def _folder_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)
