from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import write_case
from kitsjobs.data.layouts import find_cases, find_images, no_cases_message
from kitsjobs.data.splits import kfold_split
from kitsjobs.errors import UserError


def _label(shape=(4, 8, 8)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[1:3, 2:5, 2:5] = 1
    return label


def test_kits23_layout_pairs_files(tmp_path: Path) -> None:
    for name in ("case_00002", "case_00001"):
        write_case(tmp_path, name, np.zeros((4, 8, 8)), _label())
    cases = find_cases(tmp_path, "kits23")
    assert [c.name for c in cases] == ["case_00001", "case_00002"]
    assert cases[0].label == tmp_path / "case_00001" / "segmentation.nii.gz"


def test_flat_layout_pairs_files(tmp_path: Path) -> None:
    (tmp_path / "volume").mkdir()
    (tmp_path / "seg").mkdir()
    for name in ("a", "b"):
        (tmp_path / "volume" / f"{name}.nii.gz").write_bytes(b"")
        (tmp_path / "seg" / f"{name}.nii.gz").write_bytes(b"")
    cases = find_cases(tmp_path, "flat")
    assert [c.name for c in cases] == ["a", "b"]
    assert cases[1].label == tmp_path / "seg" / "b.nii.gz"


def test_image_without_label_is_named(tmp_path: Path) -> None:
    write_case(tmp_path, "case_00001", np.zeros((4, 8, 8)), _label())
    write_case(tmp_path, "case_00007", np.zeros((4, 8, 8)), None)
    with pytest.raises(UserError, match="case_00007") as raised:
        find_cases(tmp_path, "kits23")
    assert "case_00001" not in str(raised.value)


@pytest.mark.parametrize(
    ("layout", "make", "message"),
    [
        ("kits23", False, "not found"),
        ("kits23", True, "no cases found"),
        ("flat", True, "no cases found"),
        ("nifti", True, "unknown data layout 'nifti'"),
    ],
)
def test_bad_dataset_folder(tmp_path: Path, layout: str, make: bool, message: str) -> None:
    root = tmp_path / "data"
    if make:
        root.mkdir()
    with pytest.raises(UserError, match=message):
        find_cases(root, layout)


def test_find_images_accepts_plain_files(tmp_path: Path) -> None:
    (tmp_path / "x.nii.gz").write_bytes(b"")
    assert find_images(tmp_path) == [("x", tmp_path / "x.nii.gz")]


def test_kfold_split_is_deterministic_and_disjoint() -> None:
    names = [f"case_{i:05d}" for i in range(11)]
    folds = [kfold_split(names, 5, fold, seed=3) for fold in range(5)]
    assert folds[2] == kfold_split(list(reversed(names)), 5, 2, seed=3)
    held_out = [name for split in folds for name in split["val"]]
    assert sorted(held_out) == names
    for split in folds:
        assert not set(split["train"]) & set(split["val"])
        assert len(split["train"]) + len(split["val"]) == 11


@pytest.mark.parametrize(("count", "folds", "fold", "message"), [
    (3, 5, 0, "cannot be split"),
    (6, 3, 3, "data.fold=3 is out of range"),
    (6, 1, 0, "data.num_folds=1 is too small"),
])
def test_kfold_split_rejects_bad_values(count: int, folds: int, fold: int, message: str) -> None:
    with pytest.raises(UserError, match=message):
        kfold_split([str(i) for i in range(count)], folds, fold, seed=0)


def test_no_cases_message_names_other_layout(tmp_path: Path) -> None:
    write_case(tmp_path, "case_00001", np.zeros((4, 8, 8)), _label())
    message = no_cases_message(tmp_path, "flat", root_option="--input")
    assert message == (
        f"no cases found in --input {tmp_path} for --layout flat (expected ROOT/volume/NAME.nii.gz and "
        "ROOT/seg/NAME.nii.gz), but 1 in the kits23 layout (ROOT/CASE/imaging.nii.gz); pass --layout kits23"
    )


def test_no_cases_message_in_neither_layout(tmp_path: Path) -> None:
    message = no_cases_message(tmp_path, "kits23")
    assert message.startswith(f"no cases found in {tmp_path} for --layout kits23")
    assert message.endswith("nor for --layout flat (ROOT/volume/NAME.nii.gz and ROOT/seg/NAME.nii.gz); "
                            "pass a dataset folder in one of them")
