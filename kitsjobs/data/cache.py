"""Preprocessed case cache: resampled, HU-scaled, body-cropped arrays read by memory map.

A cache folder contains one folder per case::

    CACHE/CASE/image.npy      (slices, rows, cols) float16 or float32, HU window scaled to [0, 1]
    CACHE/CASE/label.npy      same shape, uint8 labels (0 background, 1 kidney, 2 tumor, 3 cyst)
    CACHE/CASE/points.npy     (N, 4) int32 rows (class, z, y, x): a uniform sample of each
                              foreground class's voxels, used to centre training patches
    CACHE/CASE/geometry.json  original shape, affine and spacing, crop box, cache spacing,
                              preprocessing settings and the source files' sizes and mtimes

A case folder appears in one rename once all its files are written, so an interrupted run
leaves only hidden temporary folders (``.CASE.tmp-HOST-PID-TOKEN``), which the next run removes
(:func:`remove_stale_temporaries`). A case whose source files and settings have not changed is
skipped, so preprocessing is idempotent. A case whose source files changed is rebuilt. A case
built with other settings stops the run unless ``overwrite`` is set, and a folder that is not a
cache case folder always stops it. Both are found before anything is written.
The same steps also run in memory (:func:`prepare_volume`) for training without a cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import multiprocessing
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import nibabel as nib
import numpy as np
from tqdm import tqdm

from kitsjobs.data.check import AFFINE_ATOL_MM, AFFINE_RTOL, ERROR, count_nonfinite, label_value_problems
from kitsjobs.data.layouts import Case
from kitsjobs.data.resample import SLAB_SLICES, resample_linear, resample_nearest, target_shape
from kitsjobs.data.volumes import Volume, read_nifti
from kitsjobs.errors import UserError
from kitsjobs.fsutil import atomic_write_json, fsync_path

logger = logging.getLogger(__name__)

# Bumped whenever the cache files change meaning; older case folders are rebuilt.
CACHE_FORMAT_VERSION = 1
IMAGE_DTYPES = ("float16", "float32")
GEOMETRY_FILE = "geometry.json"
# A temporary folder of another host (whose processes this host cannot see) is a leftover of
# an interrupted run once it is older than this.
# NOTE: a case that another host is still writing after this long would lose its folder.
STALE_TEMPORARY_AGE_S = 3600.0
# .CASE.tmp-HOST-PID-TOKEN while a case is written, .CASE.old-HOST-PID-TOKEN while the folder
# it replaces is removed. Folders of kitsjobs before host and pid were added lack HOST-PID-.
TEMPORARY_NAME = re.compile(r"\.(?P<case>.+)\.(?:tmp|old)-(?:(?P<host>.+)-(?P<pid>\d+)-)?[0-9a-f]{12}")
FOREGROUND_CLASSES = (1, 2, 3)


@dataclass(frozen=True)
class PreprocessSettings:
    """Resampling, HU window and crop that bring cases to the network's grid and intensity range.

    Attributes:
        spacing_mm: target voxel size (slice, row, col) in mm; None keeps each case's spacing.
        hu_min: lower end of the HU window; maps to 0.
        hu_max: upper end of the HU window; maps to 1.
        body_threshold_hu: voxels above this HU count as body, and the volume is cropped to
            their bounding box (extended to hold every labelled voxel); None keeps the whole volume.
        image_dtype: dtype of the cached image, "float16" or "float32".
        points_per_class: foreground voxels sampled per class to centre training patches on.
    """

    spacing_mm: Optional[tuple[float, float, float]] = None
    hu_min: float = -200.0
    hu_max: float = 400.0
    body_threshold_hu: Optional[float] = -500.0
    image_dtype: str = "float16"
    points_per_class: int = 10000

    def __post_init__(self) -> None:
        if self.hu_max <= self.hu_min:
            raise UserError(f"data.hu_max={self.hu_max} must be greater than data.hu_min={self.hu_min}")
        if self.image_dtype not in IMAGE_DTYPES:
            raise UserError(f"data.cache_dtype='{self.image_dtype}' is invalid; use one of {', '.join(IMAGE_DTYPES)}")
        if self.spacing_mm is not None:
            if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
                raise UserError(
                    f"data.spacing_mm={list(self.spacing_mm)} is invalid; give three positive sizes "
                    "in mm (slice, row, col), e.g. [3.0, 0.8, 0.8], or null to keep each case's spacing"
                )
            object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))

    @classmethod
    def from_data_config(cls, data: Any) -> PreprocessSettings:
        """Build the settings from a DataConfig (or any object with the same fields)."""
        spacing = getattr(data, "spacing_mm", None)
        return cls(
            spacing_mm=tuple(spacing) if spacing is not None else None,  # type: ignore[arg-type]
            hu_min=float(data.hu_min),
            hu_max=float(data.hu_max),
            body_threshold_hu=getattr(data, "body_threshold_hu", -500.0),
            image_dtype=getattr(data, "cache_dtype", "float16"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-ready plain data."""
        values = asdict(self)
        values["spacing_mm"] = list(self.spacing_mm) if self.spacing_mm is not None else None
        return values


