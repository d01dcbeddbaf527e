"""CT-like phantom images from KiTS23 label maps, and a procedural demo dataset.

No KiTS23 CT images are needed. :func:`labels_to_image` paints Hounsfield units (HU) per tissue
onto a label map (0 background, 1 kidney, 2 tumor, 3 cyst). It adds a body outline with
subcutaneous fat and a spine, low-frequency texture, partial-volume blur and noise.
:func:`generate_labels`
draws a pair of kidneys with tumors and cysts, so the whole pipeline can be trained and tested
without any data.

All arrays are slices-first, ``(slices, rows, cols)``, as the KiTS23 release stores them: axis 0
runs inferior, axis 1 (rows) posterior and axis 2 (cols) towards the patient's left, so the
orientation codes are ``('I', 'P', 'L')``. Spacings are in mm in the same axis order.

Command line::

    python -m kitsjobs.data.phantom LABELS_DIR OUT_DIR [--seed N] [--cases case_00048 ...]
    python -m kitsjobs.data.phantom --demo OUT_DIR [--n-cases N]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from scipy import ndimage
from tqdm import tqdm

from kitsjobs.cli import user_path

logger = logging.getLogger(__name__)

BACKGROUND, KIDNEY, TUMOR, CYST = 0, 1, 2, 3
LABEL_VALUES = (BACKGROUND, KIDNEY, TUMOR, CYST)
HU_MIN, HU_MAX = -1024, 3071

# Random streams: each use of the seed gets its own stream, so adding one does not shift others.
_STREAM_NOISE, _STREAM_TISSUE_TEXTURE, _STREAM_TUMOR_TEXTURE, _STREAM_BODY = 1, 2, 3, 4

# The body outline swells and shrinks by this fraction along the slices, with a 300 mm period.
_BODY_SIZE_VARIATION = 0.04

# Demo cases draw their anatomy seed as seed * 100_000 + index, which stays unique below this count.
MAX_DEMO_CASES = 100_000

# Half-widths in mm of a typical adult abdomen and kidney, used to scale the generated anatomy.
_REFERENCE_BODY_HALF_WIDTH_MM = 180.0
_KIDNEY_SEMI_AXES_MM = (55.0, 22.0, 28.0)  # (cranio-caudal, antero-posterior, lateral)


@dataclasses.dataclass(frozen=True)
class PhantomParams:
    """Tissue levels and image-formation settings of :func:`labels_to_image`."""

    air_hu: float = -1000.0  # outside the body outline
    fat_hu: float = -100.0  # subcutaneous fat ring inside the body outline
    soft_tissue_hu: float = 40.0  # unlabelled voxels inside the body
    bone_hu: float = 400.0  # vertebral column, a mix of cortical and trabecular bone
    kidney_hu: float = 180.0  # enhanced kidney, like renal cortex in the corticomedullary phase
    tumor_hu: float = 90.0  # mean of the tumor before texture
    cyst_hu: float = 10.0  # near-water cyst
    tumor_texture_hu: float = 20.0  # standard deviation of the tumor texture at its grid nodes
    tumor_texture_step_mm: float = 6.0  # grid step of the tumor texture
    tissue_texture_hu: float = 6.0  # standard deviation of the texture of all body tissue
    tissue_texture_step_mm: float = 20.0  # grid step of the body-tissue texture
    noise_sd_hu: float = 12.0  # standard deviation of the Gaussian noise added after the blur
    blur_sigma_mm: float = 1.0  # Gaussian partial-volume blur, converted per axis by the spacing
    fat_thickness_mm: float = 15.0  # subcutaneous fat ring at full body size
    blur_truncate: float = 3.0  # blur kernel radius in standard deviations


@dataclasses.dataclass(frozen=True)
class _Ellipse:
    """Axis-aligned ellipse in the in-plane axes, in mm from the first pixel centre."""

    center_row_mm: float
    center_col_mm: float
    semi_row_mm: float
    semi_col_mm: float


# --------------------------------------------------------------------------------------------
# Input checks and geometry helpers


def _check_spacing(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    """Return the spacing as three floats, or raise ValueError unless all are finite and > 0."""
    values = tuple(float(value) for value in spacing_mm)
    if len(values) != 3 or not all(math.isfinite(value) and value > 0 for value in values):
        raise ValueError(
            f"spacing_mm must be three positive finite numbers (slice, row, col) in mm, "
            f"got {tuple(spacing_mm)}"
        )
    return values  # type: ignore[return-value]


def _check_shape(shape: Sequence[int], min_size: int = 1) -> tuple[int, int, int]:
    """Return the shape as three ints, or raise ValueError if it is not 3-D or too small."""
    values = tuple(int(size) for size in shape)
    if len(values) != 3 or min(values) < min_size:
        raise ValueError(
            f"shape must be three sizes (slices, rows, cols) of at least {min_size}, "
            f"got {tuple(shape)}"
        )
    return values  # type: ignore[return-value]


def kits_affine(spacing_mm: Sequence[float]) -> np.ndarray:
    """Build the voxel-to-world affine that KiTS23 files use for slices-first arrays.

    Array axis 0 (slices) maps to -z, axis 1 (rows) to -y and axis 2 (cols) to -x, so
    ``nibabel.aff2axcodes`` gives ``('I', 'P', 'L')``. The origin is zero.

    Args:
        spacing_mm: voxel size in mm as (slice, row, col).

    Returns:
        float64 array of shape (4, 4).

    Raises:
        ValueError: if the spacing is not three positive finite numbers.
    """
    slice_mm, row_mm, col_mm = _check_spacing(spacing_mm)
    affine = np.zeros((4, 4), dtype=np.float64)
    affine[0, 2] = -col_mm
    affine[1, 1] = -row_mm
    affine[2, 0] = -slice_mm
    affine[3, 3] = 1.0
    return affine


def _default_body(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> _Ellipse:
    """Return the body outline that fits the in-plane field of view, in mm.

    The lateral half-width is 46 % of the field of view and the antero-posterior one 75 % of that
    (capped at 40 % of the rows' extent), which resembles an abdomen centred in the scan.
    """
    extent_row_mm = (shape[1] - 1) * spacing[1]
    extent_col_mm = (shape[2] - 1) * spacing[2]
    semi_col_mm = 0.46 * shape[2] * spacing[2]
    semi_row_mm = min(0.75 * semi_col_mm, 0.40 * shape[1] * spacing[1])
    return _Ellipse(extent_row_mm / 2, extent_col_mm / 2, semi_row_mm, semi_col_mm)


def _anatomy_scale(body: _Ellipse) -> float:
    """Return the factor that scales adult anatomy sizes in mm to this body outline."""
    return float(np.clip(body.semi_col_mm / _REFERENCE_BODY_HALF_WIDTH_MM, 0.7, 1.2))


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """Return a generator for one random stream of ``seed``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *keys])


