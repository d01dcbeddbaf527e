"""The prediction command: layouts, ensembles, mirroring, geometry and bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import write_case
from kitsjobs.config import Config, config_to_dict
from kitsjobs.errors import UserError
from kitsjobs.models.factory import build_model
from kitsjobs.predict import PredictOptions, predict_cases, predict_folder
from kitsjobs.train.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _checkpoint(folder: Path, seed: int, spacing_mm=None) -> Path:
    import torch

    config = Config()
    config.model.channels = [4, 8, 16]
    config.model.strides = [2, 2]
    config.data.patch_size = [8, 16, 16]
    config.data.spacing_mm = spacing_mm
    torch.manual_seed(seed)
    model = build_model(config.model)
    return save_checkpoint(folder, {"model": model.state_dict(), "config": config_to_dict(config)}, is_best=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for index, shape in enumerate([(10, 30, 30), (6, 20, 26)]):
        write_case(root, f"case_{index:05d}", rng.integers(-1000, 500, shape), None, spacing_mm=(3.0, 1.5, 1.5))
    return root


def test_ensemble_with_tta_keeps_geometry(dataset: Path, tmp_path: Path) -> None:
    checkpoints = [_checkpoint(tmp_path / "a", 0), _checkpoint(tmp_path / "b", 1)]
    written = predict_folder(checkpoints, dataset, tmp_path / "out", PredictOptions(tta=True, overlap=0.5))
    assert [p.name for p in written] == ["case_00000.nii.gz", "case_00001.nii.gz"]
    for path in written:
        source = nib.load(dataset / path.name[:-7] / "imaging.nii.gz")
        output = nib.load(path)
        assert output.shape == source.shape
        np.testing.assert_array_equal(output.affine, source.affine)
        assert output.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(output.dataobj))) <= {0, 1, 2, 3}


def test_predict_cases_takes_a_subset(dataset: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "a", 0)
    cases = [("renamed", dataset / "case_00001" / "imaging.nii.gz")]
    written = predict_cases([checkpoint], cases, tmp_path / "out", PredictOptions(device="cpu"))
    assert written == [tmp_path / "out" / "renamed.nii.gz"]


def test_ensemble_needs_same_preprocessing(dataset: Path, tmp_path: Path) -> None:
    checkpoints = [_checkpoint(tmp_path / "a", 0), _checkpoint(tmp_path / "b", 0, spacing_mm=[3.0, 3.0, 3.0])]
    with pytest.raises(UserError, match="same data settings"):
        predict_folder(checkpoints, dataset, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_flat_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "flat" / "volume").mkdir(parents=True)
    nib.save(nib.Nifti1Image(rng.integers(-1000, 500, (7, 24, 24)).astype(np.int16), np.diag([2.0, 1, 1, 1])),
             tmp_path / "flat" / "volume" / "scan.nii.gz")
    checkpoint = _checkpoint(tmp_path / "ck", 0)
    result = subprocess.run(
        [sys.executable, "-m", "kitsjobs.predict", "--checkpoint", str(checkpoint), str(checkpoint),
         "--input", str(tmp_path / "flat"), "--output", str(tmp_path / "out"), "--overlap", "0.25",
         "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert nib.load(tmp_path / "out" / "scan.nii.gz").shape == (7, 24, 24)


@pytest.mark.parametrize("case", ["missing checkpoint", "output inside input", "bad overlap"])
def test_cli_bad_input_is_one_line(case: str, dataset: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "ck", 0)
    args = {"missing checkpoint": ["--checkpoint", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "out")],
            "output inside input": ["--checkpoint", str(checkpoint), "--output", str(dataset / "preds")],
            "bad overlap": ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--overlap", "1.5"]}
    result = subprocess.run([sys.executable, "-m", "kitsjobs.predict", "--input", str(dataset), *args[case]],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
    assert not (dataset / "preds").exists()


@pytest.mark.slurm
def test_slurm_array_predicts_each_case(slurm_cluster: str, dataset: Path, tmp_path: Path) -> None:
    from slurm_cluster import wait_for_sacct

    checkpoint = _checkpoint(tmp_path / "model", seed=0)
    output = tmp_path / "predictions"
    command = [sys.executable, "-m", "kitsjobs.predict", "--checkpoint", str(checkpoint), "--input", str(dataset),
               "--output", str(output), "--slurm", "debug", "--templates-dir", str(REPO / "slurm_templates"),
               "--device", "cpu"]
    dry = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "#SBATCH --array=0-1%" in dry.stdout
    assert "#SBATCH --partition=debug" in dry.stdout
    assert not output.exists()

    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.split("array job ")[1].split(";")[0]
    records = wait_for_sacct(job_id, 300, task_count=2)
    assert sorted(record.state for record in records) == ["COMPLETED", "COMPLETED"]
    for name in ("case_00000", "case_00001"):
        prediction = nib.load(output / f"{name}.nii.gz")
        image = nib.load(dataset / name / "imaging.nii.gz")
        assert prediction.shape == image.shape
        np.testing.assert_allclose(prediction.affine, image.affine)


@pytest.mark.slurm
def test_slurm_array_rejects_unknown_template(slurm_cluster: str, dataset: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "model", seed=0)
    result = subprocess.run(
        [sys.executable, "-m", "kitsjobs.predict", "--checkpoint", str(checkpoint), "--input", str(dataset),
         "--output", str(tmp_path / "out"), "--slurm", "nope", "--templates-dir", str(REPO / "slurm_templates")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "nope" in result.stderr
    assert not (tmp_path / "out").exists()
