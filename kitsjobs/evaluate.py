"""Evaluate predicted KiTS23 segmentations against reference segmentations, and rank runs.

Command line::

    python -m kitsjobs.evaluate --predictions DIR --references DIR [--csv FILE] [--jobs N] [--overwrite]
    python -m kitsjobs.evaluate --predictions [NAME=]DIR [NAME=]DIR ... --references DIR
        [--leaderboard FILE.md] [--leaderboard-csv FILE.csv] [--csv FILE] [--jobs N] [--overwrite]

With one predictions folder the command prints one line per case and the mean.
With several, each folder is one team or run, named by its folder name unless
given as NAME=DIR, and the command ranks them as the KiTS23 challenge ranks teams
(see :func:`kitsjobs.metrics.rank_teams`) and prints the leaderboard as Markdown.

Output files are checked before any case is read: each must lie outside the predictions and
references folders, its folder must exist, and an existing file is replaced only with
``--overwrite``.

All folders may use any of these layouts, and cases are matched by name:

- flat files: ``DIR/CASE.nii.gz``
- KiTS23 case folders: ``DIR/case_XXXXX/segmentation.nii.gz``
- cluster flat layout: ``DIR/seg/NAME.nii.gz``

``.nii`` files are accepted wherever ``.nii.gz`` is. The spacing of each case comes
from the reference's NIfTI header zooms, in array axis order. A prediction must have
its reference's shape, and an affine equal to the reference's within
:data:`AFFINE_TOLERANCE` on every entry.
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

import nibabel as nib
import numpy as np
from tqdm import tqdm

from kitsjobs.cli import positive_int, user_path
from kitsjobs.data.volumes import read_nifti
from kitsjobs.errors import UserError
from kitsjobs.fsutil import atomic_write_text, check_output_file, require_input_folder
from kitsjobs.metrics import METRIC_COLUMNS, compute_case_metrics, rank_teams

logger = logging.getLogger(__name__)

CSV_COLUMNS: tuple[str, ...] = ("case", *METRIC_COLUMNS)
"""Columns of the per-case CSV, the same as the official KiTS23 results table."""

SEGMENTATION_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
CASE_FOLDER_FILE = "segmentation.nii.gz"
CLUSTER_FOLDER = "seg"
AFFINE_TOLERANCE = 1e-3
"""Largest difference allowed between matching entries of the prediction and reference affines (mm, or mm per voxel)."""

LEADERBOARD_COLUMNS: tuple[str, ...] = (
    "place",
    "team",
    "mean_dice",
    "mean_surface_dice",
    "dice_rank",
    "surface_dice_rank",
    "aggregate_rank",
    "cases",
    "missing_cases",
    *METRIC_COLUMNS,
)
"""Columns of the leaderboard; the metric columns hold each team's mean over the cases."""

_MAX_NAMES_IN_MESSAGE = 5
_EXIT_INVALID_INPUT = 2


@dataclass(frozen=True)
class CasePair:
    """A reference segmentation and its prediction, matched by case name."""

    case: str
    reference: Path
    prediction: Path | None  # None when the prediction is missing and counts as all zeros


@dataclass(frozen=True)
class PredictionSet:
    """A folder of predictions scored as one team or run."""

    name: str
    folder: Path