# --------------------------------------------------------------------------------------------
# Steps on arrays


def read_hu(image_file: nib.Nifti1Image) -> tuple[np.ndarray, float, float]:
    """Read a CT volume as stored on disk, without converting it to float.

    Returns:
        (raw array, slope, intercept): HU = raw * slope + intercept. The raw array keeps the
        file's dtype (int16 for KiTS23), half the size of float32.
    """
    proxy = image_file.dataobj
    raw = np.asanyarray(proxy.get_unscaled()) if hasattr(proxy, "get_unscaled") else np.asarray(proxy)
    slope = float(getattr(proxy, "slope", 1.0))
    intercept = float(getattr(proxy, "inter", 0.0))
    if not np.isfinite(slope) or slope == 0:
        slope, intercept = 1.0, 0.0
    return raw, slope, intercept


def hu_scaler(slope: float, intercept: float, hu_min: float, hu_max: float) -> Callable[[np.ndarray], np.ndarray]:
    """Return a function mapping raw float32 values to the HU window scaled to [0, 1], in place."""

    def scale(block: np.ndarray) -> np.ndarray:
        if slope != 1.0 or intercept != 0.0:
            block *= slope
            block += intercept
        np.clip(block, hu_min, hu_max, out=block)
        block -= hu_min
        block /= hu_max - hu_min
        return block

    return scale


def body_box(
    raw: np.ndarray,
    raw_threshold: Optional[float],
    label: Optional[np.ndarray] = None,
) -> tuple[slice, slice, slice]:
    """Return the bounding box of voxels above ``raw_threshold`` and of labelled voxels.

    Computed slab by slab from per-axis projections, so no full-size mask is built.

    Args:
        raw: (slices, rows, cols) image as stored on disk.
        raw_threshold: threshold in stored units; None returns the whole volume.
        label: optional label map of the same shape whose foreground must stay inside the box.

    Returns:
        One slice per axis; the whole volume when no voxel passes the threshold.
    """
    full = tuple(slice(0, size) for size in raw.shape)
    if raw_threshold is None:
        return full  # type: ignore[return-value]

    along_z = np.zeros(raw.shape[0], dtype=bool)
    along_y = np.zeros(raw.shape[1], dtype=bool)
    along_x = np.zeros(raw.shape[2], dtype=bool)
    for start in range(0, raw.shape[0], SLAB_SLICES):
        stop = min(start + SLAB_SLICES, raw.shape[0])
        mask = raw[start:stop] > raw_threshold
        if label is not None:
            mask |= np.asarray(label[start:stop]) > 0
        along_z[start:stop] = mask.any(axis=(1, 2))
        along_y |= mask.any(axis=(0, 2))
        along_x |= mask.any(axis=(0, 1))

    if not along_z.any():
        return full  # type: ignore[return-value]
    return tuple(_true_span(axis) for axis in (along_z, along_y, along_x))  # type: ignore[return-value]


def _true_span(flags: np.ndarray) -> slice:
    indices = np.flatnonzero(flags)
    return slice(int(indices[0]), int(indices[-1]) + 1)


def sample_class_points(label: np.ndarray, points_per_class: int, seed: int) -> tuple[np.ndarray, dict[int, int]]:
    """Draw a uniform sample of each foreground class's voxels, slab by slab.

    Each voxel gets a random key and the ``points_per_class`` smallest keys per class are kept,
    which is a uniform sample without replacement that never keeps more than one slab's voxels in memory.

    Args:
        label: (slices, rows, cols) uint8 label map; it may be a memory map.
        points_per_class: maximum number of voxels kept per class.
        seed: seed of the random keys.

    Returns:
        ((N, 4) int32 rows (class, z, y, x) sorted by class, {class: voxel count}).
    """
    rng = np.random.default_rng(seed)
    kept: dict[int, tuple[np.ndarray, np.ndarray]] = {
        c: (np.empty(0), np.empty((0, 3), np.int32)) for c in FOREGROUND_CLASSES
    }
    counts = dict.fromkeys(FOREGROUND_CLASSES, 0)
    for start in range(0, label.shape[0], SLAB_SLICES):
        slab = np.asarray(label[start : start + SLAB_SLICES])
        for cls in FOREGROUND_CLASSES:
            coordinates = np.argwhere(slab == cls).astype(np.int32)
            if not len(coordinates):
                continue
            counts[cls] += len(coordinates)
            coordinates[:, 0] += start
            keys = np.concatenate([kept[cls][0], rng.random(len(coordinates))])
            coordinates = np.concatenate([kept[cls][1], coordinates])
            if len(keys) > points_per_class:
                order = np.argpartition(keys, points_per_class)[:points_per_class]
                keys, coordinates = keys[order], coordinates[order]
            kept[cls] = (keys, coordinates)

    rows = [
        np.column_stack([np.full(len(coords), cls, np.int32), coords[np.lexsort(coords.T[::-1])]])
        for cls, (_, coords) in kept.items()
    ]
    return np.concatenate(rows).astype(np.int32).reshape(-1, 4), counts


