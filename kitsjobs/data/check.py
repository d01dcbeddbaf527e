"""Check a dataset before training: ``python -m kitsjobs.data.check ROOT [--layout kits23|flat]``.

Finds what would waste a GPU job or silently corrupt one: images without labels and labels
without images, duplicate case ids, unreadable or truncated NIfTI files, volumes that are not
3D, absurd voxel spacing, image and label grids that differ, label values outside
{0, 1, 2, 3} and NaN or infinite intensities. The command prints one table row per problem
and exits with status 1 when any problem is an error.

Two depths exist. ``full=True`` (the command) decompresses every file to its end, so a
truncated or corrupt gzip stream is found, and reads every voxel. ``full=False`` (the check
training runs before loading) reads headers only; training then checks label values and
intensities on the volumes it loads anyway (:func:`check_volume`).
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import re
import sys
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener
from tqdm import tqdm

from kitsjobs.cli import user_path
from kitsjobs.data.layouts import LAYOUT_FILES, LAYOUTS, layout_hint, no_cases_message
from kitsjobs.errors import UserError

logger = logging.getLogger(__name__)

# Start of the problem text reported for a dataset folder without any case.
NO_CASES = "no cases found"
# Warning for a subfolder of a kits23 dataset folder that is not a case folder.
NO_CASE_FILES = "no imaging.nii.gz or segmentation.nii.gz"

ERROR = "error"
WARNING = "warning"
# Values of data.check: stop on errors, only log them, or skip the check.
CHECK_MODES = ("error", "warn", "off")
# Background, kidney, tumor, cyst.
LABEL_VALUES = (0, 1, 2, 3)
# Tolerance of a label's affine against its image's (relative, and absolute in mm).
AFFINE_RTOL = 1e-5
AFFINE_ATOL_MM = 1e-4
# Coarser voxels than this are not abdominal CT (KiTS23 slices are 0.5 to 5 mm thick).
MAX_SPACING_MM = 10.0
GZIP_CHUNK_BYTES = 16 * 2**20
# Slices per block when counting non-finite voxels, so the boolean temporary stays small.
SLAB_SLICES = 16
CASE_ID = re.compile(r"case_0*(\d+)")
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)


@dataclass(frozen=True)
class Problem:
    """One finding of the dataset check.

    Attributes:
        case: case name, or "" for a finding about the dataset as a whole.
        file: the file or folder concerned.
        problem: what is wrong, with the values found.
        severity: "error" (training would fail or learn from broken data) or
            "warning" (unusual, training still works).
    """

    case: str
    file: str
    problem: str
    severity: str


@dataclass(frozen=True)
class CaseFiles:
    """The files found for one case; either may be None when it is missing."""

    name: str
    image: Optional[Path]
    label: Optional[Path]


def check_dataset(
    root: str | Path,
    layout: str = "kits23",
    *,
    full: bool = True,
    workers: int = 1,
    progress: bool = False,
) -> list[Problem]:
    """Check every case under ``root`` and return the problems found.

    Args:
        root: dataset folder, only read.
        layout: "kits23" (ROOT/CASE/imaging.nii.gz and segmentation.nii.gz) or
            "flat" (ROOT/volume/NAME.nii.gz and ROOT/seg/NAME.nii.gz).
        full: read every file to its end and check every voxel; when false, check
            pairing, duplicates and headers only (about a millisecond per file).
        workers: processes checking cases in parallel. Each keeps one case in
            memory at a time: the label array plus, for float images, the image array.
        progress: show a tqdm progress bar on stderr.

    Returns:
        The problems, sorted by case and file; empty when the dataset is clean.

    Raises:
        UserError: unknown layout, or ``root`` is missing or a file.
    """
    if layout not in LAYOUTS:
        raise UserError(f"unknown data layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(
            f"{root} is a file, not a dataset folder; pass the dataset folder ROOT "
            f"({layout} layout: {LAYOUT_FILES[layout]})"
        )
    if not root.is_dir():
        raise UserError(f"dataset folder {root} not found; pass an existing folder")

    cases, problems = collect_cases(root, layout)

    check = partial(check_case, full=full)
    bar = partial(tqdm, total=len(cases), desc="check", unit="case", disable=not progress)
    if workers > 1 and len(cases) > 1:
        with ProcessPoolExecutor(max_workers=workers) as executor:
            for found in bar(executor.map(check, cases, chunksize=1)):
                problems.extend(found)
    else:
        for found in bar(map(check, cases)):
            problems.extend(found)
    return sorted(problems, key=lambda p: (p.case, p.file, p.severity, p.problem))


def collect_cases(root: Path, layout: str) -> tuple[list[CaseFiles], list[Problem]]:
    """Pair images with labels and report unpaired files, duplicates and ignored files.

    Only ``.nii.gz`` files count as cases, as in training. A ``.nii`` file is a
    duplicate when the same name also exists as ``.nii.gz``, and is reported as
    ignored otherwise.

    A folder without any image or label file in ``layout`` is one error, whose text starts
    with NO_CASES and names the other layout when that one finds cases. The kits23 warnings
    about subfolders that are not case folders are then left out, because such a folder
    (a flat dataset's volume/ and seg/, say) is not a dataset with a few stray folders.

    Returns:
        The cases that have both files, and the problems found while pairing.
    """
    if layout == "kits23":
        images, labels, problems = _scan_kits23(root)
    else:
        images, labels, problems = _scan_flat(root)
    if not images and not labels:
        problems = [problem for problem in problems if problem.problem != NO_CASE_FILES]
        problems.append(Problem("", str(root), no_cases_message(root, layout), ERROR))

    cases = []
    for name in sorted(set(images) | set(labels)):
        image, label = images.get(name), labels.get(name)
        if image is None:
            problems.append(Problem(name, str(label), "label without image", ERROR))
        elif label is None:
            problems.append(Problem(name, str(image), "image without label", ERROR))
        else:
            cases.append(CaseFiles(name, image, label))
    problems.extend(_duplicate_ids(set(images) | set(labels)))
    return cases, problems


def _scan_kits23(root: Path) -> tuple[dict[str, Path], dict[str, Path], list[Problem]]:
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    problems: list[Problem] = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        found = False
        reported = len(problems)
        for stem, files in (("imaging", images), ("segmentation", labels)):
            path, extra = _pick_nifti(folder, folder.name, stem)
            problems.extend(extra)
            if path is not None:
                files[folder.name] = path
                found = True
        if not found and len(problems) == reported:
            problems.append(Problem(folder.name, str(folder), NO_CASE_FILES, WARNING))
    return images, labels, problems


def _scan_flat(root: Path) -> tuple[dict[str, Path], dict[str, Path], list[Problem]]:
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    problems: list[Problem] = []
    for folder, files in ((root / "volume", images), (root / "seg", labels)):
        if not folder.is_dir():
            continue
        names = {_strip_nifti(path.name) for path in folder.iterdir() if _strip_nifti(path.name)}
        for name in sorted(names):
            path, extra = _pick_nifti(folder, name, name)
            problems.extend(extra)
            if path is not None:
                files[name] = path
    return images, labels, problems


def _strip_nifti(filename: str) -> str:
    for extension in (".nii.gz", ".nii"):
        if filename.endswith(extension) and len(filename) > len(extension):
            return filename[: -len(extension)]
    return ""


def _pick_nifti(folder: Path, case: str, stem: str) -> tuple[Optional[Path], list[Problem]]:
    """Return ``folder/stem.nii.gz`` when it exists, plus problems with a ``stem.nii`` beside it."""
    compressed, plain = folder / f"{stem}.nii.gz", folder / f"{stem}.nii"
    if compressed.is_file() and plain.is_file():
        problem = f"duplicate: both {plain.name} and {compressed.name} exist; remove one"
        return compressed, [Problem(case, str(plain), problem, ERROR)]
    if plain.is_file():
        problem = f"ignored: training reads {compressed.name} only; compress it with gzip"
        return None, [Problem(case, str(plain), problem, WARNING)]
    return (compressed if compressed.is_file() else None), []


def _duplicate_ids(names: Iterable[str]) -> list[Problem]:
    """Report names that denote the same case number, such as case_00001 and case_1."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        match = CASE_ID.fullmatch(name)
        groups[f"case_{int(match.group(1)):05d}" if match else name].append(name)
    problems = []
    for case_id, group in sorted(groups.items()):
        if len(group) > 1:
            listed = ", ".join(sorted(group))
            for name in sorted(group):
                problems.append(Problem(name, name, f"duplicate case id {case_id}: {listed}; keep one", ERROR))
    return problems


def check_case(case: CaseFiles, full: bool = True) -> list[Problem]:
    """Check one case's image and label files (see :func:`check_dataset` for ``full``)."""
    if case.image is None or case.label is None:
        raise ValueError(f"case {case.name} lacks an image or a label file; check_case needs both")
    image, problems = _open_checked(case.name, case.image, full)
    label, label_problems = _open_checked(case.name, case.label, full)
    problems += label_problems
    if image is None or label is None:
        return problems

    if image.shape != label.shape:
        problems.append(Problem(case.name, str(case.label),
                                f"label shape {label.shape} differs from image shape {image.shape}", ERROR))
    if not np.allclose(image.affine, label.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL_MM):
        problems.append(Problem(case.name, str(case.label),
                                f"label affine differs from image affine (largest difference "
                                f"{_max_difference(image.affine, label.affine):.4g} mm)", ERROR))
    if full:
        problems += _check_image_values(case.name, case.image, image)
        problems += _check_label_file_values(case.name, case.label, label)
    return problems


def _max_difference(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.nanmax(np.abs(np.asarray(first) - np.asarray(second))))


def _open_checked(case: str, path: Path, full: bool) -> tuple[Optional[nib.Nifti1Image], list[Problem]]:
    """Open a file's header, check its geometry and, with ``full``, its whole byte stream.

    Returns the image only when it is 3D and readable, so callers can compare grids.
    """
    try:
        image = nib.load(str(path))
    except READ_ERRORS as error:
        return None, [Problem(case, str(path), f"unreadable: {_one_line(error)}", ERROR)]

    problems = _check_geometry(case, path, image)
    if full:
        problems += _check_stream(case, path, image)
    if any(problem.severity == ERROR for problem in problems):
        return None, problems
    return image, problems


def _check_geometry(case: str, path: Path, image: nib.Nifti1Image) -> list[Problem]:
    if len(image.shape) != 3:
        return [Problem(case, str(path), f"not a 3D volume: shape {image.shape}", ERROR)]
    problems = []
    # nibabel replaces a zero or negative pixdim by 1 or its absolute value when it
    # loads a header, so the spacing is read from the raw header.
    try:
        spacing_mm = _raw_spacing_mm(path, image)
    except READ_ERRORS as error:
        return [Problem(case, str(path), f"unreadable header: {_one_line(error)}", ERROR)]
    shown = ", ".join(f"{value:g}" for value in spacing_mm)
    if not all(np.isfinite(spacing_mm)) or min(spacing_mm) <= 0:
        problems.append(Problem(case, str(path), f"invalid voxel spacing ({shown}) mm: must be positive", ERROR))
    elif max(spacing_mm) > MAX_SPACING_MM:
        problems.append(Problem(case, str(path),
                                f"voxel spacing ({shown}) mm is over {MAX_SPACING_MM:g} mm", ERROR))
    if not np.all(np.isfinite(image.affine)) or abs(np.linalg.det(image.affine[:3, :3])) < 1e-12:
        problems.append(Problem(case, str(path), "affine is singular or not finite", ERROR))
    slope, intercept = image.header.get_slope_inter()
    if any(value is not None and not np.isfinite(value) for value in (slope, intercept)):
        problems.append(Problem(case, str(path), f"scaling slope {slope} or intercept {intercept} is not finite", ERROR))
    return problems


def _raw_spacing_mm(path: Path, image: nib.Nifti1Image) -> list[float]:
    with ImageOpener(str(path)) as stream:
        header = type(image.header).from_fileobj(stream, check=False)
    return [float(value) for value in header["pixdim"][1:4]]


def _check_stream(case: str, path: Path, image: nib.Nifti1Image) -> list[Problem]:
    """Read the file to its end: truncation, a corrupt gzip stream and a bad CRC all fail here."""
    expected_bytes = int(image.dataobj.offset) + int(np.prod(image.shape)) * image.get_data_dtype().itemsize
    try:
        if path.name.endswith(".gz"):
            total_bytes = 0
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(GZIP_CHUNK_BYTES):
                    total_bytes += len(chunk)
        else:
            total_bytes = path.stat().st_size
    except (OSError, EOFError, zlib.error) as error:
        return [Problem(case, str(path), f"corrupt or truncated: {_one_line(error)}", ERROR)]
    if total_bytes < expected_bytes:
        return [Problem(case, str(path),
                        f"truncated: {total_bytes} of {expected_bytes} bytes of header and voxels", ERROR)]
    return []


def _check_image_values(case: str, path: Path, image: nib.Nifti1Image) -> list[Problem]:
    # Integer voxels with a finite slope and intercept cannot be NaN or infinite, so only
    # float files are read here.
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return []
    try:
        voxels = np.asanyarray(image.dataobj)
    except READ_ERRORS as error:
        return [Problem(case, str(path), f"unreadable voxels: {_one_line(error)}", ERROR)]
    count = count_nonfinite(voxels)
    if count:
        return [Problem(case, str(path), f"{count} NaN or infinite intensities", ERROR)]
    return []


def _check_label_file_values(case: str, path: Path, label: nib.Nifti1Image) -> list[Problem]:
    try:
        values = np.asanyarray(label.dataobj)
    except READ_ERRORS as error:
        return [Problem(case, str(path), f"unreadable voxels: {_one_line(error)}", ERROR)]
    return [Problem(case, str(path), text, severity) for text, severity in label_value_problems(values)]


def count_nonfinite(array: np.ndarray) -> int:
    """Count NaN and infinite voxels of a slices-first array without a full-size temporary."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    if np.isfinite(np.sum(array, dtype=np.float64)):
        return 0
    count = 0
    for start in range(0, array.shape[0], SLAB_SLICES):
        slab = array[start : start + SLAB_SLICES]
        count += slab.size - int(np.count_nonzero(np.isfinite(slab)))
    return count


def label_value_problems(values: np.ndarray) -> list[tuple[str, str]]:
    """Find label values outside {0, 1, 2, 3}, non-integer labels and empty label maps.

    uint8 labels, as KiTS23 ships them, cost one ``np.bincount`` pass; other dtypes
    cost a min and a max, plus one more pass when a value is out of range.

    Returns:
        (problem, severity) pairs; empty when the labels are valid.
    """
    if values.dtype == np.uint8:
        counts = np.bincount(values.ravel(), minlength=256)
        bad = [int(value) for value in np.flatnonzero(counts[len(LABEL_VALUES):]) + len(LABEL_VALUES)]
        has_foreground = bool(counts[1 : len(LABEL_VALUES)].any())
    else:
        if np.issubdtype(values.dtype, np.floating):
            if count_nonfinite(values):
                return [("label values include NaN or infinity", ERROR)]
            if not np.array_equal(values, np.round(values)):
                return [("label values are not whole numbers", ERROR)]
        low, high = values.min(), values.max()
        bad = []
        if low < LABEL_VALUES[0] or high > LABEL_VALUES[-1]:
            outside = (values < LABEL_VALUES[0]) | (values > LABEL_VALUES[-1])
            bad = [value.item() for value in np.unique(values[outside])]
        has_foreground = bool(high > 0)

    problems = []
    if bad:
        shown = ", ".join(f"{value:g}" for value in bad[:10]) + (" ..." if len(bad) > 10 else "")
        problems.append((f"label values {shown} outside {{0, 1, 2, 3}}", ERROR))
    if not has_foreground:
        problems.append(("label map has no kidney, tumor or cyst voxel", WARNING))
    return problems


def check_volume(name: str, image: np.ndarray, label: Optional[np.ndarray], image_file: str = "",
                 label_file: str = "") -> list[Problem]:
    """Check a loaded case's intensities and labels, as training keeps them in memory.

    Args:
        name: case name.
        image: intensities, slices-first.
        label: uint8 labels of the same shape, or None.
        image_file, label_file: files named in the problems.
    """
    problems = []
    count = count_nonfinite(image)
    if count:
        problems.append(Problem(name, image_file, f"{count} NaN or infinite intensities", ERROR))
    if label is not None:
        problems += [Problem(name, label_file, text, severity) for text, severity in label_value_problems(label)]
    return problems


def enforce(problems: Sequence[Problem], mode: str, root: str | Path, layout: str) -> None:
    """Log warnings, then stop on errors when ``mode`` is "error" (the value of data.check).

    Raises:
        UserError: ``mode`` is "error" and a problem is an error (the message names
            up to five files), or ``mode`` is not one of CHECK_MODES.
    """
    if mode not in CHECK_MODES:
        raise UserError(f"data.check='{mode}' is invalid; choose one of {', '.join(CHECK_MODES)}")
    errors = [problem for problem in problems if problem.severity == ERROR]
    for problem in problems:
        if problem.severity == WARNING or mode == "warn":
            logger.warning("dataset check: %s %s: %s", problem.case or "-", problem.file, problem.problem)
    if not errors or mode != "error":
        return
    if any(problem.problem.startswith(NO_CASES) for problem in errors):
        # data.check=warn cannot help here: there is nothing to train on.
        raise UserError(f"{NO_CASES} in {root} for data layout '{layout}'; {layout_hint(layout)}")
    listed = "; ".join(f"{problem.file}: {problem.problem}" for problem in errors[:5])
    more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
    raise UserError(
        f"dataset check found {len(errors)} error(s) in {root}: {listed}{more}; fix the files "
        f"(python -m kitsjobs.data.check {root} --layout {layout} lists all) or set data.check=warn"
    )


def format_table(problems: Sequence[Problem], root: Path) -> str:
    """Render problems as an aligned text table with paths relative to ``root``."""
    rows = [("case", "file", "problem", "severity")]
    for problem in problems:
        rows.append((problem.case or "-", _relative(problem.file, root), problem.problem, problem.severity))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    return "\n".join(lines)


def _relative(file: str, root: Path) -> str:
    try:
        return str(Path(file).relative_to(root))
    except ValueError:
        return file


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: print the problem table; exit 1 on errors, 2 on a usage mistake or a folder without cases."""
    parser = argparse.ArgumentParser(prog="python -m kitsjobs.data.check", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=user_path, help="dataset folder (only read)")
    parser.add_argument("--layout", choices=LAYOUTS, default="kits23",
                        help="kits23: ROOT/CASE/imaging.nii.gz; flat: ROOT/volume/ and ROOT/seg/ (default kits23)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="cases checked in parallel; each keeps one case in memory (default: up to 4)")
    parser.add_argument("--headers-only", action="store_true",
                        help="check pairing and headers only, as training does before loading")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.workers < 1:
        parser.error(f"--workers={args.workers} is invalid; use 1 or more")

    root = args.root.expanduser()
    try:
        problems = check_dataset(root, args.layout, full=not args.headers_only, workers=args.workers,
                                 progress=sys.stderr.isatty())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    no_cases = [problem for problem in problems if problem.problem.startswith(NO_CASES)]
    if no_cases:
        # A wrong folder or --layout is a usage mistake: one line, as for a missing folder.
        others = [problem for problem in problems if problem not in no_cases]
        if others:
            print(format_table(others, root))
        print(f"error: {no_cases[0].problem}", file=sys.stderr)
        return 2

    errors = sum(problem.severity == ERROR for problem in problems)
    if problems:
        print(format_table(problems, root))
    print(f"{root}: {errors} error(s), {len(problems) - errors} warning(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
