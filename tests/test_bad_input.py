"""Broken data, wrong overrides, reused folders and failing disks: one line, nothing lost."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO, write_case
from kitsjobs.config import Config, config_to_dict
from kitsjobs.configstore import register_configs, reserve_unique_dir
from kitsjobs.data.phantom import write_demo_dataset
from kitsjobs.errors import UserError
from kitsjobs.fsutil import atomic_write_json
from kitsjobs.job import format_size, slurm_memory_grant_bytes
from kitsjobs.train.checkpoint import LATEST, load_latest, save_checkpoint

SMOKE = ["experiment=smoke", "data.demo_cases=0", "data.num_folds=2", "trainer.max_steps=2",
         "trainer.val_every_steps=2", "trainer.checkpoint_every_steps=2", "trainer.predict_validation=false"]


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    env["KITSJOBS_DEMO_DIR"] = str(cwd / "no-demo")
    return subprocess.run([sys.executable, "-m", "kitsjobs.launch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [line] = error_lines(result)
    for fragment in fragments:
        assert fragment in line
    return line


def tree_digest(root: Path) -> dict[str, tuple[str, int, int]]:
    """Map every file under ``root`` to (SHA-256, size, mtime in ns)."""
    digest = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                   stat.st_size, stat.st_mtime_ns)
    return digest


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    write_demo_dataset(root, n_cases=2, shape=(16, 32, 32), progress=False)
    return root


def mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs, unmounted at teardown."""
    folder = tmp_path / "tmpfs"
    mount_tmpfs(folder, "512k")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], timeout=30, check=True)


def fill_disk(folder: Path) -> None:
    descriptor = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(descriptor, b"\0" * 4096):
            pass
    except OSError as error:
        assert error.errno == 28, error
    finally:
        os.close(descriptor)


# --- the dataset check before training -----------------------------------------------


def test_training_refuses_label_seven(tmp_path: Path, phantom: Path) -> None:
    root = tmp_path / "data"
    label = np.zeros((8, 16, 16), np.uint8)
    label[2:4, 4:8, 4:8] = 1
    write_case(root, "case_00000", np.zeros((8, 16, 16)), label)
    label[0, 0, 0] = 7
    write_case(root, "case_00001", np.zeros((8, 16, 16)), label)
    result = launch([*SMOKE, "data=kits23", f"data.root={root}", "hydra.run.dir=run"], tmp_path)
    assert_one_line_error(result, "dataset check found 1 error(s)",
                          "case_00001/segmentation.nii.gz: label values 7 outside", "data.check=warn")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_training_refuses_bad_headers_before_loading(tmp_path: Path) -> None:
    root = tmp_path / "data"
    label = np.ones((8, 16, 16), np.uint8)
    write_case(root, "case_00000", np.zeros((8, 16, 16)), label)
    write_case(root, "case_00001", np.zeros((16, 16)), label)
    write_case(root, "case_00002", np.zeros((8, 16, 16)), label, spacing_mm=(3.0, 1.5, 15.0))
    result = launch([*SMOKE, "data=kits23", f"data.root={root}", "hydra.run.dir=run"], tmp_path)
    line = assert_one_line_error(result, "dataset check found 3 error(s)")
    assert "case_00001/imaging.nii.gz: not a 3D volume" in line
    assert "case_00002/imaging.nii.gz: voxel spacing (3, 1.5, 15) mm is over 10 mm" in line
    assert "case_00002/segmentation.nii.gz: voxel spacing (3, 1.5, 15) mm is over 10 mm" in line
    assert "load train" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_check_warn_lets_training_run(tmp_path: Path, phantom: Path) -> None:
    root = tmp_path / "data"
    for case in sorted(phantom.iterdir()):
        target = root / case.name
        target.mkdir(parents=True)
        for file in case.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
    write_case(root, "case_00009", np.zeros((16, 32, 32)), np.ones((16, 32, 32)), spacing_mm=(12.0, 1.0, 1.0))
    result = launch([*SMOKE, "data=kits23", f"data.root={root}", "data.check=warn", "hydra.run.dir=run"],
                    tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "run" / "launch.log").read_text()
    assert "dataset check: case_00009" in log
    assert "over 10 mm" in log
    assert (tmp_path / "run" / "checkpoints" / LATEST).exists()


