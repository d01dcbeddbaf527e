"""What one task of a sweep runs: data, training, prediction and scoring.

Takes the resolved, Hydra-free Config and the task's output folder; the same
function runs under the local launcher and on a Slurm compute node.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from kitsjobs.config import Config, config_to_dict
from kitsjobs.data.layouts import Case, find_cases
from kitsjobs.data.splits import kfold_split
from kitsjobs.data.volumes import Volume, load_volume, read_nifti, save_labels
from kitsjobs.errors import UserError
from kitsjobs.fsutil import atomic_write_json, atomic_write_text
from kitsjobs.metrics import METRIC_COLUMNS, compute_case_metrics
from kitsjobs.train.loop import Trainer, load_best_weights

logger = logging.getLogger(__name__)


@dataclass
class TaskResult:
    """Where a finished task left its outputs, and its headline score."""

    run_dir: Path
    checkpoint: Path | None
    predictions: Path | None
    metrics: Path | None
    mean_dice: float


def prepare_demo_data(config: Config) -> None:
    """Generate the procedural phantom cases in data.root when data.demo_cases > 0."""
    if config.data.demo_cases <= 0:
        return
    from kitsjobs.data.phantom import write_demo_dataset

    root = Path(config.data.root or "").expanduser()
    logger.info("demo data: %d phantom cases in %s", config.data.demo_cases, root)
    write_demo_dataset(root, n_cases=config.data.demo_cases, seed=0)


def load_volumes(cases: list[Case], config: Config, desc: str) -> list[Volume]:
    """Load and scale the given cases into memory."""
    return [
        load_volume(case, config.data.hu_min, config.data.hu_max)
        for case in tqdm(cases, desc=desc, unit="case", leave=False)
    ]


def write_run_config(config: Config, run_dir: Path) -> None:
    """Store the resolved config as plain YAML in the run folder."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    atomic_write_text(run_dir / "config.yaml", text)


def predict_and_score(trainer: Trainer, cases: list[Case], volumes: list[Volume], run_dir: Path) -> dict:
    """Predict the validation cases with the best weights and score them with KiTS23 metrics."""
    checkpoint = load_best_weights(trainer.model, trainer.checkpoint_dir)
    prediction_dir = run_dir / "predictions"
    prediction_dir.mkdir(parents=True, exist_ok=True)

    per_case: dict[str, dict[str, float]] = {}
    for case, volume in tqdm(list(zip(cases, volumes)), desc="predict", unit="case"):
        labels = trainer.predict(volume.image)
        save_labels(prediction_dir / f"{case.name}.nii.gz", labels, read_nifti(case.image))
        per_case[case.name] = compute_case_metrics(labels, volume.label, volume.spacing_mm)

    mean = {column: float(np.mean([m[column] for m in per_case.values()])) for column in METRIC_COLUMNS}
    return {"checkpoint": str(checkpoint) if checkpoint else None, "cases": per_case, "mean": mean}


def run_task(config: Config, run_dir: Path) -> float:
    """Train, predict and score one experiment in ``run_dir``; return the mean validation Dice.

    Raises:
        UserError: a dataset or config problem the user can fix.
    """
    started = time.monotonic()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.data.root is None:
        raise UserError("data.root is not set; pass data.root=/path/to/dataset")
    if config.trainer.num_threads > 0:
        torch.set_num_threads(config.trainer.num_threads)
    write_run_config(config, run_dir)

    prepare_demo_data(config)
    cases = find_cases(config.data.root, config.data.layout)
    split = kfold_split([c.name for c in cases], config.data.num_folds, config.data.fold, config.data.split_seed)
    atomic_write_json(run_dir / "split.json", {"fold": config.data.fold, "num_folds": config.data.num_folds,
                                               "seed": config.data.split_seed, **split})
    by_name = {case.name: case for case in cases}
    train_cases = [by_name[name] for name in split["train"]]
    val_cases = [by_name[name] for name in split["val"]]
    logger.info("%d training and %d validation cases (fold %d of %d)",
                len(train_cases), len(val_cases), config.data.fold, config.data.num_folds)

    train_volumes = load_volumes(train_cases, config, "load train")
    val_volumes = load_volumes(val_cases, config, "load val")
    trainer = Trainer(config, run_dir, train_volumes, val_volumes)
    result = trainer.fit()

    metrics_path = predictions = None
    mean_dice = result.best_metric
    if config.trainer.predict_validation and val_cases:
        metrics = predict_and_score(trainer, val_cases, val_volumes, run_dir)
        metrics_path = run_dir / "metrics.json"
        atomic_write_json(metrics_path, metrics)
        predictions = run_dir / "predictions"
        dice_columns = [c for c in METRIC_COLUMNS if c.startswith("dice_")]
        mean_dice = float(np.mean([metrics["mean"][c] for c in dice_columns]))
        logger.info("validation means: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics["mean"].items()))

    logger.info("task finished in %.0f s", time.monotonic() - started)
    logger.info("run folder:  %s", run_dir)
    logger.info("config:      %s", run_dir / "config.yaml")
    logger.info("checkpoint:  %s", trainer.checkpoint_dir / "best.pt")
    if predictions is not None:
        logger.info("predictions: %s", predictions)
        logger.info("metrics:     %s", metrics_path)
    return mean_dice
