"""Preprocessed case cache: resampled, HU-scaled, body-cropped arrays read by memory map.

A cache folder contains one folder per case::

    CACHE/CASE/image.npy      (slices, rows, cols) float16 or float32, HU window scaled to [0, 1]
    CACHE/CASE/label.npy      same shape, uint8 labels (0 background, 1 kidney, 2 tumor, 3 cyst)
    CACHE/CASE/points.npy     (N, 4) int32 rows (class, z, y, x): a uniform sample of each
                              foreground class's voxels, used to centre training patches
    CACHE/CASE/geometry.json  original shape, affine and spacing, crop box, cache spacing,
                              preprocessing settings and the source files' sizes and mtimes

A case folder appears in one rename once all its files are written, so an interrupted run
leaves only hidden temporary folders, which the next run removes once they are stale. A case
whose source files and settings have not changed is skipped, so preprocessing is idempotent.
The same steps also run in memory (:func:`prepare_volume`) for training without a cache.
"""

from __future__ import annotations

import json
import logging
import mmap
import multiprocessing
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import nibabel as nib
import numpy as np
from tqdm import tqdm

from kitsjobs.data.layouts import Case
from kitsjobs.data.resample import SLAB_SLICES, resample_linear, resample_nearest, target_shape
from kitsjobs.data.volumes import Volume, read_nifti
from kitsjobs.errors import UserError
from kitsjobs.fsutil import atomic_write_json

logger = logging.getLogger(__name__)

# Bumped whenever the cache files change meaning; older case folders are rebuilt.
CACHE_FORMAT_VERSION = 1
IMAGE_DTYPES = ("float16", "float32")
GEOMETRY_FILE = "geometry.json"
# Temporary folders older than this are leftovers of an interrupted run.
# NOTE: a case still being written after this long by another process would lose its folder.
STALE_TEMPORARY_AGE_S = 3600.0
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
    case: Case, settings: PreprocessSettings, allocate: Allocator = _allocate_in_memory
) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray, dict[str, Any]]:
    """Crop, scale and resample one case into arrays that ``allocate`` provides.

    Peak memory is the stored image and label (int16 and uint8 for KiTS23) plus a few slabs of
    float32, whatever the size of the outputs, which may be memory maps.

    Args:
        case: the case's files; ``case.label`` may be None (inference).
        settings: target spacing, HU window, crop threshold and image dtype.
        allocate: ``allocate(name, shape, dtype)`` returns the array for "image" or "label".

    Returns:
        (image, label or None, class points (N, 4) int32, geometry dict).

    Raises:
        UserError: unreadable files, or image and label of different shapes.
    """
    image_file = read_nifti(case.image)
    raw, slope, intercept = _read_or_fail(case.image, lambda: read_hu(image_file))
    label = None
    if case.label is not None:
        label_file = read_nifti(case.label)
        if label_file.shape != image_file.shape:
            raise UserError(
                f"case {case.name}: image {case.image} has shape {image_file.shape} but label "
                f"{case.label} has shape {label_file.shape}; they must match"
            )
        label = _read_or_fail(case.label, lambda: np.asarray(label_file.dataobj).astype(np.uint8, copy=False))

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


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_case_folder(case: Case, folder: Path, settings: PreprocessSettings) -> None:
    maps: list[np.memmap] = []

    def allocate(name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        array = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        maps.append(array)
        return array

    _, _, points, geometry = prepare_arrays(case, settings, allocate)
    for array in maps:
        array.flush()
    del maps
    np.save(folder / "points.npy", points)
    for path in folder.glob("*.npy"):
        _fsync_file(path)
    atomic_write_json(folder / GEOMETRY_FILE, geometry)


def _remove_stale_temporaries(cache_dir: Path, name: str) -> None:
    now = time.time()
    for leftover in cache_dir.glob(f".{name}.*"):
        if leftover.is_dir() and now - leftover.stat().st_mtime > STALE_TEMPORARY_AGE_S:
            logger.info("removing %s, left by an interrupted run", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def preprocess_case(case: Case, cache_dir: Path, settings: PreprocessSettings) -> str:
    """Write ``cache_dir/CASE`` unless it is up to date; return "kept" or "written".

    The case is written into a hidden temporary folder that is renamed into place, so readers
    see the old folder or the new one. When another process finishes the same case first, its
    folder is kept.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / case.name
    if is_up_to_date(final, case, settings):
        return "kept"
    _remove_stale_temporaries(cache_dir, case.name)
    temporary = cache_dir / f".{case.name}.tmp-{uuid.uuid4().hex[:12]}"
    temporary.mkdir(parents=True)
    try:
        _write_case_folder(case, temporary, settings)
        if final.exists():
            retired = cache_dir / f".{case.name}.old-{uuid.uuid4().hex[:12]}"
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


def _worker_init() -> None:
    # One process per case already uses the cores; torch threads would oversubscribe them.
    import torch

    torch.set_num_threads(1)


def preprocess_cases(
    cases: Sequence[Case],
    cache_dir: Path,
    settings: PreprocessSettings,
    jobs: int = 1,
    progress: bool = True,
) -> dict[str, str]:
    """Preprocess every case into ``cache_dir``, skipping those already up to date.

    Args:
        cases: the dataset's cases (labels optional).
        cache_dir: cache folder, created if missing.
        settings: preprocessing settings; a change rebuilds every case.
        jobs: worker processes; 1 runs in this process.
        progress: show a tqdm progress bar.

    Returns:
        {case name: "kept" or "written"}.

    Raises:
        UserError: ``jobs`` below 1, or cases that failed (all named, after the others finished).
    """
    if jobs < 1:
        raise UserError(f"--jobs {jobs} is invalid; give 1 or more worker processes")
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    pending = [case for case in cases if not is_up_to_date(cache_dir / case.name, case, settings)]
    status = {case.name: "kept" for case in cases}
    logger.info("cache %s: %d of %d cases to preprocess", cache_dir, len(pending), len(cases))

    failures: dict[str, str] = {}
    bar = tqdm(total=len(pending), desc="preprocess", unit="case", disable=not progress or not pending)
    if jobs == 1 or len(pending) <= 1:
        for case in pending:
            try:
                status[case.name] = preprocess_case(case, cache_dir, settings)
            except UserError as error:
                failures[case.name] = str(error)
            bar.update(1)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(jobs, len(pending)), mp_context=context, initializer=_worker_init) as pool:
            futures = {pool.submit(preprocess_case, case, cache_dir, settings): case for case in pending}
            for future in as_completed(futures):
                name = futures[future].name
                try:
                    status[name] = future.result()
                except UserError as error:
                    failures[name] = str(error)
                bar.update(1)
    bar.close()

    if failures:
        details = "; ".join(f"{name}: {message}" for name, message in sorted(failures.items()))
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
