"""Gaussian-blended sliding-window prediction with memory bounded by one slab of windows.

Windows are visited row by row along z (slices). All windows of a row start at the same
slice, so once a row is done every slice before the next row's first slice has received all
its windows: those slices are reduced to labels (argmax) and their probabilities dropped.
Only a slab one window deep is kept as float probabilities, so a 1059 x 512 x 512 case needs
about classes x window depth x 512 x 512 x 4 bytes beside the image and labels. The
blending equals Gaussian blending over the whole volume (MONAI's importance map with
sigma 0.125 x window size), because argmax ignores the per-voxel normalisation.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Union

import numpy as np
import torch
from monai.data.utils import compute_importance_map

logger = logging.getLogger(__name__)

ACCUMULATE_CHOICES = ("auto", "device", "cpu")
# With accumulate_on="auto", the slab buffer goes on the GPU when it takes at most this
# fraction of the free GPU memory.
GPU_BUFFER_FRACTION = 0.25

Models = Union[torch.nn.Module, Sequence[torch.nn.Module]]


@dataclass(frozen=True)
class SlidingWindowSettings:
    """Window size, overlap and blending with which a volume is covered and its outputs combined.

    Attributes:
        roi_size: window size (z, y, x) in voxels; a smaller volume is zero-padded per window.
        overlap: fraction of a window shared with its neighbour along each axis, in [0, 1).
        sw_batch_size: windows per forward pass.
        mirror_axes: spatial axes (0 = z, 1 = y, 2 = x) flipped for test-time augmentation;
            every subset of them is predicted and the probabilities averaged (8 passes for 3 axes).
        amp: autocast to float16 on CUDA; ignored on CPU.
        accumulate_on: where the blended slab lives: "device", "cpu", or "auto" (the device
            when the slab takes at most a quarter of the free GPU memory).
    """

    roi_size: tuple[int, int, int]
    overlap: float = 0.5
    sw_batch_size: int = 2
    mirror_axes: tuple[int, ...] = ()
    amp: bool = False
    accumulate_on: str = "auto"

    def __post_init__(self) -> None:
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size={list(self.roi_size)} is invalid; give three positive sizes (z, y, x)")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap={self.overlap} is invalid; give a fraction in [0, 1), e.g. 0.5")
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size={self.sw_batch_size} is invalid; give 1 or more")
        if any(axis not in (0, 1, 2) for axis in self.mirror_axes):
            raise ValueError(f"mirror_axes={list(self.mirror_axes)} is invalid; use axes among 0, 1, 2")
        if self.accumulate_on not in ACCUMULATE_CHOICES:
            raise ValueError(f"accumulate_on='{self.accumulate_on}' is invalid; use one of {ACCUMULATE_CHOICES}")


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Return the first voxel of each window along one axis of ``size`` voxels.

    The step is ``roi * (1 - overlap)`` (at least 1) and the last window ends at the border;
    a single window at 0 covers an axis shorter than the window.
    """
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1.0 - overlap)))
    count = math.ceil((size - roi) / step) + 1
    return sorted({min(i * step, size - roi) for i in range(count)})


