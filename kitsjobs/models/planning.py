"""Derive a DynUNet's kernel sizes and strides from the patch size and voxel spacing.

The rules follow the nnU-Net planner (Isensee et al., "nnU-Net: a self-configuring
method for deep learning-based biomedical image segmentation", Nature Methods 2021):

- An axis is downsampled by 2 at a level when its voxels are less than twice as
  large as the finest axis at that level, and when halving it leaves at least
  ``min_feature_map_vox`` voxels. An axis much coarser than the others therefore
  waits until the other axes have caught up with its spacing.
- A convolution uses kernel size 3 along an axis whose voxels are less than twice
  as large as the finest axis, and kernel size 1 along a much coarser axis. Once
  an axis has kernel size 3, the lower levels keep it, even where pooling only the
  other axes made this axis the finer one.
- Levels are added until no axis can be downsampled any further.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from kitsjobs.errors import UserError

logger = logging.getLogger(__name__)

MIN_FEATURE_MAP_VOX = 4
"""Smallest edge, in voxels, that the lowest level of the network may have (nnU-Net uses 4)."""

ANISOTROPY_RATIO = 2.0
"""Ratio to the finest axis's voxel size from which an axis is neither downsampled nor convolved across."""


@dataclass(frozen=True)
class DynUNetPlan:
    """Per-level geometry of a DynUNet, first level first.

    Attributes:
        kernel_sizes: convolution kernel size (z, y, x) of each level.
        strides: downsampling stride (z, y, x) into each level; the first is (1, 1, 1).
        bottleneck_size_vox: feature map size (z, y, x) in voxels at the lowest level.
    """

    kernel_sizes: tuple[tuple[int, int, int], ...]
    strides: tuple[tuple[int, int, int], ...]
    bottleneck_size_vox: tuple[int, int, int]

    @property
    def num_levels(self) -> int:
        """Number of resolution levels, the first one included."""
        return len(self.strides)


def plan_dynunet(
    patch_size: Sequence[int],
    spacing_mm: Sequence[float] | None = None,
    min_feature_map_vox: int = MIN_FEATURE_MAP_VOX,
) -> DynUNetPlan:
    """Plan the kernel sizes and strides of a 3D DynUNet for one patch geometry.

    Args:
        patch_size: patch size (z, y, x) in voxels, slices first.
        spacing_mm: voxel size (z, y, x) in mm of the patches; None treats all axes as
            equally spaced.
        min_feature_map_vox: smallest edge in voxels allowed at the lowest level.

    Returns:
        The plan, with at least two levels.

    Raises:
        UserError: if the patch size or spacing does not have 3 positive values, or
            the patch is too small to be downsampled even once.
    """
    size = _validated_patch_size(patch_size)
    spacing = _validated_spacing(spacing_mm)

    kernel_sizes = [_kernel_size(spacing, (1, 1, 1))]
    strides = [(1, 1, 1)]
    while True:
        stride = _stride(size, spacing, min_feature_map_vox)
        if stride == (1, 1, 1):
            break
        size = [extent // step for extent, step in zip(size, stride)]
        spacing = [mm * step for mm, step in zip(spacing, stride)]
        strides.append(stride)
        kernel_sizes.append(_kernel_size(spacing, kernel_sizes[-1]))

    if len(strides) < 2:
        raise UserError(
            f"model.patch_size {list(patch_size)} is too small for dynunet: no axis can be halved "
            f"and keep {min_feature_map_vox} voxels. Use at least {2 * min_feature_map_vox} even "
            "voxels on each axis, for example [64, 128, 128]"
        )
    plan = DynUNetPlan(
        kernel_sizes=tuple(kernel_sizes),
        strides=tuple(strides),
        bottleneck_size_vox=(size[0], size[1], size[2]),
    )
    logger.debug("dynunet plan for patch %s and spacing %s mm: %s", list(patch_size), spacing_mm, plan)
    return plan


def _stride(size: Sequence[int], spacing: Sequence[float], min_feature_map_vox: int) -> tuple[int, int, int]:
    finest_mm = min(spacing)
    steps = []
    for extent, mm in zip(size, spacing):
        is_fine_enough = mm < ANISOTROPY_RATIO * finest_mm
        # An odd edge would lose a voxel at every pooling and misalign the skip connections.
        is_large_enough = extent % 2 == 0 and extent // 2 >= min_feature_map_vox
        steps.append(2 if is_fine_enough and is_large_enough else 1)
    return (steps[0], steps[1], steps[2])


def _kernel_size(spacing: Sequence[float], previous: Sequence[int]) -> tuple[int, int, int]:
    finest_mm = min(spacing)
    sizes = [
        3 if previous_size == 3 or mm < ANISOTROPY_RATIO * finest_mm else 1
        for mm, previous_size in zip(spacing, previous)
    ]
    return (sizes[0], sizes[1], sizes[2])


def _validated_patch_size(patch_size: Sequence[int]) -> list[int]:
    values = list(patch_size)
    if len(values) != 3 or not all(isinstance(value, int) and value > 0 for value in values):
        raise UserError(
            f"model.patch_size must be 3 positive voxel counts (z, y, x), got {values}. "
            "Set it to the training patch, as conf/model/dynunet.yaml does with ${data.patch_size}"
        )
    return values


def _validated_spacing(spacing_mm: Sequence[float] | None) -> list[float]:
    if spacing_mm is None:
        return [1.0, 1.0, 1.0]
    values = [float(value) for value in spacing_mm]
    if len(values) != 3 or not all(math.isfinite(value) and value > 0 for value in values):
        raise UserError(
            f"model.spacing_mm must be 3 positive voxel sizes (z, y, x) in mm or null, "
            f"got {list(spacing_mm)}. Set it to the spacing of the training patches"
        )
    return values