# --- config mistakes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["trainer.max_stepz=3"], ["unknown config key 'trainer.max_stepz'", "max_steps", "val_every_steps"]),
        (["trainer.max_steps=many"], ["invalid value for trainer.max_steps", "'many'", "expected int"]),
        (["trainer.amp=maybe"], ["invalid value for trainer.amp", "expected bool"]),
        (["model=foo"], ["model=foo is not an option of config group 'model'", "segresnet", "unet"]),
        (["data=kits23", "data.root=null"], ["data.root is not set"]),
        (["data.check=strict"], ["data.check='strict' is invalid; choose one of error, warn, off"]),
        (["trainer.max_steps=[1"], ["cannot parse override 'trainer.max_steps=[1'"]),
    ],
)
def test_config_mistake_is_one_line(args: list[str], fragments: list[str], tmp_path: Path, phantom: Path) -> None:
    result = launch([*SMOKE, f"data.root={phantom}", *args, "hydra.run.dir=run"], tmp_path)
    assert_one_line_error(result, *fragments)
    assert result.stderr.count("\n") <= 2
    assert "HYDRA_FULL_ERROR" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_model_group_lists_config_files(tmp_path: Path) -> None:
    result = launch(["model=foo"], tmp_path)
    line = assert_one_line_error(result)
    options = sorted(path.stem for path in (REPO / "conf" / "model").glob("*.yaml"))
    assert line.endswith(f"choose one of: {', '.join(options)}")