def _case_seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _source_stats(path: Optional[Path]) -> Optional[dict[str, Any]]:
    if path is None:
        return None
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


Allocator = Callable[[str, tuple[int, ...], str], np.ndarray]


def _allocate_in_memory(name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


def prepare_arrays(
    case: Case,
    settings: PreprocessSettings,
    allocate: Allocator = _allocate_in_memory,
    *,
    check_label: bool = False,
    check_intensities: bool = False,
) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray, dict[str, Any]]:
    """Crop, scale and resample one case into arrays that ``allocate`` provides.

    Peak memory is the stored image and label (int16 and uint8 for KiTS23) plus a few slabs of
    float32, whatever the size of the outputs, which may be memory maps.

    Args:
        case: the case's files; ``case.label`` may be None (inference).
        settings: target spacing, HU window, crop threshold and image dtype.
        allocate: ``allocate(name, shape, dtype)`` returns the array for "image" or "label".
        check_label: also reject a label whose affine differs from the image's or whose values
            lie outside {0, 1, 2, 3}, before anything is allocated. The cache does; training
            in memory leaves this to the dataset check, which ``data.check`` controls.
        check_intensities: reject an image with NaN or infinite voxels before anything is
            allocated (:func:`check_finite_intensities`). The cache and prediction need it,
            because resampling would spread a NaN and the HU window would hide an infinity.

    Returns:
        (image, label or None, class points (N, 4) int32, geometry dict).

    Raises:
        UserError: unreadable files, image and label of different shapes, (with
            ``check_label``) a label off the image's grid or with invalid values, or (with
            ``check_intensities``) NaN or infinite intensities.
    """
    image_file = read_nifti(case.image)
    raw, slope, intercept = _read_or_fail(case.image, lambda: read_hu(image_file))
    if check_intensities:
        check_finite_intensities(case.image, raw)
    label = None
    if case.label is not None:
        label_file = read_nifti(case.label)
        if label_file.shape != image_file.shape:
            raise UserError(
                f"case {case.name}: image {case.image} has shape {image_file.shape} but label "
                f"{case.label} has shape {label_file.shape}; they must match"
            )
        if check_label:
            check_label_grid(case, image_file.affine, label_file.affine)
        stored_label = _read_or_fail(case.label, lambda: np.asarray(label_file.dataobj))
        if check_label or not _fits_uint8_exactly(stored_label):
            # The cast to uint8 would truncate or wrap these values, so no later check could see them.
            check_label_values(case, stored_label)
        label = stored_label.astype(np.uint8, copy=False)
        del stored_label

    spacing = tuple(float(z) for z in image_file.header.get_zooms()[:3])
    raw_threshold = None
    if settings.body_threshold_hu is not None:
        raw_threshold = (settings.body_threshold_hu - intercept) / slope
    box = body_box(raw, raw_threshold, label)
    cropped_shape = tuple(s.stop - s.start for s in box)
    spacing_target = settings.spacing_mm or spacing
    shape = target_shape(cropped_shape, spacing, spacing_target)

    image = allocate("image", shape, settings.image_dtype)
    resample_linear(raw[box], image, hu_scaler(slope, intercept, settings.hu_min, settings.hu_max))
    del raw
    points = np.zeros((0, 4), np.int32)
    counts: dict[int, int] = dict.fromkeys(FOREGROUND_CLASSES, 0)
    cache_label = None
    if label is not None:
        cache_label = allocate("label", shape, "uint8")
        resample_nearest(label[box], cache_label)
        del label
        points, counts = sample_class_points(cache_label, settings.points_per_class, _case_seed(case.name))

    geometry = {
        "format_version": CACHE_FORMAT_VERSION,
        "case": case.name,
        "source": {"image": _source_stats(case.image), "label": _source_stats(case.label)},
        "settings": settings.to_dict(),
        "original_shape": list(image_file.shape),
        "original_spacing_mm": list(spacing),
        "affine": image_file.affine.tolist(),
        "crop_box": [[s.start, s.stop] for s in box],
        "shape": list(shape),
        # Exact spacing of the cache grid: the cropped extent over the rounded shape.
        "spacing_mm": [c * s / n for c, s, n in zip(cropped_shape, spacing, shape)],
        "class_voxels": {str(c): int(n) for c, n in counts.items()},
    }
    return image, cache_label, points, geometry


