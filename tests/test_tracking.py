"""Tracking with the real wandb library in offline mode, read back from the files it wrote."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kitsjobs.config import Config
from kitsjobs.errors import UserError
from kitsjobs.sync import main as sync_main
from kitsjobs.sync import plan_sync, write_merged_run
from kitsjobs.tracking import (
    LocalTracker,
    WandbTracker,
    build_tracker,
    init_with_retries,
    read_run_id,
    resolve_mode,
    save_overlays,
)
from kitsjobs.tracking.offline import find_offline_runs, iter_records, merge_segments, read_segment

REPO = Path(__file__).resolve().parents[1]
SENTINEL_KEY = "kitsjobs-sentinel-0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment of a wandb that never reaches a server."""
    for variable in ("SLURM_JOB_ID", "SLURM_PROCID", "RANK", "WANDB_BASE_URL", "WANDB_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    values = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_SILENT": "true",
              "WANDB_DISABLE_CODE": "true", "WANDB_DISABLE_GIT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "cfg")}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def fresh_process_env() -> dict[str, str]:
    """Environment for a child process that starts its own wandb service, as a new Slurm attempt does.

    wandb puts the address of this process's service in WANDB_SERVICE; a child
    that inherits it shares the service, which keeps a killed child's run open.
    """
    return {name: value for name, value in os.environ.items() if name != "WANDB_SERVICE"}


def closed_segments(folder: Path, run_id: str, count: int, killed: int = 0, timeout_s: float = 60.0) -> list:
    """Wait until a run has ``count`` segments, all but the ``killed`` oldest ending with an exit record.

    wandb 0.31 can return from ``finish()`` before its service has written the
    last records of an offline run.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        segments = find_offline_runs(folder).get(run_id, [])
        if len(segments) == count and all(segment.exit_code is not None for segment in segments[killed:]):
            return segments
        if time.monotonic() > deadline:
            exit_codes = [segment.exit_code for segment in segments]
            raise TimeoutError(f"{count} segment(s) of run {run_id} expected in {folder}; exit codes {exit_codes}")
        time.sleep(0.2)


def make_task_folder(sweep_dir: Path, index: int, overrides: list[str]) -> Path:
    """Create a Hydra-like task folder of a sweep: multirun.yaml above, overrides.yaml inside."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    run_dir = sweep_dir / str(index)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {value}\n" for value in overrides))
    return run_dir


def wandb_config(**tracking: object) -> Config:
    config = Config()
    config.tracking.name = "wandb"
    config.model.name = "segresnet"
    config.data.fold = 3
    for key, value in tracking.items():
        setattr(config.tracking, key, value)
    return config


def test_mode_resolution_order() -> None:
    cases = [
        (None, {}, "online"),
        (None, {"SLURM_JOB_ID": "42"}, "offline"),
        (None, {"SLURM_JOB_ID": "42", "WANDB_MODE": "online"}, "online"),
        ("online", {"SLURM_JOB_ID": "42"}, "online"),
        ("offline", {"WANDB_MODE": "online"}, "offline"),
        ("online", {"WANDB_MODE": "disabled"}, "disabled"),
        (None, {"WANDB_MODE": "dryrun"}, "offline"),
    ]
    for configured, environ, expected in cases:
        assert resolve_mode(configured, environ) == expected, (configured, environ)


def test_mode_invalid_names_value() -> None:
    with pytest.raises(UserError, match="tracking.mode='cloud' is invalid"):
        resolve_mode("cloud", {})
    with pytest.raises(UserError, match="WANDB_MODE='sometimes'"):
        resolve_mode(None, {"WANDB_MODE": "sometimes"})


def test_none_and_disabled_skip_wandb(tmp_path: Path, offline_env: dict[str, str]) -> None:
    config = Config()
    assert type(build_tracker(config, tmp_path / "a")) is LocalTracker
    disabled = build_tracker(wandb_config(), tmp_path / "b", environ={**offline_env, "WANDB_MODE": "disabled"})
    assert type(disabled) is LocalTracker
    assert disabled.run_id is None
    assert not (tmp_path / "b" / "wandb").exists()
    assert not (tmp_path / "b" / "wandb_run_id").exists()


