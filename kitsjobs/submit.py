"""Check test-set predictions and pack them as a KiTS23 submission zip.

Command line::

    python -m kitsjobs.submit --predictions DIR --images DIR --out FILE.zip [--run RUN_DIR] [--jobs N] [--overwrite]

Every test image must have a prediction with the image's shape, an affine equal to
the image's within :data:`kitsjobs.evaluate.AFFINE_TOLERANCE` on every entry, the
uint8 data type and labels in {0, 1, 2, 3}. Every problem is listed by case, and
the zip is written only when there is none. The zip contains one ``CASE.nii.gz`` per
case (the prediction file unchanged) and ``manifest.json``: the run folder, the
hash of its config, the SHA-256 of each checkpoint, the kitsjobs version, and the
SHA-256 of each file in the zip.

``--out`` must end in ``.zip``, lie outside the predictions, images and run folders, and
be in an existing folder; an existing file is replaced only with ``--overwrite``.

The images folder may use the KiTS23 layout (``CASE/imaging.nii.gz``), the flat
layout (``volume/CASE.nii.gz``) or hold ``CASE.nii.gz`` files. The predictions folder
may use any layout that ``python -m kitsjobs.evaluate`` reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import sys
import zipfile
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np
import yaml
from tqdm import tqdm

from kitsjobs import __version__
from kitsjobs.cli import positive_int, user_path
from kitsjobs.config import config_from_dict, config_hash
from kitsjobs.data.layouts import find_images
from kitsjobs.data.volumes import read_nifti
from kitsjobs.errors import UserError
from kitsjobs.evaluate import AFFINE_TOLERANCE, find_segmentations
from kitsjobs.fsutil import atomic_write, check_output_file, require_input_folder
from kitsjobs.metrics import VALID_LABELS
from kitsjobs.train.checkpoint import BEST, LATEST, load_checkpoint

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
ZIP_SUFFIX = ".zip"
RUN_CONFIG_FILE = "config.yaml"
CHECKPOINT_FOLDER = "checkpoints"
_HASH_CHUNK_BYTES = 1 << 20
_MAX_VALUES_IN_MESSAGE = 10
_EXIT_INVALID_INPUT = 2


class SubmissionError(UserError):
    """Predictions that break the submission rules, with every violation listed by case."""

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        self.violations = list(violations)
        lines = [f"  {case}: {problem}" for case, problem in self.violations]
        super().__init__(
            f"{len(self.violations)} problem(s) in the predictions, no zip written:\n" + "\n".join(lines)
        )


@dataclass(frozen=True)
class SubmissionCase:
    """A test image and its prediction file, matched by case name."""

    case: str
    image: Path
    prediction: Path


def prepare_submission(
    predictions_dir: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str] | None = None,
    jobs: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Check every prediction against its test image, then write the submission zip.

    The zip is written to a temporary file in the output folder and renamed when
    complete, so ``out_path`` is either absent, the former file, or the full zip.

    Args:
        predictions_dir: folder of predicted label volumes, one per test case.
        images_dir: folder of test images; its cases define the test set.
        out_path: zip file to write; it must end in ``.zip``, lie outside the predictions,
            images and run folders, and be in an existing folder.
        run_dir: run folder of the model (``RUN/config.yaml``, ``RUN/checkpoints/``)
            recorded in the manifest; None records no run.
        jobs: number of worker processes that check cases in parallel.
        progress: show a tqdm progress bar over cases when stderr is a terminal.
        overwrite: replace ``out_path`` when it exists.

    Returns:
        The manifest stored in the zip.

    Raises:
        SubmissionError: listing every violation by case (missing or extra case,
            unreadable file, shape, affine, data type or labels).
        UserError: for a missing folder, an invalid run folder, or an output path that
            breaks a rule above, exists (without ``overwrite``) or cannot be written.
    """
    if jobs < 1:
        raise UserError(f"jobs must be at least 1, got {jobs}")
    require_input_folder(Path(predictions_dir), "--predictions", "predicted label volumes")
    require_input_folder(Path(images_dir), "--images", "test images")
    out_path = Path(out_path)
    # The run folder is kitsjobs' own output: a submission may be written into it.
    inputs = [("--predictions", Path(predictions_dir)), ("--images", Path(images_dir))]
    check_output_file(out_path, "--out", inputs, overwrite=overwrite, suffix=ZIP_SUFFIX)
    run_record = describe_run(Path(run_dir)) if run_dir is not None else None

    cases, violations = match_cases(Path(predictions_dir), Path(images_dir))
    violations += check_cases(cases, jobs, progress)
    if violations:
        raise SubmissionError(sorted(violations))

    manifest = {
        "format": MANIFEST_FORMAT,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kitsjobs_version": __version__,
        "predictions_folder": str(Path(predictions_dir).resolve()),
        "images_folder": str(Path(images_dir).resolve()),
        "run": run_record,
        "cases": len(cases),
        "files": [],
    }
    _write_zip(out_path, cases, manifest)
    # The command line prints the result, so the log line is for library callers.
    logger.debug("wrote %d cases to %s", len(cases), out_path)
    return manifest