@dataclass(frozen=True)
class PredictionSetResult:
    """The per-case metrics of one prediction set against the references."""

    name: str
    folder: Path
    rows: list[dict[str, str | float]]  # one per reference case, keys of CSV_COLUMNS
    missing_cases: tuple[str, ...]  # reference cases without a prediction, scored as all zeros
    extra_cases: tuple[str, ...]  # predictions without a reference, ignored


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
            prediction matches a reference, a file cannot be read, shapes or affines
            differ, or a volume has labels outside {0, 1, 2, 3}.
    """
    if jobs < 1:
        raise UserError(f"jobs must be at least 1, got {jobs}")
    predictions = find_segmentations(Path(predictions_dir), "predictions")
    references = find_segmentations(Path(references_dir), "references")
    pairs = pair_cases(predictions, references)
    check_geometry(pairs)
    return _evaluate_pairs(pairs, jobs, progress)


def evaluate_prediction_sets(
    prediction_sets: Sequence[PredictionSet],
    references_dir: str | os.PathLike[str],
    jobs: int = 1,
    progress: bool = True,
) -> list[PredictionSetResult]:
    """Compute the KiTS23 metrics of several prediction folders against the same references.

    Every set is scored on every reference case. A missing prediction counts as an
    all-zero prediction, and a prediction without a reference is ignored, each with
    a warning naming the set and the cases. Cases of all sets share one pool of
    worker processes and one progress bar.

    Args:
        prediction_sets: the folders to score, with unique names.
        references_dir: folder of reference label volumes in any supported layout.
        jobs: number of worker processes. 1 evaluates in this process.
        progress: show a tqdm progress bar over cases when stderr is a terminal.

    Returns:
        One result per set, in the order given.

    Raises:
        UserError: if two sets share a name, or for any reason listed in
            :func:`evaluate_folders`, naming the set.
    """
    if jobs < 1:
        raise UserError(f"jobs must be at least 1, got {jobs}")
    if not prediction_sets:
        raise UserError("no predictions folder given; pass at least one with --predictions")
    _check_unique_names(prediction_sets)
    references = find_segmentations(Path(references_dir), "references")

    pairs_by_set: list[list[CasePair]] = []
    extra_by_set: list[tuple[str, ...]] = []
    for prediction_set in prediction_sets:
        predictions = find_segmentations(prediction_set.folder, f"{prediction_set.name} predictions")
        pairs_by_set.append(pair_cases(predictions, references, set_name=prediction_set.name))
        extra_by_set.append(tuple(sorted(set(predictions) - set(references))))
    check_geometry([pair for pairs in pairs_by_set for pair in pairs])

    rows = _evaluate_pairs([pair for pairs in pairs_by_set for pair in pairs], jobs, progress)
    results = []
    for prediction_set, pairs, extra in zip(prediction_sets, pairs_by_set, extra_by_set):
        set_rows, rows = rows[: len(pairs)], rows[len(pairs) :]
        missing = tuple(pair.case for pair in pairs if pair.prediction is None)
        results.append(
            PredictionSetResult(prediction_set.name, prediction_set.folder, set_rows, missing, extra)
        )
    return results


def parse_prediction_set(text: str) -> PredictionSet:
    """Parse a ``--predictions`` value: ``NAME=DIR``, or ``DIR`` named by its folder name.

    Text before the first ``=`` is taken as the name only when it contains no path
    separator, so a folder path that contains ``=`` still works as ``DIR``.

    Raises:
        UserError: if the name or the folder is empty.
    """
    name, separator, folder = text.partition("=")
    if not separator or os.sep in name:
        name, separator, folder = "", "", text
    if separator and not name:
        raise UserError(f"invalid --predictions value {text!r}: the name is empty. Pass DIR or NAME=DIR")
    if not folder:
        raise UserError(f"invalid --predictions value {text!r}: the folder is empty. Pass DIR or NAME=DIR")
    path = Path(folder).expanduser()
    return PredictionSet(name=name or Path(os.path.abspath(path)).name, folder=path)


def build_leaderboard(results: Sequence[PredictionSetResult]) -> list[dict[str, str | float | int]]:
    """Rank prediction sets and return the leaderboard rows, best first.

    Returns:
        One dict per set with the keys of :data:`LEADERBOARD_COLUMNS`. Each contains
        the place, the team name, and the mean Dice and mean Surface Dice over all
        cases and regions. The rank on each mean follows, then their mean as the
        aggregate rank (lower is better). The last columns are the number of cases,
        the number of missing cases, and the mean of each metric column.
    """
    rankings = rank_teams(
        {result.name: [_metric_values(row) for row in result.rows] for result in results}
    )
    results_by_name = {result.name: result for result in results}
    board: list[dict[str, str | float | int]] = []
    for ranking in rankings:
        result = results_by_name[ranking.team]
        board.append(
            {
                "place": ranking.place,
                "team": ranking.team,
                "mean_dice": ranking.mean_dice,
                "mean_surface_dice": ranking.mean_surface_dice,
                "dice_rank": ranking.dice_rank,
                "surface_dice_rank": ranking.surface_dice_rank,
                "aggregate_rank": ranking.aggregate_rank,
                "cases": len(result.rows),
                "missing_cases": len(result.missing_cases),
                **mean_metrics(result.rows),
            }
        )
    return board


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


def pair_cases(
    predictions: dict[str, Path], references: dict[str, Path], set_name: str | None = None
) -> list[CasePair]:
    """Match predictions to references by case name, sorted by case name.

    Args:
        predictions: case name to prediction file.
        references: case name to reference file.
        set_name: name of the prediction set, put before the warnings and the error.

    Returns:
        One pair per reference case. A missing prediction gives ``prediction=None``
        and a warning naming the cases. Predictions without a reference are left
        out, with a warning naming them.

    Raises:
        UserError: if no prediction matches any reference case.
    """
    prefix = f"{set_name}: " if set_name else ""
    matched = sorted(set(predictions) & set(references))
    if not matched:
        raise UserError(
            f"{prefix}no prediction matches a reference case: predictions {_preview(predictions)}, "
            f"references {_preview(references)}. Check the folder arguments"
        )

    missing = sorted(set(references) - set(predictions))
    if missing:
        logger.warning(
            "%s%d reference cases have no prediction and are scored as all-zero predictions: %s",
            prefix,
            len(missing),
            ", ".join(missing),
        )
    unused = sorted(set(predictions) - set(references))
    if unused:
        logger.warning(
            "%s%d predictions have no reference and are ignored: %s",
            prefix,
            len(unused),
            ", ".join(unused),
        )

    return [
        CasePair(case=case, reference=references[case], prediction=predictions.get(case))
        for case in sorted(references)
    ]


def check_geometry(pairs: Iterable[CasePair]) -> None:
    """Compare prediction and reference geometry from the NIfTI headers alone.

    The shapes must be equal and the affines equal within :data:`AFFINE_TOLERANCE`
    on every entry. Header zooms (voxel spacing) that differ while the affines
    agree give a warning, and the metrics use the reference's spacing.

    Raises:
        UserError: naming both files and shapes (and affines) for the first
            mismatch, or naming a file whose header cannot be read.
    """
    reference_headers: dict[Path, nib.Nifti1Image] = {}
    for pair in pairs:
        if pair.prediction is None:
            continue
        if pair.reference not in reference_headers:
            reference_headers[pair.reference] = read_nifti(pair.reference)
        reference = reference_headers[pair.reference]
        prediction = read_nifti(pair.prediction)
        _check_pair_geometry(pair, prediction, reference)


def evaluate_case(pair: CasePair) -> dict[str, str | float]:
    """Read one case and compute its KiTS23 metrics.

    The affines are not compared here: :func:`check_geometry` does that for all
    cases before any is evaluated.

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
        prediction, _ = _read_segmentation(pair.prediction)

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
    _write_output(path, text.getvalue(), "CSV file")


