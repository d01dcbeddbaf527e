"""Facts about a run that tracking needs: its name, group, tags, rank, mode and W&B run id.

Everything here reads the run folder and the environment; nothing imports wandb,
so ``tracking=none`` runs need no W&B installation or account.
"""

from __future__ import annotations

import logging
import re
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import yaml

from kitsjobs.config import Config
from kitsjobs.errors import UserError
from kitsjobs.fsutil import atomic_write_text

logger = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"
"""File in the run folder that stores the W&B run id, so a requeued task continues the same run."""

WANDB_MODES = ("online", "offline", "disabled")
# Older spellings that wandb still accepts in WANDB_MODE.
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
_RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HYDRA_TIME_FOLDER = re.compile(r"\d{2}-\d{2}-\d{2}")
_MAX_RUN_NAME_CHARS = 128


def read_overrides(run_dir: Path) -> list[str]:
    """Return the command-line overrides of a run from ``RUN/.hydra/overrides.yaml``.

    Returns:
        The overrides in command-line order, an empty list when the file is
        missing or contains no list.
    """
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    values = yaml.safe_load(path.read_text())
    if not isinstance(values, list):
        return []
    return [str(value) for value in values]


def run_name(run_dir: Path) -> str:
    """Name a run after its overrides (``hydra.*`` left out), or after its folder when it has none."""
    overrides = [value for value in read_overrides(run_dir) if not value.lstrip("+~").startswith("hydra.")]
    name = " ".join(overrides) or Path(run_dir).resolve().name
    return name[:_MAX_RUN_NAME_CHARS]


def sweep_dir_of(run_dir: Path) -> Optional[Path]:
    """Return the sweep folder a task folder belongs to, or None for a single run.

    Hydra writes ``multirun.yaml`` into the sweep folder, and a task's folder is
    one level below it.
    """
    parent = Path(run_dir).resolve().parent
    return parent if (parent / "multirun.yaml").is_file() else None


def default_group(run_dir: Path) -> Optional[str]:
    """Return the sweep's name used as W&B group, or None for a single run.

    The name is the sweep folder's name; Hydra's default ``multirun/DATE/TIME``
    layout gives ``DATE/TIME``, because the time alone is not unique.
    """
    sweep_dir = sweep_dir_of(run_dir)
    if sweep_dir is None:
        return None
    if _HYDRA_TIME_FOLDER.fullmatch(sweep_dir.name):
        return f"{sweep_dir.parent.name}/{sweep_dir.name}"
    return sweep_dir.name


def run_tags(config: Config) -> list[str]:
    """Return the run's tags: the model name, the fold, then ``tracking.tags`` (no repeats)."""
    tags = [config.model.name, f"fold{config.data.fold}", *config.tracking.tags]
    return list(dict.fromkeys(str(tag) for tag in tags))


def process_rank(environ: Mapping[str, str]) -> int:
    """Return this process's global rank from RANK or SLURM_PROCID (0 when neither is set).

    Raises:
        ValueError: if the variable is not an integer.
    """
    for variable in ("RANK", "SLURM_PROCID"):
        value = environ.get(variable)
        if value is None or value == "":
            continue
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{variable}={value!r} is not an integer rank; unset it or set a number") from None
    return 0


def resolve_mode(configured: Optional[str], environ: Mapping[str, str]) -> str:
    """Choose the W&B mode: online, offline or disabled.

    WANDB_MODE=disabled always wins, so any run can be kept off W&B from the
    shell. Otherwise the order is ``tracking.mode``, then WANDB_MODE, then
    offline inside a Slurm job (SLURM_JOB_ID set, compute nodes often have no
    internet), then online.

    Raises:
        UserError: if ``tracking.mode`` or WANDB_MODE is not a known mode.
    """
    from_env = _normalised_mode(environ.get("WANDB_MODE"), "WANDB_MODE")
    if from_env == "disabled":
        return "disabled"
    from_config = _normalised_mode(configured, "tracking.mode")
    if from_config is not None:
        return from_config
    if from_env is not None:
        return from_env
    if environ.get("SLURM_JOB_ID"):
        return "offline"
    return "online"


def _normalised_mode(value: Optional[str], source: str) -> Optional[str]:
    if value is None or value == "":
        return None
    mode = _MODE_ALIASES.get(value.lower(), value.lower())
    if mode not in WANDB_MODES:
        raise UserError(f"{source}={value!r} is invalid; use one of {', '.join(WANDB_MODES)}, "
                        f"e.g. {source}=offline")
    return mode


def read_run_id(run_dir: Path) -> Optional[str]:
    """Return the W&B run id stored in ``RUN/wandb_run_id``, or None when there is none.

    A file whose content is not a valid run id is ignored with a warning.
    """
    path = Path(run_dir) / RUN_ID_FILE
    if not path.is_file():
        return None
    run_id = path.read_text().strip()
    if not _RUN_ID_PATTERN.fullmatch(run_id):
        logger.warning("ignoring %s: %r is not a W&B run id (letters, digits, - and _)", path, run_id[:80])
        return None
    return run_id


def new_run_id(length: int = 8) -> str:
    """Return a random run id of lowercase letters and digits (not affected by random.seed)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def write_run_id(run_dir: Path, run_id: str) -> None:
    """Store the W&B run id atomically in ``RUN/wandb_run_id``.

    Raises:
        ValueError: if ``run_id`` contains characters other than letters, digits, - and _.
    """
    if not _RUN_ID_PATTERN.fullmatch(run_id):
        raise ValueError(f"W&B run id {run_id!r} is invalid; use 1 to 64 letters, digits, - or _")
    atomic_write_text(Path(run_dir) / RUN_ID_FILE, run_id + "\n")
