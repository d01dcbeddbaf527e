"""Sweeps submitted with launcher=slurm to the local Slurm test cluster (tests/cluster/up.sh).

The tasks are tiny (smoke experiment, 2 steps, no prediction) on four phantom cases. The
partition, QoS and GPU names are those of slurm_templates/ippmed-a40.yaml, which the test
cluster mirrors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kitsjobs.data.phantom import write_demo_dataset
from slurm_cluster import cancel_jobs, sacct_records, wait_for_sacct

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "slurm_templates"
TASK_ARGS = ["experiment=smoke", "trainer.max_steps=2", "trainer.predict_validation=false",
             "data.num_folds=2", "data.demo_cases=0", "launcher=slurm", "slurm=ippmed-a40"]
# Generous bounds for tasks of a few seconds on a 2-core machine shared with other tests.
SWEEP_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slurm_demo")
    write_demo_dataset(root, n_cases=4, progress=False)
    return root


@pytest.fixture
def job_name() -> str:
    """A job name unique to the test, to find its jobs among other users' ones."""
    return f"kjtest-{uuid.uuid4().hex[:10]}"


def launch(args: list[str], cwd: Path, env: dict[str, str] | None = None,
           timeout_s: float = SWEEP_TIMEOUT_S) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "KITSJOBS_SLURM_TEMPLATES": str(TEMPLATES), "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kitsjobs.launch", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout_s)


def status(sweep_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kitsjobs.status", str(sweep_dir), "--tail", "30"],
                          capture_output=True, text=True, timeout=120)