def write_set_metrics_csv(results: Sequence[PredictionSetResult], path: Path) -> None:
    """Write one row per set and case, with a ``team`` column before :data:`CSV_COLUMNS`, atomically.

    Raises:
        UserError: if the file or its folder cannot be written.
    """
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("team", *CSV_COLUMNS))
    for result in results:
        for row in result.rows:
            values = (f"{float(row[column]):.8f}" for column in METRIC_COLUMNS)
            writer.writerow([result.name, row["case"], *values])
    _write_output(path, text.getvalue(), "CSV file")


def write_leaderboard_csv(board: Sequence[dict[str, str | float | int]], path: Path) -> None:
    """Write the leaderboard with :data:`LEADERBOARD_COLUMNS` atomically, means to 8 decimals.

    Raises:
        UserError: if the file or its folder cannot be written.
    """
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(LEADERBOARD_COLUMNS)
    for row in board:
        writer.writerow([_format_leaderboard_value(column, row[column], decimals=8) for column in LEADERBOARD_COLUMNS])
    _write_output(path, text.getvalue(), "leaderboard CSV file")


def format_leaderboard_markdown(board: Sequence[dict[str, str | float | int]]) -> str:
    """Format the leaderboard as a Markdown table, best first, means to 4 decimals."""
    lines = [
        "| " + " | ".join(LEADERBOARD_COLUMNS) + " |",
        "| " + " | ".join("---" if column == "team" else "---:" for column in LEADERBOARD_COLUMNS) + " |",
    ]
    for row in board:
        cells = [_format_leaderboard_value(column, row[column], decimals=4) for column in LEADERBOARD_COLUMNS]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def write_leaderboard_markdown(board: Sequence[dict[str, str | float | int]], path: Path) -> None:
    """Write :func:`format_leaderboard_markdown` to a file atomically.

    Raises:
        UserError: if the file or its folder cannot be written.
    """
    _write_output(path, format_leaderboard_markdown(board) + "\n", "leaderboard file")


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
        prediction_sets = [parse_prediction_set(text) for text in args.predictions]
        _check_input_folders(args, prediction_sets)
        # Checked first so that a long evaluation does not end in this error.
        _check_output_paths(args, prediction_sets)
        if len(prediction_sets) == 1 and not _wants_leaderboard(args):
            return _run_single_folder(args, prediction_sets[0].folder)
        return _run_ranking(args, prediction_sets)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return _EXIT_INVALID_INPUT


