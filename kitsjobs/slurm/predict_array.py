"""Prediction of a folder of images as one Slurm array job, one task per group of cases.

The job's files go to ``OUTPUT/.kitsjobs_predict/.submitit/`` (script, pickles, logs); each
task writes its cases' predictions into OUTPUT atomically, so tasks never touch each other's files.
A task replaces existing predictions of its own cases, so that a requeued task can rewrite them;
``python -m kitsjobs.predict`` checks OUTPUT for existing predictions once, before submitting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kitsjobs.config import LauncherConfig, SlurmConfig
from kitsjobs.errors import UserError
from kitsjobs.slurm import checks, cluster, submission
from kitsjobs.slurm.request import array_throttle, build_request
from kitsjobs.slurm.templates import SlurmTemplate, load_template

logger = logging.getLogger(__name__)

JOB_FOLDER = ".kitsjobs_predict"
JOB_NAME = "kitsjobs-predict"
# The shared Slurm checks name the training sweep's config keys; predict's users typed these
# flags instead. Longer phrases come first, so that they are replaced before their parts.
_FLAG_FOR_KEY = (
    ("set slurm.template or slurm.templates_dir (or KITSJOBS_SLURM_TEMPLATES)",
     "pass one of them to --slurm, or point --templates-dir (or KITSJOBS_SLURM_TEMPLATES) at another folder"),
    ("(slurm.gpus_per_task x slurm.nodes)", "(--gpus-per-task)"),
    ("lower slurm.gpus_per_task or add slurm.nodes", "lower --gpus-per-task"),
    ("choose another slurm=...", "choose another --slurm template"),
    ("invalid slurm.template", "invalid --slurm"),
    ("slurm.gpus_per_task=", "--gpus-per-task "),
    ("slurm.gpus_per_task", "--gpus-per-task"),
)


@dataclass
class PredictionTask:
    """Callable of one array task: the checkpoints, its share of the cases and the output folder."""

    checkpoints: list[str]
    cases: list[tuple[str, str]]  # (case name, image path)
    output_dir: str
    options: Any  # kitsjobs.predict.PredictOptions

    def __call__(self) -> list[str]:
        """Predict the task's cases; return the written files."""
        from kitsjobs.predict import predict_cases

        cases = [(name, Path(image)) for name, image in self.cases]
        written = predict_cases([Path(c) for c in self.checkpoints], cases, Path(self.output_dir), self.options)
        return [str(path) for path in written]


@dataclass(frozen=True)
class PredictionArray:
    """Template, resources and task size of a prediction array."""

    template: str  # template name: TEMPLATES_DIR/NAME.yaml
    templates_dir: Path
    cases_per_task: int = 1
    gpus_per_task: int = 1


def _check_gpus_per_task(gpus_per_task: int, template: SlurmTemplate) -> None:
    """Check ``--gpus-per-task`` against the template's per-job and per-user GPU limits.

    Raises:
        UserError: naming the flag, the limit, the template key and the largest valid value.
    """
    limit = min(template.max_gpus_per_job, template.gpu_quota_per_user)
    if gpus_per_task > limit:
        key = "max_gpus_per_job" if template.max_gpus_per_job <= template.gpu_quota_per_user else "gpu_quota_per_user"
        raise UserError(
            f"--gpus-per-task {gpus_per_task} is above the limit of {limit} GPU(s) per task set by {key} in "
            f"{template.source}; use --gpus-per-task {limit} or less (0 runs the task on CPUs)"
        )


def name_predict_flags(message: str) -> str:
    """Rewrite the ``slurm.*`` config keys in a Slurm check's message as predict's flags."""
    for key, flag in _FLAG_FOR_KEY:
        message = message.replace(key, flag)
    return message


def split_cases(cases: Sequence[tuple[str, Path]], cases_per_task: int) -> list[list[tuple[str, Path]]]:
    """Group cases, in order, into tasks of at most ``cases_per_task``."""
    if cases_per_task < 1:
        raise UserError(f"--cases-per-task {cases_per_task} is invalid; use 1 or more")
    return [list(cases[start:start + cases_per_task]) for start in range(0, len(cases), cases_per_task)]


def submit_prediction_array(checkpoints: Sequence[Path], cases: Sequence[tuple[str, Path]], output_dir: Path,
                            options: Any, array: PredictionArray, dry_run: bool = False) -> str:
    """Submit the prediction of ``cases`` as one array job (one sbatch call).

    Resources come from the admin template, checked against it and the live cluster before
    anything is submitted, exactly as for a training sweep.

    Returns:
        The array job id, or with ``dry_run`` the sbatch script that would be submitted.

    Raises:
        UserError: no sbatch here, an invalid template or request, or no cases.
    """
    if not cases:
        raise UserError("no cases to predict")
    cluster.require_sbatch()
    try:
        template = load_template(Path(array.templates_dir).expanduser().absolute(), array.template)
        _check_gpus_per_task(array.gpus_per_task, template)
        request = build_request(SlurmConfig(template=array.template, gpus_per_task=array.gpus_per_task), template)
        checks.check_against_template(request, template)
        groups = split_cases(cases, array.cases_per_task)
        launcher = LauncherConfig(name="slurm", job_name=JOB_NAME)
        throttle = array_throttle(request, template, launcher, len(groups))
        checks.check_against_cluster(request, template)
    except UserError as error:
        raise UserError(name_predict_flags(str(error))) from None

    job_dir = Path(output_dir).absolute() / JOB_FOLDER
    executor = submission.make_executor(job_dir, submission.executor_parameters(template, request, launcher, throttle))
    if dry_run:
        return submission.render_script(executor, len(groups))

    tasks = [PredictionTask([str(Path(c).absolute()) for c in checkpoints],
                            [(name, str(Path(image).absolute())) for name, image in group],
                            str(Path(output_dir).absolute()), options)
             for group in groups]
    with executor.batch():
        jobs = [executor.submit(task) for task in tasks]
    job_id = str(jobs[0].job_id).split("_", 1)[0]
    logger.info("submitted prediction array %s: %d case(s) in %d task(s), at most %d at once; logs in %s",
                job_id, len(cases), len(tasks), throttle, job_dir / submission.SUBMITIT_FOLDER)
    return job_id

