"""The preprocessing cache: geometry, idempotence, resume, parallel runs and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kitsjobs.data.cache import (
    PreprocessSettings,
    check_finite_intensities,
    is_up_to_date,
    load_cached_volume,
    prepare_arrays,
    prepare_volume,
    preprocess_cases,
)
from kitsjobs.data.layouts import Case, find_cases
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
    assert preprocess_cases(cases, tmp_path, other, progress=False, overwrite=True) == {"case_00061": "written"}
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
    with pytest.raises(UserError, match=r"about 22 MiB.*of the 20 MiB Slurm granted.*data\.cache_dir"):
        check_memory_grant(cases, config, {"SLURM_MEM_PER_NODE": "20"})
    check_memory_grant(cases, config, {"SLURM_MEM_PER_NODE": "100"})


# --- What the cache may replace, what preprocessing checks, and how the command fails -------

SMALL_SETTINGS = PreprocessSettings(spacing_mm=(2.0, 1.0, 1.0), body_threshold_hu=None)


def write_small_dataset(root: Path, count: int = 3) -> list[Path]:
    """Write ``count`` KiTS23-layout cases of 8 x 32 x 32 voxels; return their case folders."""
    from conftest import write_case

    rng = np.random.default_rng(3)
    for index in range(count):
        label = np.zeros((8, 32, 32), np.uint8)
        label[2:5, 8:16, 8:16] = 1 + index % 3
        write_case(root, f"case_{index:05d}", rng.integers(-1000, 1000, (8, 32, 32)), label)
    return sorted(root.iterdir())


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_dataset_copy_is_never_replaced(tmp_path: Path) -> None:
    write_small_dataset(tmp_path / "data")
    cases = find_cases(tmp_path / "data", "kits23")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "data", copy)
    before = folder_bytes(copy)
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"case_00000 is not a kitsjobs cache case folder.*nor are 2 other"):
            preprocess_cases(cases, copy, SMALL_SETTINGS, progress=False, overwrite=overwrite)
    assert folder_bytes(copy) == before
    assert sorted(path.name for path in copy.iterdir()) == ["case_00000", "case_00001", "case_00002"]


def test_one_foreign_folder_stops_before_writing(tmp_path: Path) -> None:
    write_small_dataset(tmp_path / "data")
    cases = find_cases(tmp_path / "data", "kits23")
    cache = tmp_path / "cache"
    (cache / "case_00002").mkdir(parents=True)
    (cache / "case_00002" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"case_00002 is not a kitsjobs cache case folder.*--output"):
        preprocess_cases(cases, cache, SMALL_SETTINGS, progress=False)
    assert sorted(path.name for path in cache.iterdir()) == ["case_00002"]
    assert (cache / "case_00002" / "notes.txt").read_text() == "mine"


def test_other_settings_stop_without_overwrite(tmp_path: Path) -> None:
    write_small_dataset(tmp_path / "data")
    cases = find_cases(tmp_path / "data", "kits23")
    cache = tmp_path / "cache"
    preprocess_cases(cases, cache, SMALL_SETTINGS, progress=False)
    mtime_ns = (cache / "case_00000" / "image.npy").stat().st_mtime_ns
    other = PreprocessSettings(spacing_mm=(2.0, 0.5, 0.5), hu_max=300.0, body_threshold_hu=None)

    with pytest.raises(UserError) as caught:
        preprocess_cases(cases, cache, other, progress=False, output_option="data.cache_dir")
    message = str(caught.value)
    assert f"data.cache_dir {cache} contains case_00000 and 2 more case(s)" in message
    assert "spacing_mm [2.0, 1.0, 1.0] cached, [2.0, 0.5, 0.5] requested" in message
    assert "hu_max 400.0 cached, 300.0 requested" in message
    assert "--overwrite" in message
    assert (cache / "case_00000" / "image.npy").stat().st_mtime_ns == mtime_ns

    status = preprocess_cases(cases, cache, other, progress=False, overwrite=True)
    assert set(status.values()) == {"written"}
    assert all(is_up_to_date(cache / case.name, case, other) for case in cases)
    assert sorted(path.name for path in cache.iterdir()) == [case.name for case in cases]


def test_changed_source_rebuilds_case(tmp_path: Path) -> None:
    write_small_dataset(tmp_path / "data")
    cases = find_cases(tmp_path / "data", "kits23")
    cache = tmp_path / "cache"
    preprocess_cases(cases, cache, SMALL_SETTINGS, progress=False)
    stat = cases[1].image.stat()
    os.utime(cases[1].image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    status = preprocess_cases(cases, cache, SMALL_SETTINGS, progress=False)
    assert status == {"case_00000": "kept", "case_00001": "written", "case_00002": "kept"}


@pytest.mark.parametrize(
    ("label_value", "label_dtype"),
    [(9, np.uint8), (256, np.int16), (-1, np.int16)],
)
def test_invalid_label_values_not_cached(tmp_path: Path, label_value: int, label_dtype: type) -> None:
    # 256 and -1 would wrap to 0 and 255 in a cast to uint8 before the check.
    root = tmp_path / "data" / "case_00000"
    root.mkdir(parents=True)
    affine = np.diag([3.0, 1.5, 1.5, 1.0])
    label = np.zeros((8, 32, 32), label_dtype)
    label[2:5, 8:16, 8:16] = 1
    label[3, 10, 10] = label_value
    nib.save(nib.Nifti1Image(np.zeros((8, 32, 32), np.int16), affine), root / "imaging.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / "segmentation.nii.gz")
    cases = find_cases(tmp_path / "data", "kits23")

    with pytest.raises(UserError, match=rf"segmentation\.nii\.gz: label values {label_value} outside"):
        preprocess_cases(cases, tmp_path / "cache", SMALL_SETTINGS, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(UserError, match="relabel it"):
        prepare_arrays(cases[0], SMALL_SETTINGS, check_label=True)


def test_shifted_label_grid_not_cached(tmp_path: Path) -> None:
    (case_dir,) = write_small_dataset(tmp_path / "data", count=1)
    label_file = nib.load(case_dir / "segmentation.nii.gz")
    shifted = label_file.affine.copy()
    shifted[0, 3] += 20.0
    nib.save(nib.Nifti1Image(np.asarray(label_file.dataobj), shifted), case_dir / "segmentation.nii.gz")
    cases = find_cases(tmp_path / "data", "kits23")
    with pytest.raises(UserError, match=r"label affine differs from image affine \(largest difference 20 mm\)"):
        preprocess_cases(cases, tmp_path / "cache", SMALL_SETTINGS, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def exited_pid() -> int:
    """Return the pid of a child process that has exited and been reaped."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, timeout=60, check=True)
    return int(child.stdout)


