"""Time and peak memory of whole-case CPU inference: kitsjobs' slab-bounded path against MONAI.

The case is a phantom CT painted from a real KiTS23 label map (case_00151 by default:
1059 x 512 x 512 at 0.5 x 0.81 x 0.81 mm), written once to a work folder. Each method runs in
its own child process, which reports its peak resident memory (ru_maxrss), so the numbers
include the Python interpreter, torch and the input:

- kitsjobs: ``kitsjobs.infer.pipeline.predict_file`` (read NIfTI, crop to the body, scale to
  float16, slab-bounded Gaussian sliding windows, labels back on the original grid).
- MONAI: read NIfTI, scale to float32, ``monai.inferers.sliding_window_inference`` on the whole
  volume (Gaussian mode, output accumulated on the CPU), argmax.

Both use the same 4-class MONAI UNet with random weights, the same windows and overlap.

Usage (from the repository root)::

    python benchmarks/bench_infer.py [--case case_00151] [--roi 128 128 128] [--overlap 0.25]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)

# The KiTS23 sample folder: $KITSJOBS_KITS23_DATA, else shared/data/kits23 beside the checkout.
DEFAULT_DATA_DIR = Path(
    os.environ.get("KITSJOBS_KITS23_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "kits23"
)
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "kitsjobs_bench"
HU_MIN, HU_MAX = -200.0, 400.0


def require_files(*paths: Path) -> None:
    """Exit with one line naming the first missing input file and how to point at the data."""
    for path in paths:
        if not Path(path).is_file():
            print(f"error: {path} not found; pass --data DIR (a folder with labels/CASE.nii.gz) or set "
                  "KITSJOBS_KITS23_DATA", file=sys.stderr)
            raise SystemExit(2)


def write_phantom_case(labels_path: Path, out_root: Path) -> Path:
    """Write ``out_root/CASE/{imaging,segmentation}.nii.gz`` painted from a label file, once.

    Returns:
        The case folder.
    """
    from kitsjobs.data.phantom import labels_to_image

    name = labels_path.name[: -len(".nii.gz")]
    case_dir = out_root / name
    image_path = case_dir / "imaging.nii.gz"
    if image_path.is_file():
        return case_dir
    case_dir.mkdir(parents=True, exist_ok=True)
    label_file = nib.load(labels_path)
    labels = np.asarray(label_file.dataobj).astype(np.uint8)
    spacing = tuple(float(z) for z in label_file.header.get_zooms()[:3])
    image = labels_to_image(labels, spacing, seed=0)
    nib.save(nib.Nifti1Image(labels, label_file.affine, label_file.header), case_dir / "segmentation.nii.gz")
    partial = case_dir / "imaging.tmp.nii.gz"
    header = label_file.header.copy()
    header.set_data_dtype(np.int16)
    nib.save(nib.Nifti1Image(image, label_file.affine, header), partial)
    os.replace(partial, image_path)
    return case_dir


def build_model():
    """The small 4-class 3D U-Net used by both methods, with fixed random weights."""
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 4, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1).eval()


def run_kitsjobs(image_path: Path, roi: list[int], overlap: float, sw_batch_size: int) -> tuple[int, ...]:
    import torch

    from kitsjobs.data.cache import PreprocessSettings
    from kitsjobs.infer.pipeline import predict_file

    settings = PreprocessSettings(hu_min=HU_MIN, hu_max=HU_MAX)
    labels = predict_file(build_model(), image_path, settings, roi, overlap, sw_batch_size, torch.device("cpu"))
    return labels.shape


def run_monai(image_path: Path, roi: list[int], overlap: float, sw_batch_size: int) -> tuple[int, ...]:
    import torch
    from monai.inferers import sliding_window_inference

    hu = np.asarray(nib.load(image_path).dataobj, dtype=np.float32)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    hu -= HU_MIN
    hu /= HU_MAX - HU_MIN
    model = build_model()
    with torch.inference_mode():
        logits = sliding_window_inference(
            torch.from_numpy(hu)[None, None], tuple(roi), sw_batch_size, model, overlap=overlap,
            mode="gaussian", device=torch.device("cpu"),
        )
        labels = torch.argmax(logits[0], dim=0).to(torch.uint8).numpy()
    return labels.shape


def child(method: str, image_path: Path, roi: list[int], overlap: float, sw_batch_size: int) -> None:
    """Run one method and print a JSON line with its time and peak RSS."""
    started = time.perf_counter()
    runner = run_kitsjobs if method == "kitsjobs" else run_monai
    shape = runner(image_path, roi, overlap, sw_batch_size)
    seconds = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"method": method, "seconds": seconds, "peak_rss_gib": peak_gib, "shape": list(shape)}))


def measure(method: str, image_path: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", method, "--image", str(image_path),
               "--roi", *map(str, args.roi), "--overlap", str(args.overlap), "--sw-batch-size", str(args.sw_batch_size)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed with exit status {result.returncode}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="folder with labels/CASE.nii.gz")
    parser.add_argument("--case", default="case_00151", help="label map the phantom is painted from")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK_DIR, help="folder for the phantom case")
    parser.add_argument("--roi", type=int, nargs=3, default=[128, 128, 128], help="window size (z, y, x) in voxels")
    parser.add_argument("--overlap", type=float, default=0.25, help="overlap fraction between windows")
    parser.add_argument("--sw-batch-size", type=int, default=2, help="windows per forward pass")
    parser.add_argument("--methods", nargs="+", default=["kitsjobs", "monai"], choices=("kitsjobs", "monai"))
    parser.add_argument("--timeout-s", type=float, default=900.0, help="limit per method, in seconds")
    parser.add_argument("--child", choices=("kitsjobs", "monai"), help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a Markdown table."""
    args = parse_args(argv)
    if args.child:
        child(args.child, args.image, args.roi, args.overlap, args.sw_batch_size)
        return 0
    logging.basicConfig(level=logging.INFO)
    require_files(args.data / "labels" / f"{args.case}.nii.gz")
    case_dir = write_phantom_case(args.data / "labels" / f"{args.case}.nii.gz", args.work)
    image_path = case_dir / "imaging.nii.gz"
    shape = nib.load(image_path).shape
    rows = [measure(method, image_path, args) for method in args.methods]

    print(f"Whole-case CPU inference, {args.case} phantom {'x'.join(map(str, shape))}, "
          f"windows {'x'.join(map(str, args.roi))}, overlap {args.overlap}, 4-class UNet, "
          f"{os.cpu_count()} CPUs, torch threads default, {platform.python_version()}, {date.today()}\n")
    print("| method | seconds | peak RSS (GiB) |")
    print("| --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['method']} | {row['seconds']:.1f} | {row['peak_rss_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