def match_cases(predictions_dir: Path, images_dir: Path) -> tuple[list[SubmissionCase], list[tuple[str, str]]]:
    """Match test images to prediction files by case name.

    Returns:
        The matched cases sorted by name, and one (case, problem) violation per
        image without a prediction and per prediction without an image.

    Raises:
        UserError: if a folder is missing or contains no image or no prediction.
    """
    images = dict(find_images(images_dir))
    predictions = find_segmentations(predictions_dir, "predictions")

    violations = [
        (case, f"no prediction in {predictions_dir} for the test image {images[case]}")
        for case in sorted(set(images) - set(predictions))
    ]
    violations += [
        (case, f"prediction {predictions[case]} has no test image in {images_dir}; remove it")
        for case in sorted(set(predictions) - set(images))
    ]
    cases = [
        SubmissionCase(case=case, image=images[case], prediction=predictions[case])
        for case in sorted(set(images) & set(predictions))
    ]
    return cases, violations


def check_cases(cases: Sequence[SubmissionCase], jobs: int = 1, progress: bool = True) -> list[tuple[str, str]]:
    """Check each prediction against its image, in ``jobs`` processes.

    Returns:
        One (case, problem) pair per violation, in case order; empty when all pass.
    """
    disable = None if progress else True
    with tqdm(total=len(cases), unit="case", desc="check", disable=disable) as bar:
        if jobs == 1:
            problems = [_check_and_advance(case, bar) for case in cases]
        else:
            with ProcessPoolExecutor(max_workers=jobs) as executor:
                problems = []
                for case_problems in executor.map(check_case, cases):
                    problems.append(case_problems)
                    bar.update()
    return [(case.case, problem) for case, case_problems in zip(cases, problems) for problem in case_problems]


def check_case(case: SubmissionCase) -> list[str]:
    """Check one prediction against its test image.

    Returns:
        The problems found, each a sentence naming the file and the values;
        empty when the prediction is valid.
    """
    try:
        image = read_nifti(case.image)
        prediction = read_nifti(case.prediction)
    except UserError as error:
        return [str(error)]

    problems = _geometry_problems(case, prediction, image)
    data_type = prediction.get_data_dtype()
    if data_type != np.uint8:
        problems.append(
            f"prediction {case.prediction} stores {data_type} voxels; save the labels as uint8"
        )
    problems += _label_problems(case, prediction)
    return problems


