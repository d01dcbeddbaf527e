"""Submission of a sweep as one Slurm array job through submitit, and the dry run of it.

Layout of a sweep folder written here:

- ``SWEEP_DIR/.submitit/``: submitit's pickles, ``ARRAYID_submission.sh`` (the sbatch script)
  and the Slurm logs ``ARRAYID_TASKID_0_log.out`` and ``.err``.
- ``SWEEP_DIR/sweep.json``: the manifest that ``python -m kitsjobs.status`` reads.
- ``SWEEP_DIR/INDEX/``: one folder per task (Hydra's per-job folder).
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kitsjobs.config import LauncherConfig
from kitsjobs.errors import UserError
from kitsjobs.fsutil import atomic_write_json
from kitsjobs.slurm.request import ResourceRequest
from kitsjobs.slurm.signals import SignalSettings
from kitsjobs.slurm.templates import SlurmTemplate
from kitsjobs.slurm.worker import TaskRunner

logger = logging.getLogger(__name__)

SUBMITIT_FOLDER = ".submitit"
MANIFEST_FILE = "sweep.json"
MANIFEST_VERSION = 1
# A job name goes into "#SBATCH --job-name=..."; only these characters are allowed in it.
_JOB_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")


@dataclass(frozen=True)
class SweepTask:
    """One task of the sweep, ready to pickle."""

    index: int  # Hydra's job number; also the array task id when the sweep starts at 0
    overrides: list[str]  # the task's command-line overrides
    run_dir: Path  # SWEEP_DIR/INDEX
    runner: TaskRunner


def check_script_values(sweep_dir: Path, launcher: LauncherConfig) -> None:
    """Reject values that would reach the sbatch script in a form Slurm or bash could misread.

    Paths are shell-quoted by submitit, but Slurm expands ``%`` patterns in log paths and a
    newline would end a ``#SBATCH`` line early, so both are rejected.

    Raises:
        UserError: naming the value and the allowed characters.
    """
    if not _JOB_NAME_PATTERN.match(launcher.job_name):
        raise UserError(
            f"invalid launcher.job_name {launcher.job_name!r}: use 1 to 64 letters, digits or _.+-"
        )
    text = str(sweep_dir)
    for character, label in (("%", "'%'"), ("\n", "a newline"), ("\r", "a carriage return"), ("\0", "a NUL byte")):
        if character in text:
            raise UserError(
                f"invalid sweep folder {text!r}: it contains {label}, which Slurm would misread in log paths; "
                "choose another hydra.sweep.dir"
            )


def executor_parameters(template: SlurmTemplate, request: ResourceRequest, launcher: LauncherConfig,
                        throttle: int) -> dict[str, Any]:
    """Return the submitit ``SlurmExecutor`` parameters of the array (sbatch options and setup lines)."""
    setup = list(template.setup)
    if template.signal != "USR2":
        # submitit's handler listens to SUBMITIT_PREEMPT_SIGNAL (USR2 when unset).
        setup.insert(0, f"export SUBMITIT_PREEMPT_SIGNAL={template.signal}")
    params: dict[str, Any] = {
        "job_name": launcher.job_name,
        "partition": template.partition,
        "time": request.time_min,
        "nodes": request.nodes,
        "ntasks_per_node": request.tasks_per_node,
        "cpus_per_task": request.cpus_per_task,
        # In MB, so that 0.5 GB is 512M and not rounded to 0 or 1 GB.
        "mem": f"{request.mem_mb}M",
        "signal_delay_s": template.signal_delay_s,
        "array_parallelism": throttle,
        "setup": setup,
        "additional_parameters": {
            # The job compares this line with the signal settings pickled in its task.
            "signal": SignalSettings.from_template(template).sbatch_signal,
            "requeue" if template.requeue else "no-requeue": True,
        },
    }
    if template.qos is not None:
        params["qos"] = template.qos
    if template.account is not None:
        params["account"] = template.account
    if request.gpus_per_node > 0:
        kind = f"gpu:{template.gres_type}" if template.gres_type else "gpu"
        params["gres"] = f"{kind}:{request.gpus_per_node}"
    return params


def make_executor(sweep_dir: Path, parameters: dict[str, Any]) -> Any:
    """Return a submitit SlurmExecutor writing to ``SWEEP_DIR/.submitit`` with ``parameters``."""
    import submitit

    executor = submitit.SlurmExecutor(folder=sweep_dir / SUBMITIT_FOLDER)
    executor.update_parameters(**parameters)
    return executor


def render_script(executor: Any, task_count: int) -> str:
    """Return the sbatch script that ``submit_array`` makes submitit write for ``task_count`` tasks.

    It builds the same array executor as submitit's ``_internal_process_submissions`` and asks it
    for the script text, so the dry run and the real submission share one renderer.
    """
    import submitit

    # NOTE: relies on submitit 1.5's private _make_submission_file_text and _submitit_command_str;
    # the dry-run test compares the result byte for byte with a real submission's script.
    array_executor = submitit.SlurmExecutor(executor.folder, executor.max_num_timeout)
    array_executor.update_parameters(**executor.parameters)
    if task_count > 1:
        array_executor.parameters["map_count"] = task_count
    return str(array_executor._make_submission_file_text(array_executor._submitit_command_str, "dry-run"))


def check_picklable(tasks: Sequence[SweepTask]) -> None:
    """Pickle every task's runner as submitit will, so a failure shows here and not on the node.

    Raises:
        UserError: naming the task, its overrides and the config field (or object) that fails.
    """
    import cloudpickle

    for task in tasks:
        try:
            cloudpickle.dumps(task.runner)
        except Exception as error:  # noqa: BLE001 - pickling raises many types; all are reported
            culprit = _find_unpicklable(task.runner)
            raise UserError(
                f"task #{task.index} [{' '.join(task.overrides)}] cannot be sent to Slurm: {culprit} "
                f"cannot be pickled ({type(error).__name__}: {error}); use plain values (numbers, strings, lists)"
            ) from None


def _find_unpicklable(runner: TaskRunner) -> str:
    """Return the dotted name of the first config field that cloudpickle rejects."""
    import dataclasses

    import cloudpickle

    for section in dataclasses.fields(runner.config):
        value = getattr(runner.config, section.name)
        children = dataclasses.fields(value) if dataclasses.is_dataclass(value) else []
        for child in children:
            try:
                cloudpickle.dumps(getattr(value, child.name))
            except Exception:  # noqa: BLE001
                return f"config value {section.name}.{child.name}={getattr(value, child.name)!r}"
        try:
            cloudpickle.dumps(value)
        except Exception:  # noqa: BLE001
            return f"config value {section.name}={value!r}"
    return f"the task object {runner!r}"


def submit_array(executor: Any, tasks: Sequence[SweepTask]) -> str:
    """Submit the tasks as one array (one sbatch call) and return the array job id."""
    with executor.batch():
        jobs = [executor.submit(task.runner) for task in tasks]
    return str(jobs[0].job_id).split("_", 1)[0]


def submitted_script_path(sweep_dir: Path, array_job_id: str) -> Path:
    """Return where submitit keeps the sbatch script of a submitted array."""
    return sweep_dir / SUBMITIT_FOLDER / f"{array_job_id}_submission.sh"


def write_manifest(sweep_dir: Path, array_job_id: str, tasks: Sequence[SweepTask], template: SlurmTemplate,
                   throttle: int) -> Path:
    """Write ``SWEEP_DIR/sweep.json`` atomically and return its path.

    Keys: version, array_job_id, submitted (ISO time), template (file), throttle, submitit_folder
    (relative), and tasks: a list of {index, task_id, overrides, folder (relative)}.
    """
    manifest = {
        "version": MANIFEST_VERSION,
        "array_job_id": array_job_id,
        "is_array": len(tasks) > 1,
        "submitted": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "template": template.source,
        "throttle": throttle,
        "submitit_folder": SUBMITIT_FOLDER,
        "tasks": [
            {
                "index": task.index,
                "task_id": position,
                "overrides": task.overrides,
                "folder": str(task.run_dir.relative_to(sweep_dir)),
            }
            for position, task in enumerate(tasks)
        ],
    }
    path = sweep_dir / MANIFEST_FILE
    atomic_write_json(path, manifest)
    return path
