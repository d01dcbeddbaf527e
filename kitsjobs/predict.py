"""Predict label maps for a folder of CT images with one checkpoint or a fold ensemble.

``python -m kitsjobs.predict --checkpoint RUN/checkpoints/best.pt [MORE.pt ...] --input DIR --output DIR``
writes OUTPUT/CASE.nii.gz for every image, on the image's own grid (same shape, affine and
voxel size). Several checkpoints average their probabilities; ``--tta`` adds mirroring.
An existing OUTPUT/CASE.nii.gz stops the command before any work unless ``--overwrite`` (replace
it) or ``--skip-existing`` (keep it and predict only the other cases) is given.

Every input is checked before the first prediction is written: the output folder, each image's
NIfTI header (readable, 3D) and each checkpoint (readable, no file given twice). An image whose
header reads but whose voxel data is cut off fails only while it is predicted. The other cases
are still predicted and written, the command exits with status 2 listing the failed images, and
``--skip-existing`` then predicts only the cases still missing once the images are fixed.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import nibabel as nib
import torch
from tqdm import tqdm

from kitsjobs.cli import non_negative_int, positive_int, user_path
from kitsjobs.config import Config, config_from_dict
from kitsjobs.data.cache import PreprocessSettings
from kitsjobs.data.layouts import Case, find_images
from kitsjobs.data.volumes import read_nifti, save_labels
from kitsjobs.errors import UserError
from kitsjobs.fsutil import check_output_folder, require_input_folder
from kitsjobs.infer.pipeline import predict_file
from kitsjobs.models.factory import build_model
from kitsjobs.submit import sha256_of_file
from kitsjobs.train.checkpoint import load_checkpoint
from kitsjobs.train.loop import select_device

logger = logging.getLogger(__name__)

# Mirror test-time augmentation flips every combination of the three spatial axes.
TTA_AXES = (0, 1, 2)
DEVICE_CHOICES = ("auto", "cpu", "cuda")
PREDICTION_SUFFIX = ".nii.gz"
# Errors torch.load(weights_only=True) raises for a file that is not a checkpoint, as of torch 2.13:
# EOFError (empty file), KeyError or UnpicklingError (text, NIfTI or a pickle of other objects),
# RuntimeError (a damaged or truncated zip archive).
_UNREADABLE_CHECKPOINT_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, OSError)
# Errors nib.load raises for a file that is not a readable NIfTI image (nibabel 5): ImageFileError
# (not an image, or not gzip data behind a .gz name), OSError and EOFError (a header cut short).
_UNREADABLE_IMAGE_ERRORS = (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError)
# Flags that only shape the Slurm array job, with the defaults they take under --slurm.
SLURM_ONLY_DEFAULTS = {"templates_dir": None, "cases_per_task": 1, "gpus_per_task": 1, "dry_run": False}


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


def read_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """Load a kitsjobs checkpoint with ``torch.load(weights_only=True)``, so no code in it runs.

    Returns:
        The checkpoint's state, which has at least the ``model`` and ``config`` entries.

    Raises:
        UserError: the file is missing, is not a PyTorch checkpoint (text, NIfTI, empty or
            truncated file, or a pickle of objects other than tensors and plain values), or
            lacks the ``model`` or ``config`` entry.
    """
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        raise UserError(f"--checkpoint {checkpoint} is a folder, not a checkpoint file; "
                        f"pass {_checkpoint_in_folder(checkpoint)}")
    if not checkpoint.is_file():
        raise UserError(f"--checkpoint {checkpoint} not found; pass RUN/checkpoints/best.pt of a finished run")
    try:
        state = load_checkpoint(checkpoint)
    except _UNREADABLE_CHECKPOINT_ERRORS as error:
        raise UserError(
            f"--checkpoint {checkpoint} is not a readable kitsjobs checkpoint ({_describe_load_error(error)}); "
            "pass RUN/checkpoints/best.pt or latest.pt of a training run"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(
            f"--checkpoint {checkpoint} is not a kitsjobs checkpoint (no 'model' or 'config' entry); "
            "pass RUN/checkpoints/best.pt or latest.pt of a training run"
        )
    return state


def load_model(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, Config]:
    """Rebuild the network stored in a checkpoint and return (model, config).

    Raises:
        UserError: missing or unreadable checkpoint (see :func:`read_checkpoint`).
    """
    state = read_checkpoint(checkpoint)
    config = config_from_dict(state["config"])
    model = build_model(config.model)
    model.load_state_dict(state["model"])
    return model.to(device), config


def load_ensemble(checkpoints: Sequence[Path], device: torch.device) -> tuple[list[torch.nn.Module], Config]:
    """Load every checkpoint; return the models and the first one's config.

    Raises:
        UserError: no checkpoint, the same checkpoint given twice (see
            :func:`check_distinct_checkpoints`), or checkpoints trained with different
            preprocessing (their probabilities would not describe the same grid), naming both files.
    """
    if not checkpoints:
        raise UserError("no checkpoint given; pass --checkpoint RUN/checkpoints/best.pt")
    check_distinct_checkpoints(checkpoints)
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


def check_distinct_checkpoints(checkpoints: Sequence[Path]) -> None:
    """Reject a checkpoint given twice, by path (symlinks resolved) or by identical content.

    An ensemble of a model with itself only weights that model twice, so it is a mistake in the
    command line. Files of equal size are compared by SHA-256; missing files are left to
    :func:`read_checkpoint` to report.

    Raises:
        UserError: naming both arguments and the fix.
    """
    files = [Path(c) for c in checkpoints if Path(c).is_file()]
    by_path: dict[Path, Path] = {}
    for path in files:
        first = by_path.setdefault(path.resolve(), path)
        if first is not path:
            same = f"{path} is given twice" if str(first) == str(path) else f"{first} and {path} are the same file"
            raise UserError(f"--checkpoint {same}; an ensemble needs different models, so remove one of them")
    sizes = [path.stat().st_size for path in files]
    by_digest: dict[str, Path] = {}
    for path, size in zip(files, sizes):
        if sizes.count(size) < 2:
            continue
        first = by_digest.setdefault(sha256_of_file(path), path)
        if first is not path:
            raise UserError(f"--checkpoint {path} has the same content as {first}; "
                            "an ensemble needs different models, so remove one of them")


def check_image_headers(cases: Sequence[Union[Case, tuple[str, Path]]]) -> None:
    """Read the NIfTI header of every image (no voxel data) and report every bad image at once.

    Raises:
        UserError: one line per unreadable or non-3D image, then a last line naming the fix.
    """
    problems = []
    # No progress bar: a header read takes milliseconds, and the error must start on its own line.
    for name, image_path in (_as_case(c) for c in cases):
        problem = _image_header_problem(image_path)
        if problem:
            problems.append(f"  {name}: {problem}")
    if problems:
        raise UserError(
            f"{len(problems)} of the {len(cases)} image(s) cannot be predicted; nothing was written:\n"
            + "\n".join(problems)
            + "\nreplace or remove these files in --input, then run the command again"
        )


def _image_header_problem(image_path: Path) -> Optional[str]:
    """Describe why an image cannot be predicted from its header alone, or return None."""
    try:
        image = nib.load(str(image_path))
    except _UNREADABLE_IMAGE_ERRORS as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"cannot read {image_path} as NIfTI ({reason})"
    if len(image.shape) != 3:
        return (f"{image_path} has shape {tuple(image.shape)}, but predict needs a 3D CT volume (z, y, x); "
                "save it as a 3D NIfTI image or remove it")
    return None


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
        output_dir: folder for the predictions, created if missing. Files are written atomically
            and replace existing ones of the same name, so callers check first (a requeued Slurm
            array task relies on rewriting its own cases).
        options: inference settings; None uses the checkpoint's.

    Returns:
        The written prediction files, in case order.

    Raises:
        UserError: bad checkpoint, invalid option or an unreadable or non-3D image header, all
            before anything is written. An image whose voxel data cannot be read fails only
            while it is predicted: the other cases are still written, and then the error lists
            the failed images and how to predict only the missing cases.
    """
    options = options or PredictOptions()
    check_image_headers(cases)
    device = _select_device(options.device)
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

    written, failures = [], []
    for name, image_path in tqdm([_as_case(c) for c in cases], desc="predict", unit="case"):
        try:
            labels = predict_file(
                models, image_path, settings, roi_size, overlap, sw_batch_size, device,
                amp=options.amp, mirror_axes=TTA_AXES if options.tta else (),
            )
        except UserError as error:
            logger.error("%s: %s", name, error)
            failures.append(f"  {name}: {error}")
            continue
        target = output_dir / f"{name}{PREDICTION_SUFFIX}"
        save_labels(target, labels, read_nifti(image_path))
        logger.info("wrote %s", target)
        written.append(target)
    if failures:
        raise UserError(
            f"{len(failures)} of the {len(cases)} image(s) failed while being predicted; "
            f"the other {len(written)} prediction(s) were written to {output_dir}:\n" + "\n".join(failures)
            + "\nfix these images, then run the same command with --skip-existing (and without --overwrite) "
            "to predict only the cases missing from the output folder"
        )
    return written