def test_help_and_cfg_still_work(tmp_path: Path) -> None:
    shown = launch(["--cfg", "job", "model=segresnet"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["model"]["name"] == "segresnet"
    helped = launch(["--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "model" in helped.stdout
    assert not (tmp_path / "outputs").exists()


# --- run and sweep folders ---------------------------------------------------------


def test_unique_dir_adds_suffix(tmp_path: Path) -> None:
    base = str(tmp_path / "outputs" / "12-00-00")
    assert reserve_unique_dir(base) == base
    assert reserve_unique_dir(base) == f"{base}_2"
    assert reserve_unique_dir(base) == f"{base}_3"
    assert sorted(path.name for path in (tmp_path / "outputs").iterdir()) == ["12-00-00", "12-00-00_2", "12-00-00_3"]


def test_default_run_dirs_differ_in_same_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    register_configs()
    folders = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for _ in range(3):
            config = compose("config", return_hydra_config=True)
            folders.append(OmegaConf.select(config, "hydra.run.dir"))
            # A second read of the same config keeps its folder.
            assert OmegaConf.select(config, "hydra.run.dir") == folders[-1]
    assert len(set(folders)) == 3
    for folder in folders:
        assert (tmp_path / folder).is_dir()


def write_earlier_run(run_dir: Path, config: dict) -> dict[str, tuple[str, int, int]]:
    """Fake the results of an earlier run: its config.yaml, a latest checkpoint and metrics."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    save_checkpoint(run_dir / "checkpoints", {"step": torch.tensor(7)})
    atomic_write_json(run_dir / "metrics.json", {"mean": {"dice_tumor": 0.5}})
    return tree_digest(run_dir)


def test_other_config_in_run_folder_is_refused(tmp_path: Path, phantom: Path) -> None:
    shown = launch(["--cfg", "job", *SMOKE, f"data.root={phantom}", "model=segresnet"], tmp_path)
    before = write_earlier_run(tmp_path / "run", yaml.safe_load(shown.stdout))
    result = launch([*SMOKE, f"data.root={phantom}", "model=unet", "hydra.run.dir=run"], tmp_path)
    assert_one_line_error(result, f"run folder {tmp_path / 'run'} contains a run of another config",
                          "model.name: 'segresnet' then, 'unet' now", "pass a new hydra.run.dir")
    after = tree_digest(tmp_path / "run")
    for name in ("config.yaml", "checkpoints/latest.pt", "metrics.json"):
        assert after[name] == before[name], name


def test_resume_false_in_run_folder_is_refused(tmp_path: Path, phantom: Path) -> None:
    before = write_earlier_run(tmp_path / "run", config_to_dict(Config()))
    result = launch([*SMOKE, f"data.root={phantom}", "trainer.resume=false", "hydra.run.dir=run"], tmp_path)
    assert_one_line_error(result, "trainer.resume=false would overwrite", "checkpoints")
    assert tree_digest(tmp_path / "run")["checkpoints/latest.pt"] == before["checkpoints/latest.pt"]


def test_folder_of_other_files_is_refused(tmp_path: Path, phantom: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    result = launch([*SMOKE, f"data.root={phantom}", "hydra.run.dir=run"], tmp_path)
    assert_one_line_error(result, "already contains notes.txt and no kitsjobs config.yaml")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_existing_sweep_folder_is_refused(tmp_path: Path, phantom: Path) -> None:
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("earlier sweep\n")
    result = launch(["-m", *SMOKE, f"data.root={phantom}", "model=unet,segresnet", "hydra.sweep.dir=sweep"],
                    tmp_path)
    assert_one_line_error(result, "sweep folder sweep already exists and is not empty")
    assert (sweep / "multirun.yaml").read_text() == "earlier sweep\n"
    assert sorted(path.name for path in sweep.iterdir()) == ["0", "multirun.yaml"]


# --- input data stays untouched ---------------------------------------------------


def test_smoke_run_leaves_read_only_data_identical(tmp_path: Path, phantom: Path) -> None:
    root = tmp_path / "data"
    subprocess.run(["cp", "-a", str(phantom), str(root)], check=True, timeout=60)
    before = tree_digest(root)
    subprocess.run(["chmod", "-R", "a-w", str(root)], check=True, timeout=60)
    try:
        result = launch(["experiment=smoke", "data=kits23", f"data.root={root}", "data.num_folds=2",
                         "trainer.max_steps=2", "hydra.run.dir=run"], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (tmp_path / "run" / "metrics.json").exists()
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(root)], check=True, timeout=60)
    # Tests run as root, for whom chmod does not stop writes: the hashes and mtimes prove it.
    assert tree_digest(root) == before
    assert sorted(path.name for path in root.iterdir()) == sorted(path.name for path in phantom.iterdir())


# --- full disk and read-only output folder ----------------------------------------


def test_full_disk_keeps_last_checkpoint(small_tmpfs: Path) -> None:
    folder = small_tmpfs / "run" / "checkpoints"
    save_checkpoint(folder, {"step": torch.tensor(1), "weights": torch.zeros(1000)})
    fill_disk(small_tmpfs)
    with pytest.raises(UserError) as raised:
        save_checkpoint(folder, {"step": torch.tensor(2), "weights": torch.zeros(100_000)})
    message = str(raised.value)
    assert str(folder / ".staged.pt") in message
    assert "No space left on device (ENOSPC)" in message
    assert int(load_latest(folder)["step"]) == 1
    assert sorted(path.name for path in folder.iterdir()) == [LATEST]


def test_full_disk_metrics_write_is_user_error(small_tmpfs: Path) -> None:
    target = small_tmpfs / "metrics.json"
    atomic_write_json(target, {"mean": 0.5})
    fill_disk(small_tmpfs)
    with pytest.raises(UserError, match="cannot write .*metrics.json: No space left on device"):
        atomic_write_json(target, {"mean": 0.6, "cases": ["x" * 1000] * 1000})
    assert target.read_text() == '{\n  "mean": 0.5\n}\n'


def test_read_only_folder_keeps_checkpoint(small_tmpfs: Path) -> None:
    folder = small_tmpfs / "run" / "checkpoints"
    save_checkpoint(folder, {"step": torch.tensor(3)})
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True, timeout=30)
    with pytest.raises(UserError, match="Read-only file system \\(EROFS\\)"):
        save_checkpoint(folder, {"step": torch.tensor(4)})
    assert int(load_latest(folder)["step"]) == 3


def test_read_only_output_folder_is_one_line(small_tmpfs: Path, phantom: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True, timeout=30)
    result = launch([*SMOKE, f"data.root={phantom}", f"hydra.run.dir={small_tmpfs / 'run'}"], small_tmpfs.parent)
    assert_one_line_error(result, str(small_tmpfs / "run"), "Read-only file system")


def test_malformed_slurm_memory_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kitsjobs.job"):
        assert slurm_memory_grant_bytes({"SLURM_MEM_PER_NODE": "abc"}) is None
        assert slurm_memory_grant_bytes({"SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_ON_NODE": "x"}) is None
    assert "SLURM_MEM_PER_NODE='abc' is not a whole number" in caplog.text
    assert "SLURM_CPUS_ON_NODE='x'" in caplog.text


def test_size_below_one_gib_in_mib() -> None:
    assert format_size(20 * 2**20) == "20 MiB"
    assert format_size(2.5 * 2**30) == "2.5 GiB"


# --- numbers out of range, run folders in the wrong place ------------------------


def folder_state(root: Path) -> tuple[list[str], dict[str, tuple[str, int, int]]]:
    """Return every path under ``root`` (folders included) and the digest of its files."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*")), tree_digest(root)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=nan", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("trainer.max_steps=-3", "trainer.max_steps"),
        ("trainer.val_every_steps=0", "trainer.val_every_steps"),
        ("trainer.checkpoint_every_steps=0", "trainer.checkpoint_every_steps"),
        ("trainer.sw_overlap=1.0", "trainer.sw_overlap"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.num_folds=1", "data.num_folds"),
        ("data.fold=2", "data.fold"),
        ("data.patch_size=[0,32,32]", "data.patch_size"),
        ("data.class_ratios=[0,0,0,0]", "data.class_ratios"),
    ],
)
def test_out_of_range_number_is_one_line(override: str, key: str, tmp_path: Path, phantom: Path) -> None:
    result = launch([*SMOKE, f"data.root={phantom}", override, "hydra.run.dir=run"], tmp_path)
    line = assert_one_line_error(result, key, "is invalid; use")
    assert line.startswith(f"error: {key}=")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("backend", [["launcher=local"], ["launcher=slurm", "slurm=debug", "--dry-run"]])
def test_sweep_with_bad_task_runs_nothing(backend: list[str], tmp_path: Path, phantom: Path) -> None:
    result = launch(["-m", *SMOKE, f"data.root={phantom}", "optim.lr=1e-3,-1", *backend,
                     "hydra.sweep.dir=sweep"], tmp_path)
    assert_one_line_error(result, "optim.lr=-1", "is invalid")
    assert "#SBATCH" not in result.stdout
    assert not (tmp_path / "sweep").exists()


@pytest.fixture
def own_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_demo_dataset(root, n_cases=2, shape=(16, 32, 32), progress=False)
    return root


@pytest.mark.parametrize("through_link", [False, True])
def test_run_dir_inside_dataset_is_rejected(through_link: bool, tmp_path: Path, own_dataset: Path) -> None:
    before = folder_state(own_dataset)
    named = own_dataset
    if through_link:
        named = tmp_path / "link"
        named.symlink_to(own_dataset)
    result = launch([*SMOKE, "data=kits23", f"data.root={own_dataset}", f"hydra.run.dir={named / 'run'}"],
                    tmp_path)
    assert_one_line_error(result, f"hydra.run.dir={named / 'run'}", f"data.root={own_dataset}",
                          "pass a hydra.run.dir outside it")
    assert folder_state(own_dataset) == before


def test_sweep_dir_inside_dataset_is_rejected(tmp_path: Path, own_dataset: Path) -> None:
    before = folder_state(own_dataset)
    result = launch(["-m", *SMOKE, "data=kits23", f"data.root={own_dataset}", "seed=0,1",
                     f"hydra.sweep.dir={own_dataset / 'sweep'}"], tmp_path)
    assert_one_line_error(result, f"hydra.sweep.dir={own_dataset / 'sweep'}", "pass a hydra.sweep.dir outside it")
    assert folder_state(own_dataset) == before


def test_demo_dir_counts_as_dataset(tmp_path: Path) -> None:
    demo = tmp_path / "no-demo"  # the KITSJOBS_DEMO_DIR that launch() sets
    result = launch([*SMOKE, f"hydra.run.dir={demo / 'run'}"], tmp_path)
    assert_one_line_error(result, f"hydra.run.dir={demo / 'run'}", "inside the dataset folder")
    assert not demo.exists()


def test_rejected_folder_is_byte_identical(tmp_path: Path, phantom: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "case_00061.nii.gz").write_bytes(b"an earlier prediction")
    before = folder_state(run)
    result = launch([*SMOKE, f"data.root={phantom}", "hydra.run.dir=run"], tmp_path)
    assert_one_line_error(result, "already contains case_00061.nii.gz")
    assert folder_state(run) == before


def test_late_rejection_restores_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty_data").mkdir()
    (tmp_path / "run").mkdir()
    result = launch([*SMOKE, "data=kits23", f"data.root={tmp_path / 'empty_data'}", "hydra.run.dir=run"],
                    tmp_path)
    assert_one_line_error(result, "no cases found")
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_file_as_output_dir_is_rejected(key: str, tmp_path: Path, phantom: Path) -> None:
    (tmp_path / "afile").write_text("mine")
    multirun = ["-m"] if key == "hydra.sweep.dir" else []
    result = launch([*multirun, *SMOKE, f"data.root={phantom}", f"{key}=afile"], tmp_path)
    assert_one_line_error(result, f"{key}=afile is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "mine"


def test_loading_error_starts_its_own_line(tmp_path: Path, own_dataset: Path) -> None:
    image = own_dataset / "case_00001" / "imaging.nii.gz"
    image.write_bytes(image.read_bytes()[:2000])  # a truncated gzip stream: the header still reads
    result = launch([*SMOKE, "data=kits23", f"data.root={own_dataset}", "hydra.run.dir=run"], tmp_path)
    assert_one_line_error(result, f"cannot read {image}")
    start = result.stderr.index("error: ")
    assert start == 0 or result.stderr[start - 1] in "\r\n", repr(result.stderr[max(0, start - 80):start])


@pytest.mark.parametrize("values", [[0.0, 1.5, 2.5], [0, 1, 300], [0, -1, 2]], ids=["fractions", "above-255", "negative"])
def test_labels_changed_by_uint8_cast_rejected(tmp_path: Path, values: list[float]) -> None:
    from kitsjobs.data.cache import PreprocessSettings, prepare_arrays
    from kitsjobs.data.layouts import Case

    image = np.full((4, 8, 8), 40, np.int16)
    label = np.zeros((4, 8, 8), np.float32)
    label[1, 2:5, 2:5] = values[1]
    label[2, 2:5, 2:5] = values[2]
    affine = np.diag([3.0, 1.5, 1.5, 1.0])
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "label.nii.gz")

    # In memory, a cast to uint8 would turn 1.5 into 1 and 300 into 44 before data.check runs.
    with pytest.raises(UserError, match="label") as raised:
        prepare_arrays(Case("c", tmp_path / "image.nii.gz", tmp_path / "label.nii.gz"), PreprocessSettings())
    assert "\n" not in str(raised.value)


def test_user_path_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kitsjobs.cli import user_path

    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_path("~/preds") == tmp_path / "preds"
    assert user_path("relative/x") == Path("relative/x")
