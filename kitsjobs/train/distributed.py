"""Data-parallel training set up from the environment of a Slurm job (one process per device).

Slurm starts every process (``sbatch --ntasks-per-node=N`` and ``srun``); nothing here spawns
any. The rendezvous address and port come from submitit's ``TorchDistributedEnvironment``,
which takes the first host of the job and a port derived from the job id, so every rank of one
job (and of its requeued attempts) agrees on them without a fixed port in the code.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as torch_dist

logger = logging.getLogger(__name__)

# How long a rank waits for the others in init_process_group and collectives before failing.
PROCESS_GROUP_TIMEOUT_MIN = 10


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a data-parallel job; a single process by default."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # "nccl" on CUDA, "gloo" on CPU; None when no process group was created.
    backend: Optional[str] = None

    @property
    def is_distributed(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints, history and results (rank 0)."""
        return self.rank == 0


def slurm_world_size(environ: Mapping[str, str] = os.environ) -> int:
    """Return the number of processes Slurm started for this job step (SLURM_NTASKS; 1 outside Slurm)."""
    return int(environ.get("SLURM_NTASKS") or 1)


def backend_for(device: torch.device) -> str:
    """Return the process-group backend of a device type: nccl for CUDA, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_slurm(device: torch.device) -> DistributedContext:
    """Create the process group of a Slurm job with several tasks; a single task gets none.

    Args:
        device: the device type training uses (trainer.device resolved); CUDA selects nccl and
            makes each process use GPU ``local_rank`` of its node.

    Returns:
        This process's rank, world size, local rank and backend.

    Raises:
        RuntimeError: the other ranks did not join within PROCESS_GROUP_TIMEOUT_MIN minutes.
    """
    if slurm_world_size() <= 1:
        return DistributedContext()
    import submitit.helpers

    # Exports MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK for the env:// rendezvous.
    environment = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                       overwrite=True)
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(environment.local_rank)
    torch_dist.init_process_group(backend, init_method="env://", rank=environment.rank,
                                  world_size=environment.world_size,
                                  timeout=datetime.timedelta(minutes=PROCESS_GROUP_TIMEOUT_MIN))
    context = DistributedContext(environment.rank, environment.world_size, environment.local_rank, backend)
    logger.info("process group ready: rank %d of %d (local rank %d), backend %s, rendezvous %s:%s",
                context.rank, context.world_size, context.local_rank, backend, environment.master_addr,
                environment.master_port)
    return context


def shut_down(context: DistributedContext) -> None:
    """Destroy the process group created by ``init_from_slurm`` (nothing for a single process)."""
    if context.is_distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def process_device(device: torch.device, context: DistributedContext) -> torch.device:
    """Return the device of this process: ``cuda:LOCAL_RANK`` on CUDA in a multi-process job."""
    if device.type == "cuda" and context.is_distributed:
        return torch.device("cuda", context.local_rank)
    return device


def wrap_model(model: torch.nn.Module, device: torch.device, context: DistributedContext) -> torch.nn.Module:
    """Return the module that training steps call: DistributedDataParallel over ``model`` with several ranks.

    ``model`` itself stays unwrapped, so its state_dict keys and inference do not depend on the
    world size.
    """
    if not context.is_distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def any_rank(flag: bool, device: torch.device, context: DistributedContext) -> bool:
    """Return whether ``flag`` is set on at least one rank (an all-reduce with MAX).

    Every rank must call it at the same point, since it is a collective operation.
    """
    if not context.is_distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
    return bool(value.item())


def synchronize(context: Optional[DistributedContext]) -> None:
    """Wait until every rank reaches this point (nothing for a single process)."""
    if context is not None and context.is_distributed:
        torch_dist.barrier()


def sample_index(step: int, context: DistributedContext) -> int:
    """Return the sampler's per-step seed index of this rank: ``step * world_size + rank``.

    Every rank draws different patches, and a single process keeps the index ``step``.
    """
    return step * context.world_size + context.rank