# --------------------------------------------------------------------------------------------
# Smooth random fields, evaluated on any box of voxels without building the whole volume


def _field_grid(
    shape: Sequence[int], spacing: Sequence[float], step_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """Draw standard-normal node values of a grid with ``step_mm`` that covers the volume."""
    nodes = [int((size - 1) * mm // step_mm) + 2 for size, mm in zip(shape, spacing)]
    return rng.standard_normal(nodes, dtype=np.float32)


def _interpolation_weights(
    start: int, stop: int, spacing: float, step_mm: float, nodes: int
) -> np.ndarray:
    """Return the (stop - start, nodes) weights that interpolate grid nodes at voxels start..stop.

    Smoothstep weights between two neighbouring nodes make the field continuous with a continuous
    gradient at the nodes, without the cost of a cubic spline.
    """
    position = np.arange(start, stop, dtype=np.float64) * spacing / step_mm
    lower = np.minimum(np.floor(position).astype(np.int64), nodes - 2)
    fraction = position - lower
    upper_weight = fraction * fraction * (3.0 - 2.0 * fraction)
    weights = np.zeros((stop - start, nodes), dtype=np.float32)
    rows = np.arange(stop - start)
    weights[rows, lower] = 1.0 - upper_weight
    weights[rows, lower + 1] = upper_weight
    return weights


def _evaluate_field(
    grid: np.ndarray, box: Sequence[slice], spacing: Sequence[float], step_mm: float
) -> np.ndarray:
    """Evaluate the smooth field of ``grid`` on the voxel box ``box`` (one slice per axis).

    Returns:
        float32 array with the box's shape.
    """
    weights = [
        _interpolation_weights(axis_box.start, axis_box.stop, mm, step_mm, nodes)
        for axis_box, mm, nodes in zip(box, spacing, grid.shape)
    ]
    field = np.tensordot(weights[0], grid, axes=(1, 0))  # (slices, row nodes, col nodes)
    field = field @ weights[2].T  # (slices, row nodes, cols)
    return np.matmul(weights[1], field)  # (slices, rows, cols)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Return the smallest box of slices that contains every True voxel, or None if none is."""
    box = []
    for axis in range(mask.ndim):
        other_axes = tuple(other for other in range(mask.ndim) if other != axis)
        indices = np.flatnonzero(mask.any(axis=other_axes))
        if indices.size == 0:
            return None
        box.append(slice(int(indices[0]), int(indices[-1]) + 1))
    return tuple(box)


# --------------------------------------------------------------------------------------------
# Body outline, fat and spine


def _foreground_projection(labels: np.ndarray, slab_slices: int) -> np.ndarray:
    """Return the in-plane (rows, cols) mask of voxels labelled in any slice, computed in slabs."""
    projection = np.zeros(labels.shape[1:], dtype=bool)
    for start in range(0, labels.shape[0], slab_slices):
        projection |= (labels[start : start + slab_slices] > 0).any(axis=0)
    return projection


def _fit_body(
    body: _Ellipse, projection: np.ndarray, spacing: tuple[float, float, float], margin_mm: float
) -> _Ellipse:
    """Grow ``body`` until every labelled pixel lies ``margin_mm`` inside its outline."""
    rows, cols = np.nonzero(projection)
    if rows.size == 0:
        return body
    row_mm = rows * spacing[1] - body.center_row_mm
    col_mm = cols * spacing[2] - body.center_col_mm
    scale = 1.0
    for _ in range(200):
        semi_row = scale * body.semi_row_mm - margin_mm
        semi_col = scale * body.semi_col_mm - margin_mm
        if semi_row > 0 and semi_col > 0:
            radius_squared = (row_mm / semi_row) ** 2 + (col_mm / semi_col) ** 2
            if radius_squared.max() <= 1.0:
                break
        scale *= 1.03
    if scale > 1.0:
        logger.debug("body outline grown by %.2f to contain the labels", scale)
    return dataclasses.replace(
        body, semi_row_mm=scale * body.semi_row_mm, semi_col_mm=scale * body.semi_col_mm
    )


def _inside_ellipse(
    row_mm: np.ndarray, col_mm: np.ndarray, center: tuple[float, float], semi: tuple[float, float]
) -> np.ndarray:
    """Return the mask of in-plane points inside an axis-aligned ellipse (all lengths in mm)."""
    if semi[0] <= 0 or semi[1] <= 0:
        return np.zeros(np.broadcast_shapes(row_mm.shape, col_mm.shape), dtype=bool)
    return ((row_mm - center[0]) / semi[0]) ** 2 + ((col_mm - center[1]) / semi[1]) ** 2 <= 1.0


class _BackgroundPainter:
    """Paints the HU of unlabelled voxels: air, subcutaneous fat, soft tissue and spine.

    The body outline varies slowly along the slices (by 4 % with a 300 mm period) so that slices
    differ. The fat ring and the spine scale with the anatomy.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        body: _Ellipse,
        params: PhantomParams,
        seed: int,
    ) -> None:
        self._spacing = spacing
        self._body = body
        self._params = params
        self._row_mm = (np.arange(shape[1], dtype=np.float32) * spacing[1])[:, None]
        self._col_mm = (np.arange(shape[2], dtype=np.float32) * spacing[2])[None, :]
        scale = _anatomy_scale(body)
        self._fat_mm = params.fat_thickness_mm * scale
        self._spine_radius_mm = 18.0 * scale
        self._phase = float(_rng(seed, _STREAM_BODY).uniform(0.0, 2.0 * math.pi))

    def paint_slice(self, index: int) -> np.ndarray:
        """Return the (rows, cols) float32 HU map of unlabelled tissue on slice ``index``."""
        params = self._params
        body = self._body
        size_factor = 1.0 + _BODY_SIZE_VARIATION * math.sin(
            2.0 * math.pi * index * self._spacing[0] / 300.0 + self._phase
        )
        center = (body.center_row_mm, body.center_col_mm)
        outer = (body.semi_row_mm * size_factor, body.semi_col_mm * size_factor)
        inner = (outer[0] - self._fat_mm, outer[1] - self._fat_mm)
        # The vertebral body sits on the midline, in the posterior part of the abdomen.
        spine_center = (body.center_row_mm + 0.40 * body.semi_row_mm, body.center_col_mm)
        spine_semi = (self._spine_radius_mm, self._spine_radius_mm)

        hu = np.full(
            (self._row_mm.shape[0], self._col_mm.shape[1]), params.air_hu, dtype=np.float32
        )
        hu[_inside_ellipse(self._row_mm, self._col_mm, center, outer)] = params.fat_hu
        hu[_inside_ellipse(self._row_mm, self._col_mm, center, inner)] = params.soft_tissue_hu
        hu[_inside_ellipse(self._row_mm, self._col_mm, spine_center, spine_semi)] = params.bone_hu
        return hu


# --------------------------------------------------------------------------------------------
# Labels to image


def _as_label_array(labels: np.ndarray) -> np.ndarray:
    """Return ``labels`` as a uint8 array, or raise ValueError unless its values are 0 to 3."""
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3-D slices-first array, got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError(f"labels must not be empty, got shape {labels.shape}")
    if labels.dtype == np.uint8:
        if int(labels.max()) > CYST:
            raise ValueError(
                f"labels must be in {LABEL_VALUES}, got a maximum of {int(labels.max())}"
            )
        return labels
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise ValueError(f"labels must have an integer or float dtype, got {labels.dtype}")
    minimum, maximum = labels.min(), labels.max()
    if minimum < 0 or maximum > CYST:
        raise ValueError(
            f"labels must be in {LABEL_VALUES}, got values from {minimum} to {maximum}"
        )
    converted = labels.astype(np.uint8)
    if np.issubdtype(labels.dtype, np.floating) and not np.array_equal(converted, labels):
        raise ValueError("labels must be whole numbers in {0, 1, 2, 3}, got fractional values")
    return converted


def _slabs(n_slices: int, slab_slices: int, halo: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (read_start, read_stop, write_start, write_stop) slice ranges of halo-padded slabs."""
    for write_start in range(0, n_slices, slab_slices):
        write_stop = min(write_start + slab_slices, n_slices)
        yield max(write_start - halo, 0), min(write_stop + halo, n_slices), write_start, write_stop


def _blur_sigma_voxels(
    spacing: tuple[float, float, float], params: PhantomParams
) -> tuple[float, ...]:
    """Convert the blur sigma from mm to voxels along each axis."""
    return tuple(params.blur_sigma_mm / mm for mm in spacing)


def _paint_slab(
    labels: np.ndarray,
    read: slice,
    background: _BackgroundPainter,
    textures: dict[str, np.ndarray],
    spacing: tuple[float, float, float],
    params: PhantomParams,
) -> np.ndarray:
    """Return the float32 HU of the slices ``read`` before blur and noise."""
    slab_labels = labels[read]
    levels = np.zeros(256, dtype=np.float32)
    levels[[KIDNEY, TUMOR, CYST]] = (params.kidney_hu, params.tumor_hu, params.cyst_hu)
    background_hu = np.stack(
        [background.paint_slice(index) for index in range(read.start, read.stop)]
    )
    hu = np.where(slab_labels == BACKGROUND, background_hu, levels[slab_labels])
    del background_hu

    # Texture everything except air and fat, which are uniform on CT.
    if params.tissue_texture_hu > 0:
        full_box = (read, slice(0, labels.shape[1]), slice(0, labels.shape[2]))
        tissue = _evaluate_field(
            textures["tissue"], full_box, spacing, params.tissue_texture_step_mm
        )
        hu += np.where(
            hu > params.fat_hu + 50.0, params.tissue_texture_hu * tissue, np.float32(0.0)
        )
        del tissue

    tumor_box = _bounding_box(slab_labels == TUMOR) if params.tumor_texture_hu > 0 else None
    if tumor_box is not None:
        global_box = (
            slice(read.start + tumor_box[0].start, read.start + tumor_box[0].stop),
            *tumor_box[1:],
        )
        texture = _evaluate_field(
            textures["tumor"], global_box, spacing, params.tumor_texture_step_mm
        )
        tumor = slab_labels[tumor_box] == TUMOR
        hu[tumor_box][tumor] += params.tumor_texture_hu * texture[tumor]
    return hu


def _add_noise(hu: np.ndarray, first_slice: int, seed: int, noise_sd_hu: float) -> None:
    """Add Gaussian noise in place, drawn per slice so that any slab size gives the same image."""
    if noise_sd_hu <= 0:
        return
    for offset in range(hu.shape[0]):
        noise = _rng(seed, _STREAM_NOISE, first_slice + offset).standard_normal(
            hu.shape[1:], dtype=np.float32
        )
        hu[offset] += noise_sd_hu * noise


def labels_to_image(
    labels: np.ndarray,
    spacing_mm: Sequence[float],
    seed: int = 0,
    *,
    params: PhantomParams | None = None,
    slab_slices: int = 32,
) -> np.ndarray:
    """Paint a CT-like image in HU from a KiTS23 label map.

    Unlabelled voxels become soft tissue (40 HU) inside an elliptical body outline with a ring of
    subcutaneous fat (-100 HU) and a vertebral column (400 HU). Outside it is air (-1000 HU). The
    outline fits the in-plane field of view and grows until it contains every labelled voxel.
    Kidney is 180 HU, tumor 90 HU with a low-frequency texture, cyst 10 HU (see
    :class:`PhantomParams`). A Gaussian blur with a sigma in mm (converted per axis by the spacing)
    models partial volume, then Gaussian noise is added.

    The volume is processed in slabs of ``slab_slices`` slices with a halo as wide as the blur
    kernel, so the peak memory is the label array, the int16 output and a few float32 slabs. The
    result does not depend on ``slab_slices``.

    Args:
        labels: slices-first (slices, rows, cols) label map with values 0 to 3 (integer, or float
            with whole values). Axes 1 and 2 are the in-plane axes.
        spacing_mm: voxel size in mm as (slice, row, col).
        seed: seed of all random parts; the same seed and input give the same image.
        params: tissue levels and image settings; None uses the defaults of PhantomParams.
        slab_slices: number of slices processed at a time; it bounds memory, not the result.

    Returns:
        int16 array of the labels' shape, in HU, clipped to [-1024, 3071].

    Raises:
        ValueError: if the labels are not 3-D with values 0 to 3, the spacing is not three
            positive numbers, or slab_slices is below 1.
    """
    params = params or PhantomParams()
    spacing = _check_spacing(spacing_mm)
    labels = _as_label_array(np.asarray(labels))
    if slab_slices < 1:
        raise ValueError(f"slab_slices must be at least 1, got {slab_slices}")
    shape: tuple[int, int, int] = labels.shape  # type: ignore[assignment]

    # Labelled voxels stay 5 mm inside the fat ring even where the outline is smallest.
    body = _default_body(shape, spacing)
    margin_mm = (params.fat_thickness_mm * _anatomy_scale(body) + 5.0) / (
        1.0 - _BODY_SIZE_VARIATION
    )
    body = _fit_body(body, _foreground_projection(labels, slab_slices), spacing, margin_mm)
    background = _BackgroundPainter(shape, spacing, body, params, seed)

    textures = {
        "tissue": _field_grid(
            shape, spacing, params.tissue_texture_step_mm, _rng(seed, _STREAM_TISSUE_TEXTURE)
        ),
        "tumor": _field_grid(
            shape, spacing, params.tumor_texture_step_mm, _rng(seed, _STREAM_TUMOR_TEXTURE)
        ),
    }
    sigma = _blur_sigma_voxels(spacing, params)
    # gaussian_filter1d uses a kernel radius of int(truncate * sigma + 0.5) voxels.
    halo = int(params.blur_truncate * sigma[0] + 0.5)

    image = np.empty(shape, dtype=np.int16)
    for read_start, read_stop, write_start, write_stop in _slabs(shape[0], slab_slices, halo):
        hu = _paint_slab(
            labels, slice(read_start, read_stop), background, textures, spacing, params
        )
        hu = ndimage.gaussian_filter(hu, sigma=sigma, mode="nearest", truncate=params.blur_truncate)
        hu = hu[write_start - read_start : write_stop - read_start]
        _add_noise(hu, write_start, seed, params.noise_sd_hu)
        np.clip(np.rint(hu, out=hu), HU_MIN, HU_MAX, out=hu)
        image[write_start:write_stop] = hu
    return image


# --------------------------------------------------------------------------------------------
# Procedural labels


def _rotation(tilt_coronal_rad: float, rotation_axial_rad: float) -> np.ndarray:
    """Return the 3x3 rotation (z, y, x in mm) of a kidney: a coronal tilt, then an axial turn."""
    cos_t, sin_t = math.cos(tilt_coronal_rad), math.sin(tilt_coronal_rad)
    cos_a, sin_a = math.cos(rotation_axial_rad), math.sin(rotation_axial_rad)
    coronal = np.array([[cos_t, 0.0, -sin_t], [0.0, 1.0, 0.0], [sin_t, 0.0, cos_t]])
    axial = np.array([[1.0, 0.0, 0.0], [0.0, cos_a, -sin_a], [0.0, sin_a, cos_a]])
    return axial @ coronal


def _box_around(
    center_mm: np.ndarray,
    radius_mm: float,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
) -> tuple[slice, ...] | None:
    """Return the voxel box that contains a sphere, clipped to the volume, or None if outside it."""
    box = []
    for axis in range(3):
        start = max(int(math.floor((center_mm[axis] - radius_mm) / spacing[axis])), 0)
        stop = min(int(math.ceil((center_mm[axis] + radius_mm) / spacing[axis])) + 1, shape[axis])
        if start >= stop:
            return None
        box.append(slice(start, stop))
    return tuple(box)


def _box_coordinates_mm(
    box: Sequence[slice], spacing: tuple[float, float, float]
) -> list[np.ndarray]:
    """Return broadcastable (z, y, x) coordinates in mm of the voxels of a box."""
    axes = [np.arange(axis_box.start, axis_box.stop) * mm for axis_box, mm in zip(box, spacing)]
    return list(np.meshgrid(*axes, indexing="ij", sparse=True))


def _center_voxel(
    center_mm: np.ndarray, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[int, ...]:
    """Return the voxel nearest to a point, clipped to the volume."""
    return tuple(
        int(np.clip(round(center_mm[axis] / spacing[axis]), 0, shape[axis] - 1))
        for axis in range(3)
    )


@dataclasses.dataclass(frozen=True)
class _Kidney:
    """One generated kidney: centre in mm (z, y, x), semi-axes in mm, rotation, medial sign."""

    center_mm: np.ndarray
    semi_axes_mm: tuple[float, float, float]
    rotation: np.ndarray
    medial_sign: float  # +1 if the midline lies towards higher column indices


def _ellipsoid_radius_squared(
    offset: Sequence[np.ndarray], semi_axes: Sequence[float]
) -> np.ndarray:
    """Return sum((offset / semi-axis) ** 2) over the three axes: at most 1 inside the ellipsoid."""
    return sum((axis_offset / semi) ** 2 for axis_offset, semi in zip(offset, semi_axes))


def _paint_kidney(labels: np.ndarray, kidney: _Kidney, spacing: tuple[float, float, float]) -> None:
    """Paint a bean-shaped kidney (label 1): an ellipsoid with a hilum notch on its medial side."""
    shape: tuple[int, int, int] = labels.shape  # type: ignore[assignment]
    box = _box_around(kidney.center_mm, max(kidney.semi_axes_mm) + 1.0, shape, spacing)
    if box is not None:
        z, y, x = _box_coordinates_mm(box, spacing)
        offset = [z - kidney.center_mm[0], y - kidney.center_mm[1], x - kidney.center_mm[2]]
        # Coordinates in the kidney's own frame: rotation transposed times the offset.
        local = [
            sum(kidney.rotation[row, axis] * offset[row] for row in range(3)) for axis in range(3)
        ]
        semi = kidney.semi_axes_mm
        inside = _ellipsoid_radius_squared(local, semi) <= 1.0
        # The hilum: a smaller ellipsoid centred on the medial edge is cut out.
        hilum_offset = [local[0], local[1], local[2] - kidney.medial_sign * semi[2]]
        hilum_semi = (0.35 * semi[0], 0.45 * semi[1], 0.5 * semi[2])
        hilum = _ellipsoid_radius_squared(hilum_offset, hilum_semi) <= 1.0
        labels[box][inside & ~hilum] = KIDNEY
    labels[_center_voxel(kidney.center_mm, shape, spacing)] = KIDNEY


def _paint_lesion(
    labels: np.ndarray,
    label: int,
    center_mm: np.ndarray,
    radius_mm: float,
    lumpiness: float,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
) -> None:
    """Paint a roughly spherical lesion whose radius varies by up to ``lumpiness`` (a fraction).

    The voxel nearest the centre is always painted, so a lesion is never lost at coarse spacing.
    """
    shape: tuple[int, int, int] = labels.shape  # type: ignore[assignment]
    box = _box_around(center_mm, radius_mm * (1.0 + lumpiness) + 1.0, shape, spacing)
    if box is not None:
        z, y, x = _box_coordinates_mm(box, spacing)
        distance = np.sqrt(
            (z - center_mm[0]) ** 2 + (y - center_mm[1]) ** 2 + (x - center_mm[2]) ** 2
        )
        box_shape = tuple(axis_box.stop - axis_box.start for axis_box in box)
        step_mm = max(radius_mm / 2.0, 1.0)
        grid = _field_grid(box_shape, spacing, step_mm, rng)
        local_box = tuple(slice(0, size) for size in box_shape)
        wobble = np.tanh(_evaluate_field(grid, local_box, spacing, step_mm))
        labels[box][distance <= radius_mm * (1.0 + lumpiness * wobble)] = label
    labels[_center_voxel(center_mm, shape, spacing)] = label


def _make_kidneys(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator
) -> list[_Kidney]:
    """Place the right and left kidney beside the spine, posterior, near the middle slice.

    Array column indices grow towards the patient's left, slice indices towards the feet, so the
    right kidney has the lower column centre and sits slightly lower (higher slice index).
    """
    body = _default_body(shape, spacing)
    scale = _anatomy_scale(body)
    middle_slice_mm = (shape[0] - 1) * spacing[0] / 2.0
    kidneys = []
    for side in (-1.0, 1.0):  # -1: patient's right, +1: patient's left
        semi = tuple(float(mm * scale * rng.uniform(0.9, 1.1)) for mm in _KIDNEY_SEMI_AXES_MM)
        z_mm = middle_slice_mm + (-side * 8.0 + rng.uniform(-5.0, 5.0)) * scale
        y_mm = body.center_row_mm + 0.35 * body.semi_row_mm + rng.uniform(-3.0, 3.0) * scale
        x_mm = body.center_col_mm + side * 0.42 * body.semi_col_mm + rng.uniform(-3.0, 3.0) * scale
        # Upper poles lean towards the midline and the hilum turns anteriorly.
        rotation = _rotation(
            side * math.radians(rng.uniform(10.0, 20.0)),
            -side * math.radians(rng.uniform(15.0, 35.0)),
        )
        kidneys.append(_Kidney(np.array([z_mm, y_mm, x_mm]), semi, rotation, medial_sign=-side))
    return kidneys


def _surface_point(kidney: _Kidney, rng: np.random.Generator, depth: float) -> np.ndarray:
    """Return a point at ``depth`` times the kidney radius, in a random direction off the hilum."""
    direction = rng.standard_normal(3)
    direction[2] = -kidney.medial_sign * abs(direction[2])  # lateral half, away from the hilum
    direction /= np.linalg.norm(direction)
    local = depth * direction * np.array(kidney.semi_axes_mm)
    return kidney.center_mm + kidney.rotation @ local


def generate_labels(
    shape: tuple[int, int, int], spacing_mm: Sequence[float], seed: int
) -> np.ndarray:
    """Generate a KiTS23-like label map with two kidneys, one or two tumors and maybe a cyst.

    Kidneys are bean-shaped ellipsoids (about 110 x 44 x 56 mm for an adult-sized field of view)
    placed posterior and either side of the spine, the right one lower. Sizes are in mm and shrink
    with the body outline (down to 70 %) when the field of view is smaller than an abdomen.
    A tumor (20 to 50 mm across) grows from one kidney's surface, a second one from the other
    kidney in about a quarter of the seeds. Even seeds also get a cyst (10 to 20 mm across) on the
    kidney without the first tumor. Labels are painted kidney, cyst, then tumor, as in KiTS23.
    Every case contains labels 1 and 2, and label 3 exactly when the seed is even.

    Args:
        shape: (slices, rows, cols), each at least 4.
        spacing_mm: voxel size in mm as (slice, row, col).
        seed: seed of the anatomy; its parity decides the cyst.

    Returns:
        uint8 slices-first array of ``shape`` with values 0 to 3.

    Raises:
        ValueError: if the shape or spacing is invalid.
    """
    shape = _check_shape(shape, min_size=4)
    spacing = _check_spacing(spacing_mm)
    rng = _rng(seed)
    labels = np.zeros(shape, dtype=np.uint8)
    kidneys = _make_kidneys(shape, spacing, rng)
    scale = _anatomy_scale(_default_body(shape, spacing))
    for kidney in kidneys:
        _paint_kidney(labels, kidney, spacing)

    tumor_side = int(rng.integers(2))
    tumor_sides = [tumor_side] + ([1 - tumor_side] if rng.uniform() < 0.25 else [])
    if seed % 2 == 0:
        cyst_kidney = kidneys[1 - tumor_side]
        center = _surface_point(cyst_kidney, rng, depth=0.85)
        _paint_lesion(labels, CYST, center, rng.uniform(6.0, 12.0) * scale, 0.05, spacing, rng)
    for side in tumor_sides:
        center = _surface_point(kidneys[side], rng, depth=0.9)
        _paint_lesion(labels, TUMOR, center, rng.uniform(10.0, 25.0) * scale, 0.25, spacing, rng)
    return labels


# --------------------------------------------------------------------------------------------
# Writing cases


def _fsync_path(path: Path) -> None:
    """Flush a file or directory to disk."""
    flags = os.O_RDONLY
    if path.is_dir():
        flags |= getattr(os, "O_DIRECTORY", 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _save_atomic(image: nib.Nifti1Image, path: Path) -> None:
    """Write a NIfTI file under a temporary name, flush it and rename it to ``path``.

    A reader never sees a partial file at ``path``: it is absent or complete.
    """
    temporary = path.with_name(f".{path.name.split('.')[0]}.tmp-{os.getpid()}.nii.gz")
    try:
        nib.save(image, temporary)
        _fsync_path(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_path(path.parent)


def _remove_stale_temporaries(case_dir: Path) -> None:
    """Delete temporary files left by an interrupted write in ``case_dir``."""
    for stale in case_dir.glob(".*.tmp-*.nii.gz"):
        logger.info("removing %s left by an interrupted run", stale)
        stale.unlink(missing_ok=True)


def _case_paths(case_dir: Path) -> tuple[Path, Path]:
    """Return the (imaging, segmentation) paths of a KiTS23 case folder."""
    return case_dir / "imaging.nii.gz", case_dir / "segmentation.nii.gz"


def _is_complete(case_dir: Path) -> bool:
    """Return True if both files of a case exist; they are only ever renamed into place whole."""
    return all(path.is_file() for path in _case_paths(case_dir))


def _build_nifti(
    data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None, zooms: Sequence[float]
) -> nib.Nifti1Image:
    """Wrap an array in a NIfTI image with this affine and exactly these zooms (mm)."""
    header = header.copy() if header is not None else nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    image = nib.Nifti1Image(data, affine, header=header)
    image.header.set_slope_inter(None, None)
    image.header.set_zooms(tuple(float(zoom) for zoom in zooms))
    image.header.set_xyzt_units("mm")
    return image


def _write_case(
    case_dir: Path,
    labels: np.ndarray,
    image: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None,
    zooms: Sequence[float],
) -> None:
    """Write imaging.nii.gz (int16) and then segmentation.nii.gz (uint8) of one case atomically."""
    case_dir.mkdir(parents=True, exist_ok=True)
    imaging_path, segmentation_path = _case_paths(case_dir)
    _save_atomic(_build_nifti(image, affine, header, zooms), imaging_path)
    _save_atomic(_build_nifti(labels, affine, header, zooms), segmentation_path)


def _check_existing_shape(case_dir: Path, shape: tuple[int, int, int]) -> None:
    """Raise ValueError if a complete case on disk has another shape than the one requested."""
    existing = tuple(nib.load(_case_paths(case_dir)[1]).shape)
    if existing != shape:
        raise ValueError(
            f"{case_dir} contains a case of shape {existing}, not the requested {shape}. "
            f"Delete the folder or choose another output folder."
        )


def write_demo_dataset(
    out_dir: Path,
    n_cases: int = 4,
    shape: tuple[int, int, int] = (48, 96, 96),
    spacing_mm: Sequence[float] = (3.0, 1.6, 1.6),
    seed: int = 0,
    *,
    progress: bool = True,
) -> list[Path]:
    """Write procedural KiTS23-layout cases ``out_dir/case_00000/{imaging,segmentation}.nii.gz``.

    Case ``i`` uses the anatomy seed ``seed * 100_000 + i`` (unique per seed below 100,000
    cases), so cases alternate with and without a cyst. Images are int16 HU, segmentations uint8,
    both with :func:`kits_affine`. Cases whose two files already exist are kept, so the call is
    idempotent. Each file is written under a temporary name and renamed, so an interrupted run
    leaves no partial file.

    Args:
        out_dir: folder to create or complete; missing parent folders are created too.
        n_cases: number of cases, at least 1.
        shape: (slices, rows, cols) of every case; the default trains in minutes on a CPU.
        spacing_mm: voxel size in mm as (slice, row, col).
        seed: dataset seed.
        progress: show a tqdm progress bar on stderr.

    Returns:
        The case folders, in case order, including those that already existed.

    Raises:
        ValueError: if n_cases, shape or spacing is invalid, out_dir is a file, or an existing case
            has another shape.
    """
    if n_cases < 1 or n_cases > MAX_DEMO_CASES:
        raise ValueError(f"n_cases must be between 1 and {MAX_DEMO_CASES}, got {n_cases}")
    shape = _check_shape(shape, min_size=4)
    spacing = _check_spacing(spacing_mm)
    affine = kits_affine(spacing)
    out_dir = Path(out_dir).expanduser()
    _check_output_folder(out_dir, create_parents=True)

    case_dirs = []
    for index in tqdm(range(n_cases), desc="demo cases", unit="case", disable=not progress):
        case_dir = out_dir / f"case_{index:05d}"
        case_dirs.append(case_dir)
        if case_dir.is_dir():
            _remove_stale_temporaries(case_dir)
        if _is_complete(case_dir):
            _check_existing_shape(case_dir, shape)
            logger.debug("keeping complete case %s", case_dir)
            continue
        case_seed = seed * 100_000 + index
        labels = generate_labels(shape, spacing, case_seed)
        image = labels_to_image(labels, spacing, seed=case_seed)
        _write_case(case_dir, labels, image, affine, None, spacing)
        logger.info("wrote demo case %s (seed %d)", case_dir, case_seed)
    return case_dirs


# --------------------------------------------------------------------------------------------
# Converting real label files


def _strip_nifti_suffix(name: str) -> str | None:
    """Return a file name without .nii.gz or .nii, or None if it has neither."""
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def find_label_files(labels_dir: Path) -> dict[str, Path]:
    """Find the label files of a folder, by case name.

    Both layouts are accepted: flat ``labels_dir/CASE.nii.gz`` (or ``.nii``) files, and KiTS23
    case folders ``labels_dir/CASE/segmentation.nii.gz``.

    Args:
        labels_dir: folder to search (not recursively beyond one level of case folders).

    Returns:
        Mapping from case name to label file, sorted by case name.

    Raises:
        ValueError: if the folder is missing, or a case name occurs in both layouts.
    """
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise ValueError(
            f"labels folder not found: {labels_dir}. Pass a folder of CASE.nii.gz files "
            f"or of CASE/segmentation.nii.gz folders."
        )
    found: dict[str, Path] = {}
    for entry in sorted(labels_dir.iterdir()):
        case, path = None, None
        if entry.is_file():
            case, path = _strip_nifti_suffix(entry.name), entry
        elif entry.is_dir():
            for name in ("segmentation.nii.gz", "segmentation.nii"):
                if (entry / name).is_file():
                    case, path = entry.name, entry / name
                    break
        if case is None or path is None or case.startswith("."):
            continue
        if case in found:
            raise ValueError(
                f"case {case} occurs twice in {labels_dir}: {found[case]} and {path}. Remove one."
            )
        found[case] = path
    return dict(sorted(found.items()))


def _check_output_folder(out_dir: Path, *, create_parents: bool) -> None:
    """Raise ValueError if ``out_dir`` is a file, or (unless ``create_parents``) is missing with its parent.

    The launcher's demo folder (``data.demo_dir``, under the home folder by default) may lack
    its parents on a fresh machine, so the demo creates them. An OUT_DIR typed on the command
    line is created only inside an existing folder, as predict, evaluate and submit do.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is a file, not a folder. Choose a folder path.")
    if not create_parents and not out_dir.exists() and not out_dir.parent.is_dir():
        raise ValueError(
            f"output folder {out_dir}: folder {out_dir.parent} not found. Create it first or choose another path."
        )


def _check_output_outside(labels_dir: Path, out_dir: Path) -> None:
    """Raise ValueError if ``out_dir`` is ``labels_dir`` or lies inside it."""
    labels_resolved = labels_dir.resolve()
    out_resolved = out_dir.resolve()
    if out_resolved == labels_resolved or labels_resolved in out_resolved.parents:
        raise ValueError(
            f"output folder {out_dir} is inside the labels folder {labels_dir}, which must stay "
            f"unchanged. Choose an output folder outside it."
        )


def _case_seed(seed: int, case: str) -> int:
    """Derive a case's seed from the run seed and the case name, stable across processes."""
    return int(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(case.encode())]).generate_state(
            1
        )[0]
    )


_READ_ERRORS = (ImageFileError, OSError, EOFError, zlib.error)


def _open_label_image(path: Path) -> nib.Nifti1Image:
    """Read the header of a label file, or raise ValueError naming the file and the fix."""
    try:
        image = nib.load(path)
    except _READ_ERRORS as error:
        raise ValueError(
            f"failed to read label file {path} ({error}). Replace or remove it."
        ) from error
    if not isinstance(image, nib.Nifti1Image):
        raise ValueError(
            f"label file {path} is {type(image).__name__}, not NIfTI-1. Convert it to .nii.gz."
        )
    if len(image.shape) != 3:
        raise ValueError(
            f"label file {path} has shape {image.shape}, not 3-D. Pass 3-D label maps only."
        )
    return image


def _load_labels(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a label file as uint8, or raise ValueError naming the file if it cannot be read."""
    image = _open_label_image(path)
    try:
        data = np.asanyarray(image.dataobj)
    except _READ_ERRORS as error:
        raise ValueError(
            f"failed to read label file {path} ({error}). Replace or remove it."
        ) from error
    try:
        labels = _as_label_array(data)
    except ValueError as error:
        raise ValueError(f"invalid label file {path}: {error}") from error
    return labels, image


def convert_labels_folder(
    labels_dir: Path,
    out_dir: Path,
    seed: int = 0,
    cases: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Write a phantom KiTS23 case for each label file of a folder.

    For each case, ``out_dir/CASE/imaging.nii.gz`` (int16 HU from :func:`labels_to_image`) and
    ``out_dir/CASE/segmentation.nii.gz`` (the input labels as uint8) are written with the input
    file's shape, affine and header zooms. The image seed is derived from ``seed`` and the case
    name. ``labels_dir`` is only read. Complete cases already in ``out_dir`` are kept unless
    ``overwrite`` is set.

    Args:
        labels_dir: folder of ``CASE.nii.gz`` files or ``CASE/segmentation.nii.gz`` folders.
        out_dir: output folder, created if missing; its parent must exist, and it must not be
            ``labels_dir`` or inside it.
        seed: run seed.
        cases: case names to convert; None converts every case found.
        overwrite: rewrite cases whose files already exist.
        progress: show a tqdm progress bar over cases on stderr.

    Returns:
        The case folders in ``out_dir``, sorted by case name.

    Raises:
        ValueError: if labels_dir is missing or contains no label files, out_dir is inside it, is
            a file or lacks its parent folder, a requested case is not found, or a label file is
            unreadable or has values outside 0-3.
    """
    labels_dir, out_dir = Path(labels_dir), Path(out_dir)
    found = find_label_files(labels_dir)
    _check_output_outside(labels_dir, out_dir)
    _check_output_folder(out_dir, create_parents=False)
    if not found:
        raise ValueError(
            f"no label files found in {labels_dir}. Pass a folder of CASE.nii.gz files or "
            f"CASE/segmentation.nii.gz folders."
        )
    if cases is not None:
        missing = sorted(set(cases) - set(found))
        if missing:
            raise ValueError(
                f"cases not found in {labels_dir}: {', '.join(missing)}. It contains "
                f"{len(found)} cases, from {next(iter(found))} to {next(reversed(found))}."
            )
        found = {case: found[case] for case in sorted(set(cases))}
    # Reading every header first rejects a broken file before any case is written.
    for path in found.values():
        _open_label_image(path)

    case_dirs = []
    for case, path in tqdm(found.items(), desc="convert", unit="case", disable=not progress):
        case_dir = out_dir / case
        case_dirs.append(case_dir)
        if case_dir.is_dir():
            _remove_stale_temporaries(case_dir)
        if _is_complete(case_dir) and not overwrite:
            logger.info("keeping complete case %s", case_dir)
            continue
        labels, label_image = _load_labels(path)
        zooms = label_image.header.get_zooms()[:3]
        image = labels_to_image(labels, zooms, seed=_case_seed(seed, case))
        _write_case(case_dir, labels, image, label_image.affine, label_image.header, zooms)
        logger.info("converted %s to %s", path, case_dir)
    return case_dirs


# --------------------------------------------------------------------------------------------
# Command line


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kitsjobs.data.phantom",
        description=(
            "Write CT-like phantom cases in the KiTS23 layout (CASE/imaging.nii.gz, "
            "CASE/segmentation.nii.gz): from real label files, or procedural ones with --demo."
        ),
    )
    parser.add_argument(
        "labels_dir",
        nargs="?",
        type=user_path,
        metavar="LABELS_DIR",
        help="folder of CASE.nii.gz label files or CASE/segmentation.nii.gz folders (only read)",
    )
    parser.add_argument(
        "out_dir", nargs="?", type=user_path, metavar="OUT_DIR", help="output folder, outside LABELS_DIR"
    )
    parser.add_argument(
        "--demo",
        type=user_path,
        metavar="OUT_DIR",
        help="write procedural demo cases to OUT_DIR instead",
    )
    parser.add_argument(
        "--n-cases",
        type=int,
        default=None,
        help="number of demo cases, only with --demo (default 4)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of the images and demo anatomy (default 0)"
    )
    parser.add_argument(
        "--cases", nargs="+", metavar="CASE", help="convert only these cases, e.g. case_00048"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="rewrite cases whose two files already exist"
    )
    return parser


def _run(args: argparse.Namespace) -> None:
    """Run the conversion or demo that the parsed arguments request."""
    if args.demo is not None:
        if args.labels_dir is not None or args.cases:
            raise ValueError(
                "--demo takes no LABELS_DIR, OUT_DIR or --cases. "
                "Pass only --demo OUT_DIR [--n-cases N]."
            )
        n_cases = 4 if args.n_cases is None else args.n_cases
        if not 1 <= n_cases <= MAX_DEMO_CASES:
            raise ValueError(f"--n-cases {n_cases} is invalid. Pass a number from 1 to {MAX_DEMO_CASES}.")
        case_dirs = write_demo_dataset(
            args.demo, n_cases=n_cases, seed=args.seed, progress=sys.stderr.isatty()
        )
        print(f"{len(case_dirs)} demo cases in {args.demo}")
        return
    if args.labels_dir is None or args.out_dir is None:
        raise ValueError("missing LABELS_DIR or OUT_DIR. Pass both, or --demo OUT_DIR.")
    if args.n_cases is not None:
        raise ValueError("--n-cases applies only with --demo. Drop it or add --demo OUT_DIR.")
    case_dirs = convert_labels_folder(
        args.labels_dir,
        args.out_dir,
        seed=args.seed,
        cases=args.cases,
        overwrite=args.overwrite,
        progress=sys.stderr.isatty(),
    )
    print(f"{len(case_dirs)} cases in {args.out_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return 0 on success, or 2 on invalid input (one line on stderr)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        _run(args)
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
