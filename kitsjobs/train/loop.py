"""Patch-based training loop with validation, checkpoints and exact resume."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch
from monai.losses import DiceCELoss
from tqdm import tqdm

from kitsjobs import __version__
from kitsjobs.config import Config, config_hash, config_to_dict
from kitsjobs.data.sampling import PatchSampler
from kitsjobs.data.volumes import Volume
from kitsjobs.infer.sliding import predict_labels
from kitsjobs.metrics import METRIC_COLUMNS, compute_case_metrics, dice
from kitsjobs.models.factory import build_model
from kitsjobs.train.checkpoint import load_latest, save_checkpoint, set_aside
from kitsjobs.train.distributed import (
    DistributedContext,
    any_rank,
    process_device,
    sample_index,
    synchronize,
    wrap_model,
)
from kitsjobs.train.interrupt import StopRequest, TrainingInterrupted
from kitsjobs.train.prefetch import BatchPrefetcher
from kitsjobs.train.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"


class Tracker(Protocol):
    """Receiver of the training history (kitsjobs.tracking implements it)."""

    run_id: Optional[str]

    def log(self, record: dict[str, Any]) -> None:
        """Record one history line; ``record["step"]`` is the optimizer step."""

    def finish(self) -> None:
        """Flush and close the run."""


@dataclass
class TrainResult:
    """Outcome of Trainer.fit."""

    last_step: int
    best_metric: float
    best_step: int


def changed_settings(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    """List ``key: old -> new`` for every setting that differs between two nested config dicts."""
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += changed_settings(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


def select_device(name: str) -> torch.device:
    """Map trainer.device ("auto", "cpu", "cuda") to a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"trainer.device='{name}' is invalid; use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch, and optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def validation_dice(labels: np.ndarray, reference: np.ndarray) -> float:
    """Mean Dice over the three KiTS23 regions for one case (labels in {0, 1, 2, 3})."""
    # Comparisons instead of np.isin: the regions {1,2,3}, {2,3} and {2} are
    # thresholds on the label value, and np.isin is 100 times slower on large volumes.
    masks = [(labels > 0, reference > 0), (labels >= 2, reference >= 2), (labels == 2, reference == 2)]
    return float(np.mean([dice(predicted, expected) for predicted, expected in masks]))


