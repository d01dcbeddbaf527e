"""Preprocess a dataset into a cache of memory-mapped arrays that training reads.

``python -m kitsjobs.preprocess --input ROOT --layout kits23 --output CACHE --spacing-mm 3 0.8 0.8 --jobs 4``
crops each case to the body, scales the HU window to [0, 1], resamples it to the target
spacing (image trilinear, labels nearest) and writes CACHE/CASE/{image,label,points}.npy and
geometry.json. Cases already up to date are skipped; the input folder is never written.
The same cache is built by the launcher when ``data.cache_dir`` is set.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kitsjobs.config import DataConfig
from kitsjobs.data.cache import IMAGE_DTYPES, PreprocessSettings, check_output_outside_input, preprocess_cases
from kitsjobs.data.layouts import LAYOUTS, find_cases
from kitsjobs.errors import UserError

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = DataConfig()
    parser = argparse.ArgumentParser(prog="python -m kitsjobs.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path, help="dataset folder (read only)")
    parser.add_argument("--layout", default="kits23", choices=LAYOUTS, help="dataset layout")
    parser.add_argument("--output", required=True, type=Path, help="cache folder, outside the dataset folder")
    parser.add_argument("--spacing-mm", type=float, nargs=3, metavar=("Z", "Y", "X"), default=None,
                        help="target voxel size in mm, slices first (default: keep each case's spacing)")
    parser.add_argument("--hu-min", type=float, default=defaults.hu_min, help="lower end of the HU window, mapped to 0")
    parser.add_argument("--hu-max", type=float, default=defaults.hu_max, help="upper end of the HU window, mapped to 1")
    parser.add_argument("--body-threshold-hu", type=float, default=defaults.body_threshold_hu,
                        help="crop to the box of voxels above this HU")
    parser.add_argument("--no-crop", action="store_true", help="keep the whole volume")
    parser.add_argument("--dtype", default=defaults.cache_dtype, choices=IMAGE_DTYPES, help="dtype of cached images")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        check_output_outside_input(args.input, args.output)
        settings = PreprocessSettings(
            spacing_mm=tuple(args.spacing_mm) if args.spacing_mm else None,
            hu_min=args.hu_min,
            hu_max=args.hu_max,
            body_threshold_hu=None if args.no_crop else args.body_threshold_hu,
            image_dtype=args.dtype,
        )
        cases = find_cases(args.input, args.layout)
        status = preprocess_cases(cases, args.output, settings, jobs=args.jobs)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    written = sum(1 for value in status.values() if value == "written")
    print(f"{written} case(s) preprocessed, {len(status) - written} already up to date, in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
