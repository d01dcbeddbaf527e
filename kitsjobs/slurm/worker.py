"""The callable that one array task runs on a compute node.

submitit pickles a ``TaskRunner`` per task on the login node; on the node it is unpickled and
called. It carries only plain data: the resolved Config and the task folder.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from kitsjobs.config import Config

logger = logging.getLogger(__name__)

TASK_LOG_FILE = "launch.log"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class TaskRunner:
    """Run one task of a sweep in its own folder (``SWEEP_DIR/INDEX``).

    The folder depends only on the task index, so a requeued attempt finds the checkpoints of
    the previous one. ``checkpoint`` follows submitit's Checkpointable protocol: on the warning
    signal it returns a fresh runner to requeue when the template allows requeueing.
    """

    def __init__(self, config: Config, run_dir: str, index: int, requeue: bool, slurm_log_dir: str) -> None:
        self.config = config
        self.run_dir = run_dir
        self.index = index
        self.requeue = requeue
        # Folder of submitit's pickles and of the Slurm logs (SWEEP_DIR/.submitit), shown in the log.
        self.slurm_log_dir = slurm_log_dir

    def __call__(self) -> float:
        """Train, predict and score this task; return its mean validation Dice.

        Raises:
            Exception: whatever the task raises; submitit logs the traceback to the task's
                error log and the Slurm task ends FAILED.
        """
        run_dir = Path(self.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        _configure_logging(run_dir / TASK_LOG_FILE)
        label = _slurm_job_label()
        logger.info("task #%d in %s (Slurm job %s, Slurm logs %s/%s_0_log.*)", self.index, run_dir, label,
                    self.slurm_log_dir, label)

        from kitsjobs.job import run_task

        try:
            return run_task(self.config, run_dir)
        except Exception:
            logger.exception("task #%d failed", self.index)
            raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> Optional[Any]:
        """Return the submission to requeue after the warning signal, or None to stop there.

        Training resumes from ``RUN_DIR/checkpoints/latest.pt``, so the fresh runner needs no state.
        """
        if not self.requeue:
            logger.info("task #%d: requeue is off in the Slurm template; not requeued", self.index)
            return None
        import submitit.helpers

        return submitit.helpers.DelayedSubmission(
            TaskRunner(self.config, self.run_dir, self.index, self.requeue, self.slurm_log_dir))


def _slurm_job_label() -> str:
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_id and task_id:
        return f"{array_id}_{task_id}"
    return os.environ.get("SLURM_JOB_ID", "unknown")


def _configure_logging(log_file: Path) -> None:
    """Send kitsjobs' INFO logs to stderr (the Slurm log) and to the task's launch.log."""
    formatter = logging.Formatter(LOG_FORMAT)
    package_logger = logging.getLogger("kitsjobs")
    package_logger.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(log_file, mode="a")):
        handler.setFormatter(formatter)
        package_logger.addHandler(handler)
