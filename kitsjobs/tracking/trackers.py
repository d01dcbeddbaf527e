"""Trackers that receive the training history: local only, or local plus Weights & Biases.

The Trainer writes ``history.jsonl`` itself. A tracker adds validation images
(``RUN/images/``), and the W&B tracker sends every history line with the
optimizer step as the explicit x-axis ``trainer/step``. That makes a resumed run continue
without repeats even when W&B's own ``_step`` counter starts again at 0.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from kitsjobs.tracking.images import save_overlays

logger = logging.getLogger(__name__)

STEP_METRIC = "trainer/step"
"""W&B key of the optimizer step, the x-axis of every other metric."""

IMAGE_FOLDER = "images"


def wandb_key(name: str) -> str:
    """Map a history.jsonl key to its W&B name: ``val_*`` under ``val/``, the rest under ``train/``."""
    if name.startswith("val_"):
        return "val/" + name[len("val_"):]
    return "train/" + name


class LocalTracker:
    """Tracker without W&B: writes validation overlays to ``RUN/images/`` only.

    Args:
        run_dir: the task's output folder, or None to write nothing (ranks other than 0).
        log_images: whether :meth:`log_images` writes PNG files.
        image_cases: how many distinct validation cases get overlays.
    """

    def __init__(self, run_dir: Optional[Path], log_images: bool = True, image_cases: int = 2) -> None:
        self.run_id: Optional[str] = None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.log_images_enabled = log_images and run_dir is not None
        self.image_cases = image_cases
        self._image_case_names: list[str] = []

    def log(self, record: dict[str, Any]) -> None:
        """Do nothing: the Trainer already appended ``record`` to history.jsonl."""

    def log_images(self, step: int, case_name: str, image: np.ndarray, labels: np.ndarray,
                   reference: np.ndarray) -> list[Path]:
        """Save overlays of one validation case at optimizer step ``step``.

        Only the first ``image_cases`` case names seen get overlays, so every
        validation shows the same cases.

        Args:
            step: optimizer step of the validation.
            case_name: the validation case's name.
            image, labels, reference: slices-first volumes (see :func:`save_overlays`).

        Returns:
            The written PNG paths (none for an ignored case or when images are off).
        """
        if not self.log_images_enabled or self.run_dir is None:
            return []
        if case_name not in self._image_case_names:
            if len(self._image_case_names) >= self.image_cases:
                return []
            self._image_case_names.append(case_name)
        prefix = self.run_dir / IMAGE_FOLDER / f"step{step:07d}_{case_name}"
        return save_overlays(image, labels, reference, prefix)

    def summary(self, values: dict[str, float]) -> None:
        """Do nothing: final metrics are in metrics.json."""

    def finish(self, exit_code: int = 0) -> None:
        """Do nothing: there is no run to close."""


class WandbTracker(LocalTracker):
    """Tracker that also sends every history line and overlay to a W&B run.

    A failure while logging never stops training: the first one is logged as a
    warning and the tracker continues with the local files only.

    Args:
        run: the object returned by ``wandb.init``.
        run_dir: the task's output folder.
        log_images, image_cases: as for :class:`LocalTracker`.
    """

    def __init__(self, run: Any, run_dir: Path, log_images: bool = True, image_cases: int = 2) -> None:
        super().__init__(run_dir, log_images, image_cases)
        self.run: Any = run
        self.run_id = str(run.id)
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC)
        run.define_metric("val/dice", summary="max")
        atexit.register(self.finish)

    def log(self, record: dict[str, Any]) -> None:
        """Send one history line; ``record["step"]`` becomes ``trainer/step``."""
        row: dict[str, Any] = {STEP_METRIC: int(record["step"])}
        row.update({wandb_key(key): value for key, value in record.items() if key != "step"})
        self._send(row)

    def log_images(self, step: int, case_name: str, image: np.ndarray, labels: np.ndarray,
                   reference: np.ndarray) -> list[Path]:
        """Save overlays as :class:`LocalTracker` does, then log them as W&B images."""
        paths = super().log_images(step, case_name, image, labels, reference)
        if paths and self.run is not None:
            import wandb

            images = [wandb.Image(str(path), caption=f"{case_name} {path.stem.rsplit('_', 1)[-1]} "
                                  "(left reference, right prediction)") for path in paths]
            self._send({STEP_METRIC: step, f"val_images/{case_name}": images})
        return paths

    def summary(self, values: dict[str, float]) -> None:
        """Store final metrics (e.g. metrics.json means) in the run summary under ``final/``."""
        if self.run is None:
            return
        try:
            self.run.summary.update({f"final/{key}": value for key, value in values.items()})
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            self._disable(error)

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run (safe to call twice); a non-zero ``exit_code`` marks it failed."""
        run, self.run = self.run, None
        atexit.unregister(self.finish)
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            logger.warning("closing W&B run %s failed (%s: %s); its local files are kept",
                           self.run_id, type(error).__name__, error)

    def _send(self, row: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.log(row)
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            self._disable(error)

    def _disable(self, error: Exception) -> None:
        logger.warning("W&B logging failed (%s: %s); run %s continues with the local history only",
                       type(error).__name__, error, self.run_id)
        run, self.run = self.run, None
        atexit.unregister(self.finish)
        try:
            run.finish(exit_code=1)
        except Exception as close_error:  # noqa: BLE001 - the run is already broken
            logger.debug("closing the failed W&B run raised %s", close_error)
