"""Status of a Slurm sweep: ``python -m kitsjobs.status SWEEP_DIR [--watch SECONDS]``.

Reads the manifest the launcher wrote (SWEEP_DIR/sweep.json), so the launcher process need not
be alive. Each refresh makes one squeue and one sacct call for the whole array: squeue gives the
state of queued and running tasks, sacct the state of ended ones and the number of restarts.
Without accounting it falls back to squeue alone and warns once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kitsjobs.cli import user_path
from kitsjobs.errors import UserError
from kitsjobs.slurm import cluster
from kitsjobs.slurm.submission import MANIFEST_FILE

logger = logging.getLogger(__name__)

# Log of each task of a local sweep (Hydra names it after the entry module).
LOCAL_LOG_FILE = "launch.log"

HISTORY_FILE = "history.jsonl"
# Long states in which a task will not run again (sacct(1), JOB STATE CODES).
TERMINAL_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                             "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"})
FAILED_STATES = TERMINAL_STATES - {"COMPLETED"}
# Shown for a task that left the queue while sacct is unavailable.
ENDED_UNKNOWN = "ENDED"


@dataclass(frozen=True)
class ManifestTask:
    """One task as the launcher recorded it."""

    index: int
    task_id: int
    overrides: list[str]
    folder: Path  # absolute
    state: Optional[str] = None  # local sweeps: written by the launcher after each task


@dataclass(frozen=True)
class SweepManifest:
    """The contents of SWEEP_DIR/sweep.json."""

    sweep_dir: Path
    array_job_id: str
    is_array: bool
    submitit_folder: Path  # absolute
    tasks: list[ManifestTask]
    backend: str = "slurm"  # "local" for a sweep run with launcher=local


@dataclass(frozen=True)
class TaskStatus:
    """One row of the status table."""

    index: int
    overrides: str
    state: str  # Slurm long state, REQUEUED for a requeued task waiting to start again
    restarts: int
    elapsed: str
    last_step: Optional[int]
    best_val_dice: Optional[float]
    log_path: Path  # the task's Slurm stderr log
    reason: str = ""  # squeue's pending reason


def read_manifest(sweep_dir: Path) -> SweepManifest:
    """Read SWEEP_DIR/sweep.json.

    Raises:
        UserError: the folder has no manifest or it cannot be parsed.
    """
    sweep_dir = Path(sweep_dir).expanduser().absolute()
    path = sweep_dir / MANIFEST_FILE
    if not path.is_file():
        raise UserError(
            f"{path} not found: {sweep_dir} is not a kitsjobs sweep folder (a run started without -m "
            "has none); pass the sweep folder that the launch command printed"
        )
    try:
        raw = json.loads(path.read_text())
        tasks = [ManifestTask(int(t["index"]), int(t["task_id"]), list(t["overrides"]), sweep_dir / t["folder"],
                              t.get("state"))
                 for t in raw["tasks"]]
        return SweepManifest(sweep_dir, str(raw["array_job_id"]), bool(raw.get("is_array", True)),
                             sweep_dir / raw["submitit_folder"], tasks, str(raw.get("backend", "slurm")))
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a valid sweep manifest ({error}); it was not written by kitsjobs") from None


def slurm_log_path(manifest: SweepManifest, task: ManifestTask, stream: str = "err") -> Path:
    """Return the Slurm log of a task: SUBMITIT_FOLDER/ARRAYID_TASKID_0_log.{out,err}."""
    label = f"{manifest.array_job_id}_{task.task_id}" if manifest.is_array else manifest.array_job_id
    return manifest.submitit_folder / f"{label}_0_log.{stream}"


def read_history(folder: Path) -> tuple[Optional[int], Optional[float]]:
    """Return the last logged step and the best (max) val_dice of TASK/history.jsonl, None if absent."""
    path = folder / HISTORY_FILE
    if not path.is_file():
        return None, None
    last_step: Optional[int] = None
    best: Optional[float] = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if isinstance(record.get("step"), int):
            last_step = record["step"]
        value = record.get("val_dice")
        if isinstance(value, (int, float)):
            best = value if best is None else max(best, float(value))
    return last_step, best


def log_tail(path: Path, lines: int) -> str:
    """Return the last ``lines`` lines of a log, or a note when it does not exist."""
    if not path.is_file():
        return f"(no log at {path})"
    with path.open("rb") as file:
        file.seek(0, 2)
        file.seek(max(0, file.tell() - 64 * 1024))
        text = file.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


class StatusReader:
    """Query squeue and sacct for one sweep; warns once when accounting is unavailable."""

    def __init__(self, manifest: SweepManifest) -> None:
        self.manifest = manifest
        self._sacct_warned = False

    def refresh(self) -> list[TaskStatus]:
        """Return one TaskStatus per task, from one squeue and one sacct call.

        A local sweep has no Slurm job: the states come from the manifest, which the
        local launcher rewrites after each task.
        """
        if self.manifest.backend == "local":
            self.manifest = read_manifest(self.manifest.sweep_dir)
            return [self._local_status(task) for task in self.manifest.tasks]
        queued = cluster.squeue_tasks(self.manifest.array_job_id)
        accounted = self._sacct()
        if not self.manifest.is_array:
            queued = {0: record for record in queued.values()}
        return [self._task_status(task, queued.get(task.task_id), accounted) for task in self.manifest.tasks]

    def _sacct(self) -> Optional[dict[int, cluster.TaskRecord]]:
        try:
            return cluster.sacct_tasks(self.manifest.array_job_id)
        except cluster.SlurmCommandError as error:
            if not self._sacct_warned:
                logger.warning("sacct unavailable, using squeue only (ended tasks show %s): %s", ENDED_UNKNOWN, error)
                self._sacct_warned = True
            return None

    @staticmethod
    def _local_status(task: ManifestTask) -> TaskStatus:
        last_step, best = read_history(task.folder)
        return TaskStatus(task.index, " ".join(task.overrides) or "(no overrides)", task.state or "UNKNOWN", 0,
                          "", last_step, best, task.folder / LOCAL_LOG_FILE)

    def _task_status(self, task: ManifestTask, queued: Optional[cluster.TaskRecord],
                     accounted: Optional[dict[int, cluster.TaskRecord]]) -> TaskStatus:
        record = (accounted or {}).get(task.task_id)
        restarts = record.restarts if record is not None else 0
        if queued is not None:
            state, elapsed, reason = queued.state, queued.elapsed, queued.reason
            if state == "PENDING" and restarts > 0:
                state = "REQUEUED"
        elif record is not None:
            state, elapsed, reason = record.state, record.elapsed, ""
        else:
            state, elapsed, reason = ENDED_UNKNOWN if accounted is None else "UNKNOWN", "", ""
        last_step, best = read_history(task.folder)
        return TaskStatus(task.index, " ".join(task.overrides) or "(no overrides)", state, restarts, elapsed,
                          last_step, best, slurm_log_path(self.manifest, task), reason)


def is_finished(statuses: Sequence[TaskStatus]) -> bool:
    """Return whether every task is in a terminal state (or left the queue without accounting)."""
    return all(s.state in TERMINAL_STATES or s.state == ENDED_UNKNOWN for s in statuses)


def failed_tasks(statuses: Sequence[TaskStatus]) -> list[TaskStatus]:
    """Return the tasks that ended in any state but COMPLETED."""
    return [s for s in statuses if s.state in FAILED_STATES]


def format_table(manifest: SweepManifest, statuses: Sequence[TaskStatus], tail_lines: int = 10) -> str:
    """Format the status table, then each failed task with the tail of its error log."""
    header = ("task", "state", "restarts", "elapsed", "step", "best val_dice", "overrides", "log")
    rows = [header]
    for s in statuses:
        state = f"{s.state} ({s.reason})" if s.reason and s.reason != "None" else s.state
        rows.append((str(s.index), state, str(s.restarts), s.elapsed or "-",
                     "-" if s.last_step is None else str(s.last_step),
                     "-" if s.best_val_dice is None else f"{s.best_val_dice:.4f}",
                     s.overrides, str(s.log_path)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    job = "local sweep" if manifest.backend == "local" else f"array job {manifest.array_job_id}"
    lines = [f"sweep {manifest.sweep_dir}  {job}"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines.append("total: " + ", ".join(f"{count} {state}" for state, count in sorted(counts.items())))
    for s in failed_tasks(statuses):
        lines.append("")
        lines.append(f"task #{s.index} {s.state} [{s.overrides}]; end of {s.log_path}:")
        lines.append(log_tail(s.log_path, tail_lines))
    return "\n".join(lines)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kitsjobs.status", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=user_path, help="sweep folder printed by the launch command")
    parser.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                        help="refresh every SECONDS until every task ended (0, the default: print once)")
    parser.add_argument("--tail", type=int, default=10, metavar="LINES",
                        help="lines of each failed task's error log to show (default 10)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the status table; return 0, or 1 when a task failed, or 2 on bad input."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        manifest = read_manifest(args.sweep_dir)
        reader = StatusReader(manifest)
        statuses = reader.refresh()
        while args.watch > 0 and not is_finished(statuses):
            print(format_table(manifest, statuses, args.tail), flush=True)
            print()
            time.sleep(args.watch)
            statuses = reader.refresh()
    except (UserError, cluster.SlurmCommandError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(manifest, statuses, args.tail))
    return 1 if failed_tasks(statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