def test_other_ranks_log_nothing(tmp_path: Path, offline_env: dict[str, str]) -> None:
    tracker = build_tracker(wandb_config(), tmp_path, environ={**offline_env, "SLURM_PROCID": "1"})
    assert type(tracker) is LocalTracker
    image = np.zeros((4, 8, 8), dtype=np.float32)
    assert tracker.log_images(1, "case", image, image.astype(np.uint8), image.astype(np.uint8)) == []
    assert list(tmp_path.iterdir()) == []


def test_wandb_run_stores_config_group_tags(tmp_path: Path, offline_env: dict[str, str]) -> None:
    run_dir = make_task_folder(tmp_path / "my-sweep", 0, ["model=segresnet", "optim.lr=0.001", "hydra.verbose=true"])
    tracker = build_tracker(wandb_config(tags=["baseline"]), run_dir)
    assert isinstance(tracker, WandbTracker)
    tracker.log({"step": 10, "loss": 0.5, "lr": 1e-3, "patches_per_s": 12.5})
    tracker.log({"step": 20, "loss": 0.4, "lr": 9e-4, "val_dice": 0.7, "val_sd_tumor": 0.6})
    tracker.finish()

    assert read_run_id(run_dir) == tracker.run_id
    (segment,) = closed_segments(run_dir.parent, tracker.run_id, 1)
    assert segment.exit_code == 0
    assert segment.folder.parent == run_dir / "wandb"
    assert segment.group == "my-sweep"
    assert segment.tags == ["segresnet", "fold3", "baseline"]
    assert segment.name == "model=segresnet optim.lr=0.001"
    assert segment.config["model"]["name"] == "segresnet"
    assert segment.config["tracking"]["tags"] == ["baseline"]
    assert segment.config["overrides"] == ["model=segresnet", "optim.lr=0.001", "hydra.verbose=true"]
    assert [row["trainer/step"] for row in segment.rows] == [10, 20]
    assert segment.rows[0]["train/patches_per_s"] == 12.5
    assert segment.rows[1]["val/dice"] == 0.7
    assert segment.rows[1]["val/sd_tumor"] == 0.6
    assert "train/lr" in segment.rows[1]


def test_resume_keeps_run_id(tmp_path: Path, offline_env: dict[str, str]) -> None:
    run_dir = make_task_folder(tmp_path / "sweep", 1, ["seed=1"])
    first = build_tracker(wandb_config(), run_dir)
    first.log({"step": 5, "loss": 1.0})
    first.finish()
    second = build_tracker(wandb_config(), run_dir)
    second.log({"step": 6, "loss": 0.9})
    second.finish()
    from_checkpoint = build_tracker(wandb_config(), run_dir, resume_run_id="fromckpt1")

    assert second.run_id == first.run_id
    assert from_checkpoint.run_id == "fromckpt1"
    from_checkpoint.finish()
    assert read_run_id(run_dir) == "fromckpt1"
    segments = closed_segments(run_dir, first.run_id, 2)
    assert [row["trainer/step"] for row in merge_segments(segments)] == [5, 6]


