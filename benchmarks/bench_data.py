"""Training patches per second: kitsjobs' memory-mapped cache against two MONAI pipelines.

The case is a phantom CT painted from a real KiTS23 label map (case_00000 by default: 611 x
512 x 512 slices), written once to a work folder. Each method runs in its own child process,
which reports patches per second and its peak resident memory (ru_maxrss) and its growth
over the process's memory before the data was loaded:

- monai-nifti: LoadImaged + EnsureChannelFirstd + ScaleIntensityRanged + RandCropByPosNegLabeld
  on the .nii.gz files for every patch (a Dataset without caching).
- monai-cache: the same transforms, the deterministic ones held by CacheDataset in memory.
- kitsjobs: PatchSampler on the preprocessing cache (float16 memory maps; built before timing,
  at the case's own spacing).

All draw 96^3 patches (batch of one) with half of them centred on foreground.

Usage (from the repository root)::

    python benchmarks/bench_data.py [--case case_00000] [--patches 2 20 2000]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infer import (  # noqa: E402
    DEFAULT_DATA_DIR,
    DEFAULT_WORK_DIR,
    HU_MAX,
    HU_MIN,
    require_files,
    write_phantom_case,
)

PATCH = (96, 96, 96)
METHODS = ("monai-nifti", "monai-cache", "kitsjobs")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _monai_transforms():
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        RandCropByPosNegLabeld,
        ScaleIntensityRanged,
    )

    load = [
        LoadImaged(keys=["image", "label"], image_only=True),
        EnsureChannelFirstd(keys=["image", "label"]),
        ScaleIntensityRanged(keys="image", a_min=HU_MIN, a_max=HU_MAX, b_min=0.0, b_max=1.0, clip=True),
    ]
    crop = RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=PATCH, pos=1, neg=1,
                                  num_samples=1)
    return Compose([*load, crop])


def _draw_monai(dataset, count: int) -> None:
    for index in range(count):
        sample = dataset[index % len(dataset)]
        assert tuple(sample[0]["image"].shape[1:]) == PATCH


def child(method: str, case_dir: Path, cache_dir: Path, count: int) -> dict:
    """Time ``count`` patches of one method; return its measurements."""
    from monai.data import CacheDataset, Dataset
    from monai.utils import set_determinism

    set_determinism(0)
    files = [{"image": str(case_dir / "imaging.nii.gz"), "label": str(case_dir / "segmentation.nii.gz")}]
    before = _rss_bytes()
    if method == "monai-nifti":
        dataset = Dataset(files, transform=_monai_transforms())
        started = time.perf_counter()
        _draw_monai(dataset, count)
    elif method == "monai-cache":
        # CacheDataset keeps the output of the transforms before the first random one.
        dataset = CacheDataset(files, transform=_monai_transforms(), cache_rate=1.0, progress=False)
        started = time.perf_counter()
        _draw_monai(dataset, count)
    else:
        from kitsjobs.data.cache import load_cached_volume
        from kitsjobs.data.sampling import PatchSampler

        volume = load_cached_volume(cache_dir, case_dir.name)
        sampler = PatchSampler([volume], PATCH, class_ratios=[0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3], seed=0)
        started = time.perf_counter()
        for step in range(count):
            images, _ = sampler.sample(step, batch_size=1)
            assert images.shape[2:] == PATCH
    seconds = time.perf_counter() - started
    return {
        "method": method,
        "patches": count,
        "patches_per_s": count / seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_growth_gib": (_rss_bytes() - before) / 2**30,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="folder with labels/CASE.nii.gz")
    parser.add_argument("--case", default="case_00000", help="label map the phantom is painted from")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK_DIR, help="folder for the phantom and cache")
    parser.add_argument("--patches", type=int, nargs=3, default=[2, 20, 2000], metavar=("NIFTI", "CACHE", "KITSJOBS"),
                        help="patches drawn by monai-nifti, monai-cache and kitsjobs")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a Markdown table."""
    args = parse_args(argv)
    require_files(args.data / "labels" / f"{args.case}.nii.gz")
    case_dir = write_phantom_case(args.data / "labels" / f"{args.case}.nii.gz", args.work)
    cache_dir = args.work / "cache"
    if args.child:
        print(json.dumps(child(args.child, case_dir, cache_dir, args.count)))
        return 0

    from kitsjobs.data.cache import PreprocessSettings, preprocess_cases
    from kitsjobs.data.layouts import Case

    case = Case(case_dir.name, case_dir / "imaging.nii.gz", case_dir / "segmentation.nii.gz")
    preprocess_cases([case], cache_dir, PreprocessSettings(hu_min=HU_MIN, hu_max=HU_MAX), progress=False)

    rows = []
    for method, count in zip(METHODS, args.patches):
        command = [sys.executable, __file__, "--data", str(args.data), "--case", args.case, "--work", str(args.work),
                   "--child", method, "--count", str(count)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{method} failed with exit status {result.returncode}: {result.stderr[-2000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))

    print(f"Training patches {'x'.join(map(str, PATCH))} from the {args.case} phantom, one process, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {date.today()}\n")
    print("| method | patches | patches/s | peak RSS (GiB) | RSS growth (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['method']} | {row['patches']} | {row['patches_per_s']:.2f} | {row['peak_rss_gib']:.2f} "
              f"| {row['rss_growth_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
