"""Checks of a resource request against its template and the live cluster, before anything is submitted.

Each failed check raises a UserError with one line naming the value, the limit and a fix.
A job over a QoS limit is otherwise accepted by sbatch and pends forever.
"""

from __future__ import annotations

import logging

from kitsjobs.errors import UserError
from kitsjobs.slurm import cluster
from kitsjobs.slurm.request import ResourceRequest
from kitsjobs.slurm.templates import SlurmTemplate

logger = logging.getLogger(__name__)


def check_against_template(request: ResourceRequest, template: SlurmTemplate) -> None:
    """Check GPUs per job, GPU quota and time limit against the admin template.

    Raises:
        UserError: a request over one of the template's limits.
    """
    source = template.source
    if request.gpus_per_job > template.max_gpus_per_job:
        raise UserError(
            f"{request.gpus_per_job} GPUs per job (slurm.gpus_per_task x slurm.nodes) is above "
            f"max_gpus_per_job={template.max_gpus_per_job} of {source}; lower slurm.gpus_per_task"
        )
    if request.gpus_per_job > template.gpu_quota_per_user:
        raise UserError(
            f"{request.gpus_per_job} GPUs per job is above the per-user quota "
            f"gpu_quota_per_user={template.gpu_quota_per_user} of {source}; the job would never start; "
            "lower slurm.gpus_per_task"
        )
    if request.time_min > template.max_time_min:
        raise UserError(
            f"slurm.timeout_min={request.time_min} is above max_time_min={template.max_time_min} "
            f"of {source}; use slurm.timeout_min={template.max_time_min} or less"
        )


def check_against_cluster(request: ResourceRequest, template: SlurmTemplate) -> None:
    """Check partition, node memory, CPUs, GPU type and QoS limits with sinfo and sacctmgr.

    Raises:
        UserError: the cluster could never run the request.
        SlurmCommandError: sinfo or sacctmgr failed.
    """
    nodes = cluster.partition_nodes(template.partition)
    if not nodes:
        raise UserError(
            f"partition '{template.partition}' of {template.source} is unknown to sinfo; "
            f"partitions: {cluster.known_partitions()}; fix 'partition' in the template or choose another slurm=..."
        )
    _check_nodes(request, template, nodes)
    if template.qos is not None and request.gpus_per_job > 0:
        _check_qos(request, template)


def _check_nodes(request: ResourceRequest, template: SlurmTemplate, nodes: list[cluster.NodeFacts]) -> None:
    largest_mem_mb = max(node.mem_mb for node in nodes)
    if request.mem_mb > largest_mem_mb:
        raise UserError(
            f"memory request {request.mem_mb} MB (slurm.mem_gb) is above the largest node of partition "
            f"'{template.partition}' ({largest_mem_mb} MB); lower slurm.mem_gb to {largest_mem_mb // 1024} or less"
        )
    largest_cpus = max(node.cpus for node in nodes)
    if request.cpus_per_task > largest_cpus:
        raise UserError(
            f"slurm.cpus_per_task={request.cpus_per_task} is above the largest node of partition "
            f"'{template.partition}' ({largest_cpus} CPUs); lower slurm.cpus_per_task"
        )
    if request.gpus_per_node == 0:
        return
    if template.gres_type is not None:
        offered = set().union(*(node.gpu_types() for node in nodes))
        if template.gres_type not in offered:
            raise UserError(
                f"GPU type '{template.gres_type}' (gres_type in {template.source}) is offered by no node of "
                f"partition '{template.partition}'; types there: {sorted(offered) or 'none'}"
            )
    largest_gpus = max(node.gpu_count() for node in nodes)
    if request.gpus_per_node > largest_gpus:
        raise UserError(
            f"slurm.gpus_per_task={request.gpus_per_node} is above the GPUs of the largest node of partition "
            f"'{template.partition}' ({largest_gpus}); lower slurm.gpus_per_task or add slurm.nodes"
        )


def _check_qos(request: ResourceRequest, template: SlurmTemplate) -> None:
    qos = str(template.qos)
    limits = cluster.qos_limits(qos)
    if limits is None:
        raise UserError(f"QoS '{qos}' of {template.source} is unknown to sacctmgr; fix 'qos' in the template")
    for label, limit in (("MaxTRESPerUser", limits.max_gpus_per_user), ("MaxTRESPerJob", limits.max_gpus_per_job)):
        if limit is not None and request.gpus_per_job > limit:
            raise UserError(
                f"{request.gpus_per_job} GPUs per job is above the {label} limit gres/gpu={limit} of QoS "
                f"'{qos}'; the job would pend forever; lower slurm.gpus_per_task to {limit} or less"
            )
