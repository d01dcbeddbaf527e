"""GPU throughput: training iterations per second of a 128^3 3D U-Net in bf16, and inference per case.

Self-contained (synthetic data, random weights), about 2 to 4 minutes on one GPU:

- training: MONAI UNet (channels 32-64-128-256-320, 4 classes), batch 2 of 128^3 patches,
  AdamW, DiceCELoss, bf16 autocast; iterations per second after a warm-up.
- inference: ``kitsjobs.infer.sliding.predict_labels`` on a random 1059 x 512 x 512 float16
  volume (the largest KiTS23 case's shape), 128^3 windows, overlap 0.5, sw_batch_size 4, with
  float16 autocast as ``kitsjobs.predict`` uses it, no mirroring.

Usage (from the repository root, on a machine with CUDA)::

    python benchmarks/gpu_bench.py [--train-steps 30] [--skip-inference]

Prints a Markdown table with the date and the card's name.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from kitsjobs.infer.sliding import predict_labels

CHANNELS = (32, 64, 128, 256, 320)


def build_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(3, 1, 4, channels=CHANNELS, strides=(2, 2, 2, 2), num_res_units=2)


def train_iterations_per_s(device: torch.device, steps: int, warmup: int = 5) -> float:
    """Return training iterations per second in bf16 autocast."""
    model = build_unet().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    inputs = torch.rand((2, 1, 128, 128, 128), device=device)
    targets = torch.randint(0, 4, (2, 1, 128, 128, 128), device=device)
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize(device)
            started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_function(model(inputs), targets)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize(device)
    return steps / (time.perf_counter() - started)


def inference_seconds(device: torch.device, shape: tuple[int, int, int]) -> float:
    """Return the seconds kitsjobs takes to label one volume of ``shape`` on the GPU."""
    model = build_unet().to(device).eval()
    image = np.random.default_rng(0).random(shape, dtype=np.float32).astype(np.float16)
    predict_labels(model, image[:128, :128, :128], (128, 128, 128), 0.5, 4, device, amp=True)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    predict_labels(model, image, (128, 128, 128), 0.5, 4, device, amp=True)
    torch.cuda.synchronize(device)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=30, help="timed training iterations")
    parser.add_argument("--skip-inference", action="store_true", help="time training only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device is visible; run this script on a GPU node", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    torch.backends.cudnn.benchmark = True

    rows = [("training, batch 2 x 128^3, bf16", f"{train_iterations_per_s(device, args.train_steps):.2f} it/s")]
    torch.cuda.empty_cache()
    if not args.skip_inference:
        seconds = inference_seconds(device, (1059, 512, 512))
        rows.append(("inference, 1059 x 512 x 512, overlap 0.5, fp16", f"{seconds:.1f} s/case"))
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30

    print(f"GPU benchmark, {date.today()}, {card}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"Python {platform.python_version()}, UNet channels {CHANNELS}\n")
    print("| measurement | result |")
    print("| --- | ---: |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"| peak GPU memory allocated | {peak_gib:.1f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