def _fits_uint8_exactly(values: np.ndarray) -> bool:
    """Return whether every value survives a cast to uint8 unchanged (whole, 0 to 255)."""
    if values.dtype == np.uint8 or values.size == 0:
        return True
    low, high = values.min(), values.max()
    if not (0 <= low and high <= 255):
        return False
    return not np.issubdtype(values.dtype, np.floating) or bool(np.array_equal(values, np.round(values)))


def check_label_grid(case: Case, image_affine: np.ndarray, label_affine: np.ndarray) -> None:
    """Reject a label whose affine differs from its image's beyond the dataset check's tolerance.

    Raises:
        UserError: naming the label file and the largest difference in mm.
    """
    if not np.allclose(image_affine, label_affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL_MM):
        difference_mm = float(np.max(np.abs(np.asarray(image_affine) - np.asarray(label_affine))))
        raise UserError(
            f"case {case.name}: label {case.label}: label affine differs from image affine (largest "
            f"difference {difference_mm:.4g} mm); resample the label onto the image's grid or fix its "
            "header, or remove the case (python -m kitsjobs.data.check lists every problem)"
        )


def check_label_values(case: Case, label: np.ndarray) -> None:
    """Reject label values outside {0, 1, 2, 3}, read before the cast to uint8 could wrap them.

    Raises:
        UserError: naming the label file and the values found.
    """
    errors = [text for text, severity in label_value_problems(label) if severity == ERROR]
    if errors:
        raise UserError(
            f"case {case.name}: label {case.label}: {'; '.join(errors)}; relabel it to 0 background, "
            "1 kidney, 2 tumor, 3 cyst, or remove the case"
        )


def check_finite_intensities(path: Path, raw: np.ndarray) -> None:
    """Reject an image with NaN or infinite voxels, counted slab by slab without a full-size copy.

    Args:
        path: the image file, named in the message.
        raw: the voxels as stored, slices-first (the first value :func:`read_hu` returns).
            Integer voxels are never NaN, so they pass without being read.

    Raises:
        UserError: naming the file and the count of NaN or infinite voxels.
    """
    count = count_nonfinite(raw)
    if count:
        raise UserError(
            f"image {path}: {count} NaN or infinite intensities; replace them with valid HU values "
            "or leave the image out"
        )