def predict_folder(
    checkpoints: Sequence[Path],
    input_dir: Path,
    output_dir: Path,
    options: Optional[PredictOptions] = None,
    overwrite: bool = False,
    skip_existing: bool = False,
) -> list[Path]:
    """Predict every image found in ``input_dir`` (KiTS23, flat or plain files) into ``output_dir``.

    The output folder is checked before any model is loaded (see :func:`find_prediction_targets`).

    Args:
        checkpoints: one checkpoint, or several for a fold ensemble.
        input_dir: folder of CT images.
        output_dir: folder for ``CASE.nii.gz`` predictions; created if missing, but its parent must exist.
        options: inference settings; None uses the checkpoint's.
        overwrite: replace predictions that already exist in ``output_dir``.
        skip_existing: keep predictions that already exist in ``output_dir`` and predict only
            the other images (exclusive with ``overwrite``).

    Returns:
        The written prediction files, in case order.

    Raises:
        UserError: bad checkpoint or input folder, an output folder inside the input, or
            existing predictions without ``overwrite``.
    """
    images = find_prediction_targets(input_dir, output_dir, overwrite, skip_existing)
    if not images:
        logger.info("every image of %s already has a prediction in %s; nothing to predict", input_dir, output_dir)
        return []
    return predict_cases(checkpoints, images, output_dir, options)