def describe_run(run_dir: Path) -> dict[str, Any]:
    """Describe the run folder for the manifest: config hash and checkpoint hashes.

    The config comes from ``RUN/config.yaml``, or else from the ``config`` entry of
    ``best.pt``, ``latest.pt`` or the first other checkpoint (loaded with
    ``weights_only=True``). Its hash is :func:`kitsjobs.config.config_hash`.

    Returns:
        ``folder`` (absolute path), ``config_hash``, ``config_source`` (the file
        relative to the run folder) and ``checkpoints``: one entry per file in
        ``RUN/checkpoints/`` with ``file``, ``size_bytes`` and ``sha256``.

    Raises:
        UserError: if the folder is missing, has no checkpoint, or its config
            cannot be read.
    """
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} not found; pass the folder of the training run to --run")
    checkpoint_dir = run_dir / CHECKPOINT_FOLDER
    checkpoints = _checkpoint_files(checkpoint_dir)
    if not checkpoints:
        raise UserError(
            f"no checkpoint found in {checkpoint_dir}; pass the folder of the run that trained the model"
        )

    source, hash_value = _run_config_hash(run_dir, checkpoints)
    return {
        "folder": str(run_dir.resolve()),
        "config_hash": hash_value,
        "config_source": str(source.relative_to(run_dir)),
        "checkpoints": [
            {
                "file": str(path.relative_to(run_dir)),
                "size_bytes": path.stat().st_size,
                "sha256": sha256_of_file(path),
            }
            for path in checkpoints
        ],
    }