def _read_or_fail(path: Path, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise UserError(f"cannot read {path}: {error}; check or replace the file") from None


def prepare_volume(case: Case, settings: PreprocessSettings) -> Volume:
    """Preprocess one case into memory, exactly as the cache would store it.

    Returns:
        A Volume on the preprocessed grid, with its class points; ``affine`` is the original
        image's affine and ``spacing_mm`` the preprocessed grid's spacing.
    """
    image, label, points, geometry = prepare_arrays(case, settings)
    return Volume(
        case.name, image, label, np.asarray(geometry["affine"]),
        tuple(geometry["spacing_mm"]), class_points=points,  # type: ignore[arg-type]
    )


def estimate_prepared_bytes(cases: Sequence[Case], settings: PreprocessSettings) -> int:
    """Estimate the memory :func:`prepare_volume` takes for ``cases``, reading headers only.

    The estimate ignores the body crop, so it is an upper bound: image voxels at the target
    spacing times the image dtype's size, plus one byte per voxel for labels.
    """
    per_voxel = np.dtype(settings.image_dtype).itemsize + 1
    total = 0
    for case in cases:
        header = read_nifti(case.image).header
        shape = header.get_data_shape()[:3]
        spacing = tuple(float(z) for z in header.get_zooms()[:3])
        total += int(np.prod(target_shape(shape, spacing, settings.spacing_mm or spacing))) * per_voxel
    return total


# --------------------------------------------------------------------------------------------
# The cache folder


def check_output_outside_input(input_dir: Path, output_dir: Path, option: str = "--output") -> None:
    """Raise UserError when ``output_dir`` is ``input_dir`` or lies inside it."""
    source, target = Path(input_dir).expanduser().resolve(), Path(output_dir).expanduser().resolve()
    if target == source or source in target.parents:
        raise UserError(
            f"{option} {target} is inside the dataset folder {source}, which is never written; "
            "choose a folder outside it"
        )


def read_geometry(case_dir: Path) -> Optional[dict[str, Any]]:
    """Return a cached case's geometry.json, or None when missing or unreadable."""
    try:
        return json.loads((Path(case_dir) / GEOMETRY_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(case_dir: Path, case: Case, settings: PreprocessSettings) -> bool:
    """Return whether ``case_dir`` contains ``case`` preprocessed with ``settings`` from its current files."""
    geometry = read_geometry(case_dir)
    if geometry is None or geometry.get("format_version") != CACHE_FORMAT_VERSION:
        return False
    if geometry.get("settings") != settings.to_dict():
        return False
    expected = {"image": _source_stats(case.image), "label": _source_stats(case.label)}
    if geometry.get("source") != expected:
        return False
    needed = ["image.npy", "points.npy"] + (["label.npy"] if case.label is not None else [])
    return all((Path(case_dir) / name).is_file() for name in needed)


def _write_case_folder(case: Case, folder: Path, settings: PreprocessSettings) -> None:
    maps: list[np.memmap] = []

    def allocate(name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        array = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        maps.append(array)
        return array

    _, _, points, geometry = prepare_arrays(case, settings, allocate, check_label=True, check_intensities=True)
    for array in maps:
        array.flush()
    del maps
    np.save(folder / "points.npy", points)
    for path in folder.glob("*.npy"):
        fsync_path(path)
    atomic_write_json(folder / GEOMETRY_FILE, geometry)


# --------------------------------------------------------------------------------------------
# What a cache folder already contains

# State of a case's folder in the cache before the case is written there.
MISSING = "missing"
UP_TO_DATE = "up to date"
# A cache folder of the same settings whose source files changed, whose files are
# incomplete, or that an older kitsjobs wrote: rebuilt without asking.
STALE = "stale"
# A cache folder of the case built with other settings: rebuilt only with overwrite.
OTHER_SETTINGS = "other settings"
# Anything else, such as a case folder of a dataset: never replaced.
NOT_A_CACHE = "not a cache folder"


def inspect_case_folder(case_dir: Path, case: Case, settings: PreprocessSettings) -> tuple[str, list[str]]:
    """Classify what ``case_dir`` contains before ``case`` is written there.

    Returns:
        (state, differences): the state is MISSING, UP_TO_DATE, STALE, OTHER_SETTINGS or
        NOT_A_CACHE (no readable geometry.json of the cache format). For OTHER_SETTINGS the
        differences name each setting with both values, e.g. "hu_max 400.0 cached, 300.0
        requested"; otherwise they are empty.
    """
    case_dir = Path(case_dir)
    if not os.path.lexists(case_dir):
        return MISSING, []
    geometry = read_geometry(case_dir) if case_dir.is_dir() else None
    if not _is_cache_geometry(geometry):
        return NOT_A_CACHE, []
    version = geometry["format_version"]
    if version > CACHE_FORMAT_VERSION:
        return OTHER_SETTINGS, [f"format_version {version} cached, {CACHE_FORMAT_VERSION} requested"]
    if version < CACHE_FORMAT_VERSION:
        return STALE, []
    differences = settings_differences(geometry["settings"], settings.to_dict())
    if differences:
        return OTHER_SETTINGS, differences
    return (UP_TO_DATE if is_up_to_date(case_dir, case, settings) else STALE), []


def _is_cache_geometry(geometry: Any) -> bool:
    return (
        isinstance(geometry, dict)
        and isinstance(geometry.get("format_version"), int)
        and isinstance(geometry.get("settings"), dict)
    )


# Message text for a setting that is null (off) in geometry.json.
NULL_SETTING_TEXT = {
    "spacing_mm": "each case's own spacing",
    "body_threshold_hu": "no body crop",
}


def settings_differences(cached: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Describe each setting whose value differs, as "NAME CACHED cached, REQUESTED requested".

    Values are shown as JSON, as geometry.json stores them, except that a null spacing reads
    "each case's own spacing" and a null body threshold "no body crop".
    """
    names = list(requested) + [name for name in cached if name not in requested]
    return [
        f"{name} {_setting_text(name, cached.get(name))} cached, {_setting_text(name, requested.get(name))} requested"
        for name in names
        if cached.get(name) != requested.get(name)
    ]


def _setting_text(name: str, value: Any) -> str:
    if value is None and name in NULL_SETTING_TEXT:
        return NULL_SETTING_TEXT[name]
    return json.dumps(value)


def plan_cases(
    cases: Sequence[Case],
    cache_dir: Path,
    settings: PreprocessSettings,
    *,
    overwrite: bool = False,
    output_option: str = "--output",
) -> list[Case]:
    """Return the cases to write into ``cache_dir``, after checking every case's folder there.

    Nothing is written, so a run that this rejects leaves the cache as it was.

    Raises:
        UserError: a case's folder is not a cache case folder, or (without ``overwrite``)
            contains the case built with other settings. The message names the first such
            folder and counts the others.
    """
    not_cache: list[str] = []
    other_settings: list[tuple[str, list[str]]] = []
    pending = []
    for case in cases:
        state, differences = inspect_case_folder(Path(cache_dir) / case.name, case, settings)
        if state == NOT_A_CACHE:
            not_cache.append(case.name)
        elif state == OTHER_SETTINGS and not overwrite:
            other_settings.append((case.name, differences))
        elif state != UP_TO_DATE:
            pending.append(case)

    if not_cache:
        raise UserError(_not_a_cache_message(Path(cache_dir), not_cache, output_option))
    if other_settings:
        name, differences = other_settings[0]
        raise UserError(_other_settings_message(Path(cache_dir), name, differences, len(other_settings), output_option))
    return pending


def _not_a_cache_message(cache_dir: Path, names: Sequence[str], output_option: str) -> str:
    others = f", nor are {len(names) - 1} other case folder(s) there" if len(names) > 1 else ""
    return (
        f"{cache_dir / names[0]} is not a kitsjobs cache case folder (no readable {GEOMETRY_FILE}){others}; "
        f"nothing was replaced. Choose an empty folder or an existing kitsjobs cache for {output_option}"
    )


def _other_settings_message(
    cache_dir: Path, name: str, differences: Sequence[str], count: int, output_option: str
) -> str:
    others = f" and {count - 1} more case(s)" if count > 1 else ""
    return (
        f"{output_option} {cache_dir} contains {name}{others} preprocessed with other settings "
        f"({'; '.join(differences)}); another run may be reading the cache, so nothing was replaced. "
        f"Choose another {output_option} for these settings, or add --overwrite to the "
        "python -m kitsjobs.preprocess command to rebuild the cache"
    )


def _check_replaceable(
    case_dir: Path, case: Case, settings: PreprocessSettings, overwrite: bool, output_option: str
) -> str:
    """Return the state of ``case_dir``; raise when the case must not be written there."""
    state, differences = inspect_case_folder(case_dir, case, settings)
    if state == NOT_A_CACHE:
        raise UserError(_not_a_cache_message(case_dir.parent, [case.name], output_option))
    if state == OTHER_SETTINGS and not overwrite:
        raise UserError(_other_settings_message(case_dir.parent, case.name, differences, 1, output_option))
    return state


# --------------------------------------------------------------------------------------------
# Temporary folders


def _host_name() -> str:
    # Only characters that are safe in a file name, short enough to leave room for the case.
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "localhost"


def _temporary_name(case_name: str, kind: str) -> str:
    return f".{case_name}.{kind}-{_host_name()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        # PermissionError: the process exists but belongs to another user.
        return True
    return True


def remove_stale_temporaries(cache_dir: Path, now_s: Optional[float] = None) -> list[Path]:
    """Remove the temporary folders that interrupted runs left in ``cache_dir``, for any case.

    A folder made by a process of this host is stale once that process no longer exists, so
    a run writing the same cache right now keeps its folders. A folder of another host, or
    without host and pid in its name, is stale once older than STALE_TEMPORARY_AGE_S.

    NOTE: this trusts the host name and pid in the folder name. Containers on one host that
    share a cache but not a pid namespace could remove each other's folders in progress. The
    writer then fails with an OSError, and a rerun resumes.

    Args:
        cache_dir: an existing cache folder.
        now_s: the current time in seconds since the epoch; None reads the clock.

    Returns:
        The folders removed.
    """
    host = _host_name()
    now_s = time.time() if now_s is None else now_s
    removed = []
    for path in Path(cache_dir).iterdir():
        match = TEMPORARY_NAME.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        if _is_abandoned(path, match, host, now_s):
            logger.info("removing %s, left by an interrupted run", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _is_abandoned(path: Path, match: re.Match[str], host: str, now_s: float) -> bool:
    if match["host"] == host:
        return not _process_exists(int(match["pid"]))
    try:
        age_s = now_s - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age_s > STALE_TEMPORARY_AGE_S


# --------------------------------------------------------------------------------------------
# Writing cases


def preprocess_case(
    case: Case,
    cache_dir: Path,
    settings: PreprocessSettings,
    *,
    overwrite: bool = False,
    output_option: str = "--output",
) -> str:
    """Write ``cache_dir/CASE`` unless it is up to date; return "kept" or "written".

    The case is written into a hidden temporary folder that is renamed into place, so readers
    see the old folder or the new one. When another process finishes the same case first, its
    folder is kept.

    Args:
        case: the case's files.
        cache_dir: an existing cache folder.
        settings: preprocessing settings.
        overwrite: replace the case when the cache contains it built with other settings.
        output_option: how the caller names ``cache_dir`` in error messages.

    Raises:
        UserError: the case's files fail a check, or ``cache_dir/CASE`` is not a cache case
            folder, or (without ``overwrite``) contains the case built with other settings.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / case.name
    if _check_replaceable(final, case, settings, overwrite, output_option) == UP_TO_DATE:
        return "kept"
    temporary = cache_dir / _temporary_name(case.name, "tmp")
    temporary.mkdir(parents=True)
    try:
        _write_case_folder(case, temporary, settings)
        # Another process may have written the case meanwhile, with these settings or others.
        state = _check_replaceable(final, case, settings, overwrite, output_option)
        if state == UP_TO_DATE:
            shutil.rmtree(temporary, ignore_errors=True)
            return "kept"
        if state != MISSING:
            retired = cache_dir / _temporary_name(case.name, "old")
            os.replace(final, retired)
            shutil.rmtree(retired, ignore_errors=True)
        os.rename(temporary, final)
    except OSError:
        if is_up_to_date(final, case, settings):
            shutil.rmtree(temporary, ignore_errors=True)
            return "kept"
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return "written"


# (case name, "kept", "written" or "failed", error message or None)
CaseResult = tuple[str, str, Optional[str]]


def _preprocess_reporting_errors(
    case: Case, cache_dir: Path, settings: PreprocessSettings, overwrite: bool, output_option: str
) -> CaseResult:
    try:
        return case.name, preprocess_case(case, cache_dir, settings, overwrite=overwrite,
                                          output_option=output_option), None
    except UserError as error:
        return case.name, "failed", str(error)


def _worker_init() -> None:
    # Ctrl-C reaches every process of the terminal's process group; the parent stops the
    # workers, so a worker must not print its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One process per case already uses the cores; torch threads would oversubscribe them.
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT in this process while worker processes start, so that they inherit it.

    Without it, Ctrl-C while a worker imports its modules (before ``_worker_init``) would
    print that worker's traceback. A SIGINT that arrives meanwhile is lost.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _write_pending(
    pending: Sequence[Case], write: Callable[[Case], CaseResult], jobs: int, record: Callable[[CaseResult], None]
) -> None:
    """Run ``write`` on each case, in this process or in ``jobs`` worker processes."""
    if jobs == 1 or len(pending) <= 1:
        for case in pending:
            record(write(case))
        return

    context = multiprocessing.get_context("spawn")
    with _sigint_ignored():
        pool = context.Pool(min(jobs, len(pending)), initializer=_worker_init)
    # Leaving the block terminates the workers, also on KeyboardInterrupt: their temporary
    # folders stay until remove_stale_temporaries runs.
    with pool:
        for result in pool.imap_unordered(write, pending):
            record(result)
        pool.close()
        pool.join()


def check_cache_folder(cache_dir: Path, output_option: str = "--output") -> None:
    """Check, before any work, that ``cache_dir`` is a folder or can be created as one.

    As for the output folders of predict, evaluate and submit, a missing folder is created
    only inside an existing parent, so a mistyped path creates no tree of folders.

    Raises:
        UserError: ``cache_dir`` is a file, or it is missing and so is its parent.
    """
    cache_dir = Path(cache_dir).expanduser()
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"{output_option} {cache_dir} is a file, not a folder; choose a folder for the cache")
    if not cache_dir.exists() and not cache_dir.parent.is_dir():
        raise UserError(
            f"{output_option} {cache_dir}: folder {cache_dir.parent} not found; create it first or choose another path"
        )


def prepare_cache_folder(cache_dir: Path, output_option: str = "--output") -> Path:
    """Create the cache folder if missing and return it, user directory expanded.

    Raises:
        UserError: ``cache_dir`` is a file, its parent is missing, or it cannot be created.
    """
    cache_dir = Path(cache_dir).expanduser()
    check_cache_folder(cache_dir, output_option)
    try:
        cache_dir.mkdir(exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot create {output_option} {cache_dir}: {error.strerror}; choose a folder you can write"
        ) from None
    return cache_dir


def preprocess_cases(
    cases: Sequence[Case],
    cache_dir: Path,
    settings: PreprocessSettings,
    jobs: int = 1,
    progress: bool = True,
    *,
    overwrite: bool = False,
    output_option: str = "--output",
    jobs_option: str = "--jobs",
) -> dict[str, str]:
    """Preprocess every case into ``cache_dir``, skipping those already up to date.

    Temporary folders of interrupted runs are removed first. Then every case's folder is
    checked before any is written: a folder that is not a cache case folder, or a case built
    with other settings (unless ``overwrite``), stops the run with the cache unchanged.

    Args:
        cases: the dataset's cases (labels optional).
        cache_dir: cache folder, created if missing; its parent must exist.
        settings: preprocessing settings.
        jobs: worker processes; 1 runs in this process.
        progress: show a tqdm progress bar.
        overwrite: rebuild cases that the cache contains built with other settings.
        output_option, jobs_option: how the caller names ``cache_dir`` and ``jobs`` in error
            messages ("--output" and "--jobs" on the command line, "data.cache_dir" and
            "data.cache_jobs" in the launcher).

    Returns:
        {case name: "kept" or "written"}.

    Raises:
        UserError: ``jobs`` below 1, ``cache_dir`` a file, not writable or missing with its
            parent, a folder that must not be replaced, or cases that failed (all named, after
            the others finished).
        KeyboardInterrupt: on Ctrl-C, after the worker processes are stopped and the
            temporary folders removed. Cases already written stay.
    """
    if jobs < 1:
        raise UserError(f"{jobs_option}={jobs} is invalid; give 1 or more worker processes")
    cache_dir = Path(cache_dir).expanduser()
    check_cache_folder(cache_dir, output_option)
    if cache_dir.is_dir():
        remove_stale_temporaries(cache_dir)
    pending = plan_cases(cases, cache_dir, settings, overwrite=overwrite, output_option=output_option)
    cache_dir = prepare_cache_folder(cache_dir, output_option)
    status = {case.name: "kept" for case in cases}
    logger.info("cache %s: %d of %d cases to preprocess", cache_dir, len(pending), len(cases))

    failures: dict[str, str] = {}
    bar = tqdm(total=len(pending), desc="preprocess", unit="case", disable=not progress or not pending)

    def record(result: CaseResult) -> None:
        name, state, error = result
        if error is None:
            status[name] = state
        else:
            failures[name] = error
        bar.update(1)

    write = partial(_preprocess_reporting_errors, cache_dir=cache_dir, settings=settings, overwrite=overwrite,
                    output_option=output_option)
    try:
        _write_pending(pending, write, jobs, record)
    except KeyboardInterrupt:
        bar.close()
        # The workers have exited, so their folders count as stale now.
        remove_stale_temporaries(cache_dir)
        raise
    bar.close()

    if failures:
        # Each message names its case or file.
        details = "; ".join(message for _, message in sorted(failures.items()))
        raise UserError(f"{len(failures)} case(s) failed to preprocess: {details}")
    return status


def load_cached_volume(cache_dir: Path, name: str) -> Volume:
    """Open a cached case by memory map: nothing but the class points is read into memory.

    Returns:
        A Volume whose ``image`` and ``label`` are read-only memory maps on the cache grid;
        ``affine`` is the original image's and ``spacing_mm`` the cache grid's spacing.

    Raises:
        UserError: the case folder is missing or incomplete.
    """
    case_dir = Path(cache_dir) / name
    geometry = read_geometry(case_dir)
    if geometry is None or not (case_dir / "image.npy").is_file():
        raise UserError(
            f"cached case {case_dir} is missing or incomplete; run python -m kitsjobs.preprocess "
            f"with --output {cache_dir} again"
        )
    image = np.load(case_dir / "image.npy", mmap_mode="r")
    label_path = case_dir / "label.npy"
    label = np.load(label_path, mmap_mode="r") if label_path.is_file() else None
    points = np.load(case_dir / "points.npy")
    return Volume(
        name, image, label, np.asarray(geometry["affine"]),
        tuple(geometry["spacing_mm"]), class_points=points,  # type: ignore[arg-type]
    )


def release_mapped_pages(array: Optional[np.ndarray]) -> None:
    """Drop the pages of a read-only memory map from this process's resident memory.

    The pages stay in the OS page cache, so the next read of them costs a page-table update,
    not a disk read. Without this, every page a long training run has read counts in its
    resident memory, which Slurm's accounting may hold against the job's memory request.
    Writable arrays (whose pages could hold changes), arrays that are not memory maps, and
    platforms without ``MADV_DONTNEED`` are left alone.
    """
    if array is None or array.flags.writeable:
        return
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is not None and hasattr(mmap, "MADV_DONTNEED") and not base.closed:
        base.madvise(mmap.MADV_DONTNEED)
