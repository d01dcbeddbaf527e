"""Resample slices-first volumes slab by slab, so memory stays bounded on large cases.

Both resamplers follow the grid convention of ``torch.nn.functional.interpolate`` with
``align_corners=False``: output voxel ``j`` of an axis of ``n_in`` input and ``n_out``
output voxels has its centre at input coordinate ``(j + 0.5) * n_in / n_out - 0.5``. So the
linear resampler gives the same values as trilinear interpolation of the whole volume, and
nearest-neighbour resampling there and back returns each voxel to its place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Output slices computed per step; bounds the float32 work buffers to about
# SLAB_SLICES * rows * cols * 4 bytes (32 MiB for 512 x 512 slices).
SLAB_SLICES = 32


def target_shape(
    shape: Sequence[int], spacing_mm: Sequence[float], target_spacing_mm: Sequence[float]
) -> tuple[int, int, int]:
    """Return the shape that covers the same extent as ``shape`` at ``target_spacing_mm``.

    Each size is ``round(size * spacing / target_spacing)``, at least 1.
    """
    return tuple(  # type: ignore[return-value]
        max(1, int(round(size * spacing / target)))
        for size, spacing, target in zip(shape, spacing_mm, target_spacing_mm)
    )


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Return, for each of ``n_out`` output voxels, the index of the nearest input voxel."""
    indices = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.minimum(indices, n_in - 1)


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Same clamping as torch's linear modes: coordinates below 0 use voxel 0.
    source = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lower = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    upper = np.minimum(lower + 1, n_in - 1)
    return lower, upper, (source - lower).astype(np.float32)


def resample_linear(
    source: np.ndarray,
    out: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Resample ``source`` into ``out`` with trilinear interpolation, a slab of slices at a time.

    Args:
        source: (slices, rows, cols) array of any numeric dtype; it may be a memory map.
        out: preallocated (slices', rows', cols') array (float16 or float32, possibly a
            memory map) that receives the result.
        transform: applied to each block of source slices after conversion to float32 and
            before interpolation (intensity clipping and scaling, for instance).

    Returns:
        ``out``.
    """
    lower, upper, weight = _linear_weights(source.shape[0], out.shape[0])
    same_plane = tuple(out.shape[1:]) == tuple(source.shape[1:])
    for start in range(0, out.shape[0], SLAB_SLICES):
        stop = min(start + SLAB_SLICES, out.shape[0])
        first, last = int(lower[start]), int(upper[stop - 1]) + 1
        block = np.asarray(source[first:last], dtype=np.float32)
        if transform is not None:
            block = transform(block)
        below = block[lower[start:stop] - first]
        above = block[upper[start:stop] - first]
        w = weight[start:stop, None, None]
        slab = below * (1.0 - w) + above * w
        if not same_plane:
            planes = F.interpolate(
                torch.from_numpy(slab)[:, None], size=tuple(out.shape[1:]), mode="bilinear", align_corners=False
            )
            slab = planes[:, 0].numpy()
        out[start:stop] = slab
    return out


def resample_nearest(source: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Resample a label map ``source`` into ``out`` by nearest neighbour, a slab of slices at a time.

    Args:
        source: (slices, rows, cols) integer array; it may be a memory map.
        out: preallocated array of the target shape and dtype.

    Returns:
        ``out``.
    """
    z_index = nearest_indices(source.shape[0], out.shape[0])
    y_index = nearest_indices(source.shape[1], out.shape[1])
    x_index = nearest_indices(source.shape[2], out.shape[2])
    for start in range(0, out.shape[0], SLAB_SLICES):
        stop = min(start + SLAB_SLICES, out.shape[0])
        planes = np.asarray(source[z_index[start:stop]])
        out[start:stop] = planes[:, y_index][:, :, x_index]
    return out