def _flip_sets(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    axes = sorted(set(mirror_axes))
    return [tuple(a + 2 for a in combo) for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


def _predict_batch(
    models: Sequence[torch.nn.Module], inputs: torch.Tensor, flips: list[tuple[int, ...]], amp: bool
) -> torch.Tensor:
    """Average the softmax probabilities of every model and flip: (B, C, z, y, x) float32."""
    total = None
    with torch.autocast(inputs.device.type, enabled=amp and inputs.device.type == "cuda"):
        for model in models:
            for dims in flips:
                flipped = torch.flip(inputs, dims) if dims else inputs
                probabilities = torch.softmax(model(flipped).float(), dim=1)
                if dims:
                    probabilities = torch.flip(probabilities, dims)
                total = probabilities if total is None else total + probabilities
    return total / (len(models) * len(flips))  # type: ignore[operator]


class _SlabAccumulator:
    """Blended probabilities of the slices [origin, origin + depth) of the volume."""

    def __init__(self, num_classes: int, depth: int, plane: tuple[int, int], device: torch.device) -> None:
        self.sums = torch.zeros((num_classes, depth, *plane), dtype=torch.float32, device=device)
        self.origin = 0

    def add(self, probabilities: torch.Tensor, z: int, y: int, x: int) -> None:
        dz, dy, dx = probabilities.shape[1:]
        offset = z - self.origin
        self.sums[:, offset : offset + dz, y : y + dy, x : x + dx] += probabilities

    def finalize(self, stop: int, labels: np.ndarray) -> None:
        """Write labels of the slices [origin, stop) and move the slab to start at ``stop``."""
        count = stop - self.origin
        if count <= 0:
            return
        labels[self.origin : stop] = torch.argmax(self.sums[:, :count], dim=0).to(torch.uint8).cpu().numpy()
        kept = self.sums.shape[1] - count
        if kept > 0:
            self.sums[:, :kept] = self.sums[:, count:].clone()
        self.sums[:, kept:] = 0
        self.origin = stop


def _padding_offsets(shape: Sequence[int], roi: Sequence[int]) -> tuple[int, ...]:
    # An axis shorter than the window is centred in it, as MONAI's SpatialPad does.
    return tuple(max(r - size, 0) // 2 for size, r in zip(shape, roi))


def _read_window(
    image: np.ndarray, start: tuple[int, int, int], roi: tuple[int, int, int], offsets: tuple[int, ...]
) -> np.ndarray:
    window = np.zeros(roi, dtype=np.float32)
    block = image[tuple(slice(s, s + r) for s, r in zip(start, roi))]
    window[tuple(slice(o, o + n) for o, n in zip(offsets, block.shape))] = block
    return window


def _accumulator_device(settings: SlidingWindowSettings, device: torch.device, buffer_bytes: int) -> torch.device:
    if device.type != "cuda" or settings.accumulate_on == "cpu":
        return torch.device("cpu")
    if settings.accumulate_on == "device":
        return device
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return device if buffer_bytes <= GPU_BUFFER_FRACTION * free_bytes else torch.device("cpu")


def _predict_rows(
    models: Sequence[torch.nn.Module],
    image: np.ndarray,
    settings: SlidingWindowSettings,
    device: torch.device,
) -> np.ndarray:
    shape = image.shape
    roi = tuple(int(r) for r in settings.roi_size)
    starts = [window_starts(size, r, settings.overlap) for size, r in zip(shape, roi)]
    depth = min(roi[0], shape[0])
    flips = _flip_sets(settings.mirror_axes)
    offsets = _padding_offsets(shape, roi)
    labels = np.zeros(shape, dtype=np.uint8)
    accumulator = None
    importance_cpu = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device="cpu").float()
    importance = importance_cpu

    for z in starts[0]:
        if accumulator is not None:
            accumulator.finalize(z, labels)
        plane_windows = list(itertools.product(starts[1], starts[2]))
        for first in range(0, len(plane_windows), settings.sw_batch_size):
            batch = plane_windows[first : first + settings.sw_batch_size]
            inputs = np.stack([_read_window(image, (z, y, x), roi, offsets) for y, x in batch])[:, None]
            probabilities = _predict_batch(models, torch.from_numpy(inputs).to(device), flips, settings.amp)

            if accumulator is None:
                num_classes = probabilities.shape[1]
                buffer_bytes = num_classes * depth * shape[1] * shape[2] * 4
                target = _accumulator_device(settings, device, buffer_bytes)
                logger.debug("accumulating a %.0f MB slab on %s", buffer_bytes / 2**20, target)
                accumulator = _SlabAccumulator(num_classes, depth, (shape[1], shape[2]), target)
                importance = importance_cpu.to(target)
            probabilities = probabilities.to(accumulator.sums.device) * importance

            for (y, x), window in zip(batch, probabilities):
                valid = tuple(
                    slice(o, o + min(r, size - s)) for o, r, size, s in zip(offsets, roi, shape, (z, y, x))
                )
                accumulator.add(window[(slice(None), *valid)], z, y, x)

    accumulator.finalize(shape[0], labels)  # type: ignore[union-attr]
    return labels


def predict_labels(
    model: Models,
    image: np.ndarray,
    patch_size: Sequence[int],
    overlap: float,
    sw_batch_size: int,
    device: torch.device,
    amp: bool = False,
    mirror_axes: Sequence[int] = (),
    accumulate_on: str = "auto",
) -> np.ndarray:
    """Predict a label map for one scaled image, blending windows and models in bounded memory.

    Args:
        model: a network, or several (a fold ensemble), returning (B, classes, z, y, x) logits;
            their softmax probabilities are averaged.
        image: (z, y, x) intensity-scaled volume, float16 or float32; it may be a memory map,
            read one window at a time.
        patch_size: window size (z, y, x) in voxels; windows past a border are zero-padded.
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        sw_batch_size: windows per forward pass.
        device: where the windows run.
        amp: autocast to float16 on CUDA.
        mirror_axes: spatial axes flipped for test-time augmentation (all subsets are used).
        accumulate_on: "auto", "device" or "cpu": where the blended slab is kept.

    Returns:
        uint8 labels with exactly the shape of ``image``.

    Raises:
        ValueError: invalid window settings.
        torch.cuda.OutOfMemoryError: when even CPU accumulation with one window per pass
            does not fit the GPU.
    """
    models = [model] if isinstance(model, torch.nn.Module) else list(model)
    settings = SlidingWindowSettings(
        tuple(int(s) for s in patch_size), overlap, sw_batch_size, tuple(mirror_axes), amp, accumulate_on,  # type: ignore[arg-type]
    )
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.inference_mode():
            return _predict_with_fallback(models, image, settings, device)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _predict_with_fallback(
    models: Sequence[torch.nn.Module], image: np.ndarray, settings: SlidingWindowSettings, device: torch.device
) -> np.ndarray:
    while True:
        try:
            return _predict_rows(models, image, settings, device)
        except torch.cuda.OutOfMemoryError as error:
            fallback = _smaller_settings(settings, device)
            if fallback is None:
                raise
            logger.warning(
                "CUDA out of memory on a %s volume (%s); retrying with accumulate_on=%s, sw_batch_size=%d",
                "x".join(map(str, image.shape)), str(error).splitlines()[0], fallback.accumulate_on,
                fallback.sw_batch_size,
            )
            torch.cuda.empty_cache()
            settings = fallback


def _smaller_settings(settings: SlidingWindowSettings, device: torch.device) -> SlidingWindowSettings | None:
    """Return the next, lighter settings after an out-of-memory error, or None when none is left."""
    if device.type == "cuda" and settings.accumulate_on != "cpu":
        return replace(settings, accumulate_on="cpu")
    if settings.sw_batch_size > 1:
        return replace(settings, sw_batch_size=settings.sw_batch_size // 2)
    return None
