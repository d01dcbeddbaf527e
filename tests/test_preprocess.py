"""The preprocessing cache: geometry, idempotence, resume, parallel runs and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kitsjobs.data.cache import (
    PreprocessSettings,
    is_up_to_date,
    load_cached_volume,
    prepare_volume,
    preprocess_cases,
)
from kitsjobs.data.layouts import find_cases
from kitsjobs.data.phantom import labels_to_image
from kitsjobs.data.resample import resample_linear, resample_nearest
from kitsjobs.errors import UserError
from kitsjobs.job import check_memory_grant, slurm_memory_grant_bytes

REPO = Path(__file__).resolve().parents[1]
SETTINGS = PreprocessSettings(spacing_mm=(5.0, 2.0, 2.0))


@pytest.fixture(scope="module")
def real_dataset(tmp_path_factory: pytest.TempPathFactory, kits23_data: Path) -> Path:
    """KiTS23 layout: a phantom image painted from case_00061 (29 x 512 x 512) and its labels."""
    root = tmp_path_factory.mktemp("kits23")
    label_file = nib.load(kits23_data / "labels" / "case_00061.nii.gz")
    labels = np.asarray(label_file.dataobj).astype(np.uint8)
    spacing = label_file.header.get_zooms()[:3]
    image = labels_to_image(labels, spacing, seed=0)
    case = root / "case_00061"
    case.mkdir()
    nib.save(nib.Nifti1Image(image, label_file.affine, label_file.header), case / "imaging.nii.gz")
    nib.save(nib.Nifti1Image(labels, label_file.affine, label_file.header), case / "segmentation.nii.gz")
    return root


def test_cache_files_and_geometry(real_dataset: Path, tmp_path: Path) -> None:
    cases = find_cases(real_dataset, "kits23")
    assert preprocess_cases(cases, tmp_path, SETTINGS, progress=False) == {"case_00061": "written"}
    geometry = json.loads((tmp_path / "case_00061" / "geometry.json").read_text())
    source = nib.load(cases[0].image)

    assert geometry["original_shape"] == [29, 512, 512]
    np.testing.assert_allclose(geometry["affine"], source.affine)
    box = geometry["crop_box"]
    assert box[0] == [0, 29]
    assert 0 <= box[1][0] < box[1][1] <= 512
    volume = load_cached_volume(tmp_path, "case_00061")
    assert isinstance(volume.image, np.memmap)
    assert volume.image.dtype == np.float16
    assert volume.label.dtype == np.uint8
    assert list(volume.image.shape) == geometry["shape"]
    assert geometry["shape"][0] == 29
    expected_rows = round((box[1][1] - box[1][0]) * 0.976562 / 2.0)
    assert geometry["shape"][1] == expected_rows
    assert float(volume.image.min()) >= 0.0
    assert float(volume.image.max()) <= 1.0


def test_cache_keeps_label_volumes(real_dataset: Path, tmp_path: Path) -> None:
    case = find_cases(real_dataset, "kits23")[0]
    preprocess_cases([case], tmp_path, SETTINGS, progress=False)
    volume = load_cached_volume(tmp_path, case.name)
    original = np.asarray(nib.load(case.label).dataobj)
    original_voxel_mm3 = np.prod(nib.load(case.label).header.get_zooms()[:3])
    cache_voxel_mm3 = np.prod(volume.spacing_mm)
    for cls in (1, 2):
        before = np.count_nonzero(original == cls) * original_voxel_mm3
        after = np.count_nonzero(np.asarray(volume.label) == cls) * cache_voxel_mm3
        assert after == pytest.approx(before, rel=0.05), f"class {cls}"


def test_class_points_lie_on_their_class(real_dataset: Path, tmp_path: Path) -> None:
    case = find_cases(real_dataset, "kits23")[0]
    preprocess_cases([case], tmp_path, SETTINGS, progress=False)
    volume = load_cached_volume(tmp_path, case.name)
    points = volume.class_points
    assert set(np.unique(points[:, 0])) <= {1, 2, 3}
    values = np.asarray(volume.label)[points[:, 1], points[:, 2], points[:, 3]]
    np.testing.assert_array_equal(values, points[:, 0])


def test_second_run_keeps_up_to_date_cases(real_dataset: Path, tmp_path: Path) -> None:
    cases = find_cases(real_dataset, "kits23")
    preprocess_cases(cases, tmp_path, SETTINGS, progress=False)
    mtime = (tmp_path / "case_00061" / "image.npy").stat().st_mtime_ns
    assert preprocess_cases(cases, tmp_path, SETTINGS, progress=False) == {"case_00061": "kept"}
    assert (tmp_path / "case_00061" / "image.npy").stat().st_mtime_ns == mtime
    other = PreprocessSettings(spacing_mm=(5.0, 2.5, 2.5))
    assert preprocess_cases(cases, tmp_path, other, progress=False) == {"case_00061": "written"}
    assert is_up_to_date(tmp_path / "case_00061", cases[0], other)
    assert not is_up_to_date(tmp_path / "case_00061", cases[0], SETTINGS)


def test_interrupted_run_resumes(real_dataset: Path, tmp_path: Path) -> None:
    cases = find_cases(real_dataset, "kits23")
    leftover = tmp_path / ".case_00061.tmp-0123456789ab"
    leftover.mkdir()
    (leftover / "image.npy").write_bytes(b"partial")
    os.utime(leftover, (0, 0))
    assert preprocess_cases(cases, tmp_path, SETTINGS, progress=False) == {"case_00061": "written"}
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_00061"]


def test_parallel_jobs_match_one_job(tmp_path: Path) -> None:
    from conftest import write_case

    rng = np.random.default_rng(0)
    for index in range(3):
        image = rng.integers(-1000, 1000, (12, 40, 40)).astype(np.int16)
        label = np.zeros((12, 40, 40), np.uint8)
        label[3:8, 10:20, 10 + index : 20 + index] = 1 + index
        write_case(tmp_path / "data", f"case_{index:05d}", image, label)
    cases = find_cases(tmp_path / "data", "kits23")
    settings = PreprocessSettings(spacing_mm=(2.0, 1.0, 1.0), body_threshold_hu=None)
    preprocess_cases(cases, tmp_path / "one", settings, jobs=1, progress=False)
    status = preprocess_cases(cases, tmp_path / "two", settings, jobs=2, progress=False)
    assert set(status.values()) == {"written"}
    for case in cases:
        a, b = load_cached_volume(tmp_path / "one", case.name), load_cached_volume(tmp_path / "two", case.name)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)


def test_in_memory_volume_equals_cache(real_dataset: Path, tmp_path: Path) -> None:
    case = find_cases(real_dataset, "kits23")[0]
    preprocess_cases([case], tmp_path, SETTINGS, progress=False)
    cached, in_memory = load_cached_volume(tmp_path, case.name), prepare_volume(case, SETTINGS)
    np.testing.assert_array_equal(cached.image, in_memory.image)
    np.testing.assert_array_equal(cached.label, in_memory.label)


def test_linear_resampling_equals_trilinear() -> None:
    source = np.random.default_rng(1).random((45, 20, 30), dtype=np.float32)
    out = resample_linear(source, np.empty((70, 13, 41), np.float32))
    expected = F.interpolate(torch.from_numpy(source)[None, None], size=(70, 13, 41), mode="trilinear",
                             align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_nearest_round_trip_restores_labels() -> None:
    labels = np.random.default_rng(2).integers(0, 4, (7, 9, 11)).astype(np.uint8)
    up = resample_nearest(labels, np.empty((35, 18, 22), np.uint8))
    back = resample_nearest(up, np.empty((7, 9, 11), np.uint8))
    np.testing.assert_array_equal(back, labels)


def test_cli_rejects_output_inside_input(real_dataset: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kitsjobs.preprocess", "--input", str(real_dataset), "--output",
         str(real_dataset / "cache")], cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "inside the dataset folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (real_dataset / "cache").exists()


def test_cli_writes_cache(real_dataset: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "kitsjobs.preprocess", "--input", str(real_dataset), "--output",
               str(tmp_path), "--spacing-mm", "5", "2", "2"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "1 case(s) preprocessed" in first.stdout
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "0 case(s) preprocessed, 1 already up to date" in second.stdout


def test_slurm_memory_grant_variables() -> None:
    assert slurm_memory_grant_bytes({}) is None
    assert slurm_memory_grant_bytes({"SLURM_MEM_PER_NODE": "2048"}) == 2 * 2**30
    assert slurm_memory_grant_bytes({"SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_ON_NODE": "4"}) == 4000 * 2**20
    assert slurm_memory_grant_bytes({"SLURM_MEM_PER_GPU": "3000", "SLURM_GPUS_ON_NODE": "2"}) == 6000 * 2**20


def test_memory_check_names_both_sizes(real_dataset: Path) -> None:
    from kitsjobs.config import Config

    config = Config()
    cases = find_cases(real_dataset, "kits23")
    # 29 x 512 x 512 voxels at 3 bytes (float16 image, uint8 label) is about 22 MiB.
    with pytest.raises(UserError, match=r"about 0\.0 GiB.*of the 0\.0 GiB Slurm granted.*data\.cache_dir"):
        check_memory_grant(cases, config, {"SLURM_MEM_PER_NODE": "20"})
    check_memory_grant(cases, config, {"SLURM_MEM_PER_NODE": "100"})
