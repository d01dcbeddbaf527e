"""Checks that the local Slurm test cluster (tests/cluster/up.sh) behaves like the GPU cluster.

Each test submits real jobs and waits for them, so the module takes under a minute (42 s on
2 cores). The names below (partition, QoS, account, GRES type, quota) are the ones
tests/cluster/up.sh configures.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_cluster import (
    cancel_jobs,
    max_concurrent,
    queue_entries,
    require_cluster,
    submit_batch,
    wait_for_queue_state,
    wait_for_sacct,
)

pytestmark = pytest.mark.slurm

DEFAULT_PARTITION = "IPPMED-A40"
QOS = "ippmed-qos"
ACCOUNT = "ippmed"
QOS_MAX_GPUS_PER_USER = 4
NODE_GPUS = 4
# Generous bounds: a job of a few seconds ends well within them on an idle test cluster.
JOB_TIMEOUT_S = 60.0
ARRAY_TIMEOUT_S = 120.0


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """Skip the module, or fail it under KITSJOBS_REQUIRE_SLURM=1, when no cluster is up."""
    require_cluster()


@pytest.fixture
def job_ids() -> Iterator[list[str]]:
    """List to add submitted job ids to. Jobs still queued after the test are cancelled."""
    submitted: list[str] = []
    yield submitted
    cancel_jobs(submitted)


def test_trivial_job_completed_in_sacct(tmp_path: Path, job_ids: list[str]) -> None:
    output_file = tmp_path / "job.out"
    job_id = submit_batch([f"--output={output_file}", "--wrap=echo hello from $SLURM_JOB_ID"])
    job_ids.append(job_id)

    [record] = wait_for_sacct(job_id, JOB_TIMEOUT_S)

    assert record.state == "COMPLETED"
    assert record.exit_code == "0:0"
    assert record.partition == DEFAULT_PARTITION
    assert record.qos == QOS
    assert record.account == ACCOUNT
    assert output_file.read_text().strip() == f"hello from {job_id}"


@pytest.mark.parametrize("gres", ["gpu:2", "gpu:a40:2"])
def test_gres_job_sees_two_gpus(tmp_path: Path, job_ids: list[str], gres: str) -> None:
    output_file = tmp_path / "job.out"
    script = 'echo "cuda=$CUDA_VISIBLE_DEVICES"; echo "on_node=$SLURM_GPUS_ON_NODE"'
    job_id = submit_batch([f"--gres={gres}", f"--output={output_file}", f"--wrap={script}"])
    job_ids.append(job_id)

    [record] = wait_for_sacct(job_id, JOB_TIMEOUT_S)
    lines = dict(line.split("=", maxsplit=1) for line in output_file.read_text().splitlines())

    assert record.state == "COMPLETED"
    assert "gres/gpu=2" in record.alloc_tres.split(",")
    assert lines["on_node"] == "2"
    visible = lines["cuda"].split(",")
    assert len(visible) == 2
    assert set(visible) <= {str(index) for index in range(NODE_GPUS)}


def test_gres_over_node_gpus_rejected() -> None:
    with pytest.raises(RuntimeError, match="Requested node configuration is not available"):
        submit_batch([f"--gres=gpu:{NODE_GPUS + 1}", "--wrap=true"])


def test_qos_gpu_limit_per_user(job_ids: list[str]) -> None:
    limits = subprocess.run(
        ["sacctmgr", "--noheader", "--parsable2", "show", "qos", QOS, "format=MaxTRESPerUser"],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    ).stdout.strip()
    assert limits == f"gres/gpu={QOS_MAX_GPUS_PER_USER}"

    holder = submit_batch(
        [f"--gres=gpu:{QOS_MAX_GPUS_PER_USER}", "--output=/dev/null", "--wrap=sleep 120"]
    )
    job_ids.append(holder)
    wait_for_queue_state(holder, "RUNNING", JOB_TIMEOUT_S)

    # Slurm 22.05 checks QoS limits before free resources, so the reason names the QoS quota.
    over_quota = submit_batch(["--gres=gpu:1", "--output=/dev/null", "--wrap=true"])
    job_ids.append(over_quota)
    entry = wait_for_queue_state(over_quota, "PENDING", JOB_TIMEOUT_S, reason="QOSMaxGRESPerUser")
    assert entry.reason == "QOSMaxGRESPerUser"

    # Under QoS normal the same request only waits for the node's GPUs.
    other_qos = submit_batch(["--qos=normal", "--gres=gpu:1", "--output=/dev/null", "--wrap=true"])
    job_ids.append(other_qos)
    entry = wait_for_queue_state(other_qos, "PENDING", JOB_TIMEOUT_S, reason="Resources")
    assert entry.reason == "Resources"


def _array_throttle(job_id: str) -> str:
    """Return the ArrayTaskThrottle value that scontrol shows for an array job."""
    details = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True, timeout=20
    ).stdout
    match = re.search(r"ArrayTaskThrottle=(\d+)", details)
    return match.group(1) if match else ""


def test_array_throttle_runs_two_at_once(job_ids: list[str]) -> None:
    # One GPU per task: the node could run all four, so only the %2 throttle limits them.
    job_id = submit_batch(["--array=0-3%2", "--gres=gpu:1", "--output=/dev/null", "--wrap=sleep 4"])
    job_ids.append(job_id)
    assert _array_throttle(job_id) == "2"

    peak_running = 0
    deadline = time.monotonic() + ARRAY_TIMEOUT_S
    while time.monotonic() < deadline:
        entries = queue_entries(job_id)
        if not entries:
            break
        peak_running = max(peak_running, sum(entry.state == "RUNNING" for entry in entries))
        time.sleep(0.5)
    records = wait_for_sacct(job_id, ARRAY_TIMEOUT_S, task_count=4)

    assert [record.state for record in records] == ["COMPLETED"] * 4
    assert sorted(record.job_id for record in records) == [f"{job_id}_{task}" for task in range(4)]
    assert peak_running == 2
    assert max_concurrent(records) == 2


def test_array_of_two_gpu_tasks_fits_two(job_ids: list[str]) -> None:
    # Each task takes half the node's GPUs, 8 of its 32 CPUs and 16 of its 125 GB.
    job_id = submit_batch(
        [
            "--array=0-3",
            "--gres=gpu:2",
            "--cpus-per-task=8",
            "--mem=16G",
            "--output=/dev/null",
            "--wrap=sleep 4",
        ]
    )
    job_ids.append(job_id)

    records = wait_for_sacct(job_id, ARRAY_TIMEOUT_S, task_count=4)

    assert [record.state for record in records] == ["COMPLETED"] * 4
    for record in records:
        assert "gres/gpu=2" in record.alloc_tres.split(",")
        assert "cpu=8" in record.alloc_tres.split(",")
    assert max_concurrent(records) == 2
