"""The dataset check on small broken NIfTI files written by each test."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import write_case
from kitsjobs.data.check import (
    ERROR,
    NO_CASE_FILES,
    WARNING,
    Problem,
    check_dataset,
    check_volume,
    enforce,
    label_value_problems,
)
from kitsjobs.errors import UserError

SHAPE = (6, 16, 16)
SPACING_MM = (3.0, 1.5, 1.5)


def clean_label() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[2:4, 4:8, 4:8] = 1
    label[3, 5, 5] = 2
    return label


def clean_image() -> np.ndarray:
    return np.full(SHAPE, -100, np.int16)


def write_clean(root: Path, name: str) -> Path:
    write_case(root, name, clean_image(), clean_label(), SPACING_MM)
    return root / name


def problems_of(problems: list[Problem], case: str) -> list[str]:
    return [problem.problem for problem in problems if problem.case == case]


def test_clean_dataset_has_no_problems(tmp_path: Path) -> None:
    for index in range(3):
        write_clean(tmp_path, f"case_{index:05d}")
    assert check_dataset(tmp_path, "kits23") == []
    assert check_dataset(tmp_path, "kits23", full=False) == []


def test_unpaired_files_are_errors(tmp_path: Path) -> None:
    write_clean(tmp_path, "case_00000")
    write_case(tmp_path, "case_00001", clean_image(), None, SPACING_MM)
    write_clean(tmp_path, "case_00002")
    (tmp_path / "case_00002" / "imaging.nii.gz").unlink()

    problems = check_dataset(tmp_path, "kits23")
    assert problems_of(problems, "case_00001") == ["image without label"]
    assert problems_of(problems, "case_00002") == ["label without image"]
    assert problems_of(problems, "case_00000") == []
    assert {problem.severity for problem in problems} == {ERROR}


def test_duplicate_case_ids_are_errors(tmp_path: Path) -> None:
    write_clean(tmp_path, "case_00001")
    write_clean(tmp_path, "case_1")
    problems = check_dataset(tmp_path, "kits23")
    assert len(problems) == 2
    for problem in problems:
        assert "duplicate case id case_00001" in problem.problem
        assert problem.severity == ERROR


def test_flat_duplicate_extensions_are_errors(tmp_path: Path) -> None:
    affine = np.diag([*SPACING_MM, 1.0])
    for folder, array in (("volume", clean_image()), ("seg", clean_label())):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(array, affine), tmp_path / folder / "a.nii.gz")
    nib.save(nib.Nifti1Image(clean_image(), affine), tmp_path / "volume" / "a.nii")
    nib.save(nib.Nifti1Image(clean_label(), affine), tmp_path / "seg" / "b.nii")

    problems = check_dataset(tmp_path, "flat")
    by_file = {Path(problem.file).relative_to(tmp_path).as_posix(): problem for problem in problems}
    assert "duplicate" in by_file["volume/a.nii"].problem
    assert by_file["volume/a.nii"].severity == ERROR
    assert "ignored" in by_file["seg/b.nii"].problem
    assert by_file["seg/b.nii"].severity == WARNING
    assert len(problems) == 2


def test_truncated_gzip_found_only_by_full_read(tmp_path: Path) -> None:
    # Noise compresses poorly, so the gzip stream is long and its first half holds the header.
    noise = np.random.default_rng(0).integers(-1000, 1000, (20, 64, 64))
    write_case(tmp_path, "case_00000", noise, np.ones((20, 64, 64), np.uint8), SPACING_MM)
    image = tmp_path / "case_00000" / "imaging.nii.gz"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])

    full = check_dataset(tmp_path, "kits23")
    assert len(full) == 1
    assert full[0].file == str(image)
    assert full[0].severity == ERROR
    assert "truncated" in full[0].problem or "corrupt" in full[0].problem
    # The header is intact, so a header-only check cannot see the damage.
    assert check_dataset(tmp_path, "kits23", full=False) == []


def test_corrupt_gzip_crc_is_error(tmp_path: Path) -> None:
    case = write_clean(tmp_path, "case_00000")
    label = case / "segmentation.nii.gz"
    data = bytearray(label.read_bytes())
    data[-6] ^= 0xFF  # a byte of the gzip trailer's CRC-32
    label.write_bytes(bytes(data))
    problems = check_dataset(tmp_path, "kits23")
    assert [problem.file for problem in problems] == [str(label)]
    assert "corrupt" in problems[0].problem


def test_not_gzip_is_unreadable(tmp_path: Path) -> None:
    case = write_clean(tmp_path, "case_00000")
    (case / "imaging.nii.gz").write_bytes(b"not a NIfTI file at all" * 20)
    problems = check_dataset(tmp_path, "kits23", full=False)
    assert len(problems) == 1
    assert problems[0].problem.startswith("unreadable")


def test_truncated_uncompressed_nifti_is_error(tmp_path: Path) -> None:
    affine = np.diag([*SPACING_MM, 1.0])
    for folder, array in (("volume", clean_image()), ("seg", clean_label())):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(array, affine), tmp_path / folder / "a.nii.gz")
    # A gzip stream that ends early inside the voxel data: the header and the gzip
    # framing are valid, only the voxels are short.
    raw = nib.Nifti1Image(clean_image(), affine).to_bytes()
    (tmp_path / "volume" / "a.nii.gz").write_bytes(gzip.compress(raw[: len(raw) - 100]))
    problems = check_dataset(tmp_path, "flat")
    assert len(problems) == 1
    assert problems[0].problem.startswith("truncated:")
    expected = len(raw)
    assert f"{expected - 100} of {expected} bytes" in problems[0].problem


def test_two_dimensional_image_is_error(tmp_path: Path) -> None:
    write_case(tmp_path, "case_00000", np.zeros((16, 16)), clean_label(), SPACING_MM)
    problems = check_dataset(tmp_path, "kits23", full=False)
    assert problems_of(problems, "case_00000") == ["not a 3D volume: shape (16, 16)"]


def test_shape_and_affine_mismatch_are_errors(tmp_path: Path) -> None:
    write_case(tmp_path, "case_00000", np.zeros((6, 16, 15)), clean_label(), SPACING_MM)
    case = write_clean(tmp_path, "case_00001")
    shifted = np.diag([*SPACING_MM, 1.0])
    shifted[2, 3] = 7.5
    nib.save(nib.Nifti1Image(clean_label(), shifted), case / "segmentation.nii.gz")

    problems = check_dataset(tmp_path, "kits23", full=False)
    assert problems_of(problems, "case_00000") == ["label shape (6, 16, 16) differs from image shape (6, 16, 15)"]
    [affine_problem] = problems_of(problems, "case_00001")
    assert "affine differs" in affine_problem
    assert "7.5 mm" in affine_problem


def test_label_value_seven_is_error(tmp_path: Path) -> None:
    label = clean_label()
    label[0, 0, 0] = 7
    write_case(tmp_path, "case_00000", clean_image(), label, SPACING_MM)
    problems = check_dataset(tmp_path, "kits23")
    assert problems_of(problems, "case_00000") == ["label values 7 outside {0, 1, 2, 3}"]
    assert problems[0].file.endswith("segmentation.nii.gz")
    # Header-only checks leave label values to training.
    assert check_dataset(tmp_path, "kits23", full=False) == []


def test_nan_intensities_are_error(tmp_path: Path) -> None:
    write_clean(tmp_path, "case_00000")
    image = clean_image().astype(np.float32)
    image[1, 2, 3] = np.nan
    image[4, 5, 6] = np.inf
    nib.save(nib.Nifti1Image(image, np.diag([*SPACING_MM, 1.0])), tmp_path / "case_00000" / "imaging.nii.gz")
    problems = check_dataset(tmp_path, "kits23")
    assert problems_of(problems, "case_00000") == ["2 NaN or infinite intensities"]


@pytest.mark.parametrize(
    ("pixdim", "expected"),
    [
        ((0.0, 1.5, 1.5), "invalid voxel spacing (0, 1.5, 1.5) mm: must be positive"),
        ((3.0, -1.5, 1.5), "invalid voxel spacing (3, -1.5, 1.5) mm: must be positive"),
        ((12.0, 1.5, 1.5), "voxel spacing (12, 1.5, 1.5) mm is over 10 mm"),
    ],
)
def test_absurd_spacing_is_error(pixdim: tuple[float, float, float], expected: str, tmp_path: Path) -> None:
    case = write_clean(tmp_path, "case_00000")
    image = nib.Nifti1Image(clean_image(), np.diag([*SPACING_MM, 1.0]))
    image.header["pixdim"][1:4] = pixdim
    nib.save(image, case / "imaging.nii.gz")
    problems = check_dataset(tmp_path, "kits23", full=False)
    assert [problem.problem for problem in problems] == [expected]


def test_label_values_by_dtype() -> None:
    assert label_value_problems(clean_label()) == []
    assert label_value_problems(clean_label().astype(np.int16) - 1) == [
        ("label values -1 outside {0, 1, 2, 3}", ERROR)
    ]
    assert label_value_problems(np.zeros(SHAPE, np.uint8)) == [
        ("label map has no kidney, tumor or cyst voxel", WARNING)
    ]
    fractional = clean_label().astype(np.float32)
    fractional[0, 0, 0] = 0.5
    assert label_value_problems(fractional) == [("label values are not whole numbers", ERROR)]


def test_check_volume_names_files() -> None:
    image = np.zeros(SHAPE, np.float32)
    image[0, 0, :3] = np.nan
    label = clean_label()
    label[1, 1, 1] = 9
    problems = check_volume("case_00003", image, label, "img.nii.gz", "seg.nii.gz")
    assert problems == [
        Problem("case_00003", "img.nii.gz", "3 NaN or infinite intensities", ERROR),
        Problem("case_00003", "seg.nii.gz", "label values 9 outside {0, 1, 2, 3}", ERROR),
    ]


def test_enforce_modes() -> None:
    problems = [Problem("case_00001", "/d/case_00001/segmentation.nii.gz", "label values 7 outside", ERROR)]
    with pytest.raises(UserError, match="case_00001/segmentation.nii.gz: label values 7 outside.*data.check=warn"):
        enforce(problems, "error", "/d", "kits23")
    enforce(problems, "warn", "/d", "kits23")
    with pytest.raises(UserError, match="data.check='strict' is invalid; choose one of error, warn, off"):
        enforce(problems, "strict", "/d", "kits23")


def test_parallel_check_matches_serial(tmp_path: Path) -> None:
    for index in range(3):
        write_clean(tmp_path, f"case_{index:05d}")
    label = clean_label()
    label[0, 0, 0] = 7
    write_case(tmp_path, "case_00003", clean_image(), label, SPACING_MM)
    serial = check_dataset(tmp_path, "kits23", workers=1)
    assert check_dataset(tmp_path, "kits23", workers=2) == serial
    assert len(serial) == 1


def test_command_prints_table_and_exits_one(tmp_path: Path) -> None:
    write_clean(tmp_path, "case_00000")
    write_case(tmp_path, "case_00001", np.zeros((16, 16)), clean_label(), SPACING_MM)
    result = subprocess.run(
        [sys.executable, "-m", "kitsjobs.data.check", str(tmp_path), "--workers", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["case", "file", "problem", "severity"]
    assert lines[1].startswith("case_00001  case_00001/imaging.nii.gz")
    assert lines[1].endswith("error")
    assert lines[-1] == f"{tmp_path}: 1 error(s), 0 warning(s)"
    assert "Traceback" not in result.stderr


def test_command_clean_and_missing_folder(tmp_path: Path) -> None:
    write_clean(tmp_path, "case_00000")
    clean = subprocess.run([sys.executable, "-m", "kitsjobs.data.check", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stderr
    missing = subprocess.run([sys.executable, "-m", "kitsjobs.data.check", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: dataset folder {tmp_path / 'nope'} not found; pass an existing folder"


def write_flat(root: Path, names: list[str]) -> None:
    """Write cases in the flat layout: ROOT/volume/NAME.nii.gz and ROOT/seg/NAME.nii.gz."""
    affine = np.diag([*SPACING_MM, 1.0])
    for folder in ("volume", "seg"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name in names:
        nib.save(nib.Nifti1Image(clean_image(), affine), root / "volume" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(clean_label(), affine), root / "seg" / f"{name}.nii.gz")


def test_flat_folder_as_kits23_is_error(tmp_path: Path) -> None:
    write_flat(tmp_path, ["case_00000", "case_00001"])
    problems = check_dataset(tmp_path, "kits23")
    assert len(problems) == 1
    assert problems[0].severity == ERROR
    assert problems[0].problem.startswith(f"no cases found in {tmp_path} for --layout kits23")
    assert problems[0].problem.endswith("but 2 in the flat layout (ROOT/volume/NAME.nii.gz and "
                                        "ROOT/seg/NAME.nii.gz); pass --layout flat")
    assert check_dataset(tmp_path, "flat") == []


def test_stray_folder_beside_cases_is_warning(tmp_path: Path) -> None:
    write_clean(tmp_path, "case_00000")
    (tmp_path / "notes").mkdir()
    problems = check_dataset(tmp_path, "kits23")
    assert problems == [Problem("notes", str(tmp_path / "notes"), NO_CASE_FILES, WARNING)]


def test_command_wrong_layout_exits_two(tmp_path: Path) -> None:
    write_flat(tmp_path, ["case_00000", "case_00001"])
    result = subprocess.run([sys.executable, "-m", "kitsjobs.data.check", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: no cases found in {tmp_path} for --layout kits23")
    assert lines[0].endswith("; pass --layout flat")


def test_command_rejects_file_as_root(tmp_path: Path) -> None:
    image = write_clean(tmp_path, "case_00000") / "imaging.nii.gz"
    result = subprocess.run([sys.executable, "-m", "kitsjobs.data.check", str(image)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {image} is a file, not a dataset folder; pass the dataset folder "
                                     "ROOT (kits23 layout: ROOT/CASE/imaging.nii.gz)")
