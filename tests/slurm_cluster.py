"""Helpers for tests that run jobs on the local Slurm test cluster.

tests/cluster/up.sh starts that cluster (one node, accounting through slurmdbd). These helpers call
the Slurm client commands (sinfo, sbatch, squeue, sacct, scancel) found on PATH, which read
/etc/slurm/slurm.conf or $SLURM_CONF.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import pytest

REQUIRE_SLURM_ENV = "KITSJOBS_REQUIRE_SLURM"
START_HINT = "start one with `sudo bash tests/cluster/up.sh` (see tests/cluster/README.md)"
# Upper bound for one client command, so that a hung daemon fails a call instead of blocking it.
COMMAND_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.5

# sacct states after which a job never runs again (Slurm 22.05 sacct(1), JOB STATE CODES).
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
# sinfo short node states in which a node accepts jobs. A trailing "*" (not responding) excludes it.
USABLE_NODE_STATES = frozenset({"idle", "mix", "alloc", "comp"})
SACCT_FIELDS = (
    "JobID",
    "State",
    "ExitCode",
    "Start",
    "End",
    "Partition",
    "QOS",
    "Account",
    "AllocTRES",
)


@dataclass(frozen=True)
class SacctRecord:
    """One allocation line of `sacct -X`, for a job or for one task of an array job."""

    job_id: str  # "12" for a job, "12_3" for task 3 of array job 12
    state: str  # first word of the state: "CANCELLED by 0" becomes "CANCELLED"
    exit_code: str  # "return code:signal", such as "0:0"
    start: datetime | None  # None while the job has not started
    end: datetime | None  # None while the job runs
    partition: str
    qos: str
    account: str
    alloc_tres: str  # such as "billing=1,cpu=1,gres/gpu=2,mem=2000M,node=1"


@dataclass(frozen=True)
class QueueEntry:
    """One line of squeue for a job or array task that is still queued or running."""

    job_id: str  # "12", "12_3" for a started array task, "12_[2-3]" for pending tasks
    state: str  # squeue long state, such as "PENDING" or "RUNNING"
    reason: (
        str  # pending reason, such as "Resources" or "QOSMaxGRESPerUser", or "None" while running
    )


def _run(
    args: Sequence[str], timeout_s: float = COMMAND_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command and capture its output.

    Raises:
        subprocess.TimeoutExpired: the command ran longer than `timeout_s` seconds.
    """
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout_s, check=False
    )


