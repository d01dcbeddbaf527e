"""The resources one array task requests: the experiment's ``slurm`` group filled in from its template."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from kitsjobs.config import LauncherConfig, SlurmConfig
from kitsjobs.errors import UserError
from kitsjobs.slurm.signals import check_signal_with_nccl
from kitsjobs.slurm.templates import SlurmTemplate


@dataclass(frozen=True)
class ResourceRequest:
    """Resources each task of the array requests from Slurm."""

    gpus_per_node: int
    nodes: int
    cpus_per_task: int
    mem_mb: int  # per node, in MB (sbatch --mem)
    time_min: int
    # Training processes per node (sbatch --ntasks-per-node), one per GPU when GPUs are requested.
    tasks_per_node: int = 1

    @property
    def gpus_per_job(self) -> int:
        """GPUs one task uses over all its nodes."""
        return self.gpus_per_node * self.nodes

    @property
    def world_size(self) -> int:
        """Training processes of one task over all its nodes."""
        return self.tasks_per_node * self.nodes


def build_request(slurm: SlurmConfig, template: SlurmTemplate, devices: int = 1) -> ResourceRequest:
    """Fill the unset fields of ``slurm`` from ``template`` and check their ranges.

    CPUs (per process) and memory (per node) scale with the GPU count, at least one GPU's worth
    for a CPU-only task. With ``devices`` processes per node, each process gets the CPUs of
    its share of the node's GPUs.

    Args:
        slurm: the experiment's resource request.
        template: the admin template it is checked against.
        devices: training processes per node (trainer.devices); with GPUs, one per GPU.

    Raises:
        UserError: a negative GPU count, no nodes, fewer than one process per node, GPUs that
            do not match the process count, SIGUSR1 as warning signal of a multi-GPU job, or a
            non-positive CPU, memory or time value.
    """
    if slurm.gpus_per_task < 0:
        raise UserError(f"slurm.gpus_per_task={slurm.gpus_per_task} is negative; use 0 or more")
    if slurm.nodes < 1:
        raise UserError(f"slurm.nodes={slurm.nodes} must be 1 or more")
    if devices < 1:
        raise UserError(f"trainer.devices={devices} must be 1 or more processes per node")
    if slurm.gpus_per_task > 0 and devices > 1 and slurm.gpus_per_task != devices:
        raise UserError(
            f"trainer.devices={devices} processes per node but slurm.gpus_per_task={slurm.gpus_per_task} GPUs "
            f"per node; each process drives one GPU, so set slurm.gpus_per_task={devices}"
        )
    uses_nccl = slurm.gpus_per_task > 0 and devices * slurm.nodes > 1
    check_signal_with_nccl(template.signal, uses_nccl, template.source or "Slurm template")
    gpu_units = max(slurm.gpus_per_task // devices, 1)
    cpus = slurm.cpus_per_task if slurm.cpus_per_task is not None else template.cpus_per_gpu * gpu_units
    mem_gb = slurm.mem_gb if slurm.mem_gb is not None else template.mem_gb_per_gpu * max(slurm.gpus_per_task, 1)
    time_min = slurm.timeout_min if slurm.timeout_min is not None else template.default_time_min
    if cpus < 1:
        raise UserError(f"slurm.cpus_per_task={cpus} must be 1 or more (or null for the template's value)")
    if mem_gb <= 0:
        raise UserError(f"slurm.mem_gb={mem_gb} must be above 0, e.g. slurm.mem_gb=0.5 for 512 MB")
    if time_min < 1:
        raise UserError(f"slurm.timeout_min={time_min} must be 1 or more minutes")
    # Memory is rendered in MB so that fractions of a GB (0.5 GB = 512 MB) stay exact.
    mem_mb = max(1, math.ceil(mem_gb * 1024))
    return ResourceRequest(slurm.gpus_per_task, slurm.nodes, cpus, mem_mb, time_min, tasks_per_node=devices)


def array_throttle(request: ResourceRequest, template: SlurmTemplate, launcher: LauncherConfig,
                   task_count: int) -> int:
    """Return how many tasks of the array may run at once (the ``%N`` of ``--array``).

    With GPUs it is the template's per-user GPU quota divided by the GPUs of one task, so the
    array never waits on the QoS limit; ``launcher.max_parallel`` may lower it.

    Raises:
        UserError: ``launcher.max_parallel`` is below 1 or above the quota's share.
    """
    if request.gpus_per_job > 0:
        allowed: Optional[int] = template.gpu_quota_per_user // request.gpus_per_job
    else:
        allowed = None
    requested = launcher.max_parallel
    if requested is not None and requested < 1:
        raise UserError(f"launcher.max_parallel={requested} must be 1 or more (or null for the quota's share)")
    if requested is not None and allowed is not None and requested > allowed:
        raise UserError(
            f"launcher.max_parallel={requested} is above what the GPU quota allows: "
            f"{template.gpu_quota_per_user} GPUs per user / {request.gpus_per_job} per task = {allowed}; "
            f"use launcher.max_parallel={allowed} or less"
        )
    throttle = requested if requested is not None else allowed
    if throttle is None:
        throttle = task_count
    return max(1, min(throttle, task_count))
