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
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class DataConfig:
    """Where the cases are and how training patches are drawn from them."""

    # Dataset layout: "kits23" (CASE/imaging.nii.gz + CASE/segmentation.nii.gz)
    # or "flat" (volume/NAME.nii.gz + seg/NAME.nii.gz).
    layout: str = "kits23"
    # Dataset folder; read only, never written.
    root: Optional[str] = None
    # When above 0, procedural phantom cases are generated in root if missing.
    demo_cases: int = 0
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
    # Fraction of patches centred on a foreground (kidney, tumor or cyst) voxel.
    foreground_ratio: float = 0.67
    # Patches per optimizer step.
    batch_size: int = 2


@dataclass
class ModelConfig:
    """Network choice and size; see kitsjobs.models.factory for the names."""

    # One of: unet, segresnet.
    name: str = "unet"
    in_channels: int = 1
    # Background, kidney, tumor, cyst.
    out_channels: int = 4
    # Feature maps per level (unet), and the first level's width (segresnet).
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 1
    init_filters: int = 16
    dropout: float = 0.0


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
    """How a sweep's tasks are run."""

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
    """Experiment tracking."""

    # "none" keeps only the local history.jsonl.
    name: str = "none"


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


def config_to_dict(config: Config) -> dict[str, Any]:
    """Convert a Config to nested plain dicts and lists (safe to pickle or store)."""
    return dataclasses.asdict(config)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a Config from nested plain dicts, as stored in a checkpoint.

    Raises:
        ValueError: if a section holds a key the schema does not define.
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
