"""Experiment tracking: the local history and validation images, and Weights & Biases runs.

``build_tracker`` (or the ``open_tracker`` context manager) gives the Trainer an
object with ``run_id``, ``log(record)``, ``log_images(...)``, ``summary(values)``
and ``finish(exit_code)``. W&B is imported only when ``tracking=wandb`` and the
mode is not disabled.
"""

from __future__ import annotations

from kitsjobs.tracking.build import build_tracker, init_with_retries, open_tracker
from kitsjobs.tracking.images import save_overlays
from kitsjobs.tracking.runinfo import RUN_ID_FILE, read_run_id, resolve_mode, write_run_id
from kitsjobs.tracking.trackers import STEP_METRIC, LocalTracker, WandbTracker

__all__ = [
    "RUN_ID_FILE",
    "STEP_METRIC",
    "LocalTracker",
    "WandbTracker",
    "build_tracker",
    "init_with_retries",
    "open_tracker",
    "read_run_id",
    "resolve_mode",
    "save_overlays",
    "write_run_id",
]