def _run_single_folder(args: argparse.Namespace, predictions_dir: Path) -> int:
    rows = evaluate_folders(predictions_dir, args.references, jobs=args.jobs)
    if args.csv is not None:
        write_metrics_csv(rows, args.csv)

    print(format_metrics_table(rows))
    if args.csv is not None:
        print(f"wrote {len(rows)} cases to {args.csv}")
    return 0


def _run_ranking(args: argparse.Namespace, prediction_sets: list[PredictionSet]) -> int:
    results = evaluate_prediction_sets(prediction_sets, args.references, jobs=args.jobs)
    board = build_leaderboard(results)
    if args.leaderboard is not None:
        write_leaderboard_markdown(board, args.leaderboard)
    if args.leaderboard_csv is not None:
        write_leaderboard_csv(board, args.leaderboard_csv)
    if args.csv is not None:
        write_set_metrics_csv(results, args.csv)

    if len(results) == 1:
        print(format_metrics_table(results[0].rows))
        print()
    print(format_leaderboard_markdown(board))
    for path in (args.leaderboard, args.leaderboard_csv, args.csv):
        if path is not None:
            print(f"wrote {path}")
    return 0


def _wants_leaderboard(args: argparse.Namespace) -> bool:
    return args.leaderboard is not None or args.leaderboard_csv is not None


def _check_input_folders(args: argparse.Namespace, prediction_sets: Sequence[PredictionSet]) -> None:
    for prediction_set in prediction_sets:
        require_input_folder(prediction_set.folder, "--predictions", "predicted label volumes")
    require_input_folder(args.references, "--references", "reference label volumes")


def _check_output_paths(args: argparse.Namespace, prediction_sets: Sequence[PredictionSet]) -> None:
    """Apply :func:`kitsjobs.fsutil.check_output_file` to each output file, and reject a file named twice."""
    inputs = [("--predictions", prediction_set.folder) for prediction_set in prediction_sets]
    inputs.append(("--references", args.references))
    outputs = {"--csv": args.csv, "--leaderboard": args.leaderboard, "--leaderboard-csv": args.leaderboard_csv}
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        resolved = Path(path).expanduser().resolve()
        if resolved in seen:
            raise UserError(f"{seen[resolved]} and {option} both name {path}. Pass two different files")
        seen[resolved] = option
        check_output_file(path, option, inputs, overwrite=args.overwrite)


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
            "against an all-zero prediction. Teams are ranked on mean Dice and on mean Surface "
            "Dice over all cases and regions (tied teams share the mean rank), then placed by "
            "the mean of both ranks, lower first. Exit status 2 means invalid input."
        ),
    )
    parser.add_argument(
        "--predictions",
        required=True,
        nargs="+",
        metavar="[NAME=]DIR",
        help=(
            "folder of predicted label volumes; several folders are ranked against each other, "
            "each one a team or run named NAME or by its folder name"
        ),
    )
    parser.add_argument(
        "--references", type=user_path, required=True, metavar="DIR", help="folder of reference label volumes"
    )
    parser.add_argument(
        "--csv",
        type=user_path,
        default=None,
        metavar="FILE",
        help=(
            "write one row per case to this CSV file (no mean row), values to 8 decimals; with "
            "several predictions folders a first column 'team' names the folder"
        ),
    )
    parser.add_argument(
        "--leaderboard",
        type=user_path,
        default=None,
        metavar="FILE.md",
        help="write the leaderboard (mean Dice, mean Surface Dice, their ranks) as a Markdown table",
    )
    parser.add_argument(
        "--leaderboard-csv",
        type=user_path,
        default=None,
        metavar="FILE.csv",
        help="write the leaderboard as CSV, means to 8 decimals",
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        metavar="N",
        help="number of worker processes that evaluate cases in parallel (default 1)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --csv, --leaderboard and --leaderboard-csv files that exist",
    )
    return parser


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


