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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.core.hydra_config import HydraConfig
import yaml
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import DictConfig, OmegaConf, open_dict

from kitsjobs.config import Config
from kitsjobs.errors import UserError
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
    prepared = _prepare_tasks(load_task_config, job_overrides, initial_job_idx, sweep_dir)
    config = _common_settings([task.config for task in prepared], job_overrides)
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
        submission.SweepTask(task.index, list(overrides), task.run_dir,
                             TaskRunner(task.config, str(task.run_dir), task.index, template.requeue,
                                        str(sweep_dir / submission.SUBMITIT_FOLDER), signals=signals))
        for task, overrides in zip(prepared, job_overrides)
    ]
    submission.check_picklable(tasks)
    for task in prepared:
        write_hydra_files(task.hydra_files, task.run_dir)
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


@dataclass
class PreparedTask:
    """One task resolved on the login node: its config, folder and the .hydra/ file contents."""

    index: int
    config: Config
    run_dir: Path
    hydra_files: dict[str, str]


def _prepare_tasks(load_task_config: TaskConfigLoader, job_overrides: Sequence[Sequence[str]],
                   initial_job_idx: int, sweep_dir: Path) -> list[PreparedTask]:
    """Compose, resolve and render each task in turn; the composed config is not kept."""
    prepared = []
    needs_hydra_config: Optional[bool] = None
    for offset, overrides in enumerate(job_overrides):
        task_config = load_task_config(overrides, initial_job_idx + offset)
        if needs_hydra_config is None:
            # ${hydra:...} reads the global HydraConfig, which costs a copy per task to set;
            # plain ${hydra.job.num} needs none. Checked on the first task and the overrides.
            needs_hydra_config = _uses_hydra_resolver(task_config) or any(
                "${hydra:" in override for task_overrides in job_overrides for override in task_overrides)
        config, run_dir = _resolve_task(task_config, sweep_dir, needs_hydra_config)
        prepared.append(PreparedTask(int(task_config.hydra.job.num), config, run_dir,
                                     render_hydra_files(task_config)))
    return prepared


def _resolve_task(task_config: DictConfig, sweep_dir: Path, needs_hydra_config: bool = True) -> tuple[Config, Path]:
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
    if needs_hydra_config:
        HydraConfig.instance().set_config(task_config)
    return resolve_config(task_config), run_dir


def _uses_hydra_resolver(task_config: DictConfig) -> bool:
    """Return whether a value outside the hydra node interpolates with the ``hydra:`` resolver."""
    for key in task_config.keys():
        if key == "hydra":
            continue
        node = task_config._get_node(key)
        text = OmegaConf.to_yaml(node) if isinstance(node, DictConfig) else str(node._value())
        if "${hydra:" in text:
            return True
    return False


def _common_settings(configs: Sequence[Config], job_overrides: Sequence[Sequence[str]]) -> Config:
    """Return the first config after checking that every task requests the same launcher and resources.

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


def render_hydra_files(task_config: DictConfig) -> dict[str, str]:
    """Return the texts of .hydra/config.yaml, hydra.yaml and overrides.yaml, as Hydra's run_job writes them."""
    # Plain containers instead of copies of the config: a deep copy of a DictConfig
    # costs milliseconds, and a sweep renders these files for every task.
    container = OmegaConf.to_container(task_config, resolve=False, enum_to_str=True)
    assert isinstance(container, dict)
    hydra_node = container.pop("hydra")
    files = {
        "config.yaml": container,
        "hydra.yaml": {"hydra": hydra_node},
        "overrides.yaml": hydra_node["overrides"]["task"],
    }
    return {name: yaml.dump(value, Dumper=_YAML_DUMPER, sort_keys=False) for name, value in files.items()}


def write_hydra_files(hydra_files: dict[str, str], run_dir: Path) -> None:
    """Write the rendered .hydra/ files into RUN_DIR/.hydra/."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    for name, text in hydra_files.items():
        (hydra_dir / name).write_text(text)


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
