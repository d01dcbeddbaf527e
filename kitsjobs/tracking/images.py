"""Validation slices with reference and prediction overlaid, written as PNG files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# RGB of kidney (1), tumor (2) and cyst (3); background (0) stays the CT gray.
LABEL_COLORS = np.array([[0, 0, 0], [46, 204, 64], [255, 65, 54], [0, 116, 217]], dtype=np.float32)
OVERLAY_ALPHA = 0.45
# Thresholds on the label value: kidney and masses {1,2,3}, masses {2,3}, tumor {2}.
_REGION_TESTS = (lambda v: v > 0, lambda v: v >= 2, lambda v: v == 2)


def pick_slices(reference: np.ndarray, max_slices: int = 3) -> list[int]:
    """Choose the axial slices that show each KiTS23 region best.

    Args:
        reference: label volume, slices first (z, y, x), labels in {0, 1, 2, 3}.
        max_slices: how many slices to return at most.

    Returns:
        Slice indices, without repeats: the slice with the largest area of kidney
        and masses, then of masses, then of tumor (regions absent from the volume
        are skipped). A volume without foreground gives its middle slice.
    """
    chosen: list[int] = []
    for region_test in _REGION_TESTS:
        areas = region_test(reference).sum(axis=(1, 2))
        if areas.max() > 0:
            index = int(areas.argmax())
            if index not in chosen:
                chosen.append(index)
    if not chosen:
        chosen.append(reference.shape[0] // 2)
    return chosen[:max_slices]


def overlay_slice(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Blend label colors onto a gray image slice.

    Args:
        image: 2D intensities scaled to [0, 1] (values outside are clipped).
        labels: 2D labels in {0, 1, 2, 3}, same shape.

    Returns:
        uint8 RGB array of shape (rows, cols, 3).
    """
    gray = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    labels = np.clip(np.asarray(labels).astype(np.int64), 0, len(LABEL_COLORS) - 1)
    foreground = labels > 0
    rgb[foreground] = (1.0 - OVERLAY_ALPHA) * rgb[foreground] + OVERLAY_ALPHA * LABEL_COLORS[labels[foreground]]
    return np.round(rgb).astype(np.uint8)


def overlay_panel(image: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Put the reference overlay (left) and the prediction overlay (right) side by side.

    Args:
        image, labels, reference: 2D slices of the same shape (see :func:`overlay_slice`).

    Returns:
        uint8 RGB array of shape (rows, 2 * cols + 2, 3), with a 2-pixel white gap.
    """
    gap = np.full((image.shape[0], 2, 3), 255, dtype=np.uint8)
    return np.concatenate([overlay_slice(image, reference), gap, overlay_slice(image, labels)], axis=1)


def save_overlays(
    image: np.ndarray,
    labels: np.ndarray,
    reference: np.ndarray,
    path_prefix: Path,
    max_slices: int = 3,
) -> list[Path]:
    """Write PNG panels of a few slices with reference (left) and prediction (right) overlaid.

    Args:
        image: scaled intensities in [0, 1], slices first (z, y, x).
        labels: predicted labels in {0, 1, 2, 3}, same shape.
        reference: reference labels in {0, 1, 2, 3}, same shape.
        path_prefix: files are named ``{path_prefix}_z{SLICE}.png``; missing
            folders are created.
        max_slices: how many slices to write at most (see :func:`pick_slices`).

    Returns:
        The written PNG paths, one per slice.

    Raises:
        ValueError: if the three volumes are not 3D arrays of one shape.
    """
    image, labels, reference = np.asarray(image), np.asarray(labels), np.asarray(reference)
    if image.ndim != 3 or image.shape != labels.shape or image.shape != reference.shape:
        raise ValueError(f"image {image.shape}, labels {labels.shape} and reference {reference.shape} "
                         "must be 3D volumes of one shape (z, y, x)")
    path_prefix = Path(path_prefix)
    path_prefix.parent.mkdir(parents=True, exist_ok=True)

    paths = []
    for index in pick_slices(reference, max_slices):
        panel = overlay_panel(image[index], labels[index], reference[index])
        path = path_prefix.with_name(f"{path_prefix.name}_z{index:04d}.png")
        Image.fromarray(panel).save(path, format="PNG")
        paths.append(path)
    return paths
