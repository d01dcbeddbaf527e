"""Stop on a signal, checkpoint, requeue and resume: unit checks, then tasks on the local Slurm.

The Slurm tests train the smoke network on four phantom cases for STEPS steps with a checkpoint
every step, interrupt the task mid-training, and compare the requeued task's final weights with
an uninterrupted local run of the same config. The test cluster's AuthInfo cred_expire=10 lets
a requeued task start again about 10 s later.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from kitsjobs.config import Config, LauncherConfig, SlurmConfig
from kitsjobs.data.phantom import write_demo_dataset
from kitsjobs.errors import UserError
from kitsjobs.job import check_run_folder, write_run_config
from kitsjobs.slurm import signals
from kitsjobs.slurm.request import build_request
from kitsjobs.slurm.signals import SignalSettings
from kitsjobs.slurm.submission import executor_parameters, make_executor, render_script
from kitsjobs.slurm.templates import parse_template
from kitsjobs.slurm.worker import TaskRunner, attempt_log_path
from kitsjobs.train.interrupt import StopRequest, TrainingInterrupted
from slurm_cluster import cancel_jobs, wait_for_sacct

REPO = Path(__file__).resolve().parents[1]
STEPS = 60
TRAIN_ARGS = ["experiment=smoke", f"trainer.max_steps={STEPS}", "trainer.checkpoint_every_steps=1",
              "trainer.val_every_steps=1000", "trainer.log_every_steps=1", "trainer.deterministic=true",
              "trainer.device=cpu", "trainer.num_threads=1", "trainer.predict_validation=false",
              "data.num_folds=2", "data.demo_cases=0"]
SLURM_ARGS = ["launcher=slurm", "slurm=ippmed-a40", "slurm.gpus_per_task=0", "slurm.cpus_per_task=1",
              "slurm.mem_gb=1"]
# Generous bounds for tasks of seconds on a 2-core machine shared with other tests.
TASK_TIMEOUT_S = 240.0
TEMPLATE = {
    "partition": "IPPMED-A40", "qos": "ippmed-qos", "account": "ippmed", "gres_type": "a40",
    "cpus_per_gpu": 1, "mem_gb_per_gpu": 1, "default_time_min": 10, "max_time_min": 60,
    "max_gpus_per_job": 4, "gpu_quota_per_user": 4, "setup": ['export OMP_NUM_THREADS=1'],
    "requeue": True, "signal": "USR2", "signal_delay_s": 120, "preempt_signal": "TERM",
    "preempt_grace_s": 25, "max_requeues": 3,
}


# --- Unit checks (no Slurm) ------------------------------------------------------------------


def _template(**changes: object):
    return parse_template({**TEMPLATE, **changes}, "test.yaml")


@pytest.mark.parametrize("changes, expected", [
    ({"preempt_signal": "KILL"}, "'preempt_signal' must be one of"),
    ({"signal": "TERM"}, "both TERM"),
    ({"max_requeues": -1}, "'max_requeues' must be 0 or more"),
    ({"preempt_grace_s": "20"}, "'preempt_grace_s' must be int"),
])
def test_template_rejects_bad_signal_keys(changes: dict, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        _template(**changes)


def test_usr1_rejected_for_nccl_jobs() -> None:
    template = _template(signal="USR1")
    with pytest.raises(UserError, match="NCCL installs its own SIGUSR1"):
        build_request(SlurmConfig(gpus_per_task=2), template, devices=2)
    # One GPU process, or several CPU processes (gloo), may use USR1.
    assert build_request(SlurmConfig(gpus_per_task=1), template).tasks_per_node == 1
    assert build_request(SlurmConfig(gpus_per_task=0), template, devices=2).world_size == 2


def test_devices_become_tasks_per_node() -> None:
    template = _template(cpus_per_gpu=8)
    request = build_request(SlurmConfig(gpus_per_task=2, nodes=2), template, devices=2)
    assert request.tasks_per_node == 2
    assert request.world_size == 4
    assert request.gpus_per_job == 4
    assert request.cpus_per_task == 8
    with pytest.raises(UserError, match="set slurm.gpus_per_task=2"):
        build_request(SlurmConfig(gpus_per_task=1), template, devices=2)

    script = render_script(make_executor(Path("/tmp/kj-dry"), executor_parameters(
        template, request, LauncherConfig(job_name="kj"), 1)), 1)
    assert "#SBATCH --ntasks-per-node=2\n" in script
    assert "#SBATCH --nodes=2\n" in script
    assert "#SBATCH --gres=gpu:a40:2\n" in script
    assert "#SBATCH --signal=USR2@120\n" in script


def test_job_rejects_signal_mismatch(tmp_path: Path) -> None:
    settings = SignalSettings.from_template(_template())
    script = tmp_path / "12_submission.sh"
    script.write_text("#!/bin/bash\n#SBATCH --signal=USR2@120\n")
    signals.check_job_signals(settings, {}, script)

    with pytest.raises(UserError, match="submitit listens to USR1"):
        signals.check_job_signals(settings, {"SUBMITIT_PREEMPT_SIGNAL": "USR1"}, script)
    script.write_text("#!/bin/bash\n#SBATCH --signal=USR2@60\n")
    with pytest.raises(UserError, match="--signal=USR2@60"):
        signals.check_job_signals(settings, {}, script)


def test_signal_handler_sets_stop_flag() -> None:
    settings = SignalSettings.from_template(_template())
    stop = StopRequest()
    seen: list[str] = []
    former = signal.getsignal(signal.SIGUSR2)
    restore = signals.install_stop_handlers(settings, stop, seen.append)
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.is_set()
        assert stop.reason == "SIGUSR2"
        assert seen == ["USR2"]
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    finally:
        restore()
    assert signal.getsignal(signal.SIGUSR2) == former


def test_requeue_budget_exhausted(tmp_path: Path) -> None:
    settings = SignalSettings.from_template(_template(max_requeues=2))
    runner = TaskRunner(Config(), str(tmp_path), 4, True, str(tmp_path / ".submitit"), settings)
    with pytest.raises(UserError, match="after 2 requeues, the template's max_requeues=2"):
        runner._leave_after_stop(TrainingInterrupted(7, "SIGUSR2"), 2, "12_4", True)
    with pytest.raises(UserError, match="requeued 3 times, more than max_requeues=2"):
        signals.check_restart_budget(settings, 3, "12_4")
    signals.check_restart_budget(settings, 2, "12_4")


def test_preempt_signal_exits_without_requeue(tmp_path: Path) -> None:
    settings = SignalSettings.from_template(_template())
    runner = TaskRunner(Config(), str(tmp_path), 0, True, str(tmp_path / ".submitit"), settings)
    with pytest.raises(SystemExit):
        runner._leave_after_stop(TrainingInterrupted(7, "SIGTERM"), 0, "12", True)
    off = TaskRunner(Config(), str(tmp_path), 0, False, str(tmp_path), SignalSettings(requeue=False))
    assert off._leave_after_stop(TrainingInterrupted(7, "SIGUSR2"), 0, "12", True) is None


def test_attempt_logs_allowed_in_run_folder(tmp_path: Path) -> None:
    config = Config()
    config.trainer.resume = False
    write_run_config(config, tmp_path)
    attempt_log_path(tmp_path, 2, 1).parent.mkdir()
    attempt_log_path(tmp_path, 2, 1).write_text("x\n")
    check_run_folder(config, tmp_path)
    assert attempt_log_path(tmp_path, 2, 0).name == "attempt-2.log"
    assert attempt_log_path(tmp_path, 2, 1).name == "attempt-2-rank-1.log"


# --- On the local Slurm ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("requeue_demo")
    write_demo_dataset(root, n_cases=4, progress=False)
    return root


@pytest.fixture(scope="module")
def templates_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the ippmed-a40 template with requeue on, for CPU tasks of 1 CPU."""
    folder = tmp_path_factory.mktemp("requeue_templates")
    (folder / "ippmed-a40.yaml").write_text(yaml.safe_dump(TEMPLATE))
    return folder


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory: pytest.TempPathFactory, demo_data: Path,
                      templates_dir: Path) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted local run of the config the Slurm tests submit."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = launch([*TRAIN_ARGS, f"data.root={demo_data}", f"hydra.run.dir={run_dir}"], run_dir.parent,
                    templates_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return final_weights(run_dir)