def test_dead_process_temporaries_removed(tmp_path: Path) -> None:
    write_small_dataset(tmp_path / "data", count=1)
    cases = find_cases(tmp_path / "data", "kits23")
    cache = tmp_path / "cache"
    preprocess_cases(cases, cache, SMALL_SETTINGS, progress=False)
    host = socket.gethostname()
    dead = cache / f".case_00000.tmp-{host}-{exited_pid()}-0123456789ab"
    dead_other_case = cache / f".case_00042.old-{host}-{exited_pid()}-0123456789ab"
    alive = cache / f".case_00000.tmp-{host}-{os.getpid()}-0123456789ab"
    other_host_new = cache / ".case_00000.tmp-other-host-1-0123456789ab"
    other_host_old = cache / ".case_00000.tmp-other-host-2-0123456789ab"
    for folder in (dead, dead_other_case, alive, other_host_new, other_host_old):
        folder.mkdir()
        (folder / "image.npy").write_bytes(b"partial")
    os.utime(other_host_old, (0, 0))

    # Every case is up to date, so no case is rewritten.
    assert preprocess_cases(cases, cache, SMALL_SETTINGS, progress=False) == {"case_00000": "kept"}
    assert not dead.exists()
    assert not dead_other_case.exists()
    assert not other_host_old.exists()
    assert alive.is_dir()
    assert other_host_new.is_dir()


