"""Warning and preemption signals of a Slurm task: one setting, read by sbatch and by the job.

The admin template names the warning signal and its lead time (``signal``, ``signal_delay_s``),
and optionally a preemption signal (``preempt_signal``, ``preempt_grace_s``) for clusters that
preempt with SIGTERM and then SIGKILL. ``SignalSettings`` carries those values inside the pickled
task. On the node, the job checks them against its sbatch script and submitit's environment, then
installs handlers that only set a ``StopRequest``. The training loop writes a checkpoint at the
next step boundary and raises ``TrainingInterrupted``, and only then is the task requeued.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Optional

from kitsjobs.errors import UserError
from kitsjobs.slurm.templates import SlurmTemplate
from kitsjobs.train.interrupt import StopRequest

logger = logging.getLogger(__name__)

# Environment variable that selects the signal submitit's own handler listens to (submitit 1.5
# JobEnvironment.USR_SIG); submitit uses USR2 when it is unset.
SUBMITIT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"
SUBMITIT_DEFAULT_SIGNAL = "USR2"
# NCCL installs its own SIGUSR1 handler in every process that uses it.
NCCL_RESERVED_SIGNAL = "USR1"
# Seconds one `scontrol requeue` call may take.
REQUEUE_TIMEOUT_S = 60
_SBATCH_SIGNAL_LINE = re.compile(r"^#SBATCH --signal=(\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class SignalSettings:
    """How a task learns that it must stop, as submitted; plain data, pickled with the task."""

    # Signal Slurm sends signal_delay_s seconds before the time limit (sbatch --signal).
    warning_signal: str = "USR2"
    warning_delay_s: int = 90
    # Signal of a preemption that Slurm follows with SIGKILL after preempt_grace_s; None: not handled.
    preempt_signal: Optional[str] = None
    preempt_grace_s: int = 0
    # Whether the task requeues itself on the warning signal (template key `requeue`).
    requeue: bool = False
    # Starts after the first one (SLURM_RESTART_COUNT) past which the task fails.
    max_requeues: int = 3

    @classmethod
    def from_template(cls, template: SlurmTemplate) -> SignalSettings:
        """Take the signal keys of an admin template."""
        return cls(template.signal, template.signal_delay_s, template.preempt_signal, template.preempt_grace_s,
                   template.requeue, template.max_requeues)

    @property
    def sbatch_signal(self) -> str:
        """Value of ``sbatch --signal``: ``NAME@SECONDS`` (sent to the job steps, not the batch shell)."""
        return f"{self.warning_signal}@{self.warning_delay_s}"


def check_signal_with_nccl(warning_signal: str, uses_nccl: bool, source: str) -> None:
    """Reject SIGUSR1 as the warning signal of a job whose processes use NCCL.

    Args:
        warning_signal: signal name without the SIG prefix, as in the template.
        uses_nccl: whether the job runs several processes on CUDA (backend nccl).
        source: where the signal was set (template file), for the message.

    Raises:
        UserError: naming the signal and the fix.
    """
    if uses_nccl and warning_signal == NCCL_RESERVED_SIGNAL:
        raise UserError(
            f"{source}: signal USR1 cannot warn a multi-GPU job because NCCL installs its own SIGUSR1 "
            "handler; set 'signal: USR2' in the template"
        )


def check_job_signals(settings: SignalSettings, environ: Mapping[str, str], script: Optional[Path]) -> None:
    """Check at job start that sbatch, submitit and kitsjobs use the submitted warning signal.

    Args:
        settings: the values pickled with the task on the login node.
        environ: the job's environment (SUBMITIT_PREEMPT_SIGNAL selects submitit's handler).
        script: the sbatch script of this job (``.submitit/ARRAYID_submission.sh``); None skips
            the ``#SBATCH --signal`` comparison.

    Raises:
        UserError: a mismatch; the message names both values.
    """
    submitit_signal = environ.get(SUBMITIT_SIGNAL_ENV, SUBMITIT_DEFAULT_SIGNAL)
    if submitit_signal != settings.warning_signal:
        raise UserError(
            f"the task was submitted with warning signal {settings.warning_signal} but submitit listens to "
            f"{submitit_signal} ({SUBMITIT_SIGNAL_ENV}); unset {SUBMITIT_SIGNAL_ENV} in the template's setup "
            "lines and resubmit"
        )
    if script is None or not script.is_file():
        return
    found = _SBATCH_SIGNAL_LINE.findall(script.read_text())
    if found != [settings.sbatch_signal]:
        raise UserError(
            f"{script} has '--signal={' '.join(found) or 'none'}' but the task was submitted with "
            f"--signal={settings.sbatch_signal}; resubmit the sweep so that both come from one template"
        )


def restart_count(environ: Mapping[str, str] = os.environ) -> int:
    """Return how many times Slurm restarted this job (SLURM_RESTART_COUNT; 0 on the first start)."""
    return int(environ.get("SLURM_RESTART_COUNT") or 0)


def check_restart_budget(settings: SignalSettings, restarts: int, task_label: str) -> None:
    """Fail a task started more often than the template allows.

    Raises:
        UserError: ``restarts`` is above ``settings.max_requeues``.
    """
    if restarts > settings.max_requeues:
        raise UserError(
            f"task {task_label} was requeued {restarts} times, more than max_requeues={settings.max_requeues} "
            "of the Slurm template; its checkpoints are kept: raise max_requeues or slurm.timeout_min and "
            "resubmit in the same sweep folder to resume"
        )


def install_stop_handlers(settings: SignalSettings, stop: StopRequest,
                          on_signal: Optional[Callable[[str], None]] = None) -> Callable[[], None]:
    """Make the warning signal (and the preemption signal, when set) request a stop.

    The handlers replace submitit's for these signals: they only set ``stop``, so the training
    loop finishes its step and writes a checkpoint before anything requeues or exits.

    Args:
        settings: the task's signal settings.
        stop: the flag the Trainer checks at each step boundary.
        on_signal: optional callback with the signal name (called inside the handler).

    Returns:
        A function that puts the former handlers back.
    """
    names = [settings.warning_signal]
    if settings.preempt_signal and settings.preempt_signal not in names:
        names.append(settings.preempt_signal)
    former = {}
    for name in names:
        number = getattr(signal, f"SIG{name}")

        def handle(signum: int, frame: Optional[FrameType], name: str = name) -> None:
            stop.request(f"SIG{name}")
            if on_signal is not None:
                on_signal(name)

        former[number] = signal.signal(number, handle)

    def restore() -> None:
        for number, handler in former.items():
            signal.signal(number, handler)

    return restore


def requeue_job(job_id: str) -> None:
    """Ask Slurm to requeue one job or one array task (``scontrol requeue ARRAYID_TASKID``).

    Raises:
        RuntimeError: scontrol failed or timed out; the message contains its output.
    """
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                                timeout=REQUEUE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`scontrol requeue {job_id}` timed out after {REQUEUE_TIMEOUT_S} s") from None
    if result.returncode != 0:
        raise RuntimeError(f"`scontrol requeue {job_id}` failed (exit code {result.returncode}): "
                           f"{result.stderr.strip()}")
    logger.info("requeued Slurm job %s", job_id)


class SignalClock:
    """Time from the stop signal to the written checkpoint, checked against the preemption grace."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self.received: Optional[float] = None

    def mark(self, name: str) -> None:
        """Record the first signal (called from the handler)."""
        if self.received is None:
            self.signal_name, self.received = name, time.monotonic()

    def report(self, settings: SignalSettings) -> None:
        """Log how long saving took; warn when it passed the preemption grace time."""
        if self.received is None:
            return
        elapsed_s = time.monotonic() - self.received
        logger.info("checkpoint written %.1f s after SIG%s", elapsed_s, self.signal_name)
        grace_s = settings.preempt_grace_s
        if self.signal_name == settings.preempt_signal and grace_s and elapsed_s > grace_s:
            logger.warning("saving took %.1f s, longer than preempt_grace_s=%d: a real preemption would have "
                           "killed the task first; checkpoint more often (trainer.checkpoint_every_steps)",
                           elapsed_s, grace_s)
