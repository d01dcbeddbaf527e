from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kitsjobs.errors import UserError
from kitsjobs.fsutil import atomic_write_json, check_output_file, check_output_folder


def test_atomic_write_follows_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "metrics.json", {"dice": 1.0})
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode)
    assert mode == 0o644
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_output_file_inside_input_rejected(tmp_path: Path) -> None:
    inputs = tmp_path / "references"
    inputs.mkdir()
    reference = inputs / "case_00000.nii.gz"
    reference.write_bytes(b"reference")
    linked = tmp_path / "linked"
    linked.symlink_to(inputs)

    for path in (reference, inputs / "metrics.csv", linked / "metrics.csv", inputs):
        with pytest.raises(UserError, match="--csv .* inside the --references folder .*choose a path outside it"):
            check_output_file(path, "--csv", [("--references", inputs)], overwrite=True)
    assert reference.read_bytes() == b"reference"


def test_output_file_equal_to_input_file(tmp_path: Path) -> None:
    source = tmp_path / "labels.nii.gz"
    source.write_bytes(b"labels")

    with pytest.raises(UserError, match="--out .*labels.nii.gz is the --labels file"):
        check_output_file(source, "--out", [("--labels", source)], overwrite=True)


def test_output_file_needs_existing_folder(tmp_path: Path) -> None:
    target = tmp_path / "nonexist" / "dir" / "x.csv"

    with pytest.raises(UserError, match="folder .*nonexist/dir not found; create it first"):
        check_output_file(target, "--csv", [])
    assert not (tmp_path / "nonexist").exists()


def test_output_file_exists_needs_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "metrics.csv"
    target.write_text("old")

    with pytest.raises(UserError, match="--csv .*metrics.csv exists; choose another path, or add --overwrite"):
        check_output_file(target, "--csv", [])
    check_output_file(target, "--csv", [], overwrite=True)
    with pytest.raises(UserError, match="is a folder"):
        check_output_file(tmp_path, "--csv", [], overwrite=True)


def test_output_file_suffix(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--out .*s3.tar does not end in \.zip"):
        check_output_file(tmp_path / "s3.tar", "--out", [], suffix=".zip")
    check_output_file(tmp_path / "s3.zip", "--out", [], suffix=".zip")


def test_output_folder_lists_existing_files(tmp_path: Path) -> None:
    output = tmp_path / "predictions"
    output.mkdir()
    names = [f"case_{index:05d}.nii.gz" for index in range(8)]
    for name in names[:7]:
        (output / name).write_bytes(b"earlier prediction")

    with pytest.raises(UserError) as raised:
        check_output_folder(output, "--output", [], names)

    message = str(raised.value)
    assert "already contains 7 of the 8 file(s) to write" in message
    assert str(output / "case_00004.nii.gz") in message
    assert "case_00005.nii.gz" not in message
    assert "and 2 more" in message
    assert "--overwrite" in message
    check_output_folder(output, "--output", [], names, overwrite=True)
    check_output_folder(output, "--output", [], ["case_00100.nii.gz"])


def test_output_folder_rules(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "file").write_text("x")

    with pytest.raises(UserError, match="inside the --input folder"):
        check_output_folder(images / "predictions", "--output", [("--input", images)], [], overwrite=True)
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file", "--output", [], [])
    with pytest.raises(UserError, match="folder .*missing not found"):
        check_output_folder(tmp_path / "missing" / "predictions", "--output", [], [])
    check_output_folder(tmp_path / "predictions", "--output", [("--input", images)], ["a.nii.gz"])
    assert not (tmp_path / "predictions").exists()
