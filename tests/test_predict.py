"""The prediction command: layouts, ensembles, mirroring, geometry and bad input."""

from __future__ import annotations

import pickle
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
    checkpoints = [_checkpoint(tmp_path / "ck0", 0), _checkpoint(tmp_path / "ck1", 1)]
    result = subprocess.run(
        [sys.executable, "-m", "kitsjobs.predict", "--checkpoint", *map(str, checkpoints),
         "--input", str(tmp_path / "flat"), "--output", str(tmp_path / "out"), "--overlap", "0.25",
         "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert nib.load(tmp_path / "out" / "scan.nii.gz").shape == (7, 24, 24)


def _predict_cli(checkpoint: Path, images: Path, output: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m kitsjobs.predict`` on the CPU and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "kitsjobs.predict", "--checkpoint", str(checkpoint), "--input", str(images),
         "--output", str(output), "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def _fake_checkpoints(folder: Path, dataset: Path, real: Path | None = None) -> dict[str, Path]:
    """Files named .pt that are not checkpoints: text, a NIfTI image, an empty file, a plain
    pickle and, given a ``real`` checkpoint, its first and second halves cut off."""
    folder.mkdir(parents=True, exist_ok=True)
    fakes = {"text checkpoint": folder / "text.pt", "nifti checkpoint": folder / "nifti.pt",
             "empty checkpoint": folder / "empty.pt", "pickle checkpoint": folder / "pickle.pt"}
    fakes["text checkpoint"].write_text("model weights go here\n")
    fakes["nifti checkpoint"].write_bytes((dataset / "case_00000" / "imaging.nii.gz").read_bytes())
    fakes["empty checkpoint"].write_bytes(b"")
    with open(fakes["pickle checkpoint"], "wb") as stream:
        pickle.dump({"model": {}, "config": {}}, stream)
    if real is not None:
        payload = real.read_bytes()
        fakes["checkpoint cut early"] = folder / "cut_early.pt"
        fakes["checkpoint cut early"].write_bytes(payload[:200])
        fakes["checkpoint cut late"] = folder / "cut_late.pt"
        fakes["checkpoint cut late"].write_bytes(payload[:len(payload) // 2])
    return fakes


BAD_INPUT_CASES = ["missing checkpoint", "output inside input", "bad overlap", "output is a file",
                   "text checkpoint", "nifti checkpoint", "empty checkpoint", "missing input",
                   "pickle checkpoint", "checkpoint cut early", "checkpoint cut late", "checkpoint folder",
                   "same checkpoint twice", "checkpoint copy", "checkpoint symlink"]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_cli_bad_input_is_one_line(case: str, dataset: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "ck", 0)
    fakes = _fake_checkpoints(tmp_path / "fake", dataset, real=checkpoint)
    (tmp_path / "file").write_text("not a folder\n")
    (tmp_path / "copy.pt").write_bytes(checkpoint.read_bytes())
    (tmp_path / "link.pt").symlink_to(checkpoint)
    args = {"missing checkpoint": ["--checkpoint", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "out")],
            "output inside input": ["--checkpoint", str(checkpoint), "--output", str(dataset / "preds")],
            "bad overlap": ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--overlap", "1.5"],
            "output is a file": ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "file")],
            "missing input": ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"),
                              "--input", str(tmp_path / "nope")],
            "checkpoint folder": ["--checkpoint", str(tmp_path / "ck"), "--output", str(tmp_path / "out")],
            "same checkpoint twice": ["--checkpoint", str(checkpoint), str(checkpoint),
                                      "--output", str(tmp_path / "out")],
            "checkpoint copy": ["--checkpoint", str(checkpoint), str(tmp_path / "copy.pt"),
                                "--output", str(tmp_path / "out")],
            "checkpoint symlink": ["--checkpoint", str(checkpoint), str(tmp_path / "link.pt"),
                                   "--output", str(tmp_path / "out")]}
    for name, path in fakes.items():
        args[name] = ["--checkpoint", str(path), "--output", str(tmp_path / "out")]
    expected = {"missing checkpoint": "--checkpoint", "output inside input": "--output", "bad overlap": "--overlap",
                "output is a file": f"--output {tmp_path / 'file'} is a file", "text checkpoint": "--checkpoint",
                "nifti checkpoint": "--checkpoint", "empty checkpoint": "--checkpoint",
                "missing input": f"--input {tmp_path / 'nope'} not found",
                "pickle checkpoint": "not a PyTorch file",
                "checkpoint cut early": "the file is truncated or damaged: PytorchStreamReader failed",
                "checkpoint cut late": "the file is truncated or damaged",
                "checkpoint folder": f"is a folder, not a checkpoint file; pass the file inside it, "
                                     f"e.g. --checkpoint {tmp_path / 'ck' / 'best.pt'}",
                "same checkpoint twice": f"--checkpoint {checkpoint} is given twice",
                "checkpoint copy": f"--checkpoint {tmp_path / 'copy.pt'} has the same content as {checkpoint}",
                "checkpoint symlink": f"--checkpoint {checkpoint} and {tmp_path / 'link.pt'} are the same file"}
    result = subprocess.run([sys.executable, "-m", "kitsjobs.predict", "--input", str(dataset), *args[case]],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert expected[case] in result.stderr
    assert "Traceback" not in result.stderr
    assert "weights_only=False" not in result.stderr
    assert "UserWarning" not in result.stderr
    # torch's own text is cut to its first sentence, never in the middle of one.
    assert "If you are seeing this error" not in result.stderr
    assert not (dataset / "preds").exists()
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "file").read_text() == "not a folder\n"


@pytest.mark.parametrize("flag", ["--sw-batch-size 0", "--sw-batch-size -2", "--gpus-per-task -1"])
def test_cli_rejects_invalid_counts(flag: str, dataset: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "ck", 0)
    result = subprocess.run(
        [sys.executable, "-m", "kitsjobs.predict", "--checkpoint", str(checkpoint), "--input", str(dataset),
         "--output", str(tmp_path / "out"), *flag.split()],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert f"argument {flag.split()[0]}: must be" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_cuda_without_gpu_names_flag(dataset: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible, so --device cuda is valid here")
    checkpoint = _checkpoint(tmp_path / "ck", 0)
    result = subprocess.run(
        [sys.executable, "-m", "kitsjobs.predict", "--checkpoint", str(checkpoint), "--input", str(dataset),
         "--output", str(tmp_path / "out"), "--device", "cuda"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: --device cuda: no CUDA device is visible")
    assert "--device auto" in result.stderr
    assert "trainer.device" not in result.stderr


def test_cli_keeps_existing_predictions(dataset: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "ck", 0)
    output = tmp_path / "out"
    output.mkdir()
    earlier = output / "case_00000.nii.gz"
    earlier.write_bytes(b"another model's prediction")
    command = [sys.executable, "-m", "kitsjobs.predict", "--checkpoint", str(checkpoint), "--input", str(dataset),
               "--output", str(output), "--device", "cpu"]

    rejected = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rejected.returncode == 2
    assert rejected.stderr.count("\n") == 1, rejected.stderr
    assert f"--output {output} already contains 1 of the 2 file(s) to write ({earlier})" in rejected.stderr
    assert "--overwrite" in rejected.stderr
    assert earlier.read_bytes() == b"another model's prediction"
    assert sorted(path.name for path in output.iterdir()) == ["case_00000.nii.gz"]

    replaced = subprocess.run([*command, "--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert replaced.returncode == 0, replaced.stderr
    for name in ("case_00000", "case_00001"):
        assert nib.load(output / f"{name}.nii.gz").shape == nib.load(dataset / name / "imaging.nii.gz").shape


def test_cli_never_replaces_copied_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images, copy = tmp_path / "names_in", tmp_path / "names_copy"
    for folder in (images, copy):
        folder.mkdir()
    image = nib.Nifti1Image(rng.integers(-1000, 500, (6, 20, 20)).astype(np.int16), np.diag([2.0, 1, 1, 1]))
    nib.save(image, images / "scan.nii.gz")
    (copy / "scan.nii.gz").write_bytes((images / "scan.nii.gz").read_bytes())
    checkpoint = _checkpoint(tmp_path / "ck", 0)

    result = _predict_cli(checkpoint, images, copy)

    assert result.returncode == 2
    assert "already contains 1 of the 1 file(s)" in result.stderr
    assert (copy / "scan.nii.gz").read_bytes() == (images / "scan.nii.gz").read_bytes()
    assert nib.load(copy / "scan.nii.gz").get_data_dtype() == np.int16


@pytest.mark.parametrize("case", ["existing predictions", "text checkpoint"])
def test_slurm_checks_before_sbatch(case: str, dataset: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "ck", 0)
    output = tmp_path / "out"
    output.mkdir()
    if case == "existing predictions":
        (output / "case_00001.nii.gz").write_bytes(b"earlier prediction")
    else:
        checkpoint = _fake_checkpoints(tmp_path / "fake", dataset)["text checkpoint"]

    result = subprocess.run(
        [sys.executable, "-m", "kitsjobs.predict", "--checkpoint", str(checkpoint), "--input", str(dataset),
         "--output", str(output), "--slurm", "debug", "--templates-dir", str(REPO / "slurm_templates")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    expected = "already contains 1 of the 2 file(s)" if case == "existing predictions" else "--checkpoint"
    assert expected in result.stderr
    assert not (output / ".kitsjobs_predict").exists()


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

    # A second submission into the same folder needs --overwrite, checked before sbatch.
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "already contains 2 of the 2 file(s)" in again.stderr
    replaced = subprocess.run([*command, "--overwrite", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert replaced.returncode == 0, replaced.stderr
    assert "#SBATCH --array=0-1%" in replaced.stdout


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


@pytest.mark.parametrize("flags", [["--dry-run"], ["--cases-per-task", "2"], ["--gpus-per-task", "0"],
                                   ["--templates-dir", "slurm_templates"], ["--cases-per-task", "2", "--dry-run"]])
def test_cli_slurm_flags_need_slurm(flags: list[str], dataset: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "ck", 0)
    result = subprocess.run(
        [sys.executable, "-m", "kitsjobs.predict", "--checkpoint", str(checkpoint), "--input", str(dataset),
         "--output", str(tmp_path / "out"), "--device", "cpu", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    given = ", ".join(flag for flag in flags if flag.startswith("--"))
    assert result.stderr.startswith(f"error: {given} ")
    assert "add --slurm TEMPLATE" in result.stderr
    assert not (tmp_path / "out").exists()


def _bad_images(folder: Path) -> None:
    """A good 3D image, a text file, a 2D image and a 4D image, all named .nii.gz."""
    rng = np.random.default_rng(3)
    folder.mkdir()
    good = nib.Nifti1Image(rng.integers(-1000, 500, (6, 20, 20)).astype(np.int16), np.diag([2.0, 1, 1, 1]))
    nib.save(good, folder / "a_good.nii.gz")
    (folder / "b_text.nii.gz").write_text("not an image\n")
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), folder / "c_flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 8, 8, 2), np.int16), np.eye(4)), folder / "d_series.nii.gz")


def test_cli_lists_every_bad_image_first(tmp_path: Path) -> None:
    _bad_images(tmp_path / "images")
    checkpoint = _checkpoint(tmp_path / "ck", 0)
    result = subprocess.run(
        [sys.executable, "-m", "kitsjobs.predict", "--checkpoint", str(checkpoint), "--input",
         str(tmp_path / "images"), "--output", str(tmp_path / "out"), "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "error: 3 of the 4 image(s) cannot be predicted; nothing was written:"
    assert lines[1].startswith(f"  b_text: cannot read {tmp_path / 'images' / 'b_text.nii.gz'} as NIfTI")
    assert lines[2] == (f"  c_flat: {tmp_path / 'images' / 'c_flat.nii.gz'} has shape (64, 64), but predict needs "
                        "a 3D CT volume (z, y, x); save it as a 3D NIfTI image or remove it")
    assert lines[3].startswith("  d_series: ")
    assert "(4, 8, 8, 2)" in lines[3]
    assert lines[4] == "replace or remove these files in --input, then run the command again"
    assert len(lines) == 5
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_resumes_after_cut_image(dataset: Path, tmp_path: Path) -> None:
    images, output = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for name in ("case_00000", "case_00001"):
        (images / f"{name}.nii.gz").write_bytes((dataset / name / "imaging.nii.gz").read_bytes())
    whole = (images / "case_00001.nii.gz").read_bytes()
    # The gzip stream is cut after the header, so only reading the voxels fails.
    (images / "case_00001.nii.gz").write_bytes(whole[:len(whole) // 3])
    checkpoint = _checkpoint(tmp_path / "ck", 0)
    command = [sys.executable, "-m", "kitsjobs.predict", "--checkpoint", str(checkpoint), "--input", str(images),
               "--output", str(output), "--device", "cpu"]

    failed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2
    assert (f"error: 1 of the 2 image(s) failed while being predicted; the other 1 prediction(s) were written "
            f"to {output}:") in failed.stderr
    assert f"  case_00001: cannot read {images / 'case_00001.nii.gz'}" in failed.stderr
    assert "--skip-existing" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert sorted(path.name for path in output.iterdir()) == ["case_00000.nii.gz"]
    (output / "case_00000.nii.gz").write_bytes(b"kept, not recomputed")

    (images / "case_00001.nii.gz").write_bytes(whole)
    resumed = subprocess.run([*command, "--skip-existing"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "1 prediction(s) written" in resumed.stdout
    assert (output / "case_00000.nii.gz").read_bytes() == b"kept, not recomputed"
    assert nib.load(output / "case_00001.nii.gz").shape == nib.load(dataset / "case_00001" / "imaging.nii.gz").shape

    both = subprocess.run([*command, "--skip-existing", "--overwrite"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert both.returncode == 2
    assert "not allowed with argument" in both.stderr


def test_cli_rejects_nan_intensities(dataset: Path, tmp_path: Path) -> None:
    images, output = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    source = nib.load(dataset / "case_00000" / "imaging.nii.gz")
    voxels = np.asarray(source.dataobj, dtype=np.float32)
    voxels[0, 0, :2] = np.nan
    header = source.header.copy()
    header.set_data_dtype(np.float32)
    nib.save(nib.Nifti1Image(voxels, source.affine, header), images / "case_00000.nii.gz")
    checkpoint = _checkpoint(tmp_path / "ck", 0)

    result = _predict_cli(checkpoint, images, output)

    assert result.returncode == 2
    assert "2 NaN or infinite intensities" in result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists() or not any(output.iterdir())


@pytest.mark.slurm
@pytest.mark.parametrize("case", ["too many GPUs", "unknown template", "bad image"])
def test_slurm_errors_name_predict_flags(case: str, slurm_cluster: str, dataset: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "model", seed=0)
    images = dataset
    if case == "bad image":
        _bad_images(tmp_path / "images")
        images = tmp_path / "images"
    flags = {"too many GPUs": ["--slurm", "debug", "--gpus-per-task", "5", "--dry-run"],
             "unknown template": ["--slurm", "nosuch"],
             "bad image": ["--slurm", "debug"]}[case]
    result = subprocess.run(
        [sys.executable, "-m", "kitsjobs.predict", "--checkpoint", str(checkpoint), "--input", str(images),
         "--output", str(tmp_path / "out"), "--templates-dir", str(REPO / "slurm_templates"), *flags],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "slurm." not in result.stderr
    assert not (tmp_path / "out").exists()
    if case == "too many GPUs":
        assert result.stderr == (
            f"error: --gpus-per-task 5 is above the limit of 1 GPU(s) per task set by max_gpus_per_job in "
            f"{REPO / 'slurm_templates' / 'debug.yaml'}; use --gpus-per-task 1 or less (0 runs the task on CPUs)\n")
    elif case == "unknown template":
        assert "available: ['debug', 'ippmed-a40']" in result.stderr
        assert "pass one of them to --slurm, or point --templates-dir" in result.stderr
    else:
        assert result.stderr.startswith("error: 3 of the 4 image(s) cannot be predicted")


def test_repeated_checkpoint_flag_adds_models(tmp_path: Path) -> None:
    from kitsjobs.predict import parse_args

    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    args = parse_args(["--checkpoint", str(first), "--checkpoint", str(second), "--input", "in", "--output", "out"])

    assert args.checkpoint == [first, second]
