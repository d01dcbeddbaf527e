"""The Hydra app end to end on phantom data, and its answers to bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import write_case
from kitsjobs.data.phantom import write_demo_dataset
from kitsjobs.metrics import METRIC_COLUMNS

REGION_NAMES = ("kidney_and_mass", "mass", "tumor")


def launch(args: list[str], cwd: Path, demo_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KITSJOBS_DEMO_DIR": str(demo_dir), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "kitsjobs.launch", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, n_cases=4, progress=False)
    return root


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    work = tmp_path_factory.mktemp("smoke")
    result = launch(["experiment=smoke", f"data.root={demo_data}", "data.demo_cases=0",
                     "data.num_folds=2", "hydra.run.dir=run"], work, demo_data)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


def test_smoke_run_leaves_every_output(smoke_run: Path) -> None:
    for name in ("config.yaml", "split.json", "history.jsonl", "metrics.json", "launch.log",
                 ".hydra/overrides.yaml", "checkpoints/latest.pt", "checkpoints/best.pt"):
        assert (smoke_run / name).exists(), name
    split = json.loads((smoke_run / "split.json").read_text())
    assert len(split["train"]) == 2
    assert len(split["val"]) == 2
    steps = [json.loads(line)["step"] for line in (smoke_run / "history.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))
    assert steps[-1] == 12


def test_smoke_metrics_cover_regions(smoke_run: Path) -> None:
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    split = json.loads((smoke_run / "split.json").read_text())
    assert sorted(metrics["cases"]) == split["val"]
    assert set(metrics["mean"]) == set(METRIC_COLUMNS)
    for values in metrics["cases"].values():
        for column in METRIC_COLUMNS:
            assert 0.0 <= values[column] <= 1.0
    first = metrics["cases"][split["val"][0]]["dice_kidney_and_mass"]
    second = metrics["cases"][split["val"][1]]["dice_kidney_and_mass"]
    assert metrics["mean"]["dice_kidney_and_mass"] == pytest.approx((first + second) / 2)


def test_predictions_keep_image_grid(smoke_run: Path, demo_data: Path) -> None:
    split = json.loads((smoke_run / "split.json").read_text())
    for name in split["val"]:
        prediction = nib.load(smoke_run / "predictions" / f"{name}.nii.gz")
        image = nib.load(demo_data / name / "imaging.nii.gz")
        assert prediction.shape == image.shape
        np.testing.assert_allclose(prediction.affine, image.affine)
        assert prediction.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2, 3}


def test_rerun_in_same_folder_resumes(smoke_run: Path, demo_data: Path, tmp_path: Path) -> None:
    work = smoke_run.parent
    result = launch(["experiment=smoke", f"data.root={demo_data}", "data.demo_cases=0",
                     "data.num_folds=2", "hydra.run.dir=run", "trainer.max_steps=14"], work, demo_data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in (smoke_run / "launch.log").read_text()
    steps = [json.loads(line)["step"] for line in (smoke_run / "history.jsonl").read_text().splitlines()]
    assert steps[-1] == 14
    assert len(steps) == len(set(steps))


def test_local_sweep_runs_each_task_in_own_folder(demo_data: Path, tmp_path: Path) -> None:
    result = launch(["-m", "experiment=smoke", f"data.root={demo_data}", "data.demo_cases=0",
                     "data.num_folds=2", "trainer.max_steps=2", "trainer.predict_validation=false",
                     "model=unet,segresnet", "hydra.sweep.dir=sweep"], tmp_path, demo_data)
    assert result.returncode == 0, result.stderr[-3000:]
    for index, name in enumerate(("unet", "segresnet")):
        task = tmp_path / "sweep" / str(index)
        assert (task / "checkpoints" / "latest.pt").exists()
        assert f"name: {name}" in (task / "config.yaml").read_text()
    status = subprocess.run([sys.executable, "-m", "kitsjobs.status", str(tmp_path / "sweep")],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "local sweep" in status.stdout
    assert status.stdout.count("COMPLETED") == 3  # two rows and the total line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data=kits23"], "data.root is not set"),
        (["data=kits23", "data.root=/nonexistent/kits"], "/nonexistent/kits not found"),
        (["trainer.no_such_key=1"], "no_such_key"),
        (["model=transformer9000"], "transformer9000"),
    ],
)
def test_bad_input_fails_without_writing(args: list[str], message: str, tmp_path: Path, demo_data: Path) -> None:
    result = launch(["experiment=smoke", *args, "hydra.run.dir=run"], tmp_path, demo_data)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_empty_dataset_folder_is_one_line(tmp_path: Path, demo_data: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = launch(["experiment=smoke", "data=kits23", f"data.root={tmp_path / 'empty'}",
                     "hydra.run.dir=run"], tmp_path, demo_data)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "no cases found" in result.stderr
    assert not (tmp_path / "run").exists()


def test_image_without_label_is_named(tmp_path: Path, demo_data: Path) -> None:
    root = tmp_path / "data"
    label = np.zeros((4, 8, 8), np.uint8)
    write_case(root, "case_00001", np.zeros((4, 8, 8)), label)
    write_case(root, "case_00002", np.zeros((4, 8, 8)), None)
    result = launch(["experiment=smoke", "data=kits23", f"data.root={root}", "hydra.run.dir=run"],
                    tmp_path, demo_data)
    assert result.returncode == 2
    assert "case_00002" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_plus_prefixed_unknown_key_is_rejected(tmp_path: Path, demo_data: Path) -> None:
    result = launch(["experiment=smoke", "+trainer.max_stepz=4", "hydra.run.dir=run"], tmp_path, demo_data)
    assert result.returncode == 2
    assert "unknown config key 'trainer.max_stepz'" in result.stderr
    assert "max_steps" in result.stderr
    assert not (tmp_path / "run").exists()


def test_slurm_launcher_needs_multirun(tmp_path: Path, demo_data: Path) -> None:
    result = launch(["experiment=smoke", "launcher=slurm", "hydra.run.dir=run"], tmp_path, demo_data)
    assert result.returncode == 2
    assert "add -m" in result.stderr
    assert not (tmp_path / "run").exists()


def test_rejected_rerun_keeps_hydra_files(smoke_run: Path, demo_data: Path) -> None:
    before = {path.name: path.read_bytes() for path in (smoke_run / ".hydra").iterdir()}
    log_before = (smoke_run / "launch.log").read_bytes()
    result = launch(["experiment=smoke", f"data.root={demo_data}", "data.demo_cases=0", "data.num_folds=2",
                     "model=segresnet", "hydra.run.dir=run"], smoke_run.parent, demo_data)
    assert result.returncode == 2
    assert "another config" in result.stderr
    after = {path.name: path.read_bytes() for path in (smoke_run / ".hydra").iterdir()}
    assert after == before
    assert (smoke_run / "launch.log").read_bytes() == log_before


def test_root_with_demo_data_group_is_rejected(tmp_path: Path, demo_data: Path) -> None:
    own = tmp_path / "my_dataset"
    own.mkdir()
    result = launch(["experiment=smoke", f"data.root={own}", "hydra.run.dir=run"], tmp_path, demo_data)
    assert result.returncode == 2
    assert "add data=kits23" in result.stderr
    assert list(own.iterdir()) == []
    assert not (tmp_path / "run").exists()