def _check_pair_geometry(pair: CasePair, prediction: nib.Nifti1Image, reference: nib.Nifti1Image) -> None:
    if prediction.shape != reference.shape:
        raise UserError(
            f"{pair.case}: prediction {pair.prediction} has shape {prediction.shape} but "
            f"reference {pair.reference} has shape {reference.shape}. "
            "Resample the prediction onto the reference grid"
        )

    difference = float(np.max(np.abs(prediction.affine - reference.affine)))
    if not difference <= AFFINE_TOLERANCE:
        raise UserError(
            f"{pair.case}: prediction {pair.prediction} (shape {prediction.shape}) has affine "
            f"{_format_affine(prediction.affine)} but reference {pair.reference} (shape "
            f"{reference.shape}) has affine {_format_affine(reference.affine)}, which differ by "
            f"up to {difference:.6g}, more than {AFFINE_TOLERANCE}. Save the prediction with the "
            "reference's affine"
        )

    prediction_zooms = tuple(float(zoom) for zoom in prediction.header.get_zooms()[:3])
    reference_zooms = tuple(float(zoom) for zoom in reference.header.get_zooms()[:3])
    if prediction_zooms != reference_zooms:
        logger.warning(
            "%s: prediction spacing %s mm differs from reference spacing %s mm while the affines "
            "agree within %s; using the reference spacing",
            pair.case,
            prediction_zooms,
            reference_zooms,
            AFFINE_TOLERANCE,
        )


def _format_affine(affine: np.ndarray) -> str:
    rows = (" ".join(f"{value:.6g}" for value in row) for row in np.asarray(affine))
    return "[" + "; ".join(rows) + "]"


def _check_unique_names(prediction_sets: Sequence[PredictionSet]) -> None:
    folders_by_name: dict[str, Path] = {}
    for prediction_set in prediction_sets:
        if prediction_set.name in folders_by_name:
            raise UserError(
                f"two predictions folders are named {prediction_set.name}: "
                f"{folders_by_name[prediction_set.name]} and {prediction_set.folder}. "
                "Name them with NAME=DIR"
            )
        folders_by_name[prediction_set.name] = prediction_set.folder


def _metric_values(row: dict[str, str | float]) -> dict[str, float]:
    return {column: float(row[column]) for column in METRIC_COLUMNS}


def _format_leaderboard_value(column: str, value: str | float | int, decimals: int) -> str:
    if isinstance(value, str) or column in ("place", "cases", "missing_cases"):
        return str(value)
    if column.endswith("_rank"):
        # Ranks are multiples of 0.25 (mean ranks of ties, then the mean of two ranks).
        return f"{float(value):g}"
    return f"{float(value):.{decimals}f}"


def _write_output(path: Path, text: str, description: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as error:
        raise UserError(f"cannot write the {description} {path}: {error}. Choose a writable path") from None


def _evaluate_pairs(pairs: list[CasePair], jobs: int, progress: bool) -> list[dict[str, str | float]]:
    with tqdm(total=len(pairs), unit="case", desc="evaluate", disable=None if progress else True) as bar:
        if jobs == 1:
            return [_evaluate_and_advance(pair, bar) for pair in pairs]
        return _evaluate_in_processes(pairs, jobs, bar)


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
