"""Predict a CT file on its own grid: preprocess as in training, slide windows, map labels back.

The image goes through the same steps as the training cache (crop to the body, resample to
the training spacing, scale the HU window), the network runs on that grid, and the labels
are resampled by nearest neighbour onto the cropped region of the original grid, with
background outside the crop. The result has the input's shape, and it is saved with the
input's affine. Peak memory is the stored image, one preprocessed copy (float16 by default),
one slab of blended probabilities and the uint8 labels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kitsjobs.data.cache import PreprocessSettings, prepare_arrays
from kitsjobs.data.layouts import Case
from kitsjobs.data.resample import resample_nearest
from kitsjobs.infer.sliding import Models, predict_labels

logger = logging.getLogger(__name__)


def restore_original_grid(labels: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    """Map labels of the preprocessed grid back onto the original image grid.

    Args:
        labels: uint8 (z, y, x) labels on the preprocessed grid (``geometry["shape"]``).
        geometry: the geometry dict of :func:`kitsjobs.data.cache.prepare_arrays`.

    Returns:
        uint8 labels of ``geometry["original_shape"]``: nearest-neighbour resampled inside the
        crop box, background (0) outside.

    Raises:
        ValueError: ``labels`` does not have the preprocessed shape.
    """
    if list(labels.shape) != list(geometry["shape"]):
        raise ValueError(f"labels of shape {labels.shape} do not match the preprocessed shape {geometry['shape']}")
    restored = np.zeros(tuple(geometry["original_shape"]), dtype=np.uint8)
    box = tuple(slice(start, stop) for start, stop in geometry["crop_box"])
    resample_nearest(labels, restored[box])
    return restored


def predict_file(
    models: Models,
    image_path: Path,
    settings: PreprocessSettings,
    roi_size: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    device: torch.device = torch.device("cpu"),
    amp: bool = False,
    mirror_axes: Sequence[int] = (),
) -> np.ndarray:
    """Predict the labels of one CT file on the file's own grid.

    Args:
        models: one network or several (probabilities averaged).
        image_path: NIfTI image in HU, stored slices-first like KiTS23.
        settings: the preprocessing the networks were trained with.
        roi_size: window size (z, y, x) in voxels of the preprocessed grid.
        overlap: overlap fraction between windows, in [0, 1).
        sw_batch_size: windows per forward pass.
        device: where the windows run.
        amp: autocast to float16 on CUDA.
        mirror_axes: spatial axes flipped for test-time augmentation.

    Returns:
        uint8 labels with the image file's shape.

    Raises:
        UserError: unreadable image.
    """
    name = Path(image_path).name
    image, _, _, geometry = prepare_arrays(Case(name, Path(image_path), None), settings, check_intensities=True)
    logger.debug("%s: original %s, crop %s, network grid %s", name, geometry["original_shape"],
                 geometry["crop_box"], geometry["shape"])
    labels = predict_labels(
        models, image, roi_size, overlap, sw_batch_size, device, amp=amp, mirror_axes=mirror_axes
    )
    del image
    return restore_original_grid(labels, geometry)
