"""Tests of the submit command on real NIfTI files, run folders and zips."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, write_case

from kitsjobs import __version__
from kitsjobs.config import Config, ModelConfig, config_hash, config_to_dict
from kitsjobs.errors import UserError
from kitsjobs.job import write_run_config
from kitsjobs.submit import MANIFEST_NAME, SubmissionError, main, prepare_submission
from kitsjobs.train.checkpoint import save_checkpoint

SHAPE = (5, 12, 10)
SPACING_MM = (3.0, 0.8, 0.8)
CASES = ("case_00400", "case_00401", "case_00402")


def kits_affine() -> np.ndarray:
    """An affine like the KiTS23 files': permuted, flipped axes and a zero origin."""
    return np.array(
        [
            [0.0, 0.0, -SPACING_MM[2], 0.0],
            [0.0, -SPACING_MM[1], 0.0, 0.0],
            [-SPACING_MM[0], 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def labels_for(index: int) -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:4, 2 + index : 8, 2:7] = 1
    labels[2, 4:6, 3:5] = 2
    return labels


def save_prediction(
    path: Path, labels: np.ndarray, affine: np.ndarray | None = None, dtype: type = np.uint8
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(labels.astype(dtype), kits_affine() if affine is None else affine)
    image.set_data_dtype(dtype)
    nib.save(image, path)


@pytest.fixture
def submission_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """Test images in the KiTS23 layout with the KiTS23 affine, and one valid prediction per case."""
    images = tmp_path / "images"
    predictions = tmp_path / "predictions"
    for index, case in enumerate(CASES):
        write_case(images, case, np.full(SHAPE, -100, dtype=np.int16), None, spacing_mm=SPACING_MM)
        image_path = images / case / "imaging.nii.gz"
        nib.save(nib.Nifti1Image(np.asanyarray(nib.load(image_path).dataobj), kits_affine()), image_path)
        save_prediction(predictions / f"{case}.nii.gz", labels_for(index))
    return images, predictions


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A run folder as a training task leaves it: config.yaml and checkpoints/ with best and latest."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = Config(model=ModelConfig(channels=[4, 8], strides=[2]))
    write_run_config(config, run)
    state = {"model": {"weight": torch.arange(6.0)}, "config": config_to_dict(config), "step": 2}
    save_checkpoint(run / "checkpoints", state, is_best=True)
    return run


def run_cli(*arguments: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "kitsjobs.submit", *map(str, arguments)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_submit_writes_zip_and_manifest(
    submission_inputs: tuple[Path, Path], run_folder: Path, tmp_path: Path
) -> None:
    images, predictions = submission_inputs
    out = tmp_path / "submission.zip"

    result = run_cli(
        "--predictions", predictions, "--images", images, "--out", out, "--run", run_folder, "--jobs", "2",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(out) as archive:
        names = sorted(archive.namelist())
        manifest = json.loads(archive.read(MANIFEST_NAME))
        zipped = {name: archive.read(name) for name in names if name != MANIFEST_NAME}
    assert names == sorted([*(f"{case}.nii.gz" for case in CASES), MANIFEST_NAME])
    for case in CASES:
        assert zipped[f"{case}.nii.gz"] == (predictions / f"{case}.nii.gz").read_bytes()
    assert [entry["case"] for entry in manifest["files"]] == list(CASES)
    for entry in manifest["files"]:
        assert entry["sha256"] == hashlib.sha256(zipped[entry["name"]]).hexdigest()
    assert manifest["cases"] == len(CASES)
    assert manifest["kitsjobs_version"] == __version__
    run = manifest["run"]
    assert run["folder"] == str(run_folder.resolve())
    assert run["config_source"] == "config.yaml"
    assert run["config_hash"] == config_hash(Config(model=ModelConfig(channels=[4, 8], strides=[2])))
    assert [entry["file"] for entry in run["checkpoints"]] == ["checkpoints/best.pt", "checkpoints/latest.pt"]
    for entry in run["checkpoints"]:
        assert entry["sha256"] == sha256_of(run_folder / entry["file"])
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


def test_config_hash_from_checkpoint(
    submission_inputs: tuple[Path, Path], run_folder: Path, tmp_path: Path
) -> None:
    images, predictions = submission_inputs
    (run_folder / "config.yaml").unlink()

    manifest = prepare_submission(predictions, images, tmp_path / "out.zip", run_dir=run_folder, progress=False)

    assert manifest["run"]["config_source"] == "checkpoints/best.pt"
    assert manifest["run"]["config_hash"] == config_hash(Config(model=ModelConfig(channels=[4, 8], strides=[2])))


def test_submit_without_run(submission_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    images, predictions = submission_inputs

    manifest = prepare_submission(predictions, images, tmp_path / "out.zip", progress=False)

    assert manifest["run"] is None
    assert len(manifest["files"]) == len(CASES)


def test_every_violation_listed_by_case(submission_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    images, predictions = submission_inputs
    (predictions / "case_00400.nii.gz").unlink()
    save_prediction(predictions / "case_00401.nii.gz", np.zeros((5, 12, 11), dtype=np.uint8))
    shifted_affine = kits_affine()
    shifted_affine[0, 3] = 0.01
    bad_labels = labels_for(2)
    bad_labels[0, 0, 0] = 7
    save_prediction(predictions / "case_00402.nii.gz", bad_labels, affine=shifted_affine, dtype=np.int16)
    save_prediction(predictions / "case_00999.nii.gz", labels_for(0))
    out = tmp_path / "submission.zip"

    result = run_cli("--predictions", predictions, "--images", images, "--out", out, cwd=tmp_path)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: 6 problem(s) in the predictions, no zip written:"
    problems = [line.strip() for line in lines[1:]]
    assert problems[0].startswith("case_00400: no prediction in ")
    assert problems[1].startswith("case_00401: prediction ")
    assert "has shape (5, 12, 11) but image " in problems[1]
    assert "has shape (5, 12, 10)" in problems[1]
    case_00402 = [problem for problem in problems if problem.startswith("case_00402: ")]
    assert len(case_00402) == 3
    assert any("differs from the affine of image" in problem and "up to 0.01" in problem for problem in case_00402)
    assert any("stores int16 voxels; save the labels as uint8" in problem for problem in case_00402)
    assert any("contains labels outside {0, 1, 2, 3}: 7" in problem for problem in case_00402)
    assert problems[-1].startswith("case_00999: prediction ")
    assert "has no test image" in problems[-1]
    assert list(tmp_path.glob("*.zip")) == []
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_affine_within_tolerance_passes(submission_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    images, predictions = submission_inputs
    affine = kits_affine()
    affine[:3, 3] = 0.0005
    save_prediction(predictions / "case_00400.nii.gz", labels_for(0), affine=affine)

    manifest = prepare_submission(predictions, images, tmp_path / "out.zip", progress=False)

    assert manifest["cases"] == len(CASES)


def test_violations_keep_existing_zip(submission_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    images, predictions = submission_inputs
    out = tmp_path / "submission.zip"
    out.write_bytes(b"previous submission")
    (predictions / "case_00402.nii.gz").unlink()

    with pytest.raises(SubmissionError) as raised:
        prepare_submission(predictions, images, out, progress=False, overwrite=True)

    assert raised.value.violations[0][0] == "case_00402"
    assert out.read_bytes() == b"previous submission"


@pytest.mark.parametrize(
    ("change", "expected_words"),
    [
        ("out-exists", ["submission.zip exists", "--overwrite"]),
        ("run-missing", ["run folder", "not found"]),
        ("run-without-checkpoints", ["no checkpoint found in", "checkpoints"]),
        ("images-missing", ["error: --images ", "no_images not found"]),
    ],
    ids=["out-exists", "run-missing", "run-without-checkpoints", "images-missing"],
)
def test_bad_arguments_exit_2(
    submission_inputs: tuple[Path, Path], tmp_path: Path, change: str, expected_words: list[str]
) -> None:
    images, predictions = submission_inputs
    out = tmp_path / "submission.zip"
    run = tmp_path / "run"
    if change == "out-exists":
        out.write_bytes(b"previous submission")
    if change == "run-without-checkpoints":
        run.mkdir()
    if change == "images-missing":
        images = tmp_path / "no_images"
    arguments: list[str | Path] = ["--predictions", predictions, "--images", images, "--out", out]
    if change.startswith("run"):
        arguments += ["--run", run]

    result = run_cli(*arguments, cwd=tmp_path)

    assert result.returncode == 2
    stderr_lines = result.stderr.strip().splitlines()
    assert len(stderr_lines) == 1, result.stderr
    for word in expected_words:
        assert word in stderr_lines[0]
    if change == "out-exists":
        assert out.read_bytes() == b"previous submission"
    else:
        assert not out.exists()


def test_main_returns_2_for_zero_jobs(submission_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    images, predictions = submission_inputs

    with pytest.raises(UserError, match="jobs must be at least 1, got 0"):
        prepare_submission(predictions, images, tmp_path / "out.zip", jobs=0)
    with pytest.raises(SystemExit) as raised:
        main(["--predictions", str(predictions), "--images", str(images), "--out", "x.zip", "--jobs", "0"])
    assert raised.value.code == 2


@pytest.mark.parametrize(
    ("target", "expected_words"),
    [
        ("predictions/in.zip", ["--out", "inside the --predictions folder"]),
        ("images/in.zip", ["--out", "inside the --images folder"]),
        ("predictions/case_00400.nii.gz", ["--out", "inside the --predictions folder"]),
        ("s3.tar", ["--out", "s3.tar does not end in .zip"]),
    ],
    ids=["in-predictions", "in-images", "over-prediction", "not-zip"],
)
def test_out_outside_inputs_even_with_overwrite(
    submission_inputs: tuple[Path, Path], run_folder: Path, tmp_path: Path, target: str, expected_words: list[str]
) -> None:
    images, predictions = submission_inputs
    out = tmp_path / target
    before = {path: path.read_bytes() for path in sorted(tmp_path.rglob("*")) if path.is_file()}

    result = run_cli(
        "--predictions", predictions, "--images", images, "--run", run_folder, "--out", out, "--overwrite",
        cwd=tmp_path,
    )

    assert result.returncode == 2
    stderr_lines = result.stderr.strip().splitlines()
    assert len(stderr_lines) == 1, result.stderr
    for word in expected_words:
        assert word in stderr_lines[0]
    after = {path: path.read_bytes() for path in sorted(tmp_path.rglob("*")) if path.is_file()}
    assert after == before


def test_submission_into_run_folder(
    submission_inputs: tuple[Path, Path], run_folder: Path, tmp_path: Path
) -> None:
    images, predictions = submission_inputs
    out = run_folder / "submission.zip"

    result = run_cli("--predictions", predictions, "--images", images, "--run", run_folder, "--out", out,
                     cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert zipfile.is_zipfile(out)


def test_result_reported_once(submission_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    images, predictions = submission_inputs
    out = tmp_path / "submission.zip"

    result = run_cli("--predictions", predictions, "--images", images, "--out", out, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert output.count("wrote ") == 1
    assert f"wrote {len(CASES)} cases and {MANIFEST_NAME} to {out}" in result.stdout


def test_unreadable_run_checkpoint_is_one_line(
    submission_inputs: tuple[Path, Path], run_folder: Path, tmp_path: Path
) -> None:
    images, predictions = submission_inputs
    (run_folder / "config.yaml").unlink()
    # A NIfTI file renamed .pt: torch.load(weights_only=True) raises pickle.UnpicklingError.
    for checkpoint in (run_folder / "checkpoints").iterdir():
        checkpoint.write_bytes((predictions / "case_00400.nii.gz").read_bytes())

    result = run_cli(
        "--predictions", predictions, "--images", images, "--run", run_folder, "--out", tmp_path / "s.zip",
        cwd=tmp_path,
    )

    assert result.returncode == 2
    stderr_lines = result.stderr.strip().splitlines()
    assert len(stderr_lines) == 1, result.stderr
    assert "the config of checkpoint" in stderr_lines[0]
    assert "weights_only=False" not in result.stderr
    assert not (tmp_path / "s.zip").exists()
