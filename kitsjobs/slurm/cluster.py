"""Calls to the Slurm client commands (sinfo, sacctmgr, squeue, sacct) and parsing of their output.

Every call has a time limit, so a daemon that does not answer makes the call fail instead of
hanging the login node. Outputs are requested in parsable form (``|``-separated fields).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from kitsjobs.errors import UserError

logger = logging.getLogger(__name__)

# Upper bound for one client command, in seconds.
COMMAND_TIMEOUT_S = 30.0


class SlurmCommandError(RuntimeError):
    """A Slurm client command failed, timed out or printed something unexpected."""


@dataclass(frozen=True)
class NodeFacts:
    """One node group of a partition, as ``sinfo`` prints it."""

    mem_mb: int  # RealMemory of the node, in MB
    cpus: int
    gres: str  # such as "gpu:a40:4" or "(null)"

    def gpu_types(self) -> set[str]:
        """Return the GPU types this node offers (``gpu:TYPE:COUNT`` entries)."""
        types = set()
        for item in self.gres.split(","):
            parts = item.split("(")[0].split(":")
            if parts[0] == "gpu" and len(parts) == 3:
                types.add(parts[1])
        return types

    def gpu_count(self) -> int:
        """Return the number of GPUs of the node (0 when it declares none)."""
        count = 0
        for item in self.gres.split(","):
            parts = item.split("(")[0].split(":")
            if parts[0] == "gpu" and parts[-1].isdigit():
                count += int(parts[-1])
        return count


@dataclass(frozen=True)
class QosLimits:
    """GPU limits of a QoS from ``sacctmgr show qos``; None where the QoS sets none."""

    name: str
    max_gpus_per_user: Optional[int]
    max_gpus_per_job: Optional[int]


def require_sbatch() -> None:
    """Check that ``sbatch`` is on PATH.

    Raises:
        UserError: when it is not, suggesting the local launcher.
    """
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise UserError(
            "launcher=slurm needs Slurm's sbatch and srun, which are not on PATH on this machine; "
            "run the sweep here with launcher=local, or submit from a cluster login node"
        )


def run_command(args: Sequence[str], timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """Run a Slurm client command and return its stdout.

    Raises:
        SlurmCommandError: the command is missing, exited non-zero or timed out.
    """
    try:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout_s, check=False)
    except FileNotFoundError:
        raise SlurmCommandError(f"`{args[0]}` not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise SlurmCommandError(f"`{' '.join(args)}` timed out after {timeout_s:.0f} s") from None
    if result.returncode != 0:
        error = " | ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
        raise SlurmCommandError(f"`{' '.join(args)}` failed with exit code {result.returncode}: {error}")
    return result.stdout


def partition_nodes(partition: str) -> list[NodeFacts]:
    """Return the node groups of ``partition``, or [] when sinfo does not know it."""
    output = run_command(["sinfo", "--noheader", f"--partition={partition}", "--format=%m|%c|%G"])
    nodes = []
    for line in output.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 3:
            continue
        memory, cpus, gres = fields
        nodes.append(NodeFacts(mem_mb=int(memory.rstrip("+")), cpus=int(cpus.rstrip("+")), gres=gres))
    return nodes


def known_partitions() -> list[str]:
    """Return the partition names sinfo lists (the default one without its ``*``)."""
    output = run_command(["sinfo", "--noheader", "--format=%P"])
    return sorted({line.strip().rstrip("*") for line in output.splitlines() if line.strip()})


def qos_limits(qos: str) -> Optional[QosLimits]:
    """Return the GPU limits of ``qos``, or None when sacctmgr does not list it."""
    output = run_command(["sacctmgr", "--noheader", "--parsable2", "show", "qos", qos,
                          "format=Name,MaxTRESPU,MaxTRES"])
    for line in output.splitlines():
        fields = line.split("|")
        if len(fields) == 3 and fields[0] == qos:
            return QosLimits(qos, _gpu_count_in_tres(fields[1]), _gpu_count_in_tres(fields[2]))
    return None


def _gpu_count_in_tres(tres: str) -> Optional[int]:
    """Return N from a TRES list holding ``gres/gpu=N`` (or ``gres/gpu:TYPE=N``), else None."""
    match = re.search(r"gres/gpu(?::[^=,]+)?=(\d+)", tres)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class TaskRecord:
    """State of one array task from squeue or sacct."""

    task_id: int
    state: str  # Slurm long state: PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, ...
    elapsed: str = ""  # [D-]HH:MM:SS from sacct or squeue
    exit_code: str = ""  # "code:signal" from sacct
    reason: str = ""  # squeue pending reason
    restarts: int = 0  # earlier attempts (requeues) sacct lists for the task


def _expand_task_ids(suffix: str) -> list[int]:
    """Expand an array suffix such as ``3``, ``[2-5%2]`` or ``[1,4-6]`` into task ids."""
    suffix = suffix.strip("[]").split("%")[0]
    ids: list[int] = []
    for part in suffix.split(","):
        if "-" in part:
            first, last = part.split("-")
            ids.extend(range(int(first), int(last) + 1))
        elif part.isdigit():
            ids.append(int(part))
    return ids


def squeue_tasks(array_job_id: str) -> dict[int, TaskRecord]:
    """Return the queued or running tasks of an array job by task id (one squeue call)."""
    try:
        output = run_command(["squeue", "--noheader", "--array", f"--jobs={array_job_id}",
                              "--format=%i|%T|%M|%r"])
    except SlurmCommandError as error:
        # squeue rejects the id once slurmctld forgot the whole array ("Invalid job id").
        if "Invalid job id" in str(error):
            return {}
        raise
    records: dict[int, TaskRecord] = {}
    for line in output.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4 or "_" not in fields[0]:
            continue
        job_id, state, elapsed, reason = fields
        for task_id in _expand_task_ids(job_id.split("_", 1)[1]):
            records[task_id] = TaskRecord(task_id, state, elapsed=elapsed, reason=reason)
    return records


def sacct_tasks(array_job_id: str) -> dict[int, TaskRecord]:
    """Return the accounting record of every task of an array job (one sacct call).

    ``--duplicates`` lists each earlier attempt of a requeued task too; the last record of a
    task is its current state and the others count as restarts.

    Raises:
        SlurmCommandError: sacct failed, for instance because accounting is not configured.
    """
    output = run_command(["sacct", "--noheader", "--parsable2", "--allocations", "--duplicates",
                          f"--jobs={array_job_id}", "--format=JobID,State,ExitCode,Elapsed"])
    attempts: dict[int, list[TaskRecord]] = {}
    for line in output.splitlines():
        fields = line.split("|")
        if len(fields) != 4 or "_" not in fields[0]:
            continue
        job_id, state, exit_code, elapsed = fields
        # "CANCELLED by 0" becomes "CANCELLED".
        state = state.split()[0] if state else "UNKNOWN"
        for task_id in _expand_task_ids(job_id.split("_", 1)[1]):
            attempts.setdefault(task_id, []).append(
                TaskRecord(task_id, state, elapsed=elapsed, exit_code=exit_code))
    return {task_id: _with_restarts(records) for task_id, records in attempts.items()}


def _with_restarts(records: list[TaskRecord]) -> TaskRecord:
    last = records[-1]
    return TaskRecord(last.task_id, last.state, last.elapsed, last.exit_code, last.reason, len(records) - 1)
