"""Time kitsjobs.metrics against DeepMind's surface-distance package on KiTS23 cases.

Both compute the six KiTS23 values (Dice and Surface Dice of kidney_and_mass, mass
and tumor) of the shifted prediction against the reference, in the same process,
from the same arrays in memory. NIfTI reading and one-time imports are not timed.
The surface-distance side builds its region masks with comparisons (``> 0``,
``>= 2``, ``== 2``), the fastest way for labels 0-3, so the timing is of the
package itself.

Usage (from the repository root, surface-distance installed with pip)::

    python benchmarks/bench_metrics.py [--data DIR] [--cases case_00000 case_00151] [--repeats 3]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy

from bench_infer import DEFAULT_DATA_DIR, require_files
from kitsjobs.metrics import METRIC_COLUMNS, TOLERANCES_MM, compute_case_metrics

logger = logging.getLogger(__name__)

DEFAULT_CASES = ("case_00000", "case_00151")

# Region masks by comparison, valid because KiTS23 labels are 0-3.
REGION_MASKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "kidney_and_mass": lambda volume: volume > 0,
    "mass": lambda volume: volume >= 2,
    "tumor": lambda volume: volume == 2,
}


def load_case(data_dir: Path, case: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read the shifted prediction, the reference and the reference spacing in mm."""
    reference_image = nib.load(data_dir / "labels" / f"{case}.nii.gz")
    reference = np.asanyarray(reference_image.dataobj)
    prediction = np.asanyarray(nib.load(data_dir / "shifted" / f"{case}.nii.gz").dataobj)
    zooms = reference_image.header.get_zooms()
    return prediction, reference, (float(zooms[0]), float(zooms[1]), float(zooms[2]))


def metrics_with_surface_distance(
    prediction: np.ndarray, reference: np.ndarray, spacing_mm: tuple[float, float, float]
) -> dict[str, float]:
    """Compute the six KiTS23 values with the surface-distance package, region by region."""
    import surface_distance

    metrics: dict[str, float] = {}
    for region, build_mask in REGION_MASKS.items():
        pred_mask = build_mask(prediction)
        ref_mask = build_mask(reference)
        metrics[f"dice_{region}"] = float(surface_distance.compute_dice_coefficient(ref_mask, pred_mask))
        distances = surface_distance.compute_surface_distances(ref_mask, pred_mask, spacing_mm)
        metrics[f"sd_{region}"] = float(
            surface_distance.compute_surface_dice_at_tolerance(distances, TOLERANCES_MM[region])
        )
    return metrics


def best_time_s(function: Callable[[], dict[str, float]], repeats: int) -> tuple[float, dict[str, float]]:
    """Run ``function`` ``repeats`` times and return the shortest wall time in s and the last result."""
    best = float("inf")
    result: dict[str, float] = {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def surface_distance_import_error() -> str | None:
    try:
        import surface_distance  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time kitsjobs.metrics against surface-distance.")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA_DIR, help="KiTS23 sample folder with labels/ and shifted/"
    )
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="case names to time")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per case and implementation. The shortest one counts"
    )
    args = parser.parse_args(argv)
    for case in args.cases:
        require_files(args.data / "labels" / f"{case}.nii.gz", args.data / "shifted" / f"{case}.nii.gz")

    # surface-distance 0.1 imports correlate and distance_transform_edt through
    # scipy.ndimage namespaces that SciPy deprecates.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="surface_distance")
    import_error = surface_distance_import_error()
    if import_error is not None:
        print(f"surface-distance cannot be imported: {import_error}. Run `pip install surface-distance`")

    # Load the MONAI surfel table once so that the import is not timed.
    compute_case_metrics(np.zeros((2, 2, 2), np.uint8), np.ones((2, 2, 2), np.uint8), (1.0, 1.0, 1.0))

    print(
        f"CPU cores: {os.cpu_count()}, Python {platform.python_version()}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}, best of {args.repeats} runs\n"
    )
    print("| case | shape | kitsjobs (s) | surface-distance (s) | speed-up | max abs difference |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case in args.cases:
        prediction, reference, spacing_mm = load_case(args.data, case)
        ours_s, ours = best_time_s(
            lambda: compute_case_metrics(prediction, reference, spacing_mm), args.repeats
        )
        if import_error is not None:
            print(f"| {case} | {reference.shape} | {ours_s:.3f} | n/a | n/a | n/a |")
            continue
        theirs_s, theirs = best_time_s(
            lambda: metrics_with_surface_distance(prediction, reference, spacing_mm), args.repeats
        )
        difference = max(abs(ours[column] - theirs[column]) for column in METRIC_COLUMNS)
        print(
            f"| {case} | {reference.shape} | {ours_s:.3f} | {theirs_s:.2f} | "
            f"{theirs_s / ours_s:.1f}x | {difference:.1e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
