"""One task of a sweep: data, training, prediction and scoring.

Takes the resolved, Hydra-free Config and the task's output folder; the same
function runs under the local launcher and on a Slurm compute node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from kitsjobs.config import Config, config_to_dict
from kitsjobs.data.check import check_dataset, check_volume, enforce
from kitsjobs.data.layouts import Case, find_cases
from kitsjobs.data.splits import kfold_split
from kitsjobs.data.cache import (
    PreprocessSettings,
    check_output_outside_input,
    estimate_prepared_bytes,
    load_cached_volume,
    prepare_volume,
    preprocess_cases,
)
from kitsjobs.data.volumes import Volume, read_nifti, save_labels
from kitsjobs.infer.pipeline import predict_file
from kitsjobs.errors import UserError
from kitsjobs.fsutil import atomic_write_json, atomic_write_text
from kitsjobs.metrics import METRIC_COLUMNS, compute_case_metrics
from kitsjobs.tracking import open_tracker
from kitsjobs.train.distributed import DistributedContext, synchronize
from kitsjobs.train.interrupt import StopRequest
from kitsjobs.train.loop import Trainer, load_best_weights

logger = logging.getLogger(__name__)


@dataclass
class TaskResult:
    """Output paths of a finished task and its headline score."""

    run_dir: Path
    checkpoint: Path | None
    predictions: Path | None
    metrics: Path | None
    mean_dice: float


def prepare_demo_data(config: Config) -> None:
    """Generate the procedural phantom cases in data.demo_dir when data.demo_cases > 0.

    Raises:
        UserError: data.root is not data.demo_dir (a dataset given with the demo data
            group, which would be written into), or the demo folder contains other files.
    """
    if config.data.demo_cases <= 0:
        return
    from nibabel.filebasedimages import ImageFileError

    from kitsjobs.data.phantom import write_demo_dataset

    if not config.data.demo_dir:
        raise UserError("data.demo_cases is above 0 but data.demo_dir is not set; set data.demo_dir "
                        "or data.demo_cases=0")
    demo_dir = Path(config.data.demo_dir).expanduser()
    if Path(config.data.root or "").expanduser().resolve() != demo_dir.resolve():
        raise UserError(
            f"data.root={config.data.root} was given with data=demo, which trains on generated "
            f"phantoms in {demo_dir}; add data=kits23 (case folders) or data=flat (volume/ and seg/) "
            "to train on your folder"
        )
    logger.info("demo data: %d phantom cases in %s", config.data.demo_cases, demo_dir)
    try:
        write_demo_dataset(demo_dir, n_cases=config.data.demo_cases, seed=0)
    except (OSError, EOFError, ValueError, ImageFileError) as error:
        raise UserError(
            f"demo folder {demo_dir} contains files that are not kitsjobs phantoms ({error}); remove it, "
            "or set KITSJOBS_DEMO_DIR (or data.demo_dir) to another folder"
        ) from None


# --- Training data: preprocessed cache or memory ----------------------------

# Share of the Slurm memory grant that the in-memory dataset may take; the rest is left
# for the model, the batches and the Python process.
DATASET_MEMORY_FRACTION = 0.8


def load_volumes(cases: list[Case], config: Config, desc: str) -> list[Volume]:
    """Preprocess the given cases into memory, as the cache would store them."""
    settings = PreprocessSettings.from_data_config(config.data)
    # Closed on an error too, so that the error message does not land on the bar's line.
    with tqdm(cases, desc=desc, unit="case", leave=False) as progress:
        return [prepare_volume(case, settings) for case in progress]


def slurm_memory_grant_bytes(environ: Mapping[str, str] = os.environ) -> int | None:
    """Return the memory Slurm granted this job on this node, or None outside Slurm.

    Reads SLURM_MEM_PER_NODE, else SLURM_MEM_PER_CPU x SLURM_CPUS_ON_NODE, else
    SLURM_MEM_PER_GPU x SLURM_GPUS_ON_NODE (all in MB, as Slurm sets them). A variable that is
    not a whole number is logged and ignored, so the grant is unknown rather than wrong.
    """
    for name, count_name in (
        ("SLURM_MEM_PER_NODE", None),
        ("SLURM_MEM_PER_CPU", "SLURM_CPUS_ON_NODE"),
        ("SLURM_MEM_PER_GPU", "SLURM_GPUS_ON_NODE"),
    ):
        if not environ.get(name):
            continue
        megabytes = _whole_number(environ, name)
        count = _whole_number(environ, count_name) if count_name and environ.get(count_name) else 1
        if megabytes is None or count is None:
            return None
        return megabytes * count * 2**20
    return None


def _whole_number(environ: Mapping[str, str], name: str) -> int | None:
    try:
        return int(environ[name])
    except ValueError:
        logger.warning(
            "%s=%r is not a whole number; the dataset's size is not checked against the Slurm memory grant",
            name, environ[name],
        )
        return None


def format_size(size_bytes: float) -> str:
    """Return a size in GiB with one decimal, or in MiB below 1 GiB, e.g. '2.5 GiB' or '20 MiB'."""
    if size_bytes >= 2**30:
        return f"{size_bytes / 2**30:.1f} GiB"
    return f"{size_bytes / 2**20:.0f} MiB"


def check_memory_grant(cases: list[Case], config: Config, environ: Mapping[str, str] = os.environ) -> None:
    """Reject an in-memory dataset larger than the Slurm memory grant allows, before loading it.

    Raises:
        UserError: the estimate exceeds DATASET_MEMORY_FRACTION of the grant; the message
            gives both sizes.
    """
    granted = slurm_memory_grant_bytes(environ)
    if granted is None:
        return
    needed = estimate_prepared_bytes(cases, PreprocessSettings.from_data_config(config.data))
    if needed > DATASET_MEMORY_FRACTION * granted:
        raise UserError(
            f"the {len(cases)} cases need about {format_size(needed)} in memory, more than "
            f"{DATASET_MEMORY_FRACTION:.0%} of the {format_size(granted)} Slurm granted this job; "
            "set data.cache_dir=/path/to/cache to read them by memory map, or request more memory"
        )


def load_training_data(
    train_cases: list[Case], val_cases: list[Case], config: Config
) -> tuple[list[Volume], list[Volume]]:
    """Return the training and validation volumes: memory-mapped from data.cache_dir when set.

    With data.cache_dir, missing or stale cases are preprocessed into it first, and training
    reads only the cache. Without it, the cases are preprocessed into memory after checking
    the size against the Slurm memory grant.

    Raises:
        UserError: cache folder inside data.root or not a folder, a folder there that is not a
            cache case folder, a case cached with other settings, a failed case, or not enough
            memory.
    """
    if config.data.cache_dir is None:
        check_memory_grant(train_cases + val_cases, config)
        return load_volumes(train_cases, config, "load train"), load_volumes(val_cases, config, "load val")

    cache_dir = Path(config.data.cache_dir).expanduser()
    check_output_outside_input(config.data.root or "", cache_dir, option="data.cache_dir")
    settings = PreprocessSettings.from_data_config(config.data)
    # No launcher option rebuilds a cache: the message names another data.cache_dir, or
    # python -m kitsjobs.preprocess --overwrite.
    preprocess_cases(train_cases + val_cases, cache_dir, settings, jobs=config.data.cache_jobs,
                     output_option="data.cache_dir", jobs_option="data.cache_jobs")
    train = [load_cached_volume(cache_dir, case.name) for case in train_cases]
    val = [load_cached_volume(cache_dir, case.name) for case in val_cases]
    return train, val


# --- Dataset check and run-folder rules -------------------------------------

# Sections that define what a run trains; a run folder resumes only with the same values.
RUN_IDENTITY_SECTIONS = ("data", "model", "optim", "seed")
# Keys of those sections that change how a run reads data, not what it learns.
RESUMABLE_KEYS = frozenset({"data.check", "data.cache_dir", "data.cache_jobs", "data.demo_cases"})
# What Hydra writes into the run folder before the task starts, and what the task writes first.
# logs/ contains one file per Slurm attempt and rank.
RUN_START_FILES = frozenset({".hydra", "launch.log", "config.yaml", "split.json", "logs"})


def check_dataset_headers(config: Config) -> None:
    """Check pairing, duplicate ids and headers of data.root before any volume is loaded.

    Reads headers only (about a millisecond per file); label values and intensities
    are checked by :func:`check_loaded_volumes` on the arrays training loads anyway.

    Raises:
        UserError: errors found and data.check is "error" (the message names the files).
    """
    if config.data.check == "off":
        return
    problems = check_dataset(config.data.root or "", config.data.layout, full=False)
    enforce(problems, config.data.check, config.data.root or "", config.data.layout)


def check_loaded_volumes(cases: list[Case], volumes: list[Volume], config: Config) -> None:
    """Check label values ({0, 1, 2, 3}) and finite intensities of the loaded cases.

    Raises:
        UserError: errors found and data.check is "error".
    """
    if config.data.check == "off":
        return
    problems = []
    for case, volume in zip(cases, volumes):
        problems += check_volume(case.name, volume.image, volume.label, str(case.image), str(case.label))
    enforce(problems, config.data.check, config.data.root or "", config.data.layout)


def check_run_folder(config: Config, run_dir: Path) -> None:
    """Reject a run folder whose earlier results this task would overwrite.

    A folder with nothing but what a run writes when it starts is used as it is. A
    folder with results (checkpoints, history, predictions, metrics) is resumed when
    trainer.resume is true and its config.yaml has the same data, model, optim and
    seed values as ``config`` (trainer settings such as max_steps may differ).

    Raises:
        UserError: the folder contains results of another config, results while
            trainer.resume is false, or files of something that is not a kitsjobs run.
    """
    entries = {path.name for path in run_dir.iterdir()} if run_dir.is_dir() else set()
    results = sorted(entries - RUN_START_FILES)
    if not results:
        return
    fix = "pass a new hydra.run.dir, or move the folder away to start over"
    stored_path = run_dir / "config.yaml"
    if not stored_path.is_file():
        raise UserError(f"run folder {run_dir} already contains {', '.join(results[:5])} and no kitsjobs "
                        f"config.yaml; {fix}")
    if not config.trainer.resume:
        raise UserError(f"run folder {run_dir} contains an earlier run and trainer.resume=false would overwrite "
                        f"its {', '.join(results[:5])}; {fix}, or drop trainer.resume=false to resume it")
    try:
        stored = yaml.safe_load(stored_path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"cannot read {stored_path} of the earlier run ({error}); {fix}") from None
    differences = _identity_differences(stored if isinstance(stored, dict) else {}, config_to_dict(config))
    if differences:
        raise UserError(f"run folder {run_dir} contains a run of another config ({'; '.join(differences[:5])}); "
                        f"resuming needs the same data, model, optim and seed; {fix}")


def _identity_differences(stored: dict, current: dict) -> list[str]:
    old, new = _flatten(stored), _flatten(current)
    differences = []
    for key in sorted(new):
        section = key.split(".")[0]
        if section in RUN_IDENTITY_SECTIONS and key not in RESUMABLE_KEYS and key in old and old[key] != new[key]:
            differences.append(f"{key}: {old[key]!r} then, {new[key]!r} now")
    return differences


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# -----------------------------------------------------------------------------


def write_run_config(config: Config, run_dir: Path) -> None:
    """Store the resolved config as plain YAML in the run folder."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    atomic_write_text(run_dir / "config.yaml", text)


def predict_and_score(trainer: Trainer, cases: list[Case], run_dir: Path) -> dict:
    """Predict the validation cases with the best weights and score them with KiTS23 metrics.

    Predictions go through the same path as ``python -m kitsjobs.predict``: preprocessed like
    the training data, then mapped back to each image's grid and scored against its label file.
    """
    checkpoint = load_best_weights(trainer.model, trainer.checkpoint_dir)
    prediction_dir = run_dir / "predictions"
    prediction_dir.mkdir(parents=True, exist_ok=True)
    settings = PreprocessSettings.from_data_config(trainer.config.data)
    sw = trainer.config.trainer

    per_case: dict[str, dict[str, float]] = {}
    with tqdm(cases, desc="predict", unit="case") as progress:
        for case in progress:
            labels = predict_file(
                trainer.model, case.image, settings, sw.sw_roi_size or trainer.config.data.patch_size,
                sw.sw_overlap, sw.sw_batch_size, trainer.device, amp=trainer.use_amp,
            )
            image_file = read_nifti(case.image)
            save_labels(prediction_dir / f"{case.name}.nii.gz", labels, image_file)
            reference = np.asarray(read_nifti(case.label).dataobj).astype(np.uint8)  # type: ignore[arg-type]
            spacing = tuple(float(z) for z in image_file.header.get_zooms()[:3])
            per_case[case.name] = compute_case_metrics(labels, reference, spacing)

    mean = {column: float(np.mean([m[column] for m in per_case.values()])) for column in METRIC_COLUMNS}
    return {"checkpoint": str(checkpoint) if checkpoint else None, "cases": per_case, "mean": mean}


def run_task(config: Config, run_dir: Path, stop: StopRequest | None = None,
             dist: DistributedContext | None = None) -> float:
    """Train, predict and score one experiment in ``run_dir``; return the mean validation Dice.

    Args:
        config: the resolved experiment.
        run_dir: the task's folder; a folder with an earlier run of the same config is resumed.
        stop: flag a signal handler sets; training then checkpoints at the next step boundary
            and raises TrainingInterrupted.
        dist: this process's rank in a multi-process job; only rank 0 checks and writes the
            run folder, tracks and predicts.

    Raises:
        UserError: a dataset or config problem the user can fix.
        TrainingInterrupted: ``stop`` was set before the last step.
    """
    started = time.monotonic()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.data.root is None:
        raise UserError("data.root is not set; pass data.root=/path/to/dataset")
    if config.trainer.num_threads > 0:
        torch.set_num_threads(config.trainer.num_threads)
    is_main = dist is None or dist.is_main
    if is_main:
        check_run_folder(config, run_dir)
        write_run_config(config, run_dir)
    # The other ranks must not see the files rank 0 is writing as results of another run.
    synchronize(dist)

    prepare_demo_data(config)
    check_dataset_headers(config)
    cases = find_cases(config.data.root, config.data.layout)
    split = kfold_split([c.name for c in cases], config.data.num_folds, config.data.fold, config.data.split_seed)
    atomic_write_json(run_dir / "split.json", {"fold": config.data.fold, "num_folds": config.data.num_folds,
                                               "seed": config.data.split_seed, **split})
    by_name = {case.name: case for case in cases}
    train_cases = [by_name[name] for name in split["train"]]
    val_cases = [by_name[name] for name in split["val"]]
    logger.info("%d training and %d validation cases (fold %d of %d)",
                len(train_cases), len(val_cases), config.data.fold, config.data.num_folds)

    train_volumes, val_volumes = load_training_data(train_cases, val_cases, config)
    check_loaded_volumes(train_cases + val_cases, train_volumes + val_volumes, config)
    # --- Tracking: the tracker (W&B or local) is finished on every exit path. ---
    tracking = open_tracker(config, run_dir) if is_main else contextlib.nullcontext(None)
    with tracking as tracker:
        trainer = Trainer(config, run_dir, train_volumes, val_volumes, tracker=tracker, stop=stop, dist=dist)
        result = trainer.fit()

        metrics_path = predictions = None
        mean_dice = result.best_metric
        if config.trainer.predict_validation and val_cases and is_main:
            metrics = predict_and_score(trainer, val_cases, run_dir)
            metrics_path = run_dir / "metrics.json"
            atomic_write_json(metrics_path, metrics)
            predictions = run_dir / "predictions"
            dice_columns = [c for c in METRIC_COLUMNS if c.startswith("dice_")]
            mean_dice = float(np.mean([metrics["mean"][c] for c in dice_columns]))
            logger.info("validation means: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics["mean"].items()))
            tracker.summary(metrics["mean"])

    logger.info("task finished in %.0f s", time.monotonic() - started)
    logger.info("run folder:  %s", run_dir)
    logger.info("config:      %s", run_dir / "config.yaml")
    logger.info("checkpoint:  %s", trainer.checkpoint_dir / "best.pt")
    if predictions is not None:
        logger.info("predictions: %s", predictions)
        logger.info("metrics:     %s", metrics_path)
    return mean_dice