def find_prediction_targets(input_dir: Path, output_dir: Path, overwrite: bool = False,
                            skip_existing: bool = False) -> list[tuple[str, Path]]:
    """List the images of ``input_dir`` after checking that their predictions may go to ``output_dir``.

    ``output_dir`` must lie outside ``input_dir`` and be a folder or a missing path whose parent
    exists. Without ``overwrite`` or ``skip_existing``, no ``CASE.nii.gz`` of these images may
    exist in it yet. With ``skip_existing``, images whose ``CASE.nii.gz`` exists are left out.

    Returns:
        (case name, image path) of every image to predict, in the order
        :func:`kitsjobs.data.layouts.find_images` finds them.

    Raises:
        UserError: naming the flag (``--input`` or ``--output``), the path and the fix, or
            ``overwrite`` and ``skip_existing`` both set.
    """
    if overwrite and skip_existing:
        raise UserError("--overwrite and --skip-existing exclude each other; keep only one of them")
    require_input_folder(input_dir, "--input", "CT images (KiTS23 case folders, volume/ or NAME.nii.gz files)")
    images = find_images(input_dir)
    names = [f"{name}{PREDICTION_SUFFIX}" for name, _ in images]
    check_output_folder(output_dir, "--output", [("--input", Path(input_dir))], names, overwrite or skip_existing)
    if skip_existing:
        output_dir = Path(output_dir).expanduser()
        missing = [(name, image) for name, image in images if not (output_dir / f"{name}{PREDICTION_SUFFIX}").exists()]
        logger.info("--skip-existing: %d of %d image(s) already have a prediction in %s",
                    len(images) - len(missing), len(images), output_dir)
        return missing
    return images


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kitsjobs.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=user_path, nargs="+", action="extend",
                        help="checkpoint file(s) (best.pt or latest.pt); several average their probabilities")
    parser.add_argument("--input", required=True, type=user_path,
                        help="images: KiTS23 case folders, volume/ folder, or NAME.nii.gz files")
    parser.add_argument("--output", required=True, type=user_path, help="folder for CASE.nii.gz predictions")
    parser.add_argument("--overlap", type=float, default=None,
                        help="overlap fraction between windows in [0, 1) (default: the checkpoint's)")
    parser.add_argument("--sw-batch-size", type=positive_int, default=None,
                        help="windows per forward pass, 1 or more (default: the checkpoint's)")
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation (8 flips, 8x slower)")
    parser.add_argument("--no-amp", action="store_true", help="run in float32 on CUDA")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="where to run the network; auto takes CUDA when visible, else the CPU")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true",
                          help="replace predictions that already exist in --output (other files there are kept)")
    existing.add_argument("--skip-existing", action="store_true",
                          help="keep predictions that already exist in --output and predict only the other images")
    slurm = parser.add_argument_group("Slurm", "submit the cases as one array job instead of predicting here")
    slurm.add_argument("--slurm", metavar="TEMPLATE", default=None,
                       help="admin template name (TEMPLATES_DIR/TEMPLATE.yaml), e.g. ippmed-a40")
    # The Slurm-only flags default to None, so that main can tell whether they were given.
    slurm.add_argument("--templates-dir", type=user_path, default=None,
                       help="folder of the admin templates (default: $KITSJOBS_SLURM_TEMPLATES, else slurm_templates)")
    slurm.add_argument("--cases-per-task", type=positive_int, default=None,
                       help="cases one array task predicts (default 1)")
    slurm.add_argument("--gpus-per-task", type=non_negative_int, default=None,
                       help="GPUs each array task requests, 0 for a CPU-only task (default 1)")
    slurm.add_argument("--dry-run", action="store_const", const=True, default=None,
                       help="print the sbatch script and submit nothing")
    return parser.parse_args(argv)


