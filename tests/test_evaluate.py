"""Tests of the evaluate command and kitsjobs.evaluate.evaluate_folders on real NIfTI files."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, kits23_data_dir

from kitsjobs.errors import UserError
from kitsjobs.evaluate import CSV_COLUMNS, evaluate_folders, find_segmentations, main, write_metrics_csv
from kitsjobs.metrics import METRIC_COLUMNS

SMALL_CASES = ("case_00061", "case_00110", "case_00257")
OFFICIAL_VALUE_TOLERANCE = 1e-6
DATA_DIR = kits23_data_dir()
needs_data = pytest.mark.skipif(
    DATA_DIR is None,
    reason="KiTS23 sample data not found: set KITSJOBS_KITS23_DATA to the folder with labels/",
)


def read_expected(prediction_set: str) -> dict[str, dict[str, str]]:
    assert DATA_DIR is not None
    with open(DATA_DIR / "expected" / f"{prediction_set}.csv", newline="") as stream:
        return {row["case"]: row for row in csv.DictReader(stream)}


@pytest.fixture(scope="module")
def small_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copy three small cases: references as KiTS23 case folders, predictions as seg/ and flat files."""
    if DATA_DIR is None:
        pytest.skip("KiTS23 sample data not found: set KITSJOBS_KITS23_DATA to the folder with labels/")
    root = tmp_path_factory.mktemp("kits23_small")
    (root / "predictions_seg" / "seg").mkdir(parents=True)
    (root / "predictions_flat").mkdir()
    for case in SMALL_CASES:
        case_folder = root / "references" / case
        case_folder.mkdir(parents=True)
        shutil.copyfile(DATA_DIR / "labels" / f"{case}.nii.gz", case_folder / "segmentation.nii.gz")
        prediction = DATA_DIR / "annotator2" / f"{case}.nii.gz"
        shutil.copyfile(prediction, root / "predictions_seg" / "seg" / f"{case}.nii.gz")
        shutil.copyfile(prediction, root / "predictions_flat" / f"{case}.nii.gz")
    return root


def run_cli(*arguments: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "kitsjobs.evaluate", *map(str, arguments)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def save_labels(
    path: Path, labels: np.ndarray, spacing_mm: tuple[float, float, float] = (3.0, 0.8, 0.8)
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.diag([*spacing_mm, 1.0])), path)


def small_labels(shape: tuple[int, int, int] = (6, 10, 10)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    labels[1:5, 2:8, 2:8] = 1
    labels[2:4, 3:6, 3:6] = 2
    return labels


def test_find_segmentations_all_layouts(tmp_path: Path) -> None:
    (tmp_path / "case_00001").mkdir()
    (tmp_path / "case_00001" / "segmentation.nii.gz").touch()
    (tmp_path / "case_00002").mkdir()
    (tmp_path / "case_00002" / "imaging.nii.gz").touch()  # no segmentation: not a case
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "case_00003.nii.gz").touch()
    (tmp_path / "case_00004.nii.gz").touch()
    (tmp_path / "case_00005.nii").touch()
    (tmp_path / "notes.txt").touch()

    found = find_segmentations(tmp_path, "predictions")

    assert found == {
        "case_00001": tmp_path / "case_00001" / "segmentation.nii.gz",
        "case_00003": tmp_path / "seg" / "case_00003.nii.gz",
        "case_00004": tmp_path / "case_00004.nii.gz",
        "case_00005": tmp_path / "case_00005.nii",
    }


def test_find_segmentations_duplicate_case(tmp_path: Path) -> None:
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "case_00003.nii.gz").touch()
    (tmp_path / "case_00003.nii.gz").touch()

    with pytest.raises(UserError, match="two files for case case_00003"):
        find_segmentations(tmp_path, "predictions")


