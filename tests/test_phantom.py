"""Tests of kitsjobs.data.phantom: tissue levels, determinism, labels, conversion and CLI."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from kitsjobs.data import phantom
from kitsjobs.data.phantom import (
    PhantomParams,
    convert_labels_folder,
    generate_labels,
    kits_affine,
    labels_to_image,
    main,
    write_demo_dataset,
)


def _kits23_data_dir() -> Path | None:
    """Return the folder of real KiTS23 label files, or None if it is not on this machine."""
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data" / "kits23"]
    if os.environ.get("KITSJOBS_KITS23_DATA"):
        candidates.append(Path(os.environ["KITSJOBS_KITS23_DATA"]))
    for candidate in candidates:
        if (candidate / "labels").is_dir():
            return candidate
    return None


KITS23_DATA = _kits23_data_dir()
needs_kits23 = pytest.mark.skipif(
    KITS23_DATA is None,
    reason="real KiTS23 label files not found in ../shared/data/kits23; set KITSJOBS_KITS23_DATA",
)
SMALL_CASES = ("case_00048", "case_00061")  # the two smallest label files, 85 and 29 slices


def _block_labels() -> np.ndarray:
    """Return labels with one 16-voxel cube of kidney, tumor and cyst in the anterior half."""
    labels = np.zeros((24, 128, 128), dtype=np.uint8)
    for index, label in enumerate((1, 2, 3)):
        col = 20 + 32 * index
        labels[4:20, 30:46, col : col + 16] = label
    return labels


def _interior(labels: np.ndarray, label: int) -> np.ndarray:
    """Return the mask of ``label`` voxels at least 3 voxels from any other label."""
    return ndimage.binary_erosion(labels == label, iterations=3)


def _write_labels(path: Path, labels: np.ndarray, spacing_mm: tuple[float, float, float]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, kits_affine(spacing_mm)), path)
    return path


# --------------------------------------------------------------------------------------------
# kits_affine


def test_kits_affine_orientation_and_origin() -> None:
    affine = kits_affine((5.0, 0.8, 0.7))
    assert nib.aff2axcodes(affine) == ("I", "P", "L")
    assert np.array_equal(affine[:3, 3], np.zeros(3))
    assert np.allclose(nib.affines.voxel_sizes(affine), (5.0, 0.8, 0.7))


@needs_kits23
def test_kits_affine_matches_real_file() -> None:
    image = nib.load(KITS23_DATA / "labels" / "case_00048.nii.gz")
    affine = kits_affine(image.header.get_zooms())
    assert nib.aff2axcodes(affine) == nib.aff2axcodes(image.affine)
    assert np.allclose(affine, image.affine)


@pytest.mark.parametrize(
    "spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -1.0, 1.0), (1.0, float("nan"), 1.0)]
)
def test_kits_affine_rejects_bad_spacing(spacing: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="spacing_mm"):
        kits_affine(spacing)


# --------------------------------------------------------------------------------------------
# labels_to_image


def test_image_dtype_and_shape() -> None:
    labels = _block_labels()
    image = labels_to_image(labels, (2.0, 1.0, 1.0), seed=0)
    assert image.dtype == np.int16
    assert image.shape == labels.shape
    assert image.min() >= -1024
    assert image.max() <= 3071


def test_tissue_means() -> None:
    labels = _block_labels()
    image = labels_to_image(labels, (2.0, 1.0, 1.0), seed=0).astype(np.float64)
    kidney = image[_interior(labels, 1)].mean()
    tumor = image[_interior(labels, 2)].mean()
    cyst = image[_interior(labels, 3)].mean()
    # Unlabelled voxels in the anterior middle of the body: away from fat, spine and labels.
    soft_tissue = image[4:20, 60:70, 40:90].mean()

    assert kidney > tumor > cyst
    assert abs(kidney - 180) < 20
    assert abs(tumor - 90) < 25
    assert abs(cyst - 10) < 15
    assert abs(soft_tissue - 40) < 15


def test_body_outline_air_and_fat() -> None:
    labels = np.zeros((24, 128, 128), dtype=np.uint8)
    labels[8:16, 40:50, 60:70] = 1
    params = PhantomParams(noise_sd_hu=0.0, tissue_texture_hu=0.0)
    image = labels_to_image(labels, (2.0, 1.0, 1.0), seed=0, params=params)
    corner = image[:, :4, :4]
    assert np.all(corner == -1000)
    # Along the middle row from the left edge: air, then a fat ring, then soft tissue.
    profile = image[12, 64, :64]
    assert profile.min() == -1000
    assert np.any(np.abs(profile + 100) < 10)


def test_body_outline_contains_labels() -> None:
    labels = np.zeros((8, 64, 64), dtype=np.uint8)
    labels[2:6, 1:5, 1:5] = 1  # in a corner, where the default outline would put air
    params = PhantomParams(noise_sd_hu=0.0, tissue_texture_hu=0.0, blur_sigma_mm=0.1)
    image = labels_to_image(labels, (2.0, 1.0, 1.0), seed=0, params=params)
    # The body outline grows so that the kidney is surrounded by soft tissue, not air.
    assert image[3, 5, 5] == 40


def test_image_deterministic_for_seed() -> None:
    labels = _block_labels()
    first = labels_to_image(labels, (2.0, 1.0, 1.0), seed=7)
    second = labels_to_image(labels, (2.0, 1.0, 1.0), seed=7)
    other = labels_to_image(labels, (2.0, 1.0, 1.0), seed=8)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("spacing", [(2.0, 1.0, 1.0), (0.5, 0.8, 0.8)])
def test_image_independent_of_slab_size(spacing: tuple[float, float, float]) -> None:
    labels = _block_labels()
    whole = labels_to_image(labels, spacing, seed=3, slab_slices=1000)
    slabs = labels_to_image(labels, spacing, seed=3, slab_slices=5)
    assert np.array_equal(whole, slabs)


def test_anisotropic_blur_follows_spacing() -> None:
    labels = np.zeros((20, 64, 64), dtype=np.uint8)
    labels[:10, :, :] = 1  # step between slices 9 and 10
    labels[10:, :, :32] = 1  # step between cols 31 and 32
    params = PhantomParams(noise_sd_hu=0.0, tissue_texture_hu=0.0, blur_sigma_mm=1.0)
    image = labels_to_image(labels, (5.0, 0.5, 0.5), seed=0, params=params).astype(np.float64)
    # 1 mm is 0.2 voxels across 5 mm slices, 2 voxels in-plane at 0.5 mm.
    # Row 10 is anterior, away from the spine.
    assert image[10, 10, 40] < 45
    assert image[12, 10, 33] > 60
    assert image[12, 10, 33] < 140


def test_image_rejects_invalid_labels() -> None:
    with pytest.raises(ValueError, match="labels must be in"):
        labels_to_image(np.full((4, 8, 8), 5, dtype=np.uint8), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="3-D"):
        labels_to_image(np.zeros((8, 8), dtype=np.uint8), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="whole numbers"):
        labels_to_image(np.full((4, 8, 8), 0.5), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing_mm"):
        labels_to_image(np.zeros((4, 8, 8), dtype=np.uint8), (1.0, 1.0))


# --------------------------------------------------------------------------------------------
# generate_labels


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [
        ((48, 96, 96), (3.0, 1.6, 1.6)),
        ((16, 32, 32), (5.0, 3.0, 3.0)),
        ((64, 128, 160), (1.5, 0.8, 0.8)),
    ],
)
def test_generated_labels_contain_kidney_and_tumor(
    shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> None:
    for seed in range(8):
        labels = generate_labels(shape, spacing, seed)
        present = set(np.unique(labels).tolist())
        assert labels.dtype == np.uint8
        assert labels.shape == shape
        assert {0, 1, 2} <= present, f"seed {seed}: labels {present}"
        assert (3 in present) == (seed % 2 == 0), f"seed {seed}: labels {present}"


def test_generated_labels_deterministic() -> None:
    first = generate_labels((48, 96, 96), (3.0, 1.6, 1.6), seed=5)
    second = generate_labels((48, 96, 96), (3.0, 1.6, 1.6), seed=5)
    assert np.array_equal(first, second)


def test_generated_kidneys_posterior_both_sides() -> None:
    labels = generate_labels((48, 96, 96), (3.0, 1.6, 1.6), seed=1)
    slices, rows, cols = np.nonzero(labels == 1)
    # Rows grow towards the back and cols towards the patient's left.
    assert rows.mean() > 48
    assert np.any(cols < 40)
    assert np.any(cols > 56)


def test_generate_labels_rejects_tiny_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        generate_labels((2, 96, 96), (3.0, 1.6, 1.6), seed=0)


# --------------------------------------------------------------------------------------------
# write_demo_dataset


def test_demo_dataset_layout(tmp_path: Path) -> None:
    case_dirs = write_demo_dataset(tmp_path / "demo", n_cases=2, progress=False)
    assert [case_dir.name for case_dir in case_dirs] == ["case_00000", "case_00001"]
    for case_dir in case_dirs:
        imaging = nib.load(case_dir / "imaging.nii.gz")
        segmentation = nib.load(case_dir / "segmentation.nii.gz")
        assert imaging.get_data_dtype() == np.int16
        assert segmentation.get_data_dtype() == np.uint8
        assert imaging.shape == (48, 96, 96)
        assert np.allclose(imaging.affine, kits_affine((3.0, 1.6, 1.6)))
        assert np.allclose(segmentation.affine, kits_affine((3.0, 1.6, 1.6)))
        assert nib.aff2axcodes(imaging.affine) == ("I", "P", "L")
        assert {1, 2} <= set(np.unique(np.asanyarray(segmentation.dataobj)).tolist())
    assert not list((tmp_path / "demo").rglob(".*tmp*"))


def test_demo_dataset_idempotent(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    write_demo_dataset(out_dir, n_cases=1, progress=False)
    imaging = out_dir / "case_00000" / "imaging.nii.gz"
    modified = imaging.stat().st_mtime_ns
    write_demo_dataset(out_dir, n_cases=1, progress=False)
    assert imaging.stat().st_mtime_ns == modified


def test_demo_dataset_completes_interrupted_case(tmp_path: Path) -> None:
    case_dir = tmp_path / "demo" / "case_00000"
    case_dir.mkdir(parents=True)
    (case_dir / ".imaging.tmp-123.nii.gz").write_bytes(b"partial")
    write_demo_dataset(tmp_path / "demo", n_cases=1, progress=False)
    assert (case_dir / "segmentation.nii.gz").is_file()
    assert not (case_dir / ".imaging.tmp-123.nii.gz").exists()


def test_demo_dataset_rejects_other_shape(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path / "demo", n_cases=1, shape=(16, 32, 32), progress=False)
    with pytest.raises(ValueError, match="Delete the folder"):
        write_demo_dataset(tmp_path / "demo", n_cases=1, shape=(16, 32, 48), progress=False)


# --------------------------------------------------------------------------------------------
# convert_labels_folder


@needs_kits23
def test_convert_keeps_geometry_and_labels(tmp_path: Path) -> None:
    labels_dir = KITS23_DATA / "labels"
    case_dirs = convert_labels_folder(
        labels_dir, tmp_path / "out", seed=0, cases=list(SMALL_CASES), progress=False
    )
    assert [case_dir.name for case_dir in case_dirs] == list(SMALL_CASES)
    for case_dir in case_dirs:
        source = nib.load(labels_dir / f"{case_dir.name}.nii.gz")
        source_labels = np.asanyarray(source.dataobj)
        for name, dtype in (("imaging.nii.gz", np.int16), ("segmentation.nii.gz", np.uint8)):
            written = nib.load(case_dir / name)
            assert written.shape == source.shape, name
            assert np.array_equal(written.affine, source.affine), name
            assert written.header.get_zooms() == source.header.get_zooms(), name
            assert written.get_data_dtype() == dtype, name
        segmentation = np.asanyarray(nib.load(case_dir / "segmentation.nii.gz").dataobj)
        assert np.array_equal(segmentation, source_labels)
        image = np.asanyarray(nib.load(case_dir / "imaging.nii.gz").dataobj)
        assert image[source_labels == 1].mean() > image[source_labels == 2].mean()


def test_convert_accepts_flat_and_case_folders(tmp_path: Path) -> None:
    labels = generate_labels((8, 32, 32), (5.0, 3.0, 3.0), seed=1)
    _write_labels(tmp_path / "in" / "case_a.nii.gz", labels, (5.0, 3.0, 3.0))
    _write_labels(tmp_path / "in" / "case_b" / "segmentation.nii.gz", labels, (5.0, 3.0, 3.0))
    case_dirs = convert_labels_folder(tmp_path / "in", tmp_path / "out", progress=False)
    assert [case_dir.name for case_dir in case_dirs] == ["case_a", "case_b"]
    for case_dir in case_dirs:
        assert (case_dir / "imaging.nii.gz").is_file()
        assert np.array_equal(
            np.asanyarray(nib.load(case_dir / "segmentation.nii.gz").dataobj), labels
        )


def test_convert_seed_depends_on_case_name(tmp_path: Path) -> None:
    labels = generate_labels((8, 32, 32), (5.0, 3.0, 3.0), seed=1)
    _write_labels(tmp_path / "in" / "case_a.nii.gz", labels, (5.0, 3.0, 3.0))
    _write_labels(tmp_path / "in" / "case_b.nii.gz", labels, (5.0, 3.0, 3.0))
    convert_labels_folder(tmp_path / "in", tmp_path / "out", progress=False)
    image_a = np.asanyarray(nib.load(tmp_path / "out" / "case_a" / "imaging.nii.gz").dataobj)
    image_b = np.asanyarray(nib.load(tmp_path / "out" / "case_b" / "imaging.nii.gz").dataobj)
    assert not np.array_equal(image_a, image_b)


@pytest.mark.parametrize("out_name", [".", "nested/out"])
def test_convert_rejects_output_inside_labels(tmp_path: Path, out_name: str) -> None:
    labels_dir = tmp_path / "in"
    _write_labels(
        labels_dir / "case_a.nii.gz", np.zeros((4, 8, 8), dtype=np.uint8), (1.0, 1.0, 1.0)
    )
    with pytest.raises(ValueError, match="inside the labels folder"):
        convert_labels_folder(labels_dir, labels_dir / out_name, progress=False)
    assert sorted(path.name for path in labels_dir.iterdir()) == ["case_a.nii.gz"]


def test_convert_rejects_unknown_case(tmp_path: Path) -> None:
    _write_labels(
        tmp_path / "in" / "case_a.nii.gz", np.zeros((4, 8, 8), dtype=np.uint8), (1.0, 1.0, 1.0)
    )
    with pytest.raises(ValueError, match="case_zzz"):
        convert_labels_folder(tmp_path / "in", tmp_path / "out", cases=["case_zzz"], progress=False)


def test_convert_rejects_broken_file_before_writing(tmp_path: Path) -> None:
    labels = np.zeros((4, 8, 8), dtype=np.uint8)
    _write_labels(tmp_path / "in" / "case_a.nii.gz", labels, (1.0, 1.0, 1.0))
    (tmp_path / "in" / "case_b.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(ValueError, match="case_b.nii.gz"):
        convert_labels_folder(tmp_path / "in", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "case_a").exists()


# --------------------------------------------------------------------------------------------
# Command line


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_cli_missing_labels_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert main([str(missing), str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert str(missing) in line
    assert "Pass a folder" in line


def test_cli_no_label_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert "no label files found" in line
    assert str(tmp_path / "empty") in line


def test_cli_output_inside_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_labels(
        tmp_path / "in" / "case_a.nii.gz", np.zeros((4, 8, 8), dtype=np.uint8), (1.0, 1.0, 1.0)
    )
    assert main([str(tmp_path / "in"), str(tmp_path / "in" / "out")]) == 2
    assert "Choose an output folder outside it" in _one_line_error(capsys)


def test_cli_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "in" / "case_a.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"\x1f\x8b not really gzip")
    assert main([str(tmp_path / "in"), str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert str(broken) in line
    assert "Replace or remove it" in line


def test_cli_demo_rejects_labels_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--demo", str(tmp_path / "demo"), str(tmp_path / "in")]) == 2
    assert "--demo takes no LABELS_DIR" in _one_line_error(capsys)


def test_cli_demo_writes_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--demo", str(tmp_path / "demo"), "--n-cases", "1"]) == 0
    assert "1 demo cases" in capsys.readouterr().out
    assert (tmp_path / "demo" / "case_00000" / "imaging.nii.gz").is_file()


def test_cli_subprocess_error_has_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kitsjobs.data.phantom",
            str(tmp_path / "nowhere"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_params_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PhantomParams().kidney_hu = 0.0  # type: ignore[misc]
    assert phantom.LABEL_VALUES == (0, 1, 2, 3)


def test_cli_output_without_parent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_labels(tmp_path / "in" / "case_a.nii.gz", np.zeros((4, 8, 8), dtype=np.uint8), (1.0, 1.0, 1.0))
    output = tmp_path / "nope" / "out"
    assert main([str(tmp_path / "in"), str(output)]) == 2
    line = _one_line_error(capsys)
    assert line.endswith(f"output folder {output}: folder {tmp_path / 'nope'} not found. "
                         "Create it first or choose another path.")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("demo", [False, True])
def test_cli_output_file_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str], demo: bool) -> None:
    _write_labels(tmp_path / "in" / "case_a.nii.gz", np.zeros((4, 8, 8), dtype=np.uint8), (1.0, 1.0, 1.0))
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    argv = ["--demo", str(a_file), "--n-cases", "1"] if demo else [str(tmp_path / "in"), str(a_file)]
    assert main(argv) == 2
    assert _one_line_error(capsys).endswith(f"output folder {a_file} is a file, not a folder. Choose a folder path.")
    assert a_file.read_text() == "keep"


def test_cli_demo_rejects_zero_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--demo", str(tmp_path / "demo"), "--n-cases", "0"]) == 2
    assert _one_line_error(capsys).endswith("--n-cases 0 is invalid. Pass a number from 1 to 100000.")
    assert not (tmp_path / "demo").exists()


def test_demo_creates_missing_parents(tmp_path: Path) -> None:
    # The launcher's default demo folder, ~/.cache/kitsjobs/demo, may lack ~/.cache.
    demo = tmp_path / "home" / ".cache" / "kitsjobs" / "demo"
    case_dirs = write_demo_dataset(demo, n_cases=1, shape=(16, 32, 32), progress=False)
    assert case_dirs == [demo / "case_00000"]
    assert (demo / "case_00000" / "segmentation.nii.gz").is_file()
