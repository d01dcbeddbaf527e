"""The callable that one array task runs on a compute node, and its stop-and-requeue path.

submitit pickles a ``TaskRunner`` per task on the login node. On the node, every Slurm process
(rank) of the task unpickles and calls it. It carries only plain data: the resolved Config, the
task folder and the signal settings of the template it was submitted with.

On the warning signal (or the preemption signal) the runner's handler sets a ``StopRequest``;
the Trainer writes a checkpoint at the next step boundary, every rank leaves the loop at the same
step, and only then does rank 0 run ``scontrol requeue ARRAYID_TASKID`` (this task only). A
preemption signal needs no requeue from the job: Slurm requeues a preempted or ``scontrol
requeue``-d job by itself, so the task just exits.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from kitsjobs.config import Config
from kitsjobs.errors import UserError
from kitsjobs.slurm import signals
from kitsjobs.slurm.signals import SignalSettings
from kitsjobs.train.interrupt import StopRequest, TrainingInterrupted

logger = logging.getLogger(__name__)

LOG_FOLDER = "logs"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
# Exit status of a task that stopped on a signal after writing its checkpoint.
STOPPED_EXIT_CODE = 3


class TaskRunner:
    """Run one task of a sweep in its own folder (``SWEEP_DIR/INDEX``).

    The folder depends only on the task index, so a requeued attempt finds the checkpoints of
    the previous one. ``checkpoint`` follows submitit's Checkpointable protocol: it returns a
    fresh runner to requeue when the template allows requeueing.

    Args:
        config: the resolved experiment.
        run_dir: the task folder.
        index: Hydra's job number.
        requeue: the template's ``requeue`` key.
        slurm_log_dir: submitit's folder (``SWEEP_DIR/.submitit``) with the Slurm logs and the sbatch script.
        signals: the template's signal settings; None reads them from the template named by
            ``config.slurm`` (on the machine that builds the runner).
    """

    def __init__(self, config: Config, run_dir: str, index: int, requeue: bool, slurm_log_dir: str,
                 signals: Optional[SignalSettings] = None) -> None:
        self.config = config
        self.run_dir = run_dir
        self.index = index
        self.requeue = requeue
        self.slurm_log_dir = slurm_log_dir
        if signals is None:
            signals = _settings_from_template(config, requeue)
        self.signals = signals

    def __call__(self) -> float:
        """Train, predict and score this task; return its mean validation Dice.

        Raises:
            UserError: the signal settings do not match the job's, or the task was restarted
                more than ``max_requeues`` times.
            TrainingInterrupted: stopped on the warning signal while requeue is off.
            SystemExit: stopped on a signal and requeued (or left to Slurm to requeue).
            Exception: whatever the task raises; submitit logs the traceback to the task's
                error log and the Slurm task ends FAILED.
        """
        from kitsjobs.job import run_task
        from kitsjobs.train.distributed import init_from_slurm, shut_down
        from kitsjobs.train.loop import select_device

        run_dir = Path(self.run_dir)
        restarts = signals.restart_count()
        rank = int(os.environ.get("SLURM_PROCID") or 0)
        log_file = attempt_log_path(run_dir, restarts, rank)
        _configure_logging(log_file)
        label = _slurm_job_label()
        logger.info("task #%d attempt %d (SLURM_RESTART_COUNT=%d), rank %d, in %s (Slurm job %s)",
                    self.index, restarts, restarts, rank, run_dir, label)
        _link_slurm_logs(run_dir, Path(self.slurm_log_dir), label, rank)

        signals.check_job_signals(self.signals, os.environ, self._script_path())
        signals.check_restart_budget(self.signals, restarts, label)
        context = init_from_slurm(select_device(self.config.trainer.device))
        stop = StopRequest()
        clock = signals.SignalClock()
        restore_handlers = signals.install_stop_handlers(self.signals, stop, clock.mark)
        try:
            signals.check_signal_with_nccl(self.signals.warning_signal, context.backend == "nccl",
                                           "the Slurm template")
            return run_task(self.config, run_dir, stop=stop, dist=context)
        except TrainingInterrupted as interruption:
            clock.report(self.signals)
            self._leave_after_stop(interruption, restarts, label, context.is_main)
            raise
        except Exception:
            logger.exception("task #%d failed", self.index)
            raise
        finally:
            restore_handlers()
            shut_down(context)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Optional[Any]:
        """Return the submission to requeue after the warning signal, or None to stop there.

        Training resumes from ``RUN_DIR/checkpoints/latest.pt``, so the fresh runner needs no state.
        """
        if not self.requeue:
            logger.info("task #%d: requeue is off in the Slurm template; not requeued", self.index)
            return None
        import submitit.helpers

        return submitit.helpers.DelayedSubmission(
            TaskRunner(self.config, self.run_dir, self.index, self.requeue, self.slurm_log_dir, self.signals))

    def _leave_after_stop(self, interruption: TrainingInterrupted, restarts: int, label: str,
                          is_main: bool) -> None:
        """Requeue the task after a stop with its checkpoint written, or explain why not.

        Returns only when the task should fail with ``interruption`` (requeue is off).

        Raises:
            SystemExit: requeued, or stopped by the preemption signal (Slurm requeues it).
            UserError: the task already used its ``max_requeues``.
        """
        settings = self.signals
        if interruption.reason == f"SIG{settings.preempt_signal}":
            logger.warning("task #%d stopped on %s at step %d with its checkpoint written; Slurm requeues a "
                           "preempted task", self.index, interruption.reason, interruption.step)
            raise SystemExit(STOPPED_EXIT_CODE)
        if not settings.requeue:
            logger.error("task #%d stopped at step %d; requeue is off in the Slurm template, so resubmit the "
                         "sweep in the same folder to resume", self.index, interruption.step)
            return
        if restarts >= settings.max_requeues:
            raise UserError(
                f"task {label} stopped at step {interruption.step} after {restarts} requeues, the template's "
                f"max_requeues={settings.max_requeues}; its checkpoint is kept: raise max_requeues or "
                "slurm.timeout_min and resubmit in the same sweep folder to resume"
            ) from None
        if not is_main:
            logger.info("task #%d stopped at step %d; rank 0 requeues it", self.index, interruption.step)
            raise SystemExit(STOPPED_EXIT_CODE)
        self._store_fresh_submission()
        signals.requeue_job(label)
        logger.warning("task #%d stopped on %s at step %d with its checkpoint written; requeued as %s "
                       "(restart %d of at most %d)", self.index, interruption.reason, interruption.step, label,
                       restarts + 1, settings.max_requeues)
        raise SystemExit(STOPPED_EXIT_CODE)

    def _store_fresh_submission(self) -> None:
        """Replace submitit's pickle of this task by ``checkpoint()``'s fresh runner, as submitit's own handler does."""
        import submitit
        from submitit.core.utils import DelayedSubmission, temporary_save_path

        pickle_path = submitit.JobEnvironment().paths.submitted_pickle
        # The pickle this job was started from, written by the login node into the sweep folder.
        submitted = DelayedSubmission.load(pickle_path)
        fresh = self.checkpoint()
        fresh.set_timeout(submitted._timeout_min, submitted._timeout_countdown)
        with temporary_save_path(pickle_path) as temporary:
            fresh.dump(temporary)

    def _script_path(self) -> Optional[Path]:
        """Return the sbatch script submitit wrote for this job (``ARRAYID_submission.sh``)."""
        job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        return Path(self.slurm_log_dir) / f"{job_id}_submission.sh" if job_id else None