@needs_data
def test_cli_writes_official_values(small_copy: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "out" / "metrics.csv"

    result = run_cli(
        "--predictions", small_copy / "predictions_seg",
        "--references", small_copy / "references",
        "--csv", csv_path,
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    with open(csv_path, newline="") as stream:
        rows = list(csv.reader(stream))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [row[0] for row in rows[1:]] == list(SMALL_CASES)
    expected = read_expected("annotator2")
    for row in rows[1:]:
        for column, value in zip(CSV_COLUMNS[1:], row[1:]):
            expected_value = float(expected[row[0]][column])
            assert float(value) == pytest.approx(expected_value, abs=OFFICIAL_VALUE_TOLERANCE), row[0]
    printed_cases = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert printed_cases[: len(SMALL_CASES) + 1] == [*SMALL_CASES, "mean"]


@needs_data
def test_parallel_jobs_match_serial(small_copy: Path) -> None:
    predictions = small_copy / "predictions_flat"
    references = small_copy / "references"

    serial = evaluate_folders(predictions, references, jobs=1, progress=False)
    parallel = evaluate_folders(predictions, references, jobs=2, progress=False)

    assert parallel == serial
    assert [row["case"] for row in serial] == list(SMALL_CASES)


@needs_data
def test_missing_prediction_scored_zero(
    small_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    kept = "case_00061.nii.gz"
    shutil.copyfile(small_copy / "predictions_flat" / kept, predictions / kept)
    references = small_copy / "references"
    csv_path = tmp_path / "metrics.csv"
    caplog.set_level(logging.WARNING, logger="kitsjobs.evaluate")

    exit_code = main(
        ["--predictions", str(predictions), "--references", str(references), "--csv", str(csv_path)]
    )

    assert exit_code == 0
    assert "case_00110, case_00257" in caplog.text
    with open(csv_path, newline="") as stream:
        rows = {row["case"]: row for row in csv.DictReader(stream)}
    for case in ("case_00110", "case_00257"):
        assert all(float(rows[case][column]) == 0.0 for column in METRIC_COLUMNS), case
    assert float(rows["case_00061"]["dice_kidney_and_mass"]) > 0.9
    assert "mean" in capsys.readouterr().out


@pytest.fixture
def synthetic_folders(tmp_path: Path) -> tuple[Path, Path]:
    references = tmp_path / "references"
    predictions = tmp_path / "predictions"
    save_labels(references / "case_a.nii.gz", small_labels())
    save_labels(predictions / "case_a.nii.gz", small_labels())
    return predictions, references


def test_cli_synthetic_case_scores_one(
    synthetic_folders: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    predictions, references = synthetic_folders

    exit_code = main(["--predictions", str(predictions), "--references", str(references)])

    assert exit_code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["case", *METRIC_COLUMNS]
    assert lines[1].split() == ["case_a", *["1.0000"] * len(METRIC_COLUMNS)]


def test_spacing_difference_warns(
    synthetic_folders: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    predictions, references = synthetic_folders
    save_labels(predictions / "case_a.nii.gz", small_labels(), spacing_mm=(3.0, 0.8, 0.9))
    caplog.set_level(logging.WARNING, logger="kitsjobs.evaluate")

    rows = evaluate_folders(predictions, references, progress=False)

    assert "case_a: prediction spacing (3.0, 0.8" in caplog.text
    assert rows[0]["dice_kidney_and_mass"] == 1.0


def break_missing_folder(predictions: Path, references: Path) -> None:
    shutil.rmtree(predictions)


def break_empty_folder(predictions: Path, references: Path) -> None:
    (predictions / "case_a.nii.gz").unlink()


def break_shape(predictions: Path, references: Path) -> None:
    save_labels(predictions / "case_a.nii.gz", small_labels((6, 10, 11)))


def break_labels(predictions: Path, references: Path) -> None:
    labels = small_labels()
    labels[3, 4, 4] = 5
    save_labels(predictions / "case_a.nii.gz", labels)


def break_names(predictions: Path, references: Path) -> None:
    (predictions / "case_a.nii.gz").rename(predictions / "case_b.nii.gz")


def break_file(predictions: Path, references: Path) -> None:
    (predictions / "case_a.nii.gz").write_bytes(b"not a NIfTI file")


def break_csv_path(predictions: Path, references: Path) -> None:
    (predictions.parent / "out.csv").mkdir()


@pytest.mark.parametrize(
    ("break_input", "expected_words"),
    [
        (break_missing_folder, ["predictions folder not found", "predictions"]),
        (break_empty_folder, ["no segmentations found in predictions folder"]),
        (
            break_shape,
            ["case_a", "(6, 10, 11)", "(6, 10, 10)", "predictions/case_a.nii.gz", "references/case_a.nii.gz"],
        ),
        (break_labels, ["prediction contains labels outside {0, 1, 2, 3}: 5", "predictions/case_a.nii.gz"]),
        (break_names, ["no prediction matches a reference case", "case_b", "case_a"]),
        (break_file, ["cannot read", "predictions/case_a.nii.gz"]),
        (break_csv_path, ["cannot write the CSV file", "out.csv"]),
    ],
    ids=[
        "missing-folder",
        "empty-folder",
        "shape-mismatch",
        "invalid-labels",
        "no-matching-case",
        "unreadable-file",
        "csv-path-is-folder",
    ],
)
def test_cli_bad_input_exits_2(
    synthetic_folders: tuple[Path, Path], tmp_path: Path, break_input: object, expected_words: list[str]
) -> None:
    predictions, references = synthetic_folders
    break_input(predictions, references)  # type: ignore[operator]

    result = run_cli(
        "--predictions", predictions, "--references", references, "--csv", tmp_path / "out.csv", cwd=tmp_path
    )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    stderr_lines = result.stderr.strip().splitlines()
    assert len(stderr_lines) == 1, result.stderr
    assert stderr_lines[0].startswith("error: ")
    for word in expected_words:
        assert word in stderr_lines[0]
    assert not (tmp_path / "out.csv").is_file()


def test_write_csv_unwritable_path(tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    rows: list[dict[str, str | float]] = [{"case": "case_a", **dict.fromkeys(METRIC_COLUMNS, 1.0)}]

    with pytest.raises(UserError, match="cannot write the CSV file"):
        write_metrics_csv(rows, tmp_path / "file" / "metrics.csv")


def test_cli_rejects_zero_jobs(synthetic_folders: tuple[Path, Path], tmp_path: Path) -> None:
    predictions, references = synthetic_folders

    result = run_cli("--predictions", predictions, "--references", references, "--jobs", "0", cwd=tmp_path)

    assert result.returncode == 2
    assert "--jobs: must be at least 1, got 0" in result.stderr