def _one_line(text: str) -> str:
    """Join the non-empty lines of a command's stderr with " | " for a one-line message."""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def _run_checked(args: Sequence[str], timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """Run a Slurm client command and return its stdout.

    Raises:
        RuntimeError: the command exited non-zero; the message contains the command and its stderr.
    """
    result = _run(args, timeout_s)
    if result.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(args)}` failed with exit code {result.returncode}: "
            f"{_one_line(result.stderr)}"
        )
    return result.stdout


def cluster_status() -> tuple[bool, str]:
    """Check whether a Slurm cluster that can run and account jobs is reachable.

    Checks that the client commands exist, that sinfo lists a node in a usable state, and that
    sacct gets a response from slurmdbd.

    Returns:
        (True, a summary of partitions and node states) when usable, else (False, the reason
        and how to start a cluster).
    """
    missing = [
        command
        for command in ("sinfo", "sbatch", "squeue", "sacct", "scancel")
        if shutil.which(command) is None
    ]
    if missing:
        return False, f"Slurm client commands not found on PATH: {', '.join(missing)}; {START_HINT}"

    try:
        sinfo = _run(["sinfo", "--noheader", "--format=%P %t %D"])
    except subprocess.TimeoutExpired:
        return (
            False,
            f"sinfo timed out after {COMMAND_TIMEOUT_S:.0f} s (slurmctld not answering); "
            f"{START_HINT}",
        )
    if sinfo.returncode != 0:
        return (
            False,
            f"sinfo failed (exit code {sinfo.returncode}): {_one_line(sinfo.stderr)}; {START_HINT}",
        )
    lines = sinfo.stdout.split()
    node_states = set(lines[1::3])
    if not node_states & USABLE_NODE_STATES:
        return (
            False,
            f"no node is idle, mixed or allocated; sinfo lists: {sinfo.stdout.strip()!r}; "
            f"{START_HINT}",
        )

    # A job id far beyond any real one makes sacct query slurmdbd without printing anything.
    try:
        sacct = _run(["sacct", "--noheader", "--allocations", "--jobs=999999999", "--format=JobID"])
    except subprocess.TimeoutExpired:
        return (
            False,
            f"sacct timed out after {COMMAND_TIMEOUT_S:.0f} s (slurmdbd not answering); "
            f"{START_HINT}",
        )
    if sacct.returncode != 0 or "error" in sacct.stderr.lower():
        return (
            False,
            f"sacct failed (exit code {sacct.returncode}): {_one_line(sacct.stderr)}; {START_HINT}",
        )

    partitions = ", ".join(sorted(set(lines[0::3])))
    return (
        True,
        f"Slurm cluster up: partitions {partitions}; node states {', '.join(sorted(node_states))}",
    )


def require_cluster() -> None:
    """Skip the calling test when no usable cluster is up, or fail it when KITSJOBS_REQUIRE_SLURM=1.

    CI sets KITSJOBS_REQUIRE_SLURM=1 so that a cluster that did not start is a test failure there,
    while developers without Slurm see the tests skipped with the reason.
    """
    usable, reason = cluster_status()
    if usable:
        return
    if os.environ.get(REQUIRE_SLURM_ENV) == "1":
        pytest.fail(f"{REQUIRE_SLURM_ENV}=1 but no usable Slurm cluster: {reason}", pytrace=False)
    pytest.skip(reason)


def submit_batch(sbatch_args: Sequence[str]) -> str:
    """Submit a batch job with `sbatch --parsable` and return its job id.

    Args:
        sbatch_args: sbatch options and either a script path or `--wrap=COMMAND`.

    Raises:
        RuntimeError: sbatch rejected the job; the message contains sbatch's error.
    """
    output = _run_checked(["sbatch", "--parsable", *sbatch_args]).strip()
    # --parsable prints "JOBID" or "JOBID;CLUSTER".
    return output.split(";", maxsplit=1)[0]


def cancel_jobs(job_ids: Iterable[str]) -> None:
    """Cancel the given jobs. scancel ignores ids of jobs that already ended."""
    ids = list(job_ids)
    if ids:
        _run(["scancel", *ids])


def _parse_sacct_time(value: str) -> datetime | None:
    """Parse a sacct timestamp such as 2024-05-01T12:00:03. "Unknown" and "None" become None."""
    if value in ("", "Unknown", "None"):
        return None
    return datetime.fromisoformat(value)


def sacct_records(job_id: str) -> list[SacctRecord]:
    """Return the accounting records of a job, one per array task, without step lines.

    Pending array tasks that sacct folds into one line ("12_[2-3]") are returned as that one record.
    """
    output = _run_checked(
        [
            "sacct",
            "--noheader",
            "--parsable2",
            "--allocations",
            f"--jobs={job_id}",
            f"--format={','.join(SACCT_FIELDS)}",
        ]
    )
    records = []
    for line in output.splitlines():
        fields = line.split("|")
        if len(fields) != len(SACCT_FIELDS):
            continue
        job, state, exit_code, start, end, partition, qos, account, alloc_tres = fields
        records.append(
            SacctRecord(
                job_id=job,
                state=state.split()[0] if state else "",
                exit_code=exit_code,
                start=_parse_sacct_time(start),
                end=_parse_sacct_time(end),
                partition=partition,
                qos=qos,
                account=account,
                alloc_tres=alloc_tres,
            )
        )
    return records


def wait_for_sacct(
    job_id: str,
    timeout_s: float,
    *,
    task_count: int = 1,
    states: frozenset[str] = TERMINAL_STATES,
) -> list[SacctRecord]:
    """Poll sacct until the job shows `task_count` complete records, each in one of `states`.

    slurmctld sends job records to slurmdbd asynchronously. On the test cluster sacct first shows a
    job about a second after sbatch, with an empty Partition and QOS "Unknown", and the full record
    one to four seconds later. A record counts as complete once its Partition is set.

    Args:
        job_id: id printed by sbatch; for an array job, the array's id.
        timeout_s: maximum time to wait, in seconds.
        task_count: number of records expected: 1 for a job, the task count for an array job.
        states: accepted states; by default any state in which a job has ended.

    Returns:
        The records, sorted by job id as sacct prints them.

    Raises:
        TimeoutError: the records did not reach the states in time; the message lists the last
            records seen.
    """
    deadline = time.monotonic() + timeout_s
    records: list[SacctRecord] = []
    while time.monotonic() < deadline:
        records = sacct_records(job_id)
        if len(records) == task_count and all(
            record.state in states and record.partition for record in records
        ):
            return records
        time.sleep(POLL_INTERVAL_S)
    seen = ", ".join(f"{record.job_id}={record.state}" for record in records) or "no records"
    raise TimeoutError(
        f"job {job_id}: expected {task_count} complete sacct record(s) in {sorted(states)} "
        f"within {timeout_s:.0f} s; last seen: {seen}"
    )


def queue_entries(job_id: str) -> list[QueueEntry]:
    """Return the squeue lines of a job or array job, or [] once all of it has left the queue."""
    result = _run(["squeue", "--noheader", f"--jobs={job_id}", "--format=%i|%T|%r"])
    # squeue exits non-zero with "Invalid job id" once slurmctld has purged the job (MinJobAge).
    if result.returncode != 0:
        return []
    entries = []
    for line in result.stdout.splitlines():
        queued_id, state, reason = line.split("|")
        entries.append(QueueEntry(job_id=queued_id, state=state, reason=reason))
    return entries


def wait_for_queue_state(
    job_id: str, state: str, timeout_s: float, *, reason: str | None = None
) -> QueueEntry:
    """Poll squeue until the job is in `state` and, when given, pending for `reason`.

    Args:
        job_id: id of a job that is not an array job.
        state: squeue long state, such as "RUNNING" or "PENDING".
        timeout_s: maximum time to wait, in seconds.
        reason: expected squeue reason, such as "QOSMaxGRESPerUser"; None accepts any.

    Raises:
        TimeoutError: the job did not reach the state in time; the message shows the last line seen.
    """
    deadline = time.monotonic() + timeout_s
    entries: list[QueueEntry] = []
    while time.monotonic() < deadline:
        entries = queue_entries(job_id)
        for entry in entries:
            if entry.state == state and (reason is None or entry.reason == reason):
                return entry
        time.sleep(POLL_INTERVAL_S)
    raise TimeoutError(
        f"job {job_id}: expected state {state} (reason {reason or 'any'}) "
        f"within {timeout_s:.0f} s; last seen: {entries}"
    )


def max_concurrent(records: Sequence[SacctRecord]) -> int:
    """Return the largest number of records whose [start, end) intervals overlap at one time.

    sacct times have one-second resolution, so a task that starts in the second another ends does
    not count as overlapping it. Records without a start or end are ignored.
    """
    events: list[tuple[datetime, int]] = []
    for record in records:
        if record.start is not None and record.end is not None:
            events.append((record.start, 1))
            events.append((record.end, -1))
    # At equal times the end (-1) sorts first, which makes the intervals half-open.
    events.sort()
    running = 0
    peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak
