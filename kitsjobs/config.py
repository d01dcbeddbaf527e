"""Typed configuration schema shared by the Hydra app and the library.

The dataclasses here import nothing from Hydra, so the library can take them (or
the plain dicts they convert to) from a notebook or a test. ``kitsjobs.configstore``
registers them in Hydra's ConfigStore, where they make unknown keys and wrong types
fail when the config is composed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class DataConfig:
    """Dataset location, layout, folds, preprocessing and patch sampling."""

    # Dataset layout: "kits23" (CASE/imaging.nii.gz + CASE/segmentation.nii.gz)
    # or "flat" (volume/NAME.nii.gz + seg/NAME.nii.gz).
    layout: str = "kits23"
    # Dataset folder; read only, never written (data=demo points it at demo_dir).
    root: Optional[str] = None
    # When above 0, this many procedural phantom cases are generated in demo_dir if
    # missing; root must then be demo_dir.
    demo_cases: int = 0
    # Folder owned by kitsjobs where data=demo generates its phantom cases.
    demo_dir: Optional[str] = None
    # Number of cross-validation folds, and the fold held out for validation.
    num_folds: int = 5
    fold: int = 0
    # Seed of the case shuffle that defines the folds.
    split_seed: int = 0
    # Patch size in voxels, slices-first (z, y, x).
    patch_size: list[int] = field(default_factory=lambda: [64, 128, 128])
    # HU window clipped then scaled to [0, 1].
    hu_min: float = -200.0
    hu_max: float = 400.0
    # Weights of centring a training patch on a random voxel (background) or on a
    # kidney, tumor or cyst voxel; a case lacking a class shares its weight among the others.
    class_ratios: list[float] = field(default_factory=lambda: [0.4, 0.2, 0.2, 0.2])
    # Target voxel size (z, y, x) in mm of preprocessing; null keeps each case's spacing.
    spacing_mm: Optional[list[float]] = None
    # Crop each case to the bounding box of voxels above this HU (and its labels); null keeps it whole.
    body_threshold_hu: Optional[float] = -500.0
    # Preprocessed cache folder (memory-mapped arrays); missing cases are preprocessed into it
    # and training reads only the cache. Null loads the cases into memory instead.
    cache_dir: Optional[str] = None
    # dtype of cached images: float16 (half the disk and page cache) or float32.
    cache_dtype: str = "float16"
    # Worker processes that preprocess missing cases into cache_dir.
    cache_jobs: int = 1
    # Patches per optimizer step.
    batch_size: int = 2
    # Dataset check before training (kitsjobs.data.check: file pairs, headers, label
    # values, NaN intensities): "error" stops on errors, "warn" only logs them, "off" skips it.
    check: str = "error"


@dataclass
class ModelConfig:
    """Network choice and size; see kitsjobs.models.factory for the names."""

    # One of: unet, segresnet, dynunet, swinunetr.
    name: str = "unet"
    in_channels: int = 1
    # Background, kidney, tumor, cyst.
    out_channels: int = 4
    # Feature maps per level (unet).
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 1
    # First level's width (segresnet, dynunet).
    init_filters: int = 16
    dropout: float = 0.0
    # Widest level of dynunet: widths double per level up to this many feature maps.
    max_filters: int = 320
    # Patch (z, y, x) in voxels that dynunet is planned for and swinunetr checks; [] is unset.
    patch_size: list[int] = field(default_factory=list)
    # Voxel size (z, y, x) in mm that the dynunet planner reads. Null takes data.spacing_mm at
    # launch, and when that is null too the planner treats the axes as equally spaced.
    spacing_mm: Optional[list[float]] = None
    # Dynunet in training mode also returns the lower decoder outputs, stacked on dim 1.
    deep_supervision: bool = False
    # Embedding width of swinunetr, a multiple of 12.
    feature_size: int = 24


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    # Only adamw for now.
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 1e-5
    # Learning-rate schedule: "poly" ((1 - step / max_steps) ** 0.9) or "constant".
    schedule: str = "poly"


@dataclass
class TrainerConfig:
    """Length of training, validation, checkpoints and inference settings."""

    max_steps: int = 1000
    # Validation (sliding-window Dice on the held-out fold) every N optimizer steps.
    val_every_steps: int = 250
    # Checkpoint every N optimizer steps (the last step is always saved).
    checkpoint_every_steps: int = 250
    # Also checkpoint when this many minutes passed since the last one; 0 turns it off.
    checkpoint_every_min: float = 30.0
    # Steps between two lines of history.jsonl and the log.
    log_every_steps: int = 10
    # "auto" (CUDA when available), "cpu" or "cuda".
    device: str = "auto"
    # Training processes per node (one per GPU on CUDA): with launcher=slurm, the number of
    # Slurm tasks per node (sbatch --ntasks-per-node); above 1 in total, DistributedDataParallel.
    devices: int = 1
    # Mixed precision on CUDA; ignored on CPU.
    amp: bool = True
    # Deterministic algorithms (slower on GPU).
    deterministic: bool = False
    # Torch intra-op threads; 0 keeps torch's default.
    num_threads: int = 0
    # Resume from checkpoints/latest.pt when the run folder has one; false moves
    # earlier checkpoints to RUN/set_aside_TIMESTAMP/ and starts fresh.
    resume: bool = True
    # Sliding-window inference: window size (z, y, x) in voxels, null for
    # data.patch_size; overlap fraction between windows; windows per forward pass.
    sw_roi_size: Optional[list[int]] = None
    sw_overlap: float = 0.5
    sw_batch_size: int = 2
    # Predict and score the held-out fold at the end of training.
    predict_validation: bool = True


@dataclass
class LauncherConfig:
    """Backend that runs a sweep's tasks, and its options."""

    # "local": the tasks run one after another on this machine; "slurm": one array job.
    name: str = "local"
    # Slurm: block until every task ended and log a summary, instead of returning once queued.
    wait: bool = False
    # Slurm: print the sbatch script a submission would use and submit nothing.
    dry_run: bool = False
    # Slurm: tasks running at once (array throttle); null is the template's GPU quota
    # divided by slurm.gpus_per_task. It may only be lowered below that.
    max_parallel: Optional[int] = None
    # Slurm: job name shown by squeue and sacct.
    job_name: str = "kitsjobs"
    # Slurm with wait=true: seconds between two status queries.
    poll_interval_s: float = 15.0


@dataclass
class SlurmConfig:
    """Resources one task of a sweep requests; limits come from the admin template."""

    # Template name: TEMPLATES_DIR/NAME.yaml.
    template: str = "ippmed-a40"
    # Folder of the admin templates.
    templates_dir: str = "slurm_templates"
    # GPUs per task (GRES); 0 for a CPU-only task.
    gpus_per_task: int = 1
    nodes: int = 1
    # null: the template's cpus_per_gpu times gpus_per_task.
    cpus_per_task: Optional[int] = None
    # Memory per task in GB (0.5 is 512 MB); null: the template's mem_gb_per_gpu times GPUs.
    mem_gb: Optional[float] = None
    # Time limit in minutes; null: the template's default_time_min.
    timeout_min: Optional[int] = None


@dataclass
class TrackingConfig:
    """Experiment tracking: the local history always, Weights & Biases optionally."""

    # "none" keeps only the local history.jsonl; "wandb" also logs to Weights & Biases.
    name: str = "none"
    # W&B project and entity (user or team); a null entity is the account's default.
    project: str = "kitsjobs"
    entity: Optional[str] = None
    # W&B mode: online, offline or disabled. Null picks WANDB_MODE when set,
    # otherwise offline inside a Slurm job and online elsewhere.
    mode: Optional[str] = None
    # Run group; null uses the sweep folder's name (no group for a single run).
    group: Optional[str] = None
    # Tags added to the model name and fold tags.
    tags: list[str] = field(default_factory=list)
    # Save validation slices with prediction and reference overlaid (RUN/images/, W&B).
    log_images: bool = True
    # Validation cases whose overlays are saved at each validation.
    image_cases: int = 2
    # wandb.init attempts before falling back to the local history, and the
    # base delay of the randomised exponential backoff between them.
    init_attempts: int = 3
    init_retry_delay_s: float = 10.0
    # Seconds one wandb.init attempt may take.
    init_timeout_s: float = 90.0


@dataclass
class Config:
    """One experiment: what a single task trains and evaluates."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Seed of weights initialisation and patch sampling.
    seed: int = 0


# --- Ranges of numeric values ---------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(minimum: float) -> Callable[[Any], bool]:
    return lambda value: _number(value) and value >= minimum


def _above(minimum: float) -> Callable[[Any], bool]:
    return lambda value: _number(value) and value > minimum


def _sizes(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_at_least(1)(size) for size in value)


# Key, test of its value, and the valid range as the error message states it. A value
# outside these ranges crashes training or silently trains nothing (a zero learning rate,
# NaN losses of an empty batch, a division by max_steps). Cross-key rules follow below.
VALUE_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("data.num_folds", _at_least(2), "a whole number of 2 or more"),
    ("data.fold", _at_least(0), "a whole number from 0 to data.num_folds - 1"),
    ("data.patch_size", _sizes, "three whole numbers of 1 or more, (z, y, x) in voxels"),
    ("data.batch_size", _at_least(1), "a whole number of 1 or more"),
    ("data.cache_jobs", _at_least(1), "a whole number of 1 or more"),
    ("data.demo_cases", _at_least(0), "a whole number of 0 or more"),
    ("data.hu_min", _number, "a finite number of HU below data.hu_max"),
    ("data.hu_max", _number, "a finite number of HU above data.hu_min"),
    ("data.class_ratios", lambda value: isinstance(value, list) and len(value) == 4
     and all(_at_least(0)(ratio) for ratio in value) and sum(value) > 0,
     "four weights of 0 or more (background, kidney, tumor, cyst), not all 0"),
    ("model.dropout", lambda value: _at_least(0)(value) and value < 1, "a fraction from 0 to below 1"),
    ("optim.lr", _above(0), "a finite number above 0, e.g. 3e-4"),
    ("optim.weight_decay", _at_least(0), "a finite number of 0 or more"),
    ("trainer.max_steps", _at_least(1), "a whole number of 1 or more"),
    ("trainer.val_every_steps", _at_least(1), "a whole number of 1 or more"),
    ("trainer.checkpoint_every_steps", _at_least(1), "a whole number of 1 or more"),
    ("trainer.checkpoint_every_min", _at_least(0), "a finite number of minutes, 0 or more (0 turns it off)"),
    ("trainer.log_every_steps", _at_least(1), "a whole number of 1 or more"),
    ("trainer.devices", _at_least(1), "a whole number of 1 or more"),
    ("trainer.num_threads", _at_least(0), "a whole number of 0 or more (0 keeps torch's default)"),
    ("trainer.sw_roi_size", lambda value: value is None or _sizes(value),
     "null or three whole numbers of 1 or more, (z, y, x) in voxels"),
    ("trainer.sw_overlap", lambda value: _at_least(0)(value) and value < 1, "a fraction from 0 to below 1"),
    ("trainer.sw_batch_size", _at_least(1), "a whole number of 1 or more"),
    ("tracking.image_cases", _at_least(0), "a whole number of 0 or more"),
    ("tracking.init_retry_delay_s", _at_least(0), "a finite number of seconds, 0 or more"),
    ("tracking.init_timeout_s", _above(0), "a finite number of seconds above 0"),
)


def invalid_values(config: Config) -> list[str]:
    """Return one message per numeric value of ``config`` outside its valid range.

    Each message names the key, the value and the valid range, e.g.
    ``optim.lr=nan is invalid; use a finite number above 0, e.g. 3e-4``.
    """
    messages = []
    for key, is_valid, valid_range in VALUE_RULES:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if not is_valid(value):
            messages.append(f"{key}={value} is invalid; use {valid_range}")
    data = config.data
    if not messages and data.fold >= data.num_folds:
        messages.append(f"data.fold={data.fold} is invalid; use 0 to {data.num_folds - 1} "
                        f"(data.num_folds={data.num_folds})")
    if not messages and data.hu_min >= data.hu_max:
        messages.append(f"data.hu_min={data.hu_min} is invalid; use a value below data.hu_max={data.hu_max}")
    return messages


def config_to_dict(config: Config) -> dict[str, Any]:
    """Convert a Config to nested plain dicts and lists (safe to pickle or store)."""
    return dataclasses.asdict(config)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a Config from nested plain dicts, as stored in a checkpoint.

    Raises:
        ValueError: if a section contains a key the schema does not define.
    """
    sections = {}
    for section in dataclasses.fields(Config):
        if section.name not in values:
            continue
        raw = values[section.name]
        if not isinstance(raw, dict):
            sections[section.name] = raw
            continue
        section_type = section.default_factory  # type: ignore[misc]
        known = {f.name for f in dataclasses.fields(section_type)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} in config section '{section.name}'; "
                f"valid keys: {sorted(known)}"
            )
        sections[section.name] = section_type(**raw)
    return Config(**sections)


def config_hash(config: Config) -> str:
    """Return a short SHA-256 of the config's canonical JSON form."""
    text = json.dumps(config_to_dict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