def test_launcher_names_config_keys(tmp_path: Path) -> None:
    from kitsjobs.config import Config
    from kitsjobs.job import load_training_data

    write_small_dataset(tmp_path / "data", count=2)
    cases = find_cases(tmp_path / "data", "kits23")
    config = Config()
    config.data.root = str(tmp_path / "data")
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.cache_jobs = 0
    with pytest.raises(UserError, match=r"^data\.cache_jobs=0 is invalid"):
        load_training_data(cases[:1], cases[1:], config)

    config.data.cache_jobs = 1
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    config.data.cache_dir = str(a_file)
    with pytest.raises(UserError, match=rf"^data\.cache_dir {a_file} is a file, not a folder"):
        load_training_data(cases[:1], cases[1:], config)
    assert a_file.read_text() == "keep"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the command in this process; return (exit status, stderr)."""
    from kitsjobs.preprocess import main

    try:
        status = main(args)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--spacing-mm", "0", "1", "1"], "argument --spacing-mm: must be greater than 0"),
        (["--hu-min", "400", "--hu-max", "-200"], "--hu-max -200 must be greater than --hu-min 400"),
        (["--hu-min", "nan"], "argument --hu-min: must be a finite number"),
        (["--jobs", "0"], "argument --jobs: must be at least 1"),
        (["--layout", "flat"], "for --layout flat (expected ROOT/volume/NAME.nii.gz and ROOT/seg/NAME.nii.gz), "
                               "but 1 in the kits23 layout (ROOT/CASE/imaging.nii.gz); pass --layout kits23"),
    ],
)
def test_cli_errors_name_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                 expected: str) -> None:
    write_small_dataset(tmp_path / "data", count=1)
    status, error = run_cli(["--input", str(tmp_path / "data"), "--output", str(tmp_path / "cache"), *extra], capsys)
    assert status == 2
    assert expected in error
    assert "data." not in error
    assert not (tmp_path / "cache").exists()


def test_cli_missing_input_names_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, error = run_cli(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "cache")], capsys)
    assert status == 2
    assert error == f"error: --input {tmp_path / 'nope'} not found; pass an existing dataset folder\n"


def test_cli_output_file_is_one_line(tmp_path: Path) -> None:
    write_small_dataset(tmp_path / "data", count=1)
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    result = subprocess.run(
        [sys.executable, "-m", "kitsjobs.preprocess", "--input", str(tmp_path / "data"), "--output", str(a_file)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == f"error: --output {a_file} is a file, not a folder; choose a folder for the cache"
    assert "Traceback" not in result.stderr
    assert a_file.read_text() == "keep"


def test_cli_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from kitsjobs.preprocess import main

    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("mapped to 0 (default: -200.0)", "mapped to 1 (default: 400.0)", "above this HU (default: -500.0)",
                  "images (default: float16)", "worker processes (default: 1)", "layout (default: kits23)"):
        assert fragment in text


# Runs the command with every case but case_00000 blocked in its worker, so that Ctrl-C
# finds work in progress. Spawned workers run this file's top level too, so they get the patch.
SLOW_CLI = """
import sys, time
import kitsjobs.data.cache as cache

_prepare_arrays = cache.prepare_arrays

def blocked_prepare_arrays(case, *args, **kwargs):
    if case.name != "case_00000":
        time.sleep(600)
    return _prepare_arrays(case, *args, **kwargs)

cache.prepare_arrays = blocked_prepare_arrays

if __name__ == "__main__":
    from kitsjobs.preprocess import main
    sys.exit(main(sys.argv[1:]))
