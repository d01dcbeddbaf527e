from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from kitsjobs.train.checkpoint import BEST, LATEST, PREVIOUS, load_checkpoint, load_latest, save_checkpoint


def _state(step: int) -> dict:
    return {"step": step, "weights": torch.full((3,), float(step)), "config": {"seed": 0}}


def test_save_keeps_previous_and_best(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _state(1), is_best=True)
    save_checkpoint(tmp_path, _state(2))
    assert load_checkpoint(tmp_path / LATEST)["step"] == 2
    assert load_checkpoint(tmp_path / PREVIOUS)["step"] == 1
    assert load_checkpoint(tmp_path / BEST)["step"] == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_truncated_latest_falls_back_to_previous(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_checkpoint(tmp_path, _state(1))
    save_checkpoint(tmp_path, _state(2))
    latest = tmp_path / LATEST
    latest.write_bytes(latest.read_bytes()[:100])
    state = load_latest(tmp_path)
    assert state is not None
    assert state["step"] == 1
    assert str(latest) in caplog.text
    assert str(tmp_path / PREVIOUS) in caplog.text


def test_no_checkpoint_gives_none(tmp_path: Path) -> None:
    assert load_latest(tmp_path) is None


class _RunsCode:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_object_is_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"payload": _RunsCode()}, path, pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)


def test_plain_pickle_fails_without_warning(tmp_path: Path) -> None:
    import warnings

    path = tmp_path / "plain.pt"
    with open(path, "wb") as stream:
        pickle.dump({"model": {}, "config": {}}, stream)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(pickle.UnpicklingError):
            load_checkpoint(path)
    assert [str(warning.message) for warning in caught] == []
