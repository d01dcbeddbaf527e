"""Build the tracker a task logs to, and close it on every exit path."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, Optional, Union

from kitsjobs.config import Config, config_to_dict
from kitsjobs.errors import UserError
from kitsjobs.tracking.runinfo import (
    default_group,
    new_run_id,
    process_rank,
    read_overrides,
    read_run_id,
    resolve_mode,
    run_name,
    run_tags,
    write_run_id,
)
from kitsjobs.tracking.trackers import LocalTracker, WandbTracker

logger = logging.getLogger(__name__)

TRACKER_NAMES = ("none", "wandb")
AnyTracker = Union[LocalTracker, WandbTracker]


def build_tracker(
    config: Config,
    run_dir: Path,
    resume_run_id: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> AnyTracker:
    """Build the tracker named by ``tracking.name`` for the task in ``run_dir``.

    Ranks other than 0 get a tracker that writes nothing. ``tracking=none`` and
    W&B mode ``disabled`` never import wandb. For W&B the run id is, in order,
    ``resume_run_id``, the id stored in the run folder (:func:`stored_run_id`),
    or a new one. It is written to ``RUN/wandb_run_id`` before ``wandb.init``, so a
    requeued task continues the same run even when it was killed before its first checkpoint.

    Args:
        config: the resolved experiment config.
        run_dir: the task's output folder; W&B files go to ``run_dir/wandb/``.
        resume_run_id: W&B run id stored in the checkpoint being resumed, if any.
        environ: environment to read (RANK, SLURM_PROCID, SLURM_JOB_ID,
            WANDB_MODE); ``os.environ`` when None.

    Returns:
        A :class:`WandbTracker`, or a :class:`LocalTracker` when tracking is off
        or W&B could not start (logged as one warning).

    Raises:
        UserError: if ``tracking.name`` or the W&B mode is not a known value.
    """
    environ = os.environ if environ is None else environ
    tracking = config.tracking
    run_dir = Path(run_dir)
    if tracking.name not in TRACKER_NAMES:
        raise UserError(f"tracking.name={tracking.name!r} is invalid; use tracking=none or tracking=wandb")
    if tracking.init_attempts < 1:
        raise UserError(f"tracking.init_attempts={tracking.init_attempts} is invalid; use 1 or more")

    rank = process_rank(environ)
    if rank != 0:
        logger.debug("rank %d: tracking is done by rank 0 only", rank)
        return LocalTracker(None)
    local = LocalTracker(run_dir, tracking.log_images, tracking.image_cases)
    if tracking.name == "none":
        return local
    mode = resolve_mode(tracking.mode, environ)
    if mode == "disabled":
        logger.info("W&B is disabled (tracking.mode or WANDB_MODE); keeping the local history only")
        return local


    run_id = resume_run_id or stored_run_id(run_dir) or new_run_id()
    write_run_id(run_dir, run_id)
    run = init_with_retries(lambda: _init_wandb_run(config, run_dir, run_id, mode), tracking.init_attempts,
                            tracking.init_retry_delay_s, description=f"W&B run {run_id} ({mode})")
    if run is None:
        return local
    logger.info("W&B run %s (%s, project %s, group %s)", run_id, mode, tracking.project, run.group or "none")
    return WandbTracker(run, run_dir, tracking.log_images, tracking.image_cases)


def stored_run_id(run_dir: Path) -> Optional[str]:
    """Return the W&B run id of an earlier attempt: ``RUN/wandb_run_id``, else the checkpoint's.

    The checkpoint is opened memory-mapped, so reading its ``tracker_run_id``
    does not load the weights. An unreadable checkpoint counts as none.
    """
    run_id = read_run_id(run_dir)
    if run_id is not None:
        return run_id
    import torch

    from kitsjobs.train.checkpoint import LATEST, PREVIOUS

    for name in (LATEST, PREVIOUS):
        path = Path(run_dir) / "checkpoints" / name
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, EOFError, OSError, ValueError) as error:
            logger.warning("cannot read the W&B run id from %s (%s)", path, error)
            continue
        value = state.get("tracker_run_id")
        return str(value) if value else None
    return None


def init_with_retries(
    start: Callable[[], Any],
    attempts: int,
    base_delay_s: float,
    description: str,
    sleep: Callable[[float], None] = time.sleep,
) -> Optional[Any]:
    """Call ``start`` until it succeeds, waiting a random, doubling delay between attempts.

    The delay before attempt k (k >= 2) is uniform in [0, base_delay_s * 2**(k-2)],
    so hundreds of array tasks that failed together do not retry together.

    Returns:
        What ``start`` returned, or None when every attempt raised; the last
        error is then logged as one warning.
    """
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            if attempt == attempts:
                logger.warning("%s could not start after %d attempt(s) (%s: %s); training continues "
                               "with the local history only", description, attempts, type(error).__name__, error)
                return None
            delay_s = random.uniform(0.0, base_delay_s * 2 ** (attempt - 1))
            logger.info("%s: attempt %d of %d failed (%s: %s); retrying in %.1f s",
                        description, attempt, attempts, type(error).__name__, error, delay_s)
            sleep(delay_s)
    return None


def _init_wandb_run(config: Config, run_dir: Path, run_id: str, mode: str) -> Any:
    import wandb

    tracking = config.tracking
    wandb_config = config_to_dict(config)
    wandb_config["overrides"] = read_overrides(run_dir)
    return wandb.init(
        project=tracking.project,
        entity=tracking.entity,
        id=run_id,
        resume="allow",
        name=run_name(run_dir),
        group=tracking.group or default_group(run_dir),
        tags=run_tags(config),
        job_type="train",
        config=wandb_config,
        dir=str(run_dir),
        mode=mode,
        # console="off": the task's log file already contains the output, and
        # capturing stdout of hundreds of tasks costs time for no new fact.
        settings=wandb.Settings(console="off", init_timeout=tracking.init_timeout_s),
    )


@contextlib.contextmanager
def open_tracker(
    config: Config,
    run_dir: Path,
    resume_run_id: Optional[str] = None,
) -> Iterator[AnyTracker]:
    """Build the tracker and close it however the block ends.

    The run is finished with exit code 0 after a normal end and 1 after an
    exception. While the block runs in the main thread with SIGTERM at its
    default action (which would end the process without cleanup), SIGTERM
    raises SystemExit(143) instead, so the run is finished too. ``atexit``
    covers interpreter exits that skip the block's end.

    Yields:
        The tracker returned by :func:`build_tracker`.
    """
    tracker = build_tracker(config, run_dir, resume_run_id)
    exit_code = 1
    with _sigterm_raises_system_exit():
        try:
            yield tracker
            exit_code = 0
        finally:
            tracker.finish(exit_code=exit_code)


@contextlib.contextmanager
def _sigterm_raises_system_exit() -> Iterator[None]:
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not in_main_thread or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def raise_system_exit(signum: int, frame: Optional[FrameType]) -> None:
        logger.warning("received SIGTERM; closing the tracker and exiting")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, raise_system_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