# Writes history.jsonl then logs, in the Trainer's order, and dies at step 212.
KILLED_ATTEMPT = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from kitsjobs.config import Config
    from kitsjobs.tracking import build_tracker
    config = Config()
    config.tracking.name = "wandb"
    run_dir = Path(sys.argv[1])
    tracker = build_tracker(config, run_dir)
    for step in range(1, 213):
        record = {"step": step, "loss": 1000.0 + step}
        with (run_dir / "history.jsonl").open("a") as file:
            file.write(json.dumps(record) + "\\n")
        tracker.log(record)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_killed_attempt_merges_without_repeats(tmp_path: Path, offline_env: dict[str, str]) -> None:
    run_dir = make_task_folder(tmp_path / "sweep", 2, ["optim.lr=0.0003"])
    killed = subprocess.run([sys.executable, "-c", KILLED_ATTEMPT, str(run_dir)], cwd=REPO, env=fresh_process_env(),
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    # The resumed attempt restarts from its step-200 checkpoint and, like the
    # Trainer, first cuts history.jsonl back to that step.
    history = run_dir / "history.jsonl"
    kept = [line for line in history.read_text().splitlines() if json.loads(line)["step"] <= 200]
    history.write_text("".join(line + "\n" for line in kept))
    resumed = build_tracker(wandb_config(), run_dir)
    for step in range(201, 251):
        record = {"step": step, "loss": 2000.0 + step}
        with history.open("a") as file:
            file.write(json.dumps(record) + "\n")
        resumed.log(record)
    resumed.finish()
    closed_segments(run_dir, resumed.run_id, 2, killed=1)

    plans = plan_sync(run_dir.parent)
    assert len(plans) == 1
    plan = plans[0]
    assert plan.run_id == resumed.run_id
    assert len(plan.segments) == 2
    # SIGKILL loses the rows wandb had not written yet; history.jsonl fills them in.
    killed_steps = [row["trainer/step"] for row in plan.segments[0].rows]
    assert killed_steps == list(range(1, len(killed_steps) + 1))
    assert plan.missing_steps == list(range(len(killed_steps) + 1, 201))
    steps = [row["trainer/step"] for row in plan.rows]
    assert steps == list(range(1, 251))
    losses = {row["trainer/step"]: row["train/loss"] for row in plan.rows}
    assert losses[200] == 1200.0
    assert all(losses[step] == 2000.0 + step for step in range(201, 213))

    merged = read_segment(write_merged_run(plan))
    assert merged.run_id == resumed.run_id
    assert [row["trainer/step"] for row in merged.rows] == list(range(1, 251))
    assert [row["_step"] for row in merged.rows] == list(range(250))
    assert merged.group == "sweep"
    assert merged.name == "optim.lr=0.0003"


def test_sync_dry_run_lists_runs(tmp_path: Path, offline_env: dict[str, str], capsys: pytest.CaptureFixture) -> None:
    run_dir = make_task_folder(tmp_path / "sweep", 0, ["seed=2"])
    for steps in (range(1, 8), range(5, 10)):
        tracker = build_tracker(wandb_config(), run_dir)
        for step in steps:
            tracker.log({"step": step, "loss": float(step)})
        tracker.finish()
    closed_segments(run_dir, tracker.run_id, 2)

    assert sync_main([str(tmp_path / "sweep"), "--dry-run"]) == 0
    output = capsys.readouterr().out
    assert f"{tracker.run_id}  {run_dir}  2 segment(s), 9 history row(s), steps 1-9: merge 2 segment(s)" in output
    assert not (run_dir / "wandb_merged").exists()
    assert sync_main([str(tmp_path / "missing")]) == 2


def test_sigterm_finishes_run(tmp_path: Path, offline_env: dict[str, str]) -> None:
    script = textwrap.dedent("""
        import os, signal, sys
        from pathlib import Path
        from kitsjobs.config import Config
        from kitsjobs.tracking import open_tracker
        config = Config()
        config.tracking.name = "wandb"
        with open_tracker(config, Path(sys.argv[1])) as tracker:
            tracker.log({"step": 1, "loss": 1.0})
            os.kill(os.getpid(), signal.SIGTERM)
            tracker.log({"step": 2, "loss": 2.0})
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, env=fresh_process_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    (segment,) = find_offline_runs(tmp_path)[read_run_id(tmp_path)]
    exits = [record.exit.exit_code for record in iter_records(segment.wandb_file)
             if record.WhichOneof("record_type") == "exit"]
    assert exits == [1]
    assert [row["trainer/step"] for row in segment.rows] == [1]


def test_init_failure_falls_back_once(tmp_path: Path, offline_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    # A closed port on loopback: the online init fails without any traffic leaving the machine.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL_KEY)
    config = wandb_config(mode="online", init_attempts=2, init_retry_delay_s=0.0, init_timeout_s=5.0)
    with caplog.at_level(logging.INFO, logger="kitsjobs"):
        tracker = build_tracker(config, tmp_path, environ={})
    tracker.log({"step": 1, "loss": 1.0})
    tracker.finish()

    assert type(tracker) is LocalTracker
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "could not start after 2 attempt(s)" in warnings[0].getMessage()
    assert SENTINEL_KEY not in caplog.text
    assert read_run_id(tmp_path) is not None


def test_retry_delays_have_jitter() -> None:
    delays: list[float] = []
    calls = []

    def start() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionError("refused")
        return "run"

    assert init_with_retries(start, 4, 2.0, "test run", sleep=delays.append) == "run"
    assert len(delays) == 3
    for attempt, delay in enumerate(delays, start=1):
        assert 0.0 <= delay <= 2.0 * 2 ** (attempt - 1)
    assert init_with_retries(lambda: 1 / 0, 2, 0.0, "test run", sleep=delays.append) is None


def test_overlays_are_png_panels(tmp_path: Path) -> None:
    image = np.linspace(0, 1, 6 * 10 * 12, dtype=np.float32).reshape(6, 10, 12)
    reference = np.zeros((6, 10, 12), dtype=np.uint8)
    reference[2, 2:8, 2:8] = 1
    reference[4, 3:5, 3:5] = 2
    labels = np.zeros_like(reference)
    labels[2, 2:8, 2:8] = 3

    paths = save_overlays(image, labels, reference, tmp_path / "images" / "step0000010_case")
    assert [path.name for path in paths] == ["step0000010_case_z0002.png", "step0000010_case_z0004.png"]
    panel = np.asarray(Image.open(paths[0]))
    assert panel.shape == (10, 26, 3)
    left, right = panel[:, :12], panel[:, 14:]
    assert left[4, 4, 1] > left[4, 4, 0]  # kidney in green on the reference side
    assert right[4, 4, 2] > right[4, 4, 0]  # cyst in blue on the prediction side
    assert (panel[:, 12:14] == 255).all()
    with pytest.raises(ValueError, match="must be 3D volumes of one shape"):
        save_overlays(image, labels[:3], reference, tmp_path / "bad")


@pytest.mark.slow
def test_api_key_never_written(tmp_path: Path, offline_env: dict[str, str]) -> None:
    from kitsjobs.data.phantom import write_demo_dataset

    demo = tmp_path / "demo"
    write_demo_dataset(demo, n_cases=4, progress=False)
    env = {**fresh_process_env(), "WANDB_API_KEY": SENTINEL_KEY, "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "kitsjobs.launch", "experiment=smoke", "tracking=wandb", f"data.root={demo}",
         "data.demo_cases=0", "data.num_folds=2", "hydra.run.dir=run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    report = subprocess.run([sys.executable, "-m", "kitsjobs.report", str(run_dir)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]

    assert (run_dir / "report.md").is_file()
    assert len(list((run_dir / "images").glob("*.png"))) >= 2
    (segment,) = find_offline_runs(run_dir)[read_run_id(run_dir)]
    keys = set().union(*segment.rows)
    assert {"trainer/step", "train/loss", "train/lr", "train/patches_per_s", "val/dice",
            "val/dice_tumor", "val/sd_kidney_and_mass"} <= keys
    assert "final/dice_tumor" in segment.summary
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert len(files) > 20
    leaked = [path for path in files if SENTINEL_KEY.encode() in path.read_bytes()]
    assert leaked == []
    assert SENTINEL_KEY not in result.stdout + result.stderr
