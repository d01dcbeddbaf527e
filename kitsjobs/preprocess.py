"""Preprocess a dataset into a cache of memory-mapped arrays that training reads.

``python -m kitsjobs.preprocess --input ROOT --layout kits23 --output CACHE --spacing-mm 3 0.8 0.8 --jobs 4``
crops each case to the body, scales the HU window to [0, 1], resamples it to the target
spacing (image trilinear, labels nearest) and writes CACHE/CASE/{image,label,points}.npy and
geometry.json. Cases already up to date are skipped; the input folder is never written.
A cache that contains the cases built with other settings is rebuilt only with --overwrite,
and a folder of CACHE that is not a cache case folder is never replaced.
The same cache is built by the launcher when ``data.cache_dir`` is set.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kitsjobs.cli import finite_float, positive_float, positive_int, user_path
from kitsjobs.config import DataConfig
from kitsjobs.data.cache import IMAGE_DTYPES, PreprocessSettings, check_output_outside_input, preprocess_cases
from kitsjobs.data.layouts import LAYOUTS, Case, find_cases, no_cases_message
from kitsjobs.errors import UserError

logger = logging.getLogger(__name__)

# Exit status after Ctrl-C, as shells report a process ended by SIGINT (128 + 2).
INTERRUPTED_EXIT_STATUS = 130


def build_parser() -> argparse.ArgumentParser:
    """Return the command's argument parser; every option's help shows its default."""
    defaults = DataConfig()
    parser = argparse.ArgumentParser(prog="python -m kitsjobs.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=user_path, help="dataset folder (read only)")
    parser.add_argument("--layout", default="kits23", choices=LAYOUTS, help="dataset layout (default: %(default)s)")
    parser.add_argument("--output", required=True, type=user_path, help="cache folder, outside the dataset folder")
    parser.add_argument("--spacing-mm", type=positive_float, nargs=3, metavar=("Z", "Y", "X"), default=None,
                        help="target voxel size in mm, slices first (default: keep each case's spacing)")
    parser.add_argument("--hu-min", type=finite_float, default=defaults.hu_min,
                        help="lower end of the HU window, mapped to 0 (default: %(default)s)")
    parser.add_argument("--hu-max", type=finite_float, default=defaults.hu_max,
                        help="upper end of the HU window, mapped to 1 (default: %(default)s)")
    parser.add_argument("--body-threshold-hu", type=finite_float, default=defaults.body_threshold_hu,
                        help="crop to the box of voxels above this HU (default: %(default)s)")
    parser.add_argument("--no-crop", action="store_true", help="keep the whole volume")
    parser.add_argument("--dtype", default=defaults.cache_dtype, choices=IMAGE_DTYPES,
                        help="dtype of cached images (default: %(default)s)")
    parser.add_argument("--jobs", type=positive_int, default=1, help="worker processes (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild cached cases made with other settings; runs reading the cache "
                             "then see the new arrays")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line; a bad value exits with status 2 and one error line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.hu_max <= args.hu_min:
        parser.error(f"--hu-max {args.hu_max:g} must be greater than --hu-min {args.hu_min:g}; "
                     "give the HU window as low, then high")
    return args


def find_input_cases(root: Path, layout: str) -> list[Case]:
    """List the cases of ``--input``, with errors that name the command's options.

    Raises:
        UserError: the folder is missing, contains no case in ``layout`` (the message names
            the other layout when that finds cases), or has images without labels.
    """
    if not root.is_dir():
        raise UserError(f"--input {root} not found; pass an existing dataset folder")
    try:
        find_cases(root, layout, require_labels=False)
    except UserError:
        raise UserError(no_cases_message(root, layout, root_option="--input")) from None
    return find_cases(root, layout)


def run(args: argparse.Namespace) -> dict[str, str]:
    """Preprocess ``args.input`` into ``args.output``; return {case name: "kept" or "written"}.

    Raises:
        UserError: a bad folder, a cache that must not be replaced, or cases that failed.
        KeyboardInterrupt: on Ctrl-C, once the worker processes have stopped.
    """
    check_output_outside_input(args.input, args.output)
    settings = PreprocessSettings(
        spacing_mm=tuple(args.spacing_mm) if args.spacing_mm else None,
        hu_min=args.hu_min,
        hu_max=args.hu_max,
        body_threshold_hu=None if args.no_crop else args.body_threshold_hu,
        image_dtype=args.dtype,
    )
    cases = find_input_cases(args.input.expanduser(), args.layout)
    return preprocess_cases(cases, args.output, settings, jobs=args.jobs, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a user error, 130 after Ctrl-C)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        status = run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume (cases already written are kept)", file=sys.stderr)
        return INTERRUPTED_EXIT_STATUS
    written = sum(1 for value in status.values() if value == "written")
    print(f"{written} case(s) preprocessed, {len(status) - written} already up to date, in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