"""


def test_cli_interrupt_is_one_line(tmp_path: Path) -> None:
    write_small_dataset(tmp_path / "data", count=3)
    cache = tmp_path / "cache"
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    process = subprocess.Popen(
        [sys.executable, str(script), "--input", str(tmp_path / "data"), "--output", str(cache), "--jobs", "2"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        # Wait until case_00000 is written and both workers hold a blocked case.
        for _ in range(1200):
            if (cache / "case_00000").is_dir() and len(list(cache.glob(".case_*.tmp-*"))) == 2:
                break
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
        else:
            pytest.fail("the workers never started their cases")
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()

    assert process.returncode == 130
    assert stderr.splitlines()[-1] == "interrupted; rerun the same command to resume (cases already written are kept)"
    assert "Traceback" not in stderr
    assert "KeyboardInterrupt" not in stderr
    assert sorted(path.name for path in cache.iterdir()) == ["case_00000"]
    assert is_up_to_date(cache / "case_00000", find_cases(tmp_path / "data", "kits23")[0], PreprocessSettings())


def write_nan_case(root: Path) -> Path:
    """Write one case whose float32 image has a NaN and an infinite voxel; return its image file."""
    case = root / "case_00000"
    case.mkdir(parents=True)
    affine = np.diag([3.0, 1.5, 1.5, 1.0])
    image = np.full((8, 32, 32), -100.0, np.float32)
    image[2, 3, 4] = np.nan
    image[5, 6, 7] = -np.inf
    label = np.zeros((8, 32, 32), np.uint8)
    label[2:5, 8:16, 8:16] = 1
    nib.save(nib.Nifti1Image(image, affine), case / "imaging.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), case / "segmentation.nii.gz")
    return case / "imaging.nii.gz"


def test_nan_intensities_not_cached(tmp_path: Path) -> None:
    from conftest import write_case

    image_file = write_nan_case(tmp_path / "data")
    write_case(tmp_path / "data", "case_00001", np.zeros((8, 32, 32)), np.ones((8, 32, 32)))
    cases = find_cases(tmp_path / "data", "kits23")

    with pytest.raises(UserError) as raised:
        preprocess_cases(cases, tmp_path / "cache", SMALL_SETTINGS, progress=False)
    assert str(raised.value) == (
        f"1 case(s) failed to preprocess: image {image_file}: 2 NaN or infinite intensities; "
        "replace them with valid HU values or leave the image out"
    )
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == ["case_00001"]


def test_check_intensities_flag_for_prediction(tmp_path: Path) -> None:
    image_file = write_nan_case(tmp_path / "data")
    unlabeled = Case("case_00000", image_file, None)
    with pytest.raises(UserError, match=rf"^image {image_file}: 2 NaN or infinite intensities"):
        prepare_arrays(unlabeled, SMALL_SETTINGS, check_intensities=True)
    # Without the flag the NaN reaches the resampled image, which is what the check prevents.
    image, _, _, _ = prepare_arrays(unlabeled, SMALL_SETTINGS)
    assert np.isnan(image).any()


def test_finite_intensities_pass_by_slab() -> None:
    volume = np.zeros((40, 4, 4), np.float32)
    check_finite_intensities(Path("a.nii.gz"), volume)
    check_finite_intensities(Path("b.nii.gz"), np.zeros((3, 4, 4), np.int16))
    volume[33, 1, 2] = np.inf
    volume[0, 0, 0] = np.nan
    with pytest.raises(UserError, match=r"^image a\.nii\.gz: 2 NaN or infinite intensities"):
        check_finite_intensities(Path("a.nii.gz"), volume)


def test_cli_output_without_parent_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_small_dataset(tmp_path / "data", count=1)
    output = tmp_path / "nope" / "cache"
    status, error = run_cli(["--input", str(tmp_path / "data"), "--output", str(output)], capsys)
    assert status == 2
    assert error == f"error: --output {output}: folder {tmp_path / 'nope'} not found; create it first or choose another path\n"
    assert not (tmp_path / "nope").exists()


def test_launcher_cache_without_parent_names_key(tmp_path: Path) -> None:
    write_small_dataset(tmp_path / "data", count=2)
    cases = find_cases(tmp_path / "data", "kits23")
    cache = tmp_path / "nope" / "cache"
    with pytest.raises(UserError, match=rf"^data\.cache_dir {cache}: folder {tmp_path / 'nope'} not found"):
        preprocess_cases(cases, cache, SMALL_SETTINGS, progress=False, output_option="data.cache_dir")
    assert not (tmp_path / "nope").exists()


def test_null_settings_read_as_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_small_dataset(tmp_path / "data", count=1)
    cache = tmp_path / "cache"
    base = ["--input", str(tmp_path / "data"), "--output", str(cache)]
    assert run_cli([*base, "--spacing-mm", "3", "1", "1"], capsys)[0] == 0
    status, error = run_cli([*base, "--no-crop"], capsys)
    assert status == 2
    assert "spacing_mm [3.0, 1.0, 1.0] cached, each case's own spacing requested" in error
    assert "body_threshold_hu -500.0 cached, no body crop requested" in error
    assert " null " not in error
