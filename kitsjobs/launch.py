"""Hydra entry point: ``python -m kitsjobs.launch [-m] [OVERRIDES]``.

Composes conf/config.yaml onto the typed schema, resolves it to plain data on
this machine, then runs one task per config. Torch and MONAI are imported only
when a task starts, so ``--help`` and submission stay fast.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from kitsjobs.config import Config
from kitsjobs.configstore import register_configs
from kitsjobs.errors import UserError

logger = logging.getLogger(__name__)

register_configs()


def resolve_config(cfg: DictConfig) -> Config:
    """Resolve every interpolation now and return the typed, Hydra-free config.

    Raises:
        UserError: if a mandatory value such as ``data.root`` is missing or an
            interpolation cannot be resolved.
    """
    try:
        config = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as error:
        key = error.full_key or "a mandatory value"
        raise UserError(
            f"{key} is not set; pass it on the command line, e.g. {key}=/path/to/dataset"
        ) from None
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "the config"
        raise UserError(f"invalid value for {key}: {error.msg}") from None
    if not isinstance(config, Config):
        raise TypeError(f"the composed config is a {type(config).__name__}, expected Config")
    return config


def remove_untouched_run_dir(run_dir: Path) -> None:
    """Delete a run folder that holds only what Hydra wrote before the task started.

    A folder with anything else in it (checkpoints, predictions of an earlier
    run) is left as it is.
    """
    hydra_files = {".hydra", "launch.log", "config.yaml"}
    if not run_dir.is_dir() or {path.name for path in run_dir.iterdir()} - hydra_files:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:
        if parent == Path.cwd() or not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one task in Hydra's output folder and return its mean validation Dice.

    A UserError ends a single run with one line on stderr and exit status 2;
    in a sweep it is raised so that the launcher records the task as failed.
    """
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    try:
        config = resolve_config(cfg)

        from kitsjobs.job import run_task

        return run_task(config, run_dir)
    except UserError as error:
        if hydra_config.mode == RunMode.MULTIRUN:
            raise
        logger.error("%s", error)
        remove_untouched_run_dir(run_dir)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
