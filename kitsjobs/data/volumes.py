"""Read NIfTI volumes and bring CT intensities to the network's range."""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from kitsjobs.errors import UserError
from kitsjobs.fsutil import atomic_write

logger = logging.getLogger(__name__)


@dataclass
class Volume:
    """A loaded case: slices-first arrays and the image geometry.

    Attributes:
        name: case name.
        image: intensities scaled to [0, 1], shape (slices, rows, cols); float32, or float16
            for a memory-mapped cache.
        label: uint8 labels of the same shape, or None for inference.
        affine: the image's 4x4 voxel-to-world affine.
        spacing_mm: voxel size along the array axes.
        class_points: optional (N, 4) int32 rows (class, z, y, x) of foreground voxels to
            centre training patches on; None lets the sampler find them in ``label``.
    """

    name: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    spacing_mm: tuple[float, float, float]
    class_points: np.ndarray | None = None


def scale_intensity(hu: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """Clip HU values to [hu_min, hu_max] and scale them linearly to float32 [0, 1]."""
    if hu_max <= hu_min:
        raise UserError(f"data.hu_max={hu_max} must be greater than data.hu_min={hu_min}")
    scaled = np.asarray(hu, dtype=np.float32)
    scaled = np.clip(scaled, hu_min, hu_max, out=scaled if scaled is not hu else None)
    scaled -= hu_min
    scaled /= hu_max - hu_min
    return scaled


def read_nifti(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI file, turning a missing or unreadable file into a UserError."""
    try:
        image = nib.load(str(path))
    except (OSError, EOFError, nib.filebasedimages.ImageFileError) as error:
        raise UserError(f"cannot read {path}: {error}; check or replace the file") from None
    if len(image.shape) != 3:
        raise UserError(f"{path} has shape {image.shape}; a 3D volume is expected")
    return image


def save_labels(path: Path, labels: np.ndarray, reference: nib.Nifti1Image) -> None:
    """Write a uint8 label map on the grid of ``reference`` (same shape, affine and zooms), atomically."""
    if labels.shape != reference.shape:
        raise ValueError(f"labels of shape {labels.shape} do not fit the image of shape {reference.shape}")
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    output = nib.Nifti1Image(labels.astype(np.uint8, copy=False), reference.affine, header)
    output.set_qform(reference.affine, code=int(reference.header["qform_code"]) or 1)
    output.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    atomic_write(Path(path), lambda file: file.write(_nifti_gz_bytes(output)))


def _nifti_gz_bytes(image: nib.Nifti1Image) -> bytes:
    return gzip.compress(image.to_bytes(), compresslevel=1)
