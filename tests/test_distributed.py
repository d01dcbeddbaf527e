"""Data-parallel training set up from the Slurm environment: two CPU processes (gloo) on the local Slurm."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kitsjobs.config import Config
from kitsjobs.data.phantom import write_demo_dataset
from kitsjobs.slurm.request import build_request
from kitsjobs.slurm.signals import SignalSettings
from kitsjobs.slurm.submission import SweepTask, executor_parameters, make_executor, submit_array
from kitsjobs.slurm.templates import parse_template
from kitsjobs.slurm.worker import TaskRunner, attempt_log_path
from kitsjobs.train.distributed import DistributedContext, sample_index, wrap_model
from slurm_cluster import cancel_jobs, wait_for_sacct
from test_requeue import (TASK_TIMEOUT_S, TEMPLATE, history_steps, resumed_step, slurm, stop_step,
                          wait_for_step)

STEPS = 30


def test_ranks_sample_different_indices() -> None:
    contexts = [DistributedContext(rank, 2, rank, "gloo") for rank in range(2)]
    indices = {sample_index(step, context) for step in range(50) for context in contexts}
    assert len(indices) == 100
    assert sample_index(7, DistributedContext()) == 7


def test_single_process_keeps_plain_model() -> None:
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, torch.device("cpu"), DistributedContext()) is model


def _config(data_root: Path) -> Config:
    """The smoke experiment on phantom data, trained by two CPU processes."""
    config = Config()
    config.data.root = str(data_root)
    config.data.layout = "kits23"
    config.data.num_folds = 2
    config.data.patch_size = [16, 32, 32]
    config.data.batch_size = 2
    config.model.channels = [8, 16, 32]
    config.model.strides = [2, 2]
    config.trainer.max_steps = STEPS
    config.trainer.val_every_steps = 1000
    config.trainer.checkpoint_every_steps = 1
    config.trainer.log_every_steps = 1
    config.trainer.device = "cpu"
    config.trainer.deterministic = True
    config.trainer.num_threads = 1
    config.trainer.predict_validation = False
    config.trainer.sw_roi_size = [16, 64, 64]
    config.trainer.sw_overlap = 0.0
    config.trainer.devices = 2
    config.slurm.gpus_per_task = 0
    config.slurm.cpus_per_task = 1
    config.slurm.mem_gb = 1
    return config


@pytest.mark.slurm
def test_two_gloo_ranks_requeue_and_resume(slurm_cluster: str, tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    write_demo_dataset(data_root, n_cases=4, progress=False)
    config = _config(data_root)
    config.launcher.job_name = f"kjddp-{uuid.uuid4().hex[:8]}"
    template = parse_template(yaml.safe_load(yaml.safe_dump(TEMPLATE)), "test.yaml")
    request = build_request(config.slurm, template, devices=config.trainer.devices)
    executor = make_executor(tmp_path / "sweep", executor_parameters(template, request, config.launcher, 1))
    run_dir = tmp_path / "sweep" / "0"
    runner = TaskRunner(config, str(run_dir), 0, template.requeue, str(tmp_path / "sweep" / ".submitit"),
                        SignalSettings.from_template(template))
    job_id = submit_array(executor, [SweepTask(0, [], run_dir, runner)])
    try:
        wait_for_step(run_dir, 6)
        slurm("scancel", "--signal=USR2", job_id)
        records = wait_for_sacct(job_id, TASK_TIMEOUT_S)
    finally:
        cancel_jobs([job_id])
    assert records[0].state == "COMPLETED"

    # Rank 0 alone wrote the history: every step once.
    assert history_steps(run_dir) == list(range(1, STEPS + 1))
    stopped = stop_step(attempt_log_path(run_dir, 0, 0))
    for rank in range(2):
        first = attempt_log_path(run_dir, 0, rank).read_text()
        assert f"process group ready: rank {rank} of 2 (local rank {rank}), backend gloo" in first
        # Every rank left at the same step, and every rank resumed from rank 0's checkpoint.
        assert stop_step(attempt_log_path(run_dir, 0, rank)) == stopped
        assert resumed_step(attempt_log_path(run_dir, 1, rank)) == stopped
    state = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    assert state["step"] == STEPS
    assert all(np.isfinite(value.numpy()).all() for value in state["model"].values())