class Trainer:
    """Train one model on patches of ``train_volumes``, validating on ``val_volumes``.

    Args:
        config: the resolved experiment config.
        run_dir: the task's output folder; checkpoints/ and history.jsonl go there.
        train_volumes: labelled cases to sample patches from.
        val_volumes: labelled cases scored by sliding-window Dice.
        tracker: optional receiver of every history line (W&B, for instance).
        stop: flag that a signal handler sets to make ``fit`` checkpoint and stop
            at the next step boundary.
        dist: this process's place in a data-parallel job; with several ranks the model is
            wrapped in DistributedDataParallel, each rank samples its own patches, the stop
            flag is all-reduced every step, and rank 0 alone writes checkpoints and history.
    """

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        train_volumes: Sequence[Volume],
        val_volumes: Sequence[Volume],
        tracker: Optional[Tracker] = None,
        stop: Optional[StopRequest] = None,
        dist: Optional[DistributedContext] = None,
    ) -> None:
        self.config = config
        self.tracker = tracker
        self.stop = stop or StopRequest()
        self.dist = dist or DistributedContext()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.history_path = self.run_dir / HISTORY_FILE
        self.val_volumes = list(val_volumes)
        self.device = process_device(select_device(config.trainer.device), self.dist)

        seed_everything(config.seed, config.trainer.deterministic)
        self.sampler = PatchSampler(
            train_volumes, config.data.patch_size, config.data.class_ratios, config.seed
        )
        self.model = build_model(config.model).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.use_amp = config.trainer.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        # Called by training steps; self.model stays unwrapped for state_dict and inference.
        self.train_model = wrap_model(self.model, self.device, self.dist)

        self.step = 0
        self.best_metric = float("-inf")
        self.best_step = -1
        # Per-region means of the latest validation, keys val_dice_REGION and val_sd_REGION.
        self.last_validation: dict[str, float] = {}

    def _lr_factor(self, step: int) -> float:
        if self.config.optim.schedule == "constant":
            return 1.0
        if self.config.optim.schedule == "poly":
            return (1.0 - min(step, self.config.trainer.max_steps) / self.config.trainer.max_steps) ** 0.9
        raise ValueError(f"optim.schedule='{self.config.optim.schedule}' is invalid; use poly or constant")

    def state_dict(self) -> dict[str, Any]:
        """Collect everything a resumed run needs, as tensors and plain data."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "rng": capture_rng_state(),
            "config": config_to_dict(self.config),
            "config_hash": config_hash(self.config),
            "tracker_run_id": self.tracker.run_id if self.tracker else None,
            "kitsjobs_version": __version__,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by ``state_dict``."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best_metric = float(state["best_metric"])
        self.best_step = int(state["best_step"])
        restore_rng_state(state["rng"])

    def resume(self) -> bool:
        """Continue from the run's newest readable checkpoint; return whether one was found."""
        state = load_latest(self.checkpoint_dir)
        if state is None:
            return False
        if state.get("config_hash") != config_hash(self.config):
            changed = changed_settings(state.get("config") or {}, config_to_dict(self.config))
            logger.warning(
                "resuming from %s, written with other settings: %s",
                self.checkpoint_dir,
                ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "") or "(not recorded)",
            )
        self.load_state_dict(state)
        if self.dist.is_main:
            self._truncate_history(self.step)
        logger.info("resumed from %s at step %d", self.checkpoint_dir, self.step)
        return True

    def _truncate_history(self, step: int) -> None:
        # Lines written after the checkpoint belong to steps that will run again.
        if not self.history_path.exists():
            return
        kept = [
            line
            for line in self.history_path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        self.history_path.write_text("".join(f"{line}\n" for line in kept))

    def fit(self) -> TrainResult:
        """Train until ``trainer.max_steps``, validating and checkpointing on schedule."""
        trainer = self.config.trainer
        if trainer.resume:
            self.resume()
        elif self.dist.is_main:
            set_aside(self.checkpoint_dir, self.history_path)
        synchronize(self.dist)
        self.model.train()
        # Patch sampling runs on the CPU; drawing the next batch during the current step
        # takes it off the training step's time.
        self.prefetcher = BatchPrefetcher(self._draw_batch)
        progress = tqdm(
            total=trainer.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True
        )
        # The bar and the prefetch thread are closed on every exit, so that an error message
        # printed after an exception starts on its own line instead of the bar's.
        try:
            self._train_steps(progress)
        finally:
            progress.close()
            self.prefetcher.close()
        return TrainResult(self.step, self.best_metric, self.best_step)

    def _train_steps(self, progress: tqdm) -> None:
        """Run optimizer steps up to ``trainer.max_steps``, validating and checkpointing on schedule.

        Raises:
            TrainingInterrupted: the stop request was set before the last step.
        """
        trainer = self.config.trainer
        started = time.monotonic()
        last_checkpoint = started
        # Training time and steps since the last history line, for patches/s.
        window_train_s, window_steps = 0.0, 0
        while self.step < trainer.max_steps:
            step_started = time.monotonic()
            loss = self._train_step()
            window_train_s += time.monotonic() - step_started
            window_steps += 1
            self.step += 1
            progress.update(1)

            record: dict[str, Any] = {}
            if self.step % trainer.log_every_steps == 0 or self.step == trainer.max_steps:
                record.update(loss=loss, lr=self.scheduler.get_last_lr()[0])
                record["elapsed_s"] = round(time.monotonic() - started, 3)
                record.update(self._throughput_record(window_steps, window_train_s))
                window_train_s, window_steps = 0.0, 0
                progress.set_postfix(loss=f"{loss:.4f}")
            is_best = False
            if self.val_volumes and (self.step % trainer.val_every_steps == 0 or self.step == trainer.max_steps):
                score = self.validate()
                record["val_dice"] = score
                record.update(self.last_validation)
                is_best = score > self.best_metric
                if is_best:
                    self.best_metric, self.best_step = score, self.step
                logger.info("step %d: validation Dice %.4f, mean of 3 regions (best %.4f at step %d)",
                            self.step, score, self.best_metric, self.best_step)
            if record:
                self._append_history({"step": self.step, **record})
            due_by_time = (
                trainer.checkpoint_every_min > 0
                and time.monotonic() - last_checkpoint >= trainer.checkpoint_every_min * 60
            )
            # All ranks stop at the same step, even when only one of them got the signal.
            stopping = any_rank(self.stop.is_set(), self.device, self.dist)
            if (is_best or due_by_time or stopping or self.step % trainer.checkpoint_every_steps == 0
                    or self.step == trainer.max_steps):
                if self.dist.is_main:
                    save_checkpoint(self.checkpoint_dir, self.state_dict(), is_best=is_best)
                if stopping:
                    synchronize(self.dist)
                last_checkpoint = time.monotonic()
            if stopping and self.step < trainer.max_steps:
                progress.close()
                logger.warning("stop requested (%s): checkpoint written at step %d", self.stop.reason, self.step)
                raise TrainingInterrupted(self.step, self.stop.reason)

    def _draw_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sampler.sample(sample_index(step, self.dist), self.config.data.batch_size)

    def _train_step(self) -> float:
        images, labels = self.prefetcher.get(self.step)
        inputs = torch.from_numpy(images).to(self.device)
        targets = torch.from_numpy(labels).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.use_amp):
            loss = self._loss(self.train_model(inputs), targets)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())

    def _loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.dim() == targets.dim() + 1:
            # Deep supervision (DynUNet in training mode): (B, heads, C, z, y, x), every head
            # already at full resolution; head i weighs 1/2**i, as in nnU-Net.
            weights = [0.5**head for head in range(outputs.shape[1])]
            total = sum(w * self.loss(outputs[:, head], targets) for head, w in enumerate(weights))
            return total / sum(weights)
        return self.loss(outputs, targets)

    def validate(self) -> float:
        """Return the mean Dice over validation cases and KiTS23 regions.

        Also stores the per-region means of Dice and Surface Dice in
        ``last_validation`` and hands each case to the tracker's ``log_images``
        (when it has one), which saves overlays of a few cases.
        """
        scores = []
        case_metrics = []
        with tqdm(self.val_volumes, desc="validate", unit="case", leave=False) as volumes:
            for volume in volumes:
                labels = self.predict(volume.image)
                scores.append(validation_dice(labels, volume.label))  # type: ignore[arg-type]
                case_metrics.append(compute_case_metrics(labels, volume.label, volume.spacing_mm))  # type: ignore[arg-type]
                log_images = getattr(self.tracker, "log_images", None)
                if log_images is not None:
                    log_images(self.step, volume.name, volume.image, labels, volume.label)
        self.last_validation = {
            f"val_{column}": float(np.mean([metrics[column] for metrics in case_metrics]))
            for column in METRIC_COLUMNS
        }
        return float(np.mean(scores))

    def _throughput_record(self, steps: int, train_s: float) -> dict[str, float]:
        """Training patches per second over the last ``steps`` steps, and the peak CUDA memory in GiB."""
        record = {}
        if train_s > 0:
            record["patches_per_s"] = round(steps * self.config.data.batch_size / train_s, 3)
        if self.device.type == "cuda":
            record["gpu_mem_peak_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return record

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Label one scaled volume with the current weights."""
        trainer = self.config.trainer
        return predict_labels(
            self.model, image, trainer.sw_roi_size or self.config.data.patch_size, trainer.sw_overlap,
            trainer.sw_batch_size, self.device, amp=self.use_amp,
        )

    def _append_history(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with self.history_path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)


def load_best_weights(model: torch.nn.Module, checkpoint_dir: Path) -> Optional[Path]:
    """Load best.pt (or latest.pt) weights into ``model``; return the file used."""
    from kitsjobs.train.checkpoint import BEST, LATEST, load_checkpoint

    for name in (BEST, LATEST):
        path = Path(checkpoint_dir) / name
        if path.exists():
            model.load_state_dict(load_checkpoint(path)["model"])
            return path
    return None
