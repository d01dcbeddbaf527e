"""Predict label maps for a folder of CT images with a trained checkpoint.

``python -m kitsjobs.predict --checkpoint RUN/checkpoints/best.pt --input DIR --output DIR``
writes OUTPUT/CASE.nii.gz for every image, on the image's own grid (same shape,
affine and voxel size).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from kitsjobs.config import config_from_dict
from kitsjobs.data.layouts import find_images
from kitsjobs.data.volumes import load_volume, read_nifti, save_labels
from kitsjobs.data.layouts import Case
from kitsjobs.errors import UserError
from kitsjobs.infer.sliding import predict_labels
from kitsjobs.models.factory import build_model
from kitsjobs.train.checkpoint import load_checkpoint
from kitsjobs.train.loop import select_device

logger = logging.getLogger(__name__)


def load_model(checkpoint: Path, device: torch.device):
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


def predict_folder(checkpoint: Path, input_dir: Path, output_dir: Path, device_name: str = "auto") -> list[Path]:
    """Predict every image found in ``input_dir`` into ``output_dir/CASE.nii.gz``.

    Returns:
        The written prediction files.

    Raises:
        UserError: bad checkpoint, input folder, or an output folder inside the input.
    """
    input_dir, output_dir = Path(input_dir).resolve(), Path(output_dir).resolve()
    if output_dir == input_dir or input_dir in output_dir.parents:
        raise UserError(f"output folder {output_dir} is inside the input folder {input_dir}; choose another")
    images = find_images(input_dir)
    device = select_device(device_name)
    model, config = load_model(Path(checkpoint), device)
    output_dir.mkdir(parents=True, exist_ok=True)

    written = []
    for name, image_path in tqdm(images, desc="predict", unit="case"):
        volume = load_volume(Case(name, image_path, None), config.data.hu_min, config.data.hu_max)
        labels = predict_labels(
            model, volume.image, config.trainer.sw_roi_size or config.data.patch_size, config.trainer.sw_overlap,
            config.trainer.sw_batch_size, device, amp=config.trainer.amp,
        )
        target = output_dir / f"{name}.nii.gz"
        save_labels(target, labels, read_nifti(image_path))
        logger.info("wrote %s", target)
        written.append(target)
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kitsjobs.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file (best.pt or latest.pt)")
    parser.add_argument("--input", required=True, type=Path,
                        help="images: KiTS23 case folders, volume/ folder, or NAME.nii.gz files")
    parser.add_argument("--output", required=True, type=Path, help="folder for CASE.nii.gz predictions")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run the network")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        written = predict_folder(args.checkpoint, args.input, args.output, args.device)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(written)} prediction(s) written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