def check_slurm_only_flags(args: argparse.Namespace) -> None:
    """Reject Slurm-only flags without ``--slurm``, then fill in their defaults.

    Raises:
        UserError: naming every Slurm-only flag given without ``--slurm`` and the fix.
    """
    given = [f"--{key.replace('_', '-')}" for key in SLURM_ONLY_DEFAULTS if getattr(args, key) is not None]
    if given and not args.slurm:
        raise UserError(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to a Slurm array job; "
            "add --slurm TEMPLATE (a template name "
            f"from --templates-dir) or drop {', '.join(given)} to predict on this machine"
        )
    for key, default in SLURM_ONLY_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.templates_dir is None:
        args.templates_dir = Path(os.environ.get("KITSJOBS_SLURM_TEMPLATES", "slurm_templates"))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    options = PredictOptions(overlap=args.overlap, sw_batch_size=args.sw_batch_size, tta=args.tta,
                             amp=not args.no_amp, device=args.device)
    try:
        check_slurm_only_flags(args)
        if args.slurm:
            return _submit_to_slurm(args, options)
        written = predict_folder(args.checkpoint, args.input, args.output, options, overwrite=args.overwrite,
                                 skip_existing=args.skip_existing)
    except (UserError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(written)} prediction(s) written to {args.output}")
    return 0


def _submit_to_slurm(args: argparse.Namespace, options: PredictOptions) -> int:
    """Submit the prediction as a Slurm array (or print its script with --dry-run); return the exit status."""
    from kitsjobs.slurm.cluster import SlurmCommandError
    from kitsjobs.slurm.predict_array import PredictionArray, submit_prediction_array

    # Existing predictions are checked here, once, because the array tasks replace them: a
    # requeued task must be able to rewrite the cases it wrote before it was preempted.
    images = find_prediction_targets(args.input, args.output, args.overwrite, args.skip_existing)
    # Bad images and checkpoints fail here, once, instead of in every array task.
    check_image_headers(images)
    check_distinct_checkpoints(args.checkpoint)
    for checkpoint in args.checkpoint:
        read_checkpoint(checkpoint)
    output_dir = Path(args.output).resolve()
    if not images:
        print(f"nothing to submit: every image of {args.input} already has a prediction in {output_dir}")
        return 0
    array = PredictionArray(args.slurm, args.templates_dir, args.cases_per_task, args.gpus_per_task)
    try:
        result = submit_prediction_array(args.checkpoint, images, output_dir, options, array, dry_run=args.dry_run)
    except SlurmCommandError as error:
        print(f"error: {error}; nothing was submitted", file=sys.stderr)
        return 1
    if args.dry_run:
        sys.stdout.write(result)
        return 0
    print(f"submitted prediction array job {result}; predictions will appear in {output_dir}")
    print(f"follow it with: squeue -j {result}; logs in {output_dir / '.kitsjobs_predict' / '.submitit'}")
    return 0


def _select_device(name: str) -> torch.device:
    """Map ``--device`` to a torch device, naming the flag when the request cannot be met."""
    if name not in DEVICE_CHOICES:
        raise UserError(f"--device {name} is invalid; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda: no CUDA device is visible on this machine; use --device auto "
            "(CUDA when visible, else the CPU) or --device cpu"
        )
    return select_device(name)


def _describe_load_error(error: BaseException) -> str:
    """Describe in one line why torch.load rejected a file, leaving out torch's advice to unpickle it."""
    if isinstance(error, EOFError):
        return "the file is empty or truncated"
    if isinstance(error, (pickle.UnpicklingError, KeyError)):
        return "not a PyTorch file, or it holds objects other than tensors and plain values"
    text = " ".join(str(error).split())
    if not text:
        return type(error).__name__
    # torch's messages run to several sentences of advice; the first one names the failure.
    first_sentence = text.split(". ", 1)[0].rstrip(".")
    if isinstance(error, RuntimeError):
        return f"the file is truncated or damaged: {first_sentence}"
    if isinstance(error, PermissionError):
        return "permission denied; check the file's read permission"
    if isinstance(error, OSError):
        # torch 2.13 reports a zip archive cut off after its first entries as EINVAL.
        return f"the file is truncated or damaged: {error.strerror or first_sentence}"
    return first_sentence


def _checkpoint_in_folder(folder: Path) -> str:
    """Suggest the checkpoint file to pass for a run or checkpoints folder given as --checkpoint."""
    for candidate in (folder / "checkpoints" / "best.pt", folder / "best.pt"):
        if candidate.is_file():
            return f"the file inside it, e.g. --checkpoint {candidate}"
    return "a checkpoint file such as RUN/checkpoints/best.pt of a finished training run"


if __name__ == "__main__":
    sys.exit(main())
