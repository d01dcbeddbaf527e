"""The Hydra Launcher behind ``python -m kitsjobs.launch -m ...``.

It reads the experiment's ``launcher`` group. ``launcher=local`` runs the tasks
one after another in this process. Every task still runs to the end when another
fails, and a summary lists all failed tasks with their overrides. ``launcher=slurm``
submits them as one Slurm array job (kitsjobs.slurm.sweep).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from kitsjobs.compose import TaskComposer
from kitsjobs.fsutil import atomic_write_json

logger = logging.getLogger(__name__)


@dataclass
class KitsjobsLauncherConf:
    """Hydra-side settings; the user-facing ones are in the ``launcher`` config group."""

    _target_: str = "hydra_plugins.kitsjobs_launcher.kitsjobs_launcher.KitsjobsLauncher"


@dataclass
class KitsjobsSweeperConf(BasicSweeperConf):
    """Settings of ComposingSweeper (those of Hydra's basic sweeper)."""

    _target_: str = "hydra_plugins.kitsjobs_launcher.kitsjobs_launcher.KitsjobsSweeper"


@dataclass
class TaskFailure:
    """One failed task of a sweep."""

    index: int
    overrides: str
    error: str


class SweepLauncher(Launcher):
    """Launch a sweep's tasks with the backend named by ``launcher.name``.

    Hydra loads launchers only from the ``hydra_plugins`` namespace, where
    ``KitsjobsLauncher`` subclasses this one without changes.
    """

    def __init__(self, **_: Any) -> None:
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None
        self.composer: Optional[TaskComposer] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.composer = TaskComposer(config, hydra_context)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None, "setup() runs first"
        assert self.hydra_context is not None
        backend = str(self.config.launcher.name)
        if backend == "local":
            return self._launch_local(job_overrides, initial_job_idx)
        if backend == "slurm":
            from kitsjobs.slurm.sweep import launch_slurm_sweep

            assert self.composer is not None
            return launch_slurm_sweep(self.config, self.composer.compose_transient, job_overrides, initial_job_idx)
        raise ValueError(f"launcher.name='{backend}' is not supported; use launcher=local or launcher=slurm")

    def _load_task_config(self, overrides: Sequence[str], index: int) -> DictConfig:
        assert self.composer is not None, "setup() runs first"
        return self.composer.compose(overrides, index)

    def _launch_local(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        assert self.config is not None, "setup() runs first"
        assert self.hydra_context is not None
        assert self.task_function is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        logger.info("running %d task(s) locally in %s", len(job_overrides), sweep_dir)

        results: list[JobReturn] = []
        failures: list[TaskFailure] = []
        raw_sweep = OmegaConf.to_container(self.config.hydra.sweep, resolve=False)
        assert isinstance(raw_sweep, dict)
        manifest = LocalManifest(sweep_dir, job_overrides, initial_job_idx, str(raw_sweep["subdir"]))
        for offset, overrides in enumerate(job_overrides):
            index = initial_job_idx + offset
            shown = " ".join(filter_overrides(overrides)) or "(no overrides)"
            logger.info("task #%d: %s", index, shown)
            manifest.set_state(offset, "RUNNING")
            task_config = self._load_task_config(overrides, index)
            HydraConfig.instance().set_config(task_config)
            result = run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=task_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            if result.status == JobStatus.FAILED:
                # Logged while the task's own log file is still the active handler.
                error = result._return_value
                logger.error("task #%d failed", index, exc_info=error)
                failures.append(TaskFailure(index, shown, f"{type(error).__name__}: {error}"))
            manifest.set_state(offset, "FAILED" if result.status == JobStatus.FAILED else "COMPLETED")
            results.append(result)
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

        log_summary(len(job_overrides), failures, sweep_dir)
        return results


class LocalManifest:
    """SWEEP_DIR/sweep.json of a local sweep, so that kitsjobs.status and report read it as a Slurm one.

    The task folders follow ``hydra.sweep.subdir``, which must then depend on the task
    index alone (the default, ``${hydra.job.num}``).
    """

    def __init__(self, sweep_dir: Path, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
                 subdir: str) -> None:
        self.path = sweep_dir / "sweep.json"
        folders = [str(initial_job_idx + offset) for offset in range(len(job_overrides))]
        if subdir != "${hydra.job.num}":
            folders = [""] * len(job_overrides)  # not known before Hydra resolves it per task
        self.content: dict[str, Any] = {
            "version": 1,
            "backend": "local",
            "array_job_id": "local",
            "is_array": True,
            "submitit_folder": "",
            "tasks": [
                {"index": initial_job_idx + offset, "task_id": offset, "overrides": list(overrides),
                 "folder": folder, "state": "PENDING"}
                for offset, (overrides, folder) in enumerate(zip(job_overrides, folders))
            ],
        }
        self._write()

    def set_state(self, offset: int, state: str) -> None:
        """Record a task's state (RUNNING, COMPLETED or FAILED) and rewrite the file."""
        self.content["tasks"][offset]["state"] = state
        self._write()

    def _write(self) -> None:
        atomic_write_json(self.path, self.content)


def log_summary(task_count: int, failures: list[TaskFailure], sweep_dir: Path) -> None:
    """Log how many tasks succeeded and every failed task with its overrides and error."""
    if not failures:
        logger.info("all %d task(s) finished; results in %s", task_count, sweep_dir)
        return
    logger.error("%d of %d task(s) failed (logs in %s/INDEX/):", len(failures), task_count, sweep_dir)
    for failure in failures:
        logger.error("  task #%d [%s]: %s", failure.index, failure.overrides, failure.error)


class ComposingSweeper(BasicSweeper):
    """Hydra's basic sweeper, validating the batch with kitsjobs' shared compositions.

    Hydra's own check composes every task from scratch before the launcher
    composes it again; this one composes each distinct set of group choices once.
    It also resolves every task's config and checks its values and its folder
    (kitsjobs.launch.check_sweep_task), so that one bad task rejects the whole sweep
    before any task runs or is submitted.
    """

    sweep_dir_created = False

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None, "setup() runs first"
        raw_sweep = OmegaConf.to_container(self.config.hydra.sweep, resolve=False)
        assert isinstance(raw_sweep, dict)
        from kitsjobs.configstore import UNIQUE_DIR_RESOLVER

        # Resolving the default folder creates it, so it counts as created by this command.
        self.sweep_dir_created = (UNIQUE_DIR_RESOLVER in str(raw_sweep["dir"])
                                  or not Path(str(self.config.hydra.sweep.dir)).exists())
        return super().sweep(arguments)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        composer = getattr(self.launcher, "composer", None)
        if composer is None:
            super().validate_batch_is_legal(batch)
            return
        from kitsjobs.errors import UserError
        from kitsjobs.launch import check_sweep_task

        assert self.config is not None, "setup() runs first"
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        # Hydra's BasicSweeper numbers the tasks of its single batch from 0. Only the
        # composing matters here, so the working copies of compose_transient do.
        try:
            for offset, overrides in enumerate(batch):
                check_sweep_task(composer.compose_transient(overrides, offset), sweep_dir, overrides)
        except UserError:
            remove_rejected_sweep_dir(sweep_dir, self.sweep_dir_created)
            raise


def remove_rejected_sweep_dir(sweep_dir: Path, created: bool) -> None:
    """Remove the multirun.yaml Hydra wrote into a rejected sweep's folder, and the folder if created and empty.

    Empty parent folders of a created folder are removed too, up to the working directory.
    """
    from kitsjobs.launch import remove_untouched_run_dir

    (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
    if created and sweep_dir.is_dir() and not any(sweep_dir.iterdir()):
        remove_untouched_run_dir(sweep_dir)
