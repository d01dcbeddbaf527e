"""Evaluate predicted KiTS23 segmentations against reference segmentations.

Command line::

    python -m kitsjobs.evaluate --predictions DIR --references DIR [--csv FILE] [--jobs N]

Both folders may use any of these layouts, and cases are matched by name:

- flat files: ``DIR/CASE.nii.gz``
- KiTS23 case folders: ``DIR/case_XXXXX/segmentation.nii.gz``
- cluster flat layout: ``DIR/seg/NAME.nii.gz``

``.nii`` files are accepted wherever ``.nii.gz`` is. The spacing of each case comes
from the reference's NIfTI header zooms, in array axis order.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import sys
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kitsjobs.data.volumes import read_nifti
from kitsjobs.errors import UserError
from kitsjobs.fsutil import atomic_write_text
from kitsjobs.metrics import METRIC_COLUMNS, compute_case_metrics

logger = logging.getLogger(__name__)

CSV_COLUMNS: tuple[str, ...] = ("case", *METRIC_COLUMNS)
"""Columns of the per-case CSV, the same as the official KiTS23 results table."""

SEGMENTATION_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
CASE_FOLDER_FILE = "segmentation.nii.gz"
CLUSTER_FOLDER = "seg"
SPACING_RELATIVE_TOLERANCE = 1e-3
_MAX_NAMES_IN_MESSAGE = 5
_EXIT_INVALID_INPUT = 2


@dataclass(frozen=True)
class CasePair:
    """A reference segmentation and its prediction, matched by case name."""

    case: str
    reference: Path
    prediction: Path | None  # None when the prediction is missing and counts as all zeros


def evaluate_folders(
    predictions_dir: str | os.PathLike[str],
    references_dir: str | os.PathLike[str],
    jobs: int = 1,
    progress: bool = True,
) -> list[dict[str, str | float]]:
    """Compute the KiTS23 metrics of every reference case in a folder.

    A reference without a prediction is scored against an all-zero prediction, with
    a warning naming the cases. Predictions without a reference are ignored with a
    warning.

    Args:
        predictions_dir: folder of predicted label volumes in any supported layout.
        references_dir: folder of reference label volumes in any supported layout.
        jobs: number of worker processes. 1 evaluates in this process.
        progress: show a tqdm progress bar over cases when stderr is a terminal.

    Returns:
        One dict per reference case, sorted by case name, with the keys of
        :data:`CSV_COLUMNS`: ``case`` (str) and the metric values (float).

    Raises:
        UserError: if a folder is missing or contains no segmentation, no
            prediction matches a reference, a file cannot be read, shapes differ, or
            a volume has labels outside {0, 1, 2, 3}.
    """
    if jobs < 1:
        raise UserError(f"jobs must be at least 1, got {jobs}")
    predictions = find_segmentations(Path(predictions_dir), "predictions")
    references = find_segmentations(Path(references_dir), "references")
    pairs = pair_cases(predictions, references)
    check_shapes(pairs)

    with tqdm(total=len(pairs), unit="case", desc="evaluate", disable=None if progress else True) as bar:
        if jobs == 1:
            return [_evaluate_and_advance(pair, bar) for pair in pairs]
        return _evaluate_in_processes(pairs, jobs, bar)


def find_segmentations(folder: Path, role: str = "segmentations") -> dict[str, Path]:
    """Find the segmentation files in a folder, keyed by case name.

    Args:
        folder: folder in one of the supported layouts (see the module docstring).
        role: what the folder contains, used in error messages ("predictions").

    Returns:
        Case name to file path, for example ``case_00000`` to
        ``folder/case_00000/segmentation.nii.gz``.

    Raises:
        UserError: if the folder does not exist, contains no segmentation
            file, or contains two files for one case.
    """
    if not folder.is_dir():
        raise UserError(f"{role} folder not found: {folder}")

    found: dict[str, Path] = {}
    for case, path in _iter_segmentation_files(folder):
        if case in found:
            raise UserError(
                f"{role} folder has two files for case {case}: {found[case]} and {path}. "
                "Keep one of them"
            )
        found[case] = path

    if not found:
        raise UserError(
            f"no segmentations found in {role} folder {folder}. Expected CASE.nii.gz files, "
            f"case folders with {CASE_FOLDER_FILE}, or {CLUSTER_FOLDER}/NAME.nii.gz"
        )
    return found


def pair_cases(predictions: dict[str, Path], references: dict[str, Path]) -> list[CasePair]:
    """Match predictions to references by case name, sorted by case name.

    Args:
        predictions: case name to prediction file.
        references: case name to reference file.

    Returns:
        One pair per reference case. A missing prediction gives ``prediction=None``
        and a warning naming the cases.

    Raises:
        UserError: if no prediction matches any reference case.
    """
    matched = sorted(set(predictions) & set(references))
    if not matched:
        raise UserError(
            f"no prediction matches a reference case: predictions {_preview(predictions)}, "
            f"references {_preview(references)}. Check the folder arguments"
        )

    missing = sorted(set(references) - set(predictions))
    if missing:
        logger.warning(
            "%d reference cases have no prediction and are scored as all-zero predictions: %s",
            len(missing),
            ", ".join(missing),
        )
    unused = sorted(set(predictions) - set(references))
    if unused:
        logger.warning(
            "%d predictions have no reference and are ignored: %s", len(unused), ", ".join(unused)
        )

    return [
        CasePair(case=case, reference=references[case], prediction=predictions.get(case))
        for case in sorted(references)
    ]


def check_shapes(pairs: Iterable[CasePair]) -> None:
    """Compare prediction and reference shapes from the NIfTI headers alone.

    Raises:
        UserError: naming both files and shapes for the first mismatch, or
            naming a file whose header cannot be read.
    """
    for pair in pairs:
        if pair.prediction is None:
            continue
        reference_shape = read_nifti(pair.reference).shape
        prediction_shape = read_nifti(pair.prediction).shape
        if prediction_shape != reference_shape:
            raise UserError(
                f"{pair.case}: prediction {pair.prediction} has shape {prediction_shape} but "
                f"reference {pair.reference} has shape {reference_shape}. "
                "Resample the prediction onto the reference grid"
            )


def evaluate_case(pair: CasePair) -> dict[str, str | float]:
    """Read one case and compute its KiTS23 metrics.

    Args:
        pair: the case's reference file and prediction file (None for all zeros).

    Returns:
        A dict with the keys of :data:`CSV_COLUMNS`.

    Raises:
        UserError: if a file cannot be read, the shapes differ or a volume
            has labels outside {0, 1, 2, 3}. The message names the files.
    """
    reference, spacing_mm = _read_segmentation(pair.reference)
    if pair.prediction is None:
        prediction = np.zeros(reference.shape, dtype=np.uint8)
    else:
        prediction, prediction_spacing_mm = _read_segmentation(pair.prediction)
        _warn_if_spacing_differs(pair, prediction_spacing_mm, spacing_mm)

    try:
        metrics = compute_case_metrics(prediction, reference, spacing_mm)
    except ValueError as error:
        raise UserError(
            f"{pair.case}: {error} (prediction {pair.prediction}, reference {pair.reference})"
        ) from error
    return {"case": pair.case, **metrics}


def mean_metrics(rows: Sequence[dict[str, str | float]]) -> dict[str, float]:
    """Return the mean of each metric column over the cases."""
    return {column: float(np.mean([float(row[column]) for row in rows])) for column in METRIC_COLUMNS}


def write_metrics_csv(rows: Sequence[dict[str, str | float]], path: Path) -> None:
    """Write one row per case with :data:`CSV_COLUMNS` atomically, creating missing folders.

    Values have 8 decimals, like the official KiTS23 results table.

    Raises:
        UserError: if the file or its folder cannot be written.
    """
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([row["case"], *(f"{float(row[column]):.8f}" for column in METRIC_COLUMNS)])
    try:
        atomic_write_text(path, text.getvalue())
    except OSError as error:
        raise UserError(f"cannot write the CSV file {path}: {error}. Choose a writable path") from None


def format_metrics_table(rows: Sequence[dict[str, str | float]]) -> str:
    """Format the per-case metrics and their means as an aligned text table."""
    case_width = max(len("mean"), *(len(str(row["case"])) for row in rows))
    header = "  ".join([f"{'case':<{case_width}}", *METRIC_COLUMNS])
    lines = [header]
    for row in [*rows, {"case": "mean", **mean_metrics(rows)}]:
        values = [f"{float(row[column]):>{len(column)}.4f}" for column in METRIC_COLUMNS]
        lines.append("  ".join([f"{row['case']!s:<{case_width}}", *values]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation command line and return its exit code (2 for invalid input)."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.csv is not None and args.csv.is_dir():
            # Checked first so that a long evaluation does not end in this error.
            raise UserError(f"cannot write the CSV file {args.csv}: it is a folder. Pass a file path")
        rows = evaluate_folders(args.predictions, args.references, jobs=args.jobs)
        if args.csv is not None:
            write_metrics_csv(rows, args.csv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return _EXIT_INVALID_INPUT

    print(format_metrics_table(rows))
    if args.csv is not None:
        print(f"wrote {len(rows)} cases to {args.csv}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kitsjobs.evaluate",
        description=(
            "Compute KiTS23 Dice and Surface Dice (regions kidney_and_mass, mass, tumor) of "
            "predicted segmentations against references, matched by case name."
        ),
        epilog=(
            f"Folder layouts: DIR/CASE.nii.gz, DIR/CASE/{CASE_FOLDER_FILE} or "
            f"DIR/{CLUSTER_FOLDER}/CASE.nii.gz. A reference without a prediction is scored "
            "against an all-zero prediction. Exit status 2 means invalid input."
        ),
    )
    parser.add_argument(
        "--predictions", type=Path, required=True, metavar="DIR", help="folder of predicted label volumes"
    )
    parser.add_argument(
        "--references", type=Path, required=True, metavar="DIR", help="folder of reference label volumes"
    )
    parser.add_argument(
        "--csv",
        type=Path,
        default=None,
        metavar="FILE",
        help="write one row per case to this CSV file (no mean row), values to 8 decimals",
    )
    parser.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="number of worker processes that evaluate cases in parallel (default 1)",
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _iter_segmentation_files(folder: Path) -> Iterable[tuple[str, Path]]:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            case = _case_name_of_file(path)
            if case is not None:
                yield case, path
        elif path.name == CLUSTER_FOLDER and path.is_dir():
            for cluster_path in sorted(path.iterdir()):
                case = _case_name_of_file(cluster_path) if cluster_path.is_file() else None
                if case is not None:
                    yield case, cluster_path
        elif (path / CASE_FOLDER_FILE).is_file():
            yield path.name, path / CASE_FOLDER_FILE


def _case_name_of_file(path: Path) -> str | None:
    for suffix in SEGMENTATION_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _preview(names: Iterable[str]) -> str:
    ordered = sorted(names)
    listed = ", ".join(ordered[:_MAX_NAMES_IN_MESSAGE])
    hidden_count = len(ordered) - _MAX_NAMES_IN_MESSAGE
    return f"{listed} and {hidden_count} more" if hidden_count > 0 else listed


def _read_segmentation(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Return the label array of a 3D NIfTI file and its voxel size in mm per array axis."""
    image = read_nifti(path)
    try:
        labels = np.asanyarray(image.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise UserError(f"cannot read the voxels of {path}: {error}. Check or replace the file") from None
    zooms = image.header.get_zooms()
    return labels, (float(zooms[0]), float(zooms[1]), float(zooms[2]))


def _warn_if_spacing_differs(
    pair: CasePair,
    prediction_spacing_mm: tuple[float, float, float],
    reference_spacing_mm: tuple[float, float, float],
) -> None:
    if not np.allclose(prediction_spacing_mm, reference_spacing_mm, rtol=SPACING_RELATIVE_TOLERANCE, atol=0):
        logger.warning(
            "%s: prediction spacing %s mm differs from reference spacing %s mm, using the reference spacing",
            pair.case,
            prediction_spacing_mm,
            reference_spacing_mm,
        )


def _evaluate_and_advance(pair: CasePair, bar: tqdm) -> dict[str, str | float]:
    row = evaluate_case(pair)
    bar.update()
    return row


def _evaluate_in_processes(pairs: list[CasePair], jobs: int, bar: tqdm) -> list[dict[str, str | float]]:
    executor = ProcessPoolExecutor(max_workers=jobs)
    try:
        rows = []
        for row in executor.map(evaluate_case, pairs):
            rows.append(row)
            bar.update()
        return rows
    finally:
        # On an error, cases not yet started are dropped, and running ones finish.
        executor.shutdown(wait=True, cancel_futures=True)


if __name__ == "__main__":
    sys.exit(main())