def sha256_of_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the submission command line and return its exit code (2 for invalid input)."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        manifest = prepare_submission(
            args.predictions,
            args.images,
            args.out,
            run_dir=args.run,
            jobs=args.jobs,
            overwrite=args.overwrite,
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return _EXIT_INVALID_INPUT

    print(f"wrote {manifest['cases']} cases and {MANIFEST_NAME} to {args.out}")
    if manifest["run"] is not None:
        print(f"run {manifest['run']['folder']}, config hash {manifest['run']['config_hash']}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kitsjobs.submit",
        description=(
            "Check that every test image has a valid prediction (same shape, affine within "
            f"{AFFINE_TOLERANCE}, uint8 labels in {{0, 1, 2, 3}}), then write a zip of the "
            f"predictions and a {MANIFEST_NAME} with file, config and checkpoint hashes."
        ),
        epilog="Nothing is written unless every case passes. Exit status 2 means invalid input.",
    )
    parser.add_argument("--predictions", type=user_path, required=True, metavar="DIR", help="folder of predicted label volumes")
    parser.add_argument(
        "--images", type=user_path, required=True, metavar="DIR", help="folder of test images; its cases define the test set"
    )
    parser.add_argument("--out", type=user_path, required=True, metavar="FILE.zip", help="submission zip to write")
    parser.add_argument(
        "--run",
        type=user_path,
        default=None,
        metavar="RUN_DIR",
        help="run folder of the model (config.yaml, checkpoints/) to record in the manifest",
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        metavar="N",
        help="number of worker processes that check cases in parallel (default 1)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    return parser


def _geometry_problems(case: SubmissionCase, prediction: nib.Nifti1Image, image: nib.Nifti1Image) -> list[str]:
    if prediction.shape != image.shape:
        return [
            f"prediction {case.prediction} has shape {prediction.shape} but image {case.image} "
            f"has shape {image.shape}; save the prediction on the image grid"
        ]
    difference = float(np.max(np.abs(prediction.affine - image.affine)))
    if not difference <= AFFINE_TOLERANCE:
        return [
            f"prediction {case.prediction} has an affine that differs from the affine of image "
            f"{case.image} by up to {difference:.6g}, more than {AFFINE_TOLERANCE}; save the "
            "prediction with the image's affine"
        ]
    return []


def _label_problems(case: SubmissionCase, prediction: nib.Nifti1Image) -> list[str]:
    try:
        labels = np.asanyarray(prediction.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as error:
        return [f"cannot read the voxels of {case.prediction}: {error}; check or replace the file"]

    maximum = labels.max(initial=0)
    minimum = labels.min(initial=0)
    is_whole = labels.dtype.kind in "biu" or bool(np.all(labels == np.floor(labels)))
    if minimum >= VALID_LABELS[0] and maximum <= VALID_LABELS[-1] and is_whole:
        return []
    invalid_values = np.setdiff1d(np.unique(labels), np.asarray(VALID_LABELS))
    listed = ", ".join(str(value) for value in invalid_values[:_MAX_VALUES_IN_MESSAGE].tolist())
    hidden_count = invalid_values.size - _MAX_VALUES_IN_MESSAGE
    more = f" and {hidden_count} more" if hidden_count > 0 else ""
    return [
        f"prediction {case.prediction} contains labels outside {{0, 1, 2, 3}}: {listed}{more}; "
        "map them to 0 background, 1 kidney, 2 tumor or 3 cyst"
    ]


def _check_and_advance(case: SubmissionCase, bar: tqdm) -> list[str]:
    problems = check_case(case)
    bar.update()
    return problems


def _checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    if not checkpoint_dir.is_dir():
        return []
    # Names starting with a dot are temporary files of an atomic write in progress.
    return sorted(path for path in checkpoint_dir.iterdir() if path.is_file() and not path.name.startswith("."))


def _run_config_hash(run_dir: Path, checkpoints: list[Path]) -> tuple[Path, str]:
    config_file = run_dir / RUN_CONFIG_FILE
    if config_file.is_file():
        try:
            values = yaml.safe_load(config_file.read_text())
            return config_file, config_hash(config_from_dict(values))
        except (OSError, yaml.YAMLError, ValueError, TypeError) as error:
            raise UserError(f"cannot read the run config {config_file}: {error}; check or restore the file") from None

    preferred = {BEST: 0, LATEST: 1}
    source = min(checkpoints, key=lambda path: (preferred.get(path.name, 2), path.name))
    try:
        state = load_checkpoint(source)
        return source, config_hash(config_from_dict(state["config"]))
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, ValueError, TypeError) as error:
        # torch's text for an UnpicklingError spans lines and suggests weights_only=False,
        # which would run code from the file, so only the error's type is shown.
        reason = type(error).__name__ if isinstance(error, pickle.UnpicklingError) else repr(error)
        raise UserError(
            f"run folder {run_dir} has no {RUN_CONFIG_FILE}, and the config of checkpoint {source} "
            f"cannot be read: {reason}; pass the folder of a kitsjobs run"
        ) from None


def _write_zip(out_path: Path, cases: Sequence[SubmissionCase], manifest: dict[str, Any]) -> None:
    """Write the predictions and the manifest, filling ``manifest["files"]`` as each file is added."""

    def write(stream: IO[bytes]) -> None:
        with zipfile.ZipFile(stream, "w") as archive:
            for case in tqdm(cases, unit="case", desc="zip", disable=None):
                manifest["files"].append(_add_prediction(archive, case))
            manifest_text = json.dumps(manifest, indent=2) + "\n"
            archive.writestr(MANIFEST_NAME, manifest_text, compress_type=zipfile.ZIP_DEFLATED)

    try:
        atomic_write(out_path, write)
    except OSError as error:
        raise UserError(f"cannot write the submission zip {out_path}: {error}. Choose a writable path") from None


def _add_prediction(archive: zipfile.ZipFile, case: SubmissionCase) -> dict[str, Any]:
    payload = case.prediction.read_bytes()
    suffix = ".nii.gz" if case.prediction.name.endswith(".nii.gz") else ".nii"
    name = f"{case.case}{suffix}"
    # Gzipped volumes do not shrink further, so they are stored as they are.
    compression = zipfile.ZIP_STORED if suffix == ".nii.gz" else zipfile.ZIP_DEFLATED
    archive.writestr(name, payload, compress_type=compression)
    return {
        "name": name,
        "case": case.case,
        "size_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }


if __name__ == "__main__":
    sys.exit(main())