def queued_jobs(name: str) -> list[str]:
    """Return the squeue ids of jobs with this name (pending, running or just ended)."""
    output = subprocess.run(["squeue", "--noheader", "--array", f"--name={name}", "--format=%i"],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    return output.split()


def accounted_jobs(name: str) -> list[str]:
    output = subprocess.run(["sacct", "--noheader", "--allocations", f"--name={name}", "--format=JobID",
                             "--starttime=now-1hours"], capture_output=True, text=True, timeout=30, check=True).stdout
    return output.split()


def manifest(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep.json").read_text())


@pytest.mark.slurm
def test_four_configs_one_throttled_array(slurm_cluster: str, tmp_path: Path, demo_data: Path,
                                          job_name: str) -> None:
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "model=unet,segresnet", "optim.lr=1e-3,3e-4", *TASK_ARGS, f"data.root={demo_data}",
            "slurm.gpus_per_task=2", "slurm.mem_gb=0.5", f"launcher.job_name={job_name}",
            f"hydra.sweep.dir={sweep_dir}"]

    dry = launch([*args, "--dry-run"], tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "nothing submitted" in dry.stderr
    assert queued_jobs(job_name) == []
    assert not sweep_dir.exists()

    result = launch(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    array_id = manifest(sweep_dir)["array_job_id"]
    try:
        assert f"submitted array job {array_id}" in result.stdout
        assert f"python -m kitsjobs.status {sweep_dir}" in result.stdout
        script = (sweep_dir / ".submitit" / f"{array_id}_submission.sh").read_text()
        assert dry.stdout == script
        assert "#SBATCH --array=0-3%2" in script

        job = subprocess.run(["scontrol", "show", "job", array_id], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        assert "ArrayTaskThrottle=2" in job
        assert "gres:gpu:a40:2" in job
        assert "mem=512M" in job
        assert "Partition=IPPMED-A40" in job

        records = wait_for_sacct(array_id, SWEEP_TIMEOUT_S, task_count=4)
    finally:
        cancel_jobs([array_id])
    assert sorted(record.job_id for record in records) == [f"{array_id}_{task}" for task in range(4)]
    assert [record.state for record in records] == ["COMPLETED"] * 4
    for record in records:
        assert "gres/gpu=2" in record.alloc_tres
        assert "mem=512M" in record.alloc_tres
        assert record.qos == "ippmed-qos"
    # One sbatch call: every job of this name belongs to the one array.
    assert {job.split("_")[0] for job in accounted_jobs(job_name)} == {array_id}

    overrides = set()
    for index in range(4):
        task_dir = sweep_dir / str(index)
        history = [json.loads(line) for line in (task_dir / "history.jsonl").read_text().splitlines()]
        assert history[-1]["step"] == 2
        assert (task_dir / "config.yaml").is_file()
        assert (task_dir / ".hydra" / "config.yaml").is_file()
        overrides.add((task_dir / ".hydra" / "overrides.yaml").read_text())
        assert (sweep_dir / ".submitit" / f"{array_id}_{index}_0_log.err").is_file()
    assert len(overrides) == 4

    report = status(sweep_dir)
    assert report.returncode == 0, report.stdout + report.stderr
    assert report.stdout.count("COMPLETED") >= 4
    assert "model=segresnet optim.lr=0.0003" in report.stdout


@pytest.mark.slurm
def test_failing_task_listed_others_finish(slurm_cluster: str, tmp_path: Path, demo_data: Path,
                                           job_name: str) -> None:
    sweep_dir = tmp_path / "sweep"
    result = launch(["-m", "model.name=unet,nosuchnet", *TASK_ARGS, f"data.root={demo_data}",
                     "slurm.mem_gb=0.5", f"launcher.job_name={job_name}", "launcher.poll_interval_s=2",
                     f"hydra.sweep.dir={sweep_dir}", "--wait"], tmp_path)
    array_id = manifest(sweep_dir)["array_job_id"]
    cancel_jobs([array_id])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 of 2 task(s) failed" in result.stderr
    assert "task #1 FAILED [model.name=nosuchnet" in result.stdout
    assert "task #0" not in result.stdout.split("failed:")[-1]

    states = {record.job_id: record.state for record in sacct_records(array_id)}
    assert states == {f"{array_id}_0": "COMPLETED", f"{array_id}_1": "FAILED"}
    error_log = (sweep_dir / ".submitit" / f"{array_id}_1_0_log.err").read_text()
    assert "Traceback" in error_log
    assert "unknown model.name 'nosuchnet'" in error_log

    report = status(sweep_dir)
    assert report.returncode == 1
    rows = {line.split()[0]: line.split()[1] for line in report.stdout.splitlines()[2:4]}
    assert rows == {"0": "COMPLETED", "1": "FAILED"}
    assert "task #1 FAILED [model.name=nosuchnet" in report.stdout
    assert "unknown model.name 'nosuchnet'" in report.stdout


SITE_TEMPLATE = """partition: {partition}
qos: ippmed-qos
account: ippmed
gres_type: {gres_type}
cpus_per_gpu: 8
mem_gb_per_gpu: 16
default_time_min: 30
max_time_min: 60
max_gpus_per_job: 8
gpu_quota_per_user: 8
"""


@pytest.mark.slurm
@pytest.mark.parametrize("template, overrides, message", [
    (None, ["slurm.gpus_per_task=5"], "above max_gpus_per_job=4"),
    (None, ["slurm.timeout_min=3000"], "slurm.timeout_min=3000 is above max_time_min=2880"),
    (None, ["slurm.mem_gb=200"], "above the largest node of partition 'IPPMED-A40' (128000 MB)"),
    (None, ["launcher.max_parallel=3", "slurm.gpus_per_task=2"], "launcher.max_parallel=3 is above"),
    (None, ["launcher.job_name='$(touch MARKER)'"], "invalid launcher.job_name"),
    ({"partition": "NOPE", "gres_type": "a40"}, [], "partition 'NOPE' of"),
    ({"partition": "IPPMED-A40", "gres_type": "h100"}, [], "GPU type 'h100'"),
    ({"partition": "IPPMED-A40", "gres_type": "a40"}, ["slurm.gpus_per_task=4", "slurm.nodes=2"],
     "above the MaxTRESPerUser limit gres/gpu=4 of QoS 'ippmed-qos'"),
])
def test_request_errors_submit_nothing(slurm_cluster: str, tmp_path: Path, demo_data: Path, job_name: str,
                                       template: dict | None, overrides: list[str], message: str) -> None:
    args = ["-m", "seed=1,2", *TASK_ARGS, f"data.root={demo_data}", f"launcher.job_name={job_name}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    if template is not None:
        (tmp_path / "templates").mkdir()
        (tmp_path / "templates" / "site.yaml").write_text(SITE_TEMPLATE.format(**template))
        args += [f"slurm.templates_dir={tmp_path / 'templates'}", "slurm.template=site"]
    result = launch([*args, *overrides], tmp_path, timeout_s=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert queued_jobs(job_name) == []
    assert accounted_jobs(job_name) == []
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.slurm
def test_shell_characters_in_paths_run_nothing(slurm_cluster: str, tmp_path: Path, demo_data: Path,
                                               job_name: str) -> None:
    marker = tmp_path / "marker"
    sweep_dir = tmp_path / f"a b $(touch {marker}) `touch {marker}`; touch {marker}"
    result = launch(["-m", "seed=1,2", *TASK_ARGS, f"data.root={demo_data}", "slurm.mem_gb=0.5",
                     f"launcher.job_name={job_name}", f"hydra.sweep.dir='{sweep_dir}'"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    array_id = manifest(sweep_dir)["array_job_id"]
    try:
        records = wait_for_sacct(array_id, SWEEP_TIMEOUT_S, task_count=2)
    finally:
        cancel_jobs([array_id])
    assert [record.state for record in records] == ["COMPLETED"] * 2
    assert (sweep_dir / ".submitit" / f"{array_id}_0_0_log.out").is_file()
    assert (sweep_dir / "1" / "history.jsonl").is_file()
    assert not marker.exists()


def test_slurm_without_sbatch_suggests_local(tmp_path: Path) -> None:
    env = {"PATH": str(Path(sys.executable).parent)}
    result = launch(["-m", "seed=1,2", "launcher=slurm", "data.root=/nonexistent"], tmp_path, env=env, timeout_s=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "launcher=local" in lines[0]


@pytest.mark.slurm
def test_status_without_accounting_warns_once(slurm_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    from kitsjobs import status as sweep_status

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sacct").write_text("#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    (fake_bin / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "history.jsonl").write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "val_dice": 0.25}\n'
                                                  '{"step": 6, "val_dice": 0.5}\n{"step": 8, "val_dice": 0.4}\n')
    (tmp_path / "sweep.json").write_text(json.dumps({
        "array_job_id": "999999990", "is_array": True, "submitit_folder": ".submitit",
        "tasks": [{"index": 0, "task_id": 0, "overrides": ["seed=1"], "folder": "0"}]}))

    reader = sweep_status.StatusReader(sweep_status.read_manifest(tmp_path))
    with caplog.at_level("WARNING", logger="kitsjobs.status"):
        first = reader.refresh()
        reader.refresh()
    warnings = [record for record in caplog.records if "sacct unavailable" in record.getMessage()]
    assert len(warnings) == 1
    assert first[0].state == sweep_status.ENDED_UNKNOWN
    assert first[0].last_step == 8
    assert first[0].best_val_dice == 0.5
