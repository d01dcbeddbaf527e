"""Predict label maps for a folder of CT images with one checkpoint or a fold ensemble.

``python -m kitsjobs.predict --checkpoint RUN/checkpoints/best.pt [MORE.pt ...] --input DIR --output DIR``
writes OUTPUT/CASE.nii.gz for every image, on the image's own grid (same shape, affine and
voxel size). Several checkpoints average their probabilities; ``--tta`` adds mirroring.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm import tqdm

from kitsjobs.cli import positive_int
from kitsjobs.config import Config, config_from_dict
from kitsjobs.data.cache import PreprocessSettings, check_output_outside_input
from kitsjobs.data.layouts import Case, find_images
from kitsjobs.data.volumes import read_nifti, save_labels
from kitsjobs.errors import UserError
from kitsjobs.infer.pipeline import predict_file
from kitsjobs.models.factory import build_model
from kitsjobs.train.checkpoint import load_checkpoint
from kitsjobs.train.loop import select_device

logger = logging.getLogger(__name__)

# Mirror test-time augmentation flips every combination of the three spatial axes.
TTA_AXES = (0, 1, 2)


@dataclass
class PredictOptions:
    """Inference settings; None takes the value stored in the (first) checkpoint's config.

    Attributes:
        overlap: overlap fraction between windows, in [0, 1).
        sw_batch_size: windows per forward pass.
        roi_size: window size (z, y, x) in voxels.
        tta: average over the 8 mirrorings of the three axes (8 times slower).
        amp: float16 autocast on CUDA.
        device: "auto", "cpu" or "cuda".
    """

    overlap: Optional[float] = None
    sw_batch_size: Optional[int] = None
    roi_size: Optional[list[int]] = None
    tta: bool = False
    amp: bool = True
    device: str = "auto"


def load_model(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, Config]:
    """Rebuild the network stored in a checkpoint and return (model, config).

    Raises:
        UserError: missing or unreadable checkpoint.
    """
    if not checkpoint.is_file():
        raise UserError(f"checkpoint {checkpoint} not found; pass RUN/checkpoints/best.pt of a finished run")
    try:
        state = load_checkpoint(checkpoint)
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise UserError(f"cannot load checkpoint {checkpoint}: {error}") from None
    if "model" not in state or "config" not in state:
        raise UserError(f"{checkpoint} is not a kitsjobs checkpoint (no 'model' or 'config' entry)")
    config = config_from_dict(state["config"])
    model = build_model(config.model)
    model.load_state_dict(state["model"])
    return model.to(device), config


def load_ensemble(checkpoints: Sequence[Path], device: torch.device) -> tuple[list[torch.nn.Module], Config]:
    """Load every checkpoint; return the models and the first one's config.

    Raises:
        UserError: no checkpoint, or checkpoints trained with different preprocessing (their
            probabilities would not describe the same grid), naming both files.
    """
    if not checkpoints:
        raise UserError("no checkpoint given; pass --checkpoint RUN/checkpoints/best.pt")
    models, configs = [], []
    for path in checkpoints:
        model, config = load_model(Path(path), device)
        models.append(model)
        configs.append(config)
    reference = PreprocessSettings.from_data_config(configs[0].data)
    for path, config in zip(checkpoints[1:], configs[1:]):
        settings = PreprocessSettings.from_data_config(config.data)
        if settings != reference:
            raise UserError(
                f"checkpoint {path} was trained with preprocessing {settings.to_dict()} but "
                f"{checkpoints[0]} with {reference.to_dict()}; ensemble only checkpoints with the same data settings"
            )
    return models, configs[0]


def _as_case(case: Union[Case, tuple[str, Path]]) -> tuple[str, Path]:
    if isinstance(case, Case):
        return case.name, case.image
    return case[0], Path(case[1])


def predict_cases(
    checkpoints: Sequence[Path],
    cases: Sequence[Union[Case, tuple[str, Path]]],
    output_dir: Path,
    options: Optional[PredictOptions] = None,
) -> list[Path]:
    """Predict each case into ``output_dir/CASE.nii.gz`` on the case image's grid.

    Suits one Slurm array task: give it the task's share of the cases.

    Args:
        checkpoints: one checkpoint, or several for a fold ensemble.
        cases: Case objects or (name, image path) pairs.
        output_dir: folder for the predictions, created if missing; files are written atomically.
        options: inference settings; None uses the checkpoint's.

    Returns:
        The written prediction files, in case order.

    Raises:
        UserError: bad checkpoint, unreadable image or invalid option.
    """
    options = options or PredictOptions()
    device = select_device(options.device)
    models, config = load_ensemble([Path(c) for c in checkpoints], device)
    settings = PreprocessSettings.from_data_config(config.data)
    roi_size = options.roi_size or config.trainer.sw_roi_size or config.data.patch_size
    overlap = config.trainer.sw_overlap if options.overlap is None else options.overlap
    sw_batch_size = options.sw_batch_size or config.trainer.sw_batch_size
    if not 0.0 <= overlap < 1.0:
        raise UserError(f"--overlap {overlap} is invalid; give a fraction in [0, 1), e.g. 0.5")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    logger.info("predicting %d case(s) with %d model(s) on %s, windows %s, overlap %.2f%s",
                len(cases), len(models), device, roi_size, overlap, ", mirror TTA" if options.tta else "")

    written = []
    for name, image_path in tqdm([_as_case(c) for c in cases], desc="predict", unit="case"):
        labels = predict_file(
            models, image_path, settings, roi_size, overlap, sw_batch_size, device,
            amp=options.amp, mirror_axes=TTA_AXES if options.tta else (),
        )
        target = output_dir / f"{name}.nii.gz"
        save_labels(target, labels, read_nifti(image_path))
        logger.info("wrote %s", target)
        written.append(target)
    return written


def predict_folder(
    checkpoints: Sequence[Path], input_dir: Path, output_dir: Path, options: Optional[PredictOptions] = None
) -> list[Path]:
    """Predict every image found in ``input_dir`` (KiTS23, flat or plain files) into ``output_dir``.

    Raises:
        UserError: bad checkpoint, input folder, or an output folder inside the input.
    """
    check_output_outside_input(input_dir, output_dir)
    images = find_images(input_dir)
    return predict_cases(checkpoints, images, output_dir, options)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kitsjobs.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, nargs="+",
                        help="checkpoint file(s) (best.pt or latest.pt); several average their probabilities")
    parser.add_argument("--input", required=True, type=Path,
                        help="images: KiTS23 case folders, volume/ folder, or NAME.nii.gz files")
    parser.add_argument("--output", required=True, type=Path, help="folder for CASE.nii.gz predictions")
    parser.add_argument("--overlap", type=float, default=None,
                        help="overlap fraction between windows in [0, 1) (default: the checkpoint's)")
    parser.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward pass")
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation (8 flips, 8x slower)")
    parser.add_argument("--no-amp", action="store_true", help="run in float32 on CUDA")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run the network")
    slurm = parser.add_argument_group("Slurm", "submit the cases as one array job instead of predicting here")
    slurm.add_argument("--slurm", metavar="TEMPLATE", default=None,
                       help="admin template name (TEMPLATES_DIR/TEMPLATE.yaml), e.g. ippmed-a40")
    slurm.add_argument("--templates-dir", type=Path,
                       default=Path(os.environ.get("KITSJOBS_SLURM_TEMPLATES", "slurm_templates")),
                       help="folder of the admin templates (default: $KITSJOBS_SLURM_TEMPLATES, else slurm_templates)")
    slurm.add_argument("--cases-per-task", type=positive_int, default=1, help="cases one array task predicts")
    slurm.add_argument("--gpus-per-task", type=int, default=1, help="GPUs each array task requests")
    slurm.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    options = PredictOptions(overlap=args.overlap, sw_batch_size=args.sw_batch_size, tta=args.tta,
                             amp=not args.no_amp, device=args.device)
    try:
        if args.slurm:
            return _submit_to_slurm(args, options)
        written = predict_folder(args.checkpoint, args.input, args.output, options)
    except (UserError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(written)} prediction(s) written to {args.output}")
    return 0


def _submit_to_slurm(args: argparse.Namespace, options: PredictOptions) -> int:
    """Submit the prediction as a Slurm array (or print its script with --dry-run); return the exit status."""
    from kitsjobs.slurm.cluster import SlurmCommandError
    from kitsjobs.slurm.predict_array import PredictionArray, submit_prediction_array

    for checkpoint in args.checkpoint:
        if not Path(checkpoint).is_file():
            raise UserError(f"checkpoint {checkpoint} not found; pass RUN/checkpoints/best.pt of a finished run")
    input_dir, output_dir = Path(args.input).resolve(), Path(args.output).resolve()
    if output_dir == input_dir or input_dir in output_dir.parents:
        raise UserError(f"output folder {output_dir} is inside the input folder {input_dir}; choose another")
    array = PredictionArray(args.slurm, args.templates_dir, args.cases_per_task, args.gpus_per_task)
    try:
        result = submit_prediction_array(args.checkpoint, find_images(input_dir), output_dir, options, array,
                                         dry_run=args.dry_run)
    except SlurmCommandError as error:
        print(f"error: {error}; nothing was submitted", file=sys.stderr)
        return 1
    if args.dry_run:
        sys.stdout.write(result)
        return 0
    print(f"submitted prediction array job {result}; predictions will appear in {output_dir}")
    print(f"follow it with: squeue -j {result}; logs in {output_dir / '.kitsjobs_predict' / '.submitit'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
