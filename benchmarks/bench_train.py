"""Training step overhead of kitsjobs' Trainer against a bare PyTorch loop on the same model.

Both train the same MONAI UNet (4 classes) with AdamW and DiceCELoss on CPU, same seed:

- bare loop: one fixed batch, forward, backward, optimizer step; nothing else.
- bare loop + sampler: the same, drawing each batch with kitsjobs' PatchSampler first.
- Trainer: ``kitsjobs.train.loop.Trainer.fit`` (sampling, learning-rate schedule, history,
  progress bar), validation off, one checkpoint at the end (its write time is included).

The overhead is Trainer's seconds per step over the bare loop's, minus one.

Usage (from the repository root)::

    python benchmarks/bench_train.py [--steps 20] [--patch 32 64 64]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss

from kitsjobs.config import Config
from kitsjobs.data.sampling import PatchSampler
from kitsjobs.data.volumes import Volume
from kitsjobs.models.factory import build_model
from kitsjobs.train.loop import Trainer


def make_volumes(count: int = 2) -> list[Volume]:
    """Labelled random volumes of 64 x 160 x 160 voxels with a kidney, tumor and cyst box."""
    rng = np.random.default_rng(0)
    volumes = []
    for index in range(count):
        label = np.zeros((64, 160, 160), np.uint8)
        label[20:40, 40:90, 40:90] = 1
        label[25:32, 50:60, 50:60] = 2
        label[34:38, 70:80, 70:80] = 3
        image = rng.random(label.shape, dtype=np.float32)
        volumes.append(Volume(f"case_{index}", image, label, np.eye(4), (1.0, 1.0, 1.0)))
    return volumes


def make_config(steps: int, patch: list[int]) -> Config:
    config = Config()
    config.data.patch_size = patch
    config.trainer.max_steps = steps
    config.trainer.val_every_steps = steps * 10
    config.trainer.checkpoint_every_steps = steps * 10
    config.trainer.log_every_steps = 10
    config.trainer.device = "cpu"
    config.trainer.resume = False
    return config


def bare_loop(config: Config, sampler: PatchSampler | None, batch: tuple[np.ndarray, np.ndarray], steps: int) -> float:
    """Return seconds per step of a plain loop."""
    torch.manual_seed(config.seed)
    model = build_model(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    model.train()
    inputs, targets = torch.from_numpy(batch[0]), torch.from_numpy(batch[1])
    started = time.perf_counter()
    for step in range(steps):
        if sampler is not None:
            images, labels = sampler.sample(step, config.data.batch_size)
            inputs, targets = torch.from_numpy(images), torch.from_numpy(labels)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_function(model(inputs), targets)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def trainer_loop(config: Config, volumes: list[Volume], steps: int) -> float:
    """Return seconds per step of Trainer.fit."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, Path(run_dir), volumes, [])
        started = time.perf_counter()
        trainer.fit()
        return (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per method")
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 64, 64], help="patch size (z, y, x)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the fastest is kept")
    args = parser.parse_args(argv)

    config = make_config(args.steps, args.patch)
    volumes = make_volumes()
    sampler = PatchSampler(volumes, args.patch, config.data.class_ratios, config.seed)
    batch = sampler.sample(0, config.data.batch_size)
    bare_loop(config, None, batch, 2)

    results: dict[str, list[float]] = {"bare loop": [], "bare loop + sampler": [], "Trainer": []}
    for _ in range(args.repeats):
        results["bare loop"].append(bare_loop(config, None, batch, args.steps))
        results["bare loop + sampler"].append(bare_loop(config, sampler, batch, args.steps))
        results["Trainer"].append(trainer_loop(config, volumes, args.steps))
    best = {name: min(values) for name, values in results.items()}

    print(f"Training step on CPU, UNet {config.model.channels}, batch {config.data.batch_size} x "
          f"{'x'.join(map(str, args.patch))}, {args.steps} steps, best of {args.repeats}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}, {date.today()}\n")
    print("| loop | s/step | overhead vs bare loop |")
    print("| --- | ---: | ---: |")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.3f} | {seconds / best['bare loop'] - 1:+.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
