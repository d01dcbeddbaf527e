"""The ``launcher=slurm`` branch of the Hydra launcher: from Hydra's overrides to one queued array.

Steps: compose and resolve each task's config on this machine (so ``${hydra.job.num}`` and
custom resolvers give what they give here), load the admin template, check the request against
it and the live cluster, write each task's ``.hydra/`` files, pickle-check the tasks, submit one
array, write the manifest, then return (or wait with ``launcher.wait=true``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from kitsjobs.config import Config
from kitsjobs.errors import UserError
from kitsjobs.fsutil import atomic_write_text
from kitsjobs.slurm import checks, cluster, submission
from kitsjobs.slurm.request import array_throttle, build_request
from kitsjobs.slurm.signals import SignalSettings
from kitsjobs.slurm.templates import load_template
from kitsjobs.slurm.worker import TaskRunner

logger = logging.getLogger(__name__)

# libyaml's dumper when PyYAML was built with it: several times faster for the
# .hydra files written for every task.
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

# Loads the composed config of one task from its overrides and index.
TaskConfigLoader = Callable[[Sequence[str], int], DictConfig]


def launch_slurm_sweep(sweep_config: DictConfig, load_task_config: TaskConfigLoader,
                       job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """Submit the sweep as one array job; return once queued, or after it ends with ``launcher.wait``.

    A UserError (no sbatch here, an invalid template or request, a task that cannot be pickled)
    or a failed Slurm command ends the command with one line on stderr and exit status 2 or 1,
    and nothing is submitted.

    Returns:
        One JobReturn per task when waiting (FAILED for tasks that did not complete), else [].
    """
    try:
        return _launch(sweep_config, load_task_config, job_overrides, initial_job_idx)
    except UserError as error:
        logger.debug("rejected sweep", exc_info=True)
        _remove_dry_run_folder(Path(str(sweep_config.hydra.sweep.dir)).absolute())
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except cluster.SlurmCommandError as error:
        _remove_dry_run_folder(Path(str(sweep_config.hydra.sweep.dir)).absolute())
        print(f"error: {error}; nothing was submitted", file=sys.stderr)
        sys.exit(1)


def _launch(sweep_config: DictConfig, load_task_config: TaskConfigLoader,
            job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    cluster.require_sbatch()
    sweep_dir = Path(str(sweep_config.hydra.sweep.dir)).absolute()
    task_configs = [load_task_config(overrides, initial_job_idx + offset)
                    for offset, overrides in enumerate(job_overrides)]
    resolved = [_resolve_task(task_config, sweep_dir) for task_config in task_configs]
    config = _common_settings([config for config, _ in resolved], job_overrides)
    submission.check_script_values(sweep_dir, config.launcher)

    templates_dir = Path(config.slurm.templates_dir).expanduser().absolute()
    template = load_template(templates_dir, config.slurm.template)
    request = build_request(config.slurm, template, devices=config.trainer.devices)
    checks.check_against_template(request, template)
    throttle = array_throttle(request, template, config.launcher, len(job_overrides))
    checks.check_against_cluster(request, template)

    executor = submission.make_executor(sweep_dir, submission.executor_parameters(
        template, request, config.launcher, throttle))
    if config.launcher.dry_run:
        # The script is the command's output; it goes to stdout unchanged so that it can be diffed.
        sys.stdout.write(submission.render_script(executor, len(job_overrides)))
        sys.stdout.flush()
        _remove_dry_run_folder(sweep_dir)
        # On stderr, so that stdout contains the script alone.
        print(f"dry run: nothing submitted ({len(job_overrides)} task(s), at most {throttle} at once)",
              file=sys.stderr)
        return []

    signals = SignalSettings.from_template(template)
    tasks = [
        submission.SweepTask(task_config.hydra.job.num, list(overrides), run_dir,
                             TaskRunner(task, str(run_dir), int(task_config.hydra.job.num), template.requeue,
                                        str(sweep_dir / submission.SUBMITIT_FOLDER), signals=signals))
        for task_config, (task, run_dir), overrides in zip(task_configs, resolved, job_overrides)
    ]
    submission.check_picklable(tasks)
    for task_config, (_, run_dir) in zip(task_configs, resolved):
        write_hydra_files(task_config, run_dir)
    array_job_id = submission.submit_array(executor, tasks)
    submission.write_manifest(sweep_dir, array_job_id, tasks, template, throttle)
    _log_submitted(array_job_id, tasks, sweep_dir, throttle)

    if not config.launcher.wait:
        return []
    return wait_for_sweep(sweep_dir, config.launcher.poll_interval_s)


def _remove_dry_run_folder(sweep_dir: Path) -> None:
    """Delete the sweep folder when it contains only the multirun.yaml Hydra wrote for this command.

    Used after a dry run and after a rejected submission, so that neither leaves a folder behind.
    Empty date folders above it (multirun/DATE/) go too.
    """
    if sweep_dir.is_dir() and [path.name for path in sweep_dir.iterdir()] == ["multirun.yaml"]:
        (sweep_dir / "multirun.yaml").unlink()
        sweep_dir.rmdir()
        for parent in sweep_dir.parents:
            if parent == Path.cwd() or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()


def _resolve_task(task_config: DictConfig, sweep_dir: Path) -> tuple[Config, Path]:
    """Resolve one task's config as Hydra's run_job would see it, and return it with its folder.

    Raises:
        UserError: an unresolvable value, or a task folder outside the sweep folder.
    """
    from kitsjobs.launch import resolve_config

    with open_dict(task_config):
        run_dir = (sweep_dir / str(task_config.hydra.sweep.subdir)).absolute()
        task_config.hydra.runtime.output_dir = str(run_dir)
    if sweep_dir not in run_dir.parents:
        raise UserError(
            f"task folder {run_dir} is not inside the sweep folder {sweep_dir}; "
            "keep hydra.sweep.subdir a relative name such as ${hydra.job.num}"
        )
    HydraConfig.instance().set_config(task_config)
    return resolve_config(task_config), run_dir


def _common_settings(configs: Sequence[Config], job_overrides: Sequence[Sequence[str]]) -> Config:
    """Return the first config after checking that every task asks for the same launcher and resources.

    Raises:
        UserError: a sweep over ``launcher.*`` or ``slurm.*``; one array has one resource request.
    """
    first = configs[0]
    for config, overrides in zip(configs[1:], job_overrides[1:]):
        for section in ("launcher", "slurm"):
            if getattr(config, section) != getattr(first, section):
                raise UserError(
                    f"task [{' '.join(overrides)}] changes {section}.*, but all tasks of one array share "
                    f"the same {section} settings; sweep over {section}.* in separate commands"
                )
    return first


def write_hydra_files(task_config: DictConfig, run_dir: Path) -> None:
    """Write RUN_DIR/.hydra/config.yaml, hydra.yaml and overrides.yaml as Hydra's run_job does."""
    # Plain containers instead of copies of the config: a deep copy of a DictConfig
    # costs tens of milliseconds, and a sweep writes these files for every task.
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    container = OmegaConf.to_container(task_config, resolve=False, enum_to_str=True)
    assert isinstance(container, dict)
    hydra_node = container.pop("hydra")
    files = {
        "config.yaml": container,
        "hydra.yaml": {"hydra": hydra_node},
        "overrides.yaml": hydra_node["overrides"]["task"],
    }
    for name, value in files.items():
        (hydra_dir / name).write_text(yaml.dump(value, Dumper=_YAML_DUMPER, sort_keys=False))


