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
from kitsjobs.evaluate import (
    CSV_COLUMNS,
    LEADERBOARD_COLUMNS,
    PredictionSet,
    evaluate_folders,
    find_segmentations,
    main,
    parse_prediction_set,
    write_metrics_csv,
)
from kitsjobs.metrics import DICE_COLUMNS, METRIC_COLUMNS, SURFACE_DICE_COLUMNS

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
    path: Path,
    labels: np.ndarray,
    spacing_mm: tuple[float, float, float] = (3.0, 0.8, 0.8),
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing_mm, 1.0])
    affine[:3, 3] = origin_mm
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), path)


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
    csv_path.parent.mkdir()

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


def test_spacing_within_tolerance_warns(
    synthetic_folders: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    predictions, references = synthetic_folders
    save_labels(predictions / "case_a.nii.gz", small_labels(), spacing_mm=(3.0, 0.8, 0.8005))
    caplog.set_level(logging.WARNING, logger="kitsjobs.evaluate")

    rows = evaluate_folders(predictions, references, progress=False)

    assert "case_a: prediction spacing (3.0, 0.8" in caplog.text
    assert "using the reference spacing" in caplog.text
    assert rows[0]["dice_kidney_and_mass"] == 1.0


def test_identical_geometry_does_not_warn(
    synthetic_folders: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    predictions, references = synthetic_folders
    caplog.set_level(logging.WARNING, logger="kitsjobs.evaluate")

    evaluate_folders(predictions, references, progress=False)

    assert "spacing" not in caplog.text


def break_missing_folder(predictions: Path, references: Path) -> None:
    shutil.rmtree(predictions)


def break_empty_folder(predictions: Path, references: Path) -> None:
    (predictions / "case_a.nii.gz").unlink()


def break_shape(predictions: Path, references: Path) -> None:
    save_labels(predictions / "case_a.nii.gz", small_labels((6, 10, 11)))


def break_spacing(predictions: Path, references: Path) -> None:
    save_labels(predictions / "case_a.nii.gz", small_labels(), spacing_mm=(3.0, 0.8, 0.9))


def break_origin(predictions: Path, references: Path) -> None:
    save_labels(predictions / "case_a.nii.gz", small_labels(), origin_mm=(0.0, 0.0, 0.002))


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
        (break_missing_folder, ["--predictions", "predictions not found"]),
        (break_empty_folder, ["no segmentations found in predictions folder"]),
        (
            break_shape,
            ["case_a", "(6, 10, 11)", "(6, 10, 10)", "predictions/case_a.nii.gz", "references/case_a.nii.gz"],
        ),
        (
            break_spacing,
            ["case_a", "affine", "0.9", "(6, 10, 10)", "predictions/case_a.nii.gz", "references/case_a.nii.gz"],
        ),
        (
            break_origin,
            ["case_a", "affine", "up to 0.002", "predictions/case_a.nii.gz", "references/case_a.nii.gz"],
        ),
        (break_labels, ["prediction contains labels outside {0, 1, 2, 3}: 5", "predictions/case_a.nii.gz"]),
        (break_names, ["no prediction matches a reference case", "case_b", "case_a"]),
        (break_file, ["cannot read", "predictions/case_a.nii.gz"]),
        (break_csv_path, ["--csv", "out.csv is a folder"]),
    ],
    ids=[
        "missing-folder",
        "empty-folder",
        "shape-mismatch",
        "spacing-mismatch",
        "origin-mismatch",
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


# Ranking several prediction folders.


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def mean_of_expected(expected: dict[str, dict[str, str]], cases: list[str], columns: tuple[str, ...]) -> float:
    return float(np.mean([[float(expected[case][column]) for column in columns] for case in cases]))


@needs_data
def test_rank_annotator2_above_shifted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert DATA_DIR is not None
    shared_cases = sorted(path.name[: -len(".nii.gz")] for path in (DATA_DIR / "annotator2").glob("*.nii.gz"))
    references = tmp_path / "references"
    references.mkdir()
    for case in shared_cases:
        (references / f"{case}.nii.gz").symlink_to(DATA_DIR / "labels" / f"{case}.nii.gz")
    leaderboard_md = tmp_path / "board" / "leaderboard.md"
    leaderboard_csv = tmp_path / "board" / "leaderboard.csv"
    leaderboard_md.parent.mkdir()

    exit_code = main(
        [
            "--predictions", str(DATA_DIR / "shifted"), str(DATA_DIR / "annotator2"),
            "--references", str(references),
            "--leaderboard", str(leaderboard_md),
            "--leaderboard-csv", str(leaderboard_csv),
            "--jobs", "2",
        ]
    )

    assert exit_code == 0
    board = read_csv_rows(leaderboard_csv)
    assert [row["team"] for row in board] == ["annotator2", "shifted"]
    assert [row["place"] for row in board] == ["1", "2"]
    assert [row["dice_rank"] for row in board] == ["1", "2"]
    assert [row["surface_dice_rank"] for row in board] == ["1", "2"]
    assert [row["aggregate_rank"] for row in board] == ["1", "2"]
    for row in board:
        expected = read_expected(row["team"])
        assert row["cases"] == str(len(shared_cases))
        assert row["missing_cases"] == "0"
        expected_dice = mean_of_expected(expected, shared_cases, DICE_COLUMNS)
        expected_surface_dice = mean_of_expected(expected, shared_cases, SURFACE_DICE_COLUMNS)
        assert float(row["mean_dice"]) == pytest.approx(expected_dice, abs=OFFICIAL_VALUE_TOLERANCE)
        assert float(row["mean_surface_dice"]) == pytest.approx(expected_surface_dice, abs=OFFICIAL_VALUE_TOLERANCE)
    markdown = leaderboard_md.read_text().splitlines()
    assert markdown[0] == "| " + " | ".join(LEADERBOARD_COLUMNS) + " |"
    assert markdown[2].startswith("| 1 | annotator2 | ")
    assert markdown[3].startswith("| 2 | shifted | ")
    printed = capsys.readouterr().out
    assert "| 1 | annotator2 | " in printed


@pytest.fixture
def three_teams(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """References case_a and case_b; teams 'exact' and 'copy' predict both exactly, 'partial' only case_a."""
    references = tmp_path / "references"
    teams = {name: tmp_path / name for name in ("exact", "copy", "partial")}
    for case in ("case_a", "case_b"):
        save_labels(references / f"{case}.nii.gz", small_labels())
        save_labels(teams["exact"] / f"{case}.nii.gz", small_labels())
        save_labels(teams["copy"] / f"{case}.nii.gz", small_labels())
    save_labels(teams["partial"] / "case_a.nii.gz", small_labels())
    save_labels(teams["partial"] / "case_z.nii.gz", small_labels())
    return references, teams


def test_ranking_ties_and_missing_case(
    three_teams: tuple[Path, dict[str, Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    references, teams = three_teams
    leaderboard_csv = tmp_path / "leaderboard.csv"
    cases_csv = tmp_path / "cases.csv"
    caplog.set_level(logging.WARNING, logger="kitsjobs.evaluate")

    exit_code = main(
        [
            "--predictions", str(teams["partial"]), f"second={teams['copy']}", str(teams["exact"]),
            "--references", str(references),
            "--leaderboard-csv", str(leaderboard_csv),
            "--csv", str(cases_csv),
        ]
    )

    assert exit_code == 0
    board = {row["team"]: row for row in read_csv_rows(leaderboard_csv)}
    assert list(board) == ["exact", "second", "partial"]
    assert board["exact"]["dice_rank"] == board["second"]["dice_rank"] == "1.5"
    assert board["exact"]["place"] == board["second"]["place"] == "1"
    assert board["partial"]["place"] == "3"
    assert board["partial"]["aggregate_rank"] == "3"
    assert board["partial"]["missing_cases"] == "1"
    # case_b is missing, so it scores 0 and the mean over both cases is 0.5.
    assert float(board["partial"]["mean_dice"]) == 0.5
    assert float(board["exact"]["mean_surface_dice"]) == 1.0
    assert "partial: 1 reference cases have no prediction and are scored as all-zero predictions: case_b" in caplog.text
    assert "partial: 1 predictions have no reference and are ignored: case_z" in caplog.text
    case_rows = read_csv_rows(cases_csv)
    assert list(case_rows[0]) == ["team", *CSV_COLUMNS]
    assert [(row["team"], row["case"]) for row in case_rows] == [
        ("partial", "case_a"), ("partial", "case_b"), ("second", "case_a"),
        ("second", "case_b"), ("exact", "case_a"), ("exact", "case_b"),
    ]
    assert float(case_rows[1]["dice_tumor"]) == 0.0


def test_one_folder_with_leaderboard(three_teams: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    references, teams = three_teams
    leaderboard_md = tmp_path / "leaderboard.md"

    exit_code = main(
        ["--predictions", str(teams["exact"]), "--references", str(references), "--leaderboard", str(leaderboard_md)]
    )

    assert exit_code == 0
    lines = leaderboard_md.read_text().splitlines()
    assert len(lines) == 3
    assert lines[2].startswith("| 1 | exact | 1.0000 | 1.0000 | 1 | 1 | 1 | 2 | 0 |")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("runs/unet", PredictionSet("unet", Path("runs/unet"))),
        ("best=runs/unet", PredictionSet("best", Path("runs/unet"))),
        ("runs/lr=3e-4", PredictionSet("lr=3e-4", Path("runs/lr=3e-4"))),
        ("runs/unet/", PredictionSet("unet", Path("runs/unet"))),
    ],
    ids=["folder-name", "named", "equals-in-path", "trailing-slash"],
)
def test_parse_prediction_set(text: str, expected: PredictionSet) -> None:
    assert parse_prediction_set(text) == expected


@pytest.mark.parametrize(
    ("predictions", "options", "expected_words"),
    [
        (["{copy}", "copy={exact}"], [], ["two predictions folders are named copy", "NAME=DIR"]),
        (["=x"], [], ["invalid --predictions value '=x': the name is empty"]),
        (["{exact}", "{missing}"], [], ["--predictions", "missing not found"]),
        (
            ["{exact}", "{copy}"],
            ["--leaderboard", "{out}", "--leaderboard-csv", "{out}"],
            ["--leaderboard and --leaderboard-csv both name"],
        ),
    ],
    ids=["duplicate-name", "empty-name", "missing-folder", "same-output"],
)
def test_ranking_bad_input_exits_2(
    three_teams: tuple[Path, dict[str, Path]],
    tmp_path: Path,
    predictions: list[str],
    options: list[str],
    expected_words: list[str],
) -> None:
    references, teams = three_teams
    paths = {name: str(path) for name, path in teams.items()}
    paths.update(missing=str(tmp_path / "missing"), out=str(tmp_path / "board.md"))
    prediction_arguments = [argument.format(**paths) for argument in predictions]
    option_arguments = [argument.format(**paths) for argument in options]

    result = run_cli(
        "--predictions", *prediction_arguments, "--references", references, *option_arguments, cwd=tmp_path
    )

    assert result.returncode == 2
    stderr_lines = result.stderr.strip().splitlines()
    assert len(stderr_lines) == 1, result.stderr
    for word in expected_words:
        assert word in stderr_lines[0]
    assert not (tmp_path / "board.md").exists()


# Output files: never inside an input folder, never replaced without --overwrite.


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize("target", ["reference", "in-references", "in-predictions"])
def test_csv_inside_inputs_rejected(
    synthetic_folders: tuple[Path, Path], tmp_path: Path, target: str, overwrite: list[str]
) -> None:
    predictions, references = synthetic_folders
    reference = references / "case_a.nii.gz"
    reference_bytes = reference.read_bytes()
    path = {
        "reference": reference,
        "in-references": references / "metrics.csv",
        "in-predictions": predictions / "metrics.csv",
    }[target]
    folder_flag = "--predictions" if target == "in-predictions" else "--references"

    result = run_cli(
        "--predictions", predictions, "--references", references, "--csv", path, *overwrite, cwd=tmp_path
    )

    assert result.returncode == 2
    stderr_lines = result.stderr.strip().splitlines()
    assert len(stderr_lines) == 1, result.stderr
    assert stderr_lines[0].startswith(f"error: --csv {path} is inside the {folder_flag} folder")
    assert reference.read_bytes() == reference_bytes
    assert sorted(path.name for path in references.iterdir()) == ["case_a.nii.gz"]
    assert sorted(path.name for path in predictions.iterdir()) == ["case_a.nii.gz"]


@pytest.mark.parametrize(
    ("option", "header_start"), [("--csv", "case,"), ("--leaderboard", "| place |"), ("--leaderboard-csv", "place,")]
)
def test_existing_output_needs_overwrite(
    synthetic_folders: tuple[Path, Path], tmp_path: Path, option: str, header_start: str
) -> None:
    predictions, references = synthetic_folders
    output = tmp_path / "result.txt"
    output.write_text("earlier result\n")

    rejected = run_cli("--predictions", predictions, "--references", references, option, output, cwd=tmp_path)
    replaced = run_cli(
        "--predictions", predictions, "--references", references, option, output, "--overwrite", cwd=tmp_path
    )

    assert rejected.returncode == 2
    assert rejected.stderr.strip() == f"error: {option} {output} exists; choose another path, or add --overwrite to replace it"
    assert replaced.returncode == 0, replaced.stderr
    assert output.read_text().startswith(header_start)


def test_csv_missing_folder_not_created(synthetic_folders: tuple[Path, Path], tmp_path: Path) -> None:
    predictions, references = synthetic_folders
    target = tmp_path / "nonexist" / "dir" / "x.csv"

    result = run_cli("--predictions", predictions, "--references", references, "--csv", target, cwd=tmp_path)

    assert result.returncode == 2
    assert f"folder {target.parent} not found; create it first" in result.stderr
    assert not (tmp_path / "nonexist").exists()


def test_references_flag_named_when_missing(synthetic_folders: tuple[Path, Path], tmp_path: Path) -> None:
    predictions, _ = synthetic_folders

    result = run_cli("--predictions", predictions, "--references", tmp_path / "nope", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --references {tmp_path / 'nope'} not found")
