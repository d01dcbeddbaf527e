"""Stopping and resuming training gives the same result as never stopping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kitsjobs.config import Config
from kitsjobs.data.volumes import Volume
from kitsjobs.train.checkpoint import load_checkpoint
from kitsjobs.train.interrupt import StopRequest, TrainingInterrupted
from kitsjobs.train.loop import Trainer

MAX_STEPS = 9


def _volume(name: str, seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    label = np.zeros((12, 24, 24), np.uint8)
    label[3:8, 5:14, 6:15] = 1
    label[4:6, 7:10, 8:11] = 2
    image = (label * 0.3 + rng.normal(0, 0.05, label.shape)).astype(np.float32)
    return Volume(name, image, label, np.eye(4), (3.0, 1.0, 1.0))


def _config() -> Config:
    config = Config()
    config.data.patch_size = [8, 16, 16]
    config.model.channels = [4, 8]
    config.model.strides = [2]
    config.model.dropout = 0.2
    config.trainer.max_steps = MAX_STEPS
    config.trainer.val_every_steps = 4
    config.trainer.checkpoint_every_steps = 100
    config.trainer.log_every_steps = 1
    config.trainer.deterministic = True
    config.trainer.device = "cpu"
    config.trainer.sw_overlap = 0.0
    return config


class StopAtSteps(StopRequest):
    """A stop request that turns on when the trainer reaches one of the given steps."""

    def __init__(self, trainer_steps: set[int]) -> None:
        super().__init__()
        self.steps = trainer_steps
        self.trainer: Trainer | None = None

    def is_set(self) -> bool:
        return self.trainer is not None and self.trainer.step in self.steps


def _trainer(run_dir: Path, stop: StopRequest | None = None) -> Trainer:
    volumes = [_volume("a", 0), _volume("b", 1)]
    return Trainer(_config(), run_dir, volumes[:1], volumes[1:], stop=stop)


def test_interrupted_run_ends_with_same_weights(tmp_path: Path) -> None:
    reference = _trainer(tmp_path / "straight")
    reference.fit()

    interrupted_dir = tmp_path / "interrupted"
    stops = {3, 6}
    attempts = 0
    while True:
        stop = StopAtSteps(stops)
        trainer = _trainer(interrupted_dir, stop)
        stop.trainer = trainer
        attempts += 1
        try:
            trainer.fit()
            break
        except TrainingInterrupted as interruption:
            stops.discard(interruption.step)
    assert attempts == 3

    for name, value in reference.model.state_dict().items():
        difference = (value.float() - trainer.model.state_dict()[name].float()).abs().max().item()
        assert difference <= 1e-6, name
    history = [json.loads(line) for line in (interrupted_dir / "history.jsonl").read_text().splitlines()]
    assert [record["step"] for record in history] == list(range(1, MAX_STEPS + 1))
    straight = [json.loads(line) for line in (tmp_path / "straight" / "history.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in history] == pytest.approx([r["lr"] for r in straight])
    assert [r["loss"] for r in history] == pytest.approx([r["loss"] for r in straight], abs=1e-6)


def test_checkpoint_holds_full_training_state(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    trainer.fit()
    state = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "step", "best_metric", "best_step",
                "rng", "config", "config_hash", "kitsjobs_version", "tracker_run_id"):
        assert key in state, key
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert state["step"] == MAX_STEPS
    assert state["config"]["trainer"]["max_steps"] == MAX_STEPS


def test_resume_false_sets_old_checkpoints_aside(tmp_path: Path) -> None:
    _trainer(tmp_path).fit()
    first = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)["model"]
    config = _config()
    config.trainer.resume = False
    volumes = [_volume("a", 0), _volume("b", 1)]
    Trainer(config, tmp_path, volumes[:1], volumes[1:]).fit()
    aside = [path for path in tmp_path.iterdir() if path.name.startswith("set_aside_")]
    assert len(aside) == 1
    kept = torch.load(aside[0] / "checkpoints" / "latest.pt", weights_only=True)["model"]
    for name in first:
        assert torch.equal(first[name], kept[name])
    assert (aside[0] / "history.jsonl").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, MAX_STEPS + 1))


def test_changed_settings_names_each_difference() -> None:
    from kitsjobs.train.loop import changed_settings

    before = {"trainer": {"max_steps": 10, "amp": True}, "seed": 0}
    after = {"trainer": {"max_steps": 20, "amp": True}, "seed": 1}
    assert changed_settings(before, after) == ["seed: 0 -> 1", "trainer.max_steps: 10 -> 20"]
    assert changed_settings(before, before) == []