def _log_submitted(array_job_id: str, tasks: Sequence[submission.SweepTask], sweep_dir: Path,
                   throttle: int) -> None:
    logger.info("submitted array job %s: %d task(s), at most %d at once", array_job_id, len(tasks), throttle)
    for task in tasks:
        logger.info("  task #%d: %s", task.index, " ".join(filter_overrides(task.overrides)) or "(no overrides)")
    logger.info("sweep folder: %s", sweep_dir)
    logger.info("follow it with: python -m kitsjobs.status %s", sweep_dir)


def wait_for_sweep(sweep_dir: Path, poll_interval_s: float) -> list[JobReturn]:
    """Poll the sweep until every task ended and log a summary that lists every failed task.

    Returns:
        One COMPLETED JobReturn per task when all completed.

    Raises:
        SystemExit: with status 1 after the summary when a task did not complete.
    """
    from kitsjobs import status

    manifest = status.read_manifest(sweep_dir)
    reader = status.StatusReader(manifest)
    statuses = reader.refresh()
    while not status.is_finished(statuses):
        time.sleep(poll_interval_s)
        statuses = reader.refresh()

    failed = status.failed_tasks(statuses)
    if not failed:
        logger.info("all %d task(s) completed; results in %s", len(statuses), sweep_dir)
        return [_completed(task.overrides) for task in statuses]
    logger.error("%d of %d task(s) failed:", len(failed), len(statuses))
    for task in failed:
        logger.error("  task #%d %s [%s]; log: %s", task.index, task.state, task.overrides, task.log_path)
    print(f"error: {len(failed)} of {len(statuses)} task(s) failed; details: python -m kitsjobs.status {sweep_dir}",
          file=sys.stderr)
    sys.exit(1)


def _completed(overrides: str) -> JobReturn:
    result = JobReturn()
    result.overrides = overrides.split()
    result.status = JobStatus.COMPLETED
    result._return_value = None
    return result