def launch(args: list[str], cwd: Path, templates: Path, env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "KITSJOBS_SLURM_TEMPLATES": str(templates), "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kitsjobs.launch", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=TASK_TIMEOUT_S)


def submit(sweep_dir: Path, demo_data: Path, templates: Path, sweep: list[str],
           env: dict[str, str] | None = None) -> str:
    """Submit one array with launcher=slurm and return its job id."""
    args = ["-m", *sweep, *TRAIN_ARGS, *SLURM_ARGS, f"data.root={demo_data}",
            f"launcher.job_name=kjrequeue-{uuid.uuid4().hex[:8]}", f"hydra.sweep.dir={sweep_dir}"]
    result = launch(args, sweep_dir.parent, templates, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((sweep_dir / "sweep.json").read_text())["array_job_id"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    assert state["step"] == STEPS
    return state["model"]


def max_weight_difference(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    assert left.keys() == right.keys()
    return max((left[name].float() - right[name].float()).abs().max().item() for name in left)


def history_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def last_step(run_dir: Path) -> int:
    try:
        steps = history_steps(run_dir)
    except (OSError, json.JSONDecodeError):
        return 0
    return steps[-1] if steps else 0


def wait_for_step(run_dir: Path, step: int, attempt: int = 0) -> None:
    """Wait until attempt ``attempt`` of the task in ``run_dir`` has logged at least ``step``."""
    log = attempt_log_path(run_dir, attempt, 0)
    wait_for(lambda: log.is_file() and last_step(run_dir) >= step, TASK_TIMEOUT_S,
             f"attempt {attempt} of {run_dir} to reach step {step}")


def slurm(*args: str) -> None:
    subprocess.run(list(args), check=True, timeout=30, capture_output=True, text=True)


def resumed_step(log: Path) -> int:
    """Return the step an attempt resumed from, read from its log."""
    for line in log.read_text().splitlines():
        if "resumed from" in line:
            return int(line.rsplit("at step ", 1)[1])
    raise AssertionError(f"{log} has no 'resumed from' line")


def stop_step(log: Path) -> int:
    """Return the step at which an attempt wrote its stop checkpoint."""
    for line in log.read_text().splitlines():
        if "checkpoint written at step" in line:
            return int(line.rsplit("at step ", 1)[1])
    raise AssertionError(f"{log} has no stop checkpoint line")


def check_resumed_run(run_dir: Path, attempts: int, reference: dict[str, torch.Tensor]) -> None:
    assert history_steps(run_dir) == list(range(1, STEPS + 1))
    assert max_weight_difference(final_weights(run_dir), reference) <= 1e-6
    logs = sorted(path.name for path in (run_dir / "logs").glob("attempt-*.log"))
    assert logs == [f"attempt-{n}.log" for n in range(attempts)]
    for attempt in range(attempts):
        first_line = attempt_log_path(run_dir, attempt, 0).read_text().splitlines()[0]
        assert f"attempt {attempt} (SLURM_RESTART_COUNT={attempt})" in first_line


def interrupt_single_task(sweep_dir: Path, demo_data: Path, templates_dir: Path,
                          command: list[str]) -> tuple[str, list]:
    """Submit one task, run ``command JOB_ID`` once it logged step 8, and wait for its end."""
    job_id = submit(sweep_dir, demo_data, templates_dir, ["seed=0"])
    try:
        wait_for_step(sweep_dir / "0", 8)
        slurm(*command, job_id)
        records = wait_for_sacct(job_id, TASK_TIMEOUT_S)
    finally:
        cancel_jobs([job_id])
    return job_id, records


@pytest.mark.slurm
def test_usr2_requeues_and_resumes(slurm_cluster: str, tmp_path: Path, demo_data: Path, templates_dir: Path,
                                   reference_weights: dict[str, torch.Tensor]) -> None:
    sweep_dir = tmp_path / "sweep"
    run_dir = sweep_dir / "0"
    job_id, records = interrupt_single_task(sweep_dir, demo_data, templates_dir, ["scancel", "--signal=USR2"])
    assert records[0].state == "COMPLETED"
    check_resumed_run(run_dir, 2, reference_weights)

    first = attempt_log_path(run_dir, 0, 0).read_text()
    # The stop checkpoint is written before the requeue, and the next attempt starts from it.
    assert first.index("stop requested (SIGUSR2)") < first.index(f"requeued Slurm job {job_id}")
    assert resumed_step(attempt_log_path(run_dir, 1, 0)) == stop_step(attempt_log_path(run_dir, 0, 0))
    assert (run_dir / "logs" / "slurm-rank-0.err").resolve() == sweep_dir / ".submitit" / f"{job_id}_0_log.err"
    # Slurm appends both attempts to the one .err file (--open-mode=append).
    assert (run_dir / "logs" / "slurm-rank-0.err").read_text().count("SLURM_RESTART_COUNT=") == 2


@pytest.mark.slurm
def test_scontrol_requeue_saves_on_sigterm(slurm_cluster: str, tmp_path: Path, demo_data: Path,
                                           templates_dir: Path, reference_weights: dict[str, torch.Tensor]) -> None:
    sweep_dir = tmp_path / "sweep"
    run_dir = sweep_dir / "0"
    _, records = interrupt_single_task(sweep_dir, demo_data, templates_dir, ["scontrol", "requeue"])
    assert records[0].state == "COMPLETED"
    check_resumed_run(run_dir, 2, reference_weights)
    first = attempt_log_path(run_dir, 0, 0).read_text()
    assert "stop requested (SIGTERM)" in first
    assert "Slurm requeues a preempted task" in first
    assert resumed_step(attempt_log_path(run_dir, 1, 0)) == stop_step(attempt_log_path(run_dir, 0, 0))


# Loaded at interpreter start (PYTHONPATH): the KILL_AT_WRITE-th checkpoint write of the first
# attempt writes half its bytes, records the process id and waits to be killed.
SLOW_WRITER = textwrap.dedent("""
    import io, os, time
    from pathlib import Path
    if os.environ.get("SLURM_RESTART_COUNT", "0") == "0" and os.environ.get("SLURM_JOB_ID"):
        import kitsjobs.fsutil as fsutil
        original = fsutil.atomic_write
        calls = []

        def slow_atomic_write(path, write):
            if Path(path).name != ".staged.pt":
                return original(path, write)
            calls.append(path)
            if len(calls) != int(os.environ["KJTEST_KILL_AT_WRITE"]):
                return original(path, write)
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()

            def write_half(file):
                file.write(data[: len(data) // 2])
                file.flush()
                os.fsync(file.fileno())
                Path(os.environ["KJTEST_MARKER"]).write_text(str(os.getpid()))
                time.sleep(120)

            return original(path, write_half)

        fsutil.atomic_write = slow_atomic_write
""")


@pytest.mark.slurm
def test_sigkill_during_write_resumes_previous(slurm_cluster: str, tmp_path: Path, demo_data: Path,
                                               templates_dir: Path,
                                               reference_weights: dict[str, torch.Tensor]) -> None:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SLOW_WRITER)
    marker = tmp_path / "writing.pid"
    kill_at = 12
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")])),
           "KJTEST_KILL_AT_WRITE": str(kill_at), "KJTEST_MARKER": str(marker)}
    sweep_dir = tmp_path / "sweep"
    job_id = submit(sweep_dir, demo_data, templates_dir, ["seed=0"], env)
    run_dir = sweep_dir / "0"
    try:
        wait_for(marker.is_file, TASK_TIMEOUT_S, "the checkpoint write to start")
        os.kill(int(marker.read_text()), signal.SIGKILL)
        failed = wait_for_sacct(job_id, TASK_TIMEOUT_S)
        assert failed[0].state == "FAILED"
        staged = list((run_dir / "checkpoints").glob("..staged.pt.*.tmp"))
        assert len(staged) == 1, "the killed write left no partial file"
        slurm("scontrol", "requeue", job_id)
        records = wait_for_sacct(job_id, TASK_TIMEOUT_S, states=frozenset({"COMPLETED", "FAILED", "CANCELLED"}))
    finally:
        cancel_jobs([job_id])
    assert records[0].state == "COMPLETED"
    # Write number kill_at saves step kill_at; the attempt resumes from the one before.
    assert resumed_step(attempt_log_path(run_dir, 1, 0)) == kill_at - 1
    check_resumed_run(run_dir, 2, reference_weights)


@pytest.mark.slurm
def test_array_task_requeued_twice_alone(slurm_cluster: str, tmp_path: Path, demo_data: Path,
                                         templates_dir: Path, reference_weights: dict[str, torch.Tensor]) -> None:
    sweep_dir = tmp_path / "sweep"
    array_id = submit(sweep_dir, demo_data, templates_dir, ["seed=1,0,2"])
    run_dirs = [sweep_dir / str(index) for index in range(3)]
    requeued = run_dirs[1]
    try:
        wait_for_step(requeued, 6)
        slurm("scancel", "--signal=USR2", f"{array_id}_1")
        wait_for(lambda: attempt_log_path(requeued, 1, 0).is_file(), TASK_TIMEOUT_S, "the second attempt")
        wait_for(lambda: "resumed from" in attempt_log_path(requeued, 1, 0).read_text(), TASK_TIMEOUT_S,
                 "the second attempt to resume")
        wait_for_step(requeued, resumed_step(attempt_log_path(requeued, 1, 0)) + 4, attempt=1)
        slurm("scancel", "--signal=USR2", f"{array_id}_1")
        records = wait_for_sacct(array_id, TASK_TIMEOUT_S, task_count=3)
    finally:
        cancel_jobs([array_id])
    assert [record.state for record in records] == ["COMPLETED"] * 3
    check_resumed_run(requeued, 3, reference_weights)
    for run_dir in (run_dirs[0], run_dirs[2]):
        assert sorted(path.name for path in (run_dir / "logs").glob("attempt-*.log")) == ["attempt-0.log"]
        assert history_steps(run_dir) == list(range(1, STEPS + 1))
    duplicates = subprocess.run(["sacct", "--noheader", "--parsable2", "--allocations", "--duplicates",
                                 f"--jobs={array_id}", "--format=JobID,State"], capture_output=True, text=True,
                                timeout=30, check=True).stdout.split()
    requeues = {line.split("|")[0] for line in duplicates if line.endswith("|REQUEUED")}
    assert requeues == {f"{array_id}_1"}
    assert sum(line.endswith("|REQUEUED") for line in duplicates) == 2