def attempt_log_path(run_dir: Path, restarts: int, rank: int) -> Path:
    """Return the log file of one attempt and rank: ``RUN/logs/attempt-N.log`` (``attempt-N-rank-R.log`` for R > 0)."""
    suffix = "" if rank == 0 else f"-rank-{rank}"
    return run_dir / LOG_FOLDER / f"attempt-{restarts}{suffix}.log"


def _settings_from_template(config: Config, requeue: bool) -> SignalSettings:
    from kitsjobs.slurm.templates import load_template

    templates_dir = Path(config.slurm.templates_dir).expanduser().absolute()
    settings = SignalSettings.from_template(load_template(templates_dir, config.slurm.template))
    return SignalSettings(settings.warning_signal, settings.warning_delay_s, settings.preempt_signal,
                          settings.preempt_grace_s, requeue, settings.max_requeues)


def _slurm_job_label() -> str:
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_id and task_id:
        return f"{array_id}_{task_id}"
    return os.environ.get("SLURM_JOB_ID", "unknown")


def _link_slurm_logs(run_dir: Path, slurm_log_dir: Path, label: str, rank: int) -> None:
    """Link submitit's logs of this rank (``.submitit/LABEL_RANK_log.out`` and ``.err``) into ``RUN/logs/``.

    Slurm opens them in append mode (``--open-mode=append``), so they hold every attempt.
    """
    for stream in ("out", "err"):
        link = run_dir / LOG_FOLDER / f"slurm-rank-{rank}.{stream}"
        target = slurm_log_dir / f"{label}_{rank}_log.{stream}"
        if link.is_symlink() or link.exists():
            continue
        try:
            link.symlink_to(os.path.relpath(target, link.parent))
        except OSError as error:
            logger.warning("could not link %s to %s: %s", link, target, error)


def _configure_logging(log_file: Path) -> None:
    """Send kitsjobs' INFO logs to stderr (the Slurm log) and to this attempt's log file."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(LOG_FORMAT)
    package_logger = logging.getLogger("kitsjobs")
    package_logger.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(log_file, mode="a")):
        handler.setFormatter(formatter)
        package_logger.addHandler(handler)
