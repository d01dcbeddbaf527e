"""KiTS23 Dice and Surface Dice for label volumes.

The KiTS23 challenge scores three nested regions of a label volume (0 background,
1 kidney, 2 tumor, 3 cyst): kidney_and_mass = {1, 2, 3}, mass = {2, 3} and
tumor = {2}. For each region it reports the volumetric Dice coefficient and the
Surface Dice at a region-specific tolerance in mm.

Surface Dice follows the definition of the official KiTS23 evaluation, which
uses DeepMind's surface-distance package (``compute_surface_distances`` followed
by ``compute_surface_dice_at_tolerance``). Surface elements (surfels) sit on the
grid of 2 x 2 x 2 voxel cubes. Every cube whose eight voxels are neither all inside
nor all outside the mask is a surfel. Its weight is the area of the marching-cubes
surface inside it. A surfel counts as overlapping when the nearest surfel of the
other mask lies within the tolerance, measured between cube positions in mm.

Instead of a Euclidean distance transform over the whole volume, this module
only tests whether a surfel of the other mask exists among the cube offsets that
lie within the tolerance, and it only looks at surfels. The result is the same
because Surface Dice compares each distance with the tolerance and uses nothing
else.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

logger = logging.getLogger(__name__)

REGIONS: dict[str, tuple[int, ...]] = {
    "kidney_and_mass": (1, 2, 3),
    "mass": (2, 3),
    "tumor": (2,),
}
"""KiTS23 evaluation regions and the labels each one contains."""

TOLERANCES_MM: dict[str, float] = {
    "kidney_and_mass": 1.0330772532390826,
    "mass": 1.1328796488598762,
    "tumor": 1.1498198361434828,
}
"""Surface Dice tolerance of each KiTS23 region, in mm."""

METRIC_COLUMNS: tuple[str, ...] = (
    "dice_kidney_and_mass",
    "dice_mass",
    "dice_tumor",
    "sd_kidney_and_mass",
    "sd_mass",
    "sd_tumor",
)
"""Keys of :func:`compute_case_metrics`, in the column order of the KiTS23 results table."""

VALID_LABELS: tuple[int, ...] = (0, 1, 2, 3)
"""Labels a KiTS23 segmentation may contain: background, kidney, tumor, cyst."""

_MAX_VALUES_IN_MESSAGE = 10


def dice(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """Compute the volumetric Dice coefficient of two masks.

    Args:
        pred_mask: predicted mask, any number of dimensions. Nonzero voxels are inside.
        ref_mask: reference mask with the same shape.

    Returns:
        ``2 |P & R| / (|P| + |R|)`` in [0, 1]. Both masks empty gives 1.0, exactly
        one empty gives 0.0.

    Raises:
        ValueError: if the shapes differ.
    """
    pred_mask = np.asarray(pred_mask, dtype=bool)
    ref_mask = np.asarray(ref_mask, dtype=bool)
    _check_same_shape(pred_mask.shape, ref_mask.shape)
    pred_count = int(np.count_nonzero(pred_mask))
    ref_count = int(np.count_nonzero(ref_mask))
    overlap_count = int(np.count_nonzero(pred_mask & ref_mask))
    return _dice_from_counts(pred_count, ref_count, overlap_count)


def surface_dice(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing_mm: Sequence[float],
    tolerance_mm: float,
) -> float:
    """Compute the Surface Dice of two 3D masks at a tolerance.

    Args:
        pred_mask: predicted 3D mask. Nonzero voxels are inside.
        ref_mask: reference 3D mask with the same shape and axis order.
        spacing_mm: voxel size along each array axis, in mm and in the array's axis
            order (slices first for KiTS23 volumes).
        tolerance_mm: maximum distance in mm at which a surfel counts as overlapping
            the other surface.

    Returns:
        Area of the surfels of both masks that lie within the tolerance of the other
        surface, divided by the area of all surfels, in [0, 1]. Both masks empty
        gives 1.0, exactly one empty gives 0.0.

    Raises:
        ValueError: if the masks are not 3D, their shapes differ, a spacing is not
            positive and finite, or the tolerance is negative or not finite.
    """
    pred_mask = np.asarray(pred_mask, dtype=bool)
    ref_mask = np.asarray(ref_mask, dtype=bool)
    _check_same_shape(pred_mask.shape, ref_mask.shape)
    _check_3d(pred_mask.shape)
    spacing = _validated_spacing(spacing_mm)
    tolerance = _validated_tolerance(tolerance_mm)

    bounds = _union_bounds(_nonzero_bounds(pred_mask), _nonzero_bounds(ref_mask))
    if bounds is None:
        return 1.0
    margin = _crop_margin(spacing, tolerance)
    pred_crop = _crop_with_margin(pred_mask, bounds, margin)
    ref_crop = _crop_with_margin(ref_mask, bounds, margin)

    pred_surface = _extract_surface(pred_crop, spacing)
    ref_surface = _extract_surface(ref_crop, spacing)
    return _surface_dice_of_surfaces(pred_surface, ref_surface, spacing, tolerance)


def compute_case_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing_mm: Sequence[float],
) -> dict[str, float]:
    """Compute the KiTS23 Dice and Surface Dice of every region for one case.

    Args:
        prediction: predicted 3D label volume with labels 0-3 (0 background, 1 kidney,
            2 tumor, 3 cyst), in the same axis order as ``reference`` (KiTS23 stores
            slices first). Any integer, boolean or float dtype holding those labels.
        reference: reference 3D label volume with the same shape.
        spacing_mm: voxel size along each array axis, in mm and in the array's axis
            order, for example the NIfTI header zooms of the reference.

    Returns:
        A dict with exactly the :data:`METRIC_COLUMNS` keys. Dice and Surface Dice of
        a region are 1.0 when the region is empty in both volumes and 0.0 when it is
        empty in exactly one.

    Raises:
        ValueError: if the volumes are not 3D, their shapes differ, either volume
            contains a value outside {0, 1, 2, 3}, or a spacing is not positive and
            finite.
    """
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    _check_same_shape(prediction.shape, reference.shape)
    _check_3d(prediction.shape)
    spacing = _validated_spacing(spacing_mm)

    # The same per-slice reductions validate the labels and give the foreground bounds.
    pred_bounds = _validate_labels_and_find_bounds(prediction, "prediction")
    ref_bounds = _validate_labels_and_find_bounds(reference, "reference")
    bounds = _union_bounds(pred_bounds, ref_bounds)
    if bounds is None:
        return dict.fromkeys(METRIC_COLUMNS, 1.0)

    margin = max(_crop_margin(spacing, tolerance) for tolerance in TOLERANCES_MM.values())
    pred_crop = _crop_with_margin(prediction, bounds, margin).astype(np.uint8, copy=False)
    ref_crop = _crop_with_margin(reference, bounds, margin).astype(np.uint8, copy=False)

    # Regions with the same labels present in this case have the same masks, so they
    # share Dice and surfaces, for example mass and tumor in a case without cysts.
    present_labels = _present_labels(pred_crop) | _present_labels(ref_crop)
    analyses_by_labels: dict[tuple[int, ...], _RegionAnalysis] = {}
    metrics: dict[str, float] = {}
    for region, labels in REGIONS.items():
        effective_labels = tuple(label for label in labels if label in present_labels)
        if effective_labels not in analyses_by_labels:
            analyses_by_labels[effective_labels] = _analyse_region(
                pred_crop, ref_crop, effective_labels, spacing
            )
        analysis = analyses_by_labels[effective_labels]
        metrics[f"dice_{region}"] = analysis.dice
        metrics[f"sd_{region}"] = _surface_dice_of_surfaces(
            analysis.pred_surface, analysis.ref_surface, spacing, TOLERANCES_MM[region]
        )

    return {column: metrics[column] for column in METRIC_COLUMNS}


DICE_COLUMNS: tuple[str, ...] = tuple(column for column in METRIC_COLUMNS if column.startswith("dice_"))
SURFACE_DICE_COLUMNS: tuple[str, ...] = tuple(column for column in METRIC_COLUMNS if column.startswith("sd_"))


@dataclass(frozen=True)
class TeamRanking:
    """One team's place on a KiTS23-style leaderboard.

    Attributes:
        team: team or run name.
        mean_dice: mean Dice over all cases and regions.
        mean_surface_dice: mean Surface Dice over all cases and regions.
        dice_rank: rank by ``mean_dice``, 1 for the highest; tied teams share the
            mean of the ranks they span (two teams tied for first both get 1.5).
        surface_dice_rank: rank by ``mean_surface_dice``, with the same tie rule.
        aggregate_rank: mean of ``dice_rank`` and ``surface_dice_rank``; lower is better.
        place: position on the leaderboard from 1. Teams with equal aggregate
            ranks share the best place, and the next place skips (1, 1, 3).
    """

    team: str
    mean_dice: float
    mean_surface_dice: float
    dice_rank: float
    surface_dice_rank: float
    aggregate_rank: float
    place: int


def rank_descending(scores: Sequence[float]) -> list[float]:
    """Rank scores from 1 for the highest, giving tied scores the mean of their ranks.

    Raises:
        ValueError: if a score is NaN.
    """
    values = np.asarray(scores, dtype=np.float64)
    if np.isnan(values).any():
        raise ValueError(f"cannot rank NaN scores: {list(scores)}")
    return [float(rank) for rank in rankdata(-values, method="average")]


def rank_teams(case_metrics_by_team: Mapping[str, Sequence[Mapping[str, float]]]) -> list[TeamRanking]:
    """Rank teams the way the KiTS23 challenge ranks its leaderboard.

    Each team gets its mean Dice and its mean Surface Dice over all cases and the
    three regions, a rank on each of the two means, and the mean of both ranks as
    its aggregate rank. Every team should be scored on the same cases, a missing
    prediction counting as an empty one.

    Args:
        case_metrics_by_team: team name to its per-case metrics, each a mapping
            with at least the :data:`METRIC_COLUMNS` keys.

    Returns:
        One entry per team, best first: sorted by aggregate rank, then by team name.

    Raises:
        ValueError: if no team is given, a team has no case, or a case lacks a
            metric column.
    """
    if not case_metrics_by_team:
        raise ValueError("rank_teams needs at least one team, got none")
    teams = list(case_metrics_by_team)
    mean_dice = [_mean_over_cases(case_metrics_by_team[team], DICE_COLUMNS, team) for team in teams]
    mean_surface_dice = [
        _mean_over_cases(case_metrics_by_team[team], SURFACE_DICE_COLUMNS, team) for team in teams
    ]

    dice_ranks = rank_descending(mean_dice)
    surface_dice_ranks = rank_descending(mean_surface_dice)
    aggregate_ranks = [(first + second) / 2 for first, second in zip(dice_ranks, surface_dice_ranks)]
    places = rankdata(aggregate_ranks, method="min")

    rankings = [
        TeamRanking(
            team=team,
            mean_dice=mean_dice[index],
            mean_surface_dice=mean_surface_dice[index],
            dice_rank=dice_ranks[index],
            surface_dice_rank=surface_dice_ranks[index],
            aggregate_rank=aggregate_ranks[index],
            place=int(places[index]),
        )
        for index, team in enumerate(teams)
    ]
    return sorted(rankings, key=lambda ranking: (ranking.aggregate_rank, ranking.team))


def _mean_over_cases(rows: Sequence[Mapping[str, float]], columns: Sequence[str], team: str) -> float:
    if not rows:
        raise ValueError(f"team {team} has no case to rank")
    missing = sorted({column for row in rows for column in columns if column not in row})
    if missing:
        raise ValueError(f"team {team}: case metrics lack the columns {missing}; pass compute_case_metrics output")
    return float(np.mean([[float(row[column]) for column in columns] for row in rows]))


# Input checks.


def _check_same_shape(pred_shape: tuple[int, ...], ref_shape: tuple[int, ...]) -> None:
    if pred_shape != ref_shape:
        raise ValueError(
            f"prediction shape {pred_shape} differs from reference shape {ref_shape}. "
            "Resample the prediction onto the reference grid first"
        )


def _check_3d(shape: tuple[int, ...]) -> None:
    if len(shape) != 3:
        raise ValueError(f"expected a 3D array, got shape {shape} with {len(shape)} dimensions")


def _validated_spacing(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    spacing = tuple(float(value) for value in spacing_mm)
    if len(spacing) != 3 or not all(math.isfinite(value) and value > 0 for value in spacing):
        raise ValueError(
            f"spacing_mm must be 3 positive finite voxel sizes in mm, got {tuple(spacing_mm)}"
        )
    return spacing  # type: ignore[return-value]


def _validated_tolerance(tolerance_mm: float) -> float:
    tolerance = float(tolerance_mm)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance_mm must be a finite distance >= 0 mm, got {tolerance_mm}")
    return tolerance


def _validate_labels_and_find_bounds(
    volume: np.ndarray, name: str
) -> tuple[tuple[int, int], ...] | None:
    """Validate the labels of a volume and return its nonzero bounds.

    The bounds are inclusive (first, last) index pairs per axis, or None for an
    all-zero volume. The per-slice maxima serve both purposes, so the volume is
    read once. Raises ValueError for values outside {0, 1, 2, 3}.
    """
    if volume.dtype == bool:
        return _nonzero_bounds(volume)

    view, is_transposed = _c_ordered_view(volume)
    slices = view.reshape(view.shape[0], -1)
    slice_max = slices.max(axis=1)
    if _has_invalid_labels(view, slices, slice_max):
        raise ValueError(_invalid_labels_message(volume, name))

    bounds = _bounds_from_slab(view, np.flatnonzero(slice_max > 0))
    return _undo_transpose(bounds, is_transposed)


def _has_invalid_labels(volume: np.ndarray, slices: np.ndarray, slice_max: np.ndarray) -> bool:
    if np.any(slice_max > VALID_LABELS[-1]):
        return True
    if volume.dtype.kind != "u" and np.any(slices.min(axis=1) < VALID_LABELS[0]):
        return True
    if volume.dtype.kind == "f":
        # NaN compares unequal to its floor, so it counts as a fractional label.
        return bool(np.any(volume != np.floor(volume)))
    return False


def _invalid_labels_message(volume: np.ndarray, name: str) -> str:
    valid = np.zeros(volume.shape, dtype=bool)
    for label in VALID_LABELS:
        valid |= volume == label
    invalid_values = np.unique(volume[~valid])
    listed = ", ".join(str(value) for value in invalid_values[:_MAX_VALUES_IN_MESSAGE].tolist())
    hidden_count = invalid_values.size - _MAX_VALUES_IN_MESSAGE
    more = f" and {hidden_count} more" if hidden_count > 0 else ""
    return (
        f"{name} contains labels outside {{0, 1, 2, 3}}: {listed}{more}. "
        "Map them to 0 background, 1 kidney, 2 tumor or 3 cyst"
    )


# Cropping.


def _nonzero_bounds(mask: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """Return inclusive (first, last) nonzero indices per axis, or None if all zero."""
    view, is_transposed = _c_ordered_view(mask)
    nonzero_slices = np.flatnonzero(view.reshape(view.shape[0], -1).any(axis=1))
    return _undo_transpose(_bounds_from_slab(view, nonzero_slices), is_transposed)


def _c_ordered_view(volume: np.ndarray) -> tuple[np.ndarray, bool]:
    """Return a view whose last axis is contiguous, and whether it is the transpose.

    NIfTI stores voxels in Fortran order, so nibabel returns Fortran-ordered arrays,
    and reshaping those by slice would copy the whole volume.
    """
    if volume.flags.f_contiguous and not volume.flags.c_contiguous:
        return volume.T, True
    return volume, False


def _undo_transpose(
    bounds: tuple[tuple[int, int], ...] | None, is_transposed: bool
) -> tuple[tuple[int, int], ...] | None:
    if bounds is None or not is_transposed:
        return bounds
    return bounds[::-1]


def _bounds_from_slab(
    volume: np.ndarray, nonzero_slices: np.ndarray
) -> tuple[tuple[int, int], ...] | None:
    """Return the nonzero bounds of a volume without negative values, given its nonzero slices."""
    if nonzero_slices.size == 0:
        return None
    first_slice, last_slice = int(nonzero_slices[0]), int(nonzero_slices[-1])

    # Only the slab of slices with foreground is searched for the in-plane bounds.
    footprint = volume[first_slice : last_slice + 1].max(axis=0) != 0
    rows = np.flatnonzero(footprint.any(axis=1))
    columns = np.flatnonzero(footprint.any(axis=0))
    return (
        (first_slice, last_slice),
        (int(rows[0]), int(rows[-1])),
        (int(columns[0]), int(columns[-1])),
    )


def _union_bounds(
    first: tuple[tuple[int, int], ...] | None, second: tuple[tuple[int, int], ...] | None
) -> tuple[tuple[int, int], ...] | None:
    if first is None:
        return second
    if second is None:
        return first
    return tuple((min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(first, second))


def _crop_margin(spacing: tuple[float, float, float], tolerance: float) -> int:
    """Return the zero margin in voxels that every tolerance neighbourhood fits in.

    A surfel cube starts at most one voxel before the foreground, and its
    neighbourhood reaches ``floor(tolerance / spacing)`` cubes further on each axis.
    """
    return max(math.floor(tolerance / step) for step in spacing) + 1


def _crop_with_margin(
    volume: np.ndarray, bounds: tuple[tuple[int, int], ...], margin: int
) -> np.ndarray:
    """Copy the bounded block of ``volume`` into a zero array with ``margin`` voxels on each side."""
    block = volume[tuple(slice(first, last + 1) for first, last in bounds)]
    crop = np.zeros(tuple(size + 2 * margin for size in block.shape), dtype=volume.dtype)
    crop[tuple(slice(margin, margin + size) for size in block.shape)] = block
    return crop


# Dice and surfaces of a region.


def _dice_from_counts(pred_count: int, ref_count: int, overlap_count: int) -> float:
    if pred_count + ref_count == 0:
        return 1.0
    return 2.0 * overlap_count / (pred_count + ref_count)


def _present_labels(crop: np.ndarray) -> set[int]:
    return {label for label in VALID_LABELS[1:] if np.any(crop == label)}


# Surfaces and Surface Dice.


@dataclass(frozen=True)
class _Surface:
    """Surfels of one mask on the cube grid of a crop."""

    is_surfel: np.ndarray  # bool, cube grid shape (crop shape minus 1 per axis)
    indices: np.ndarray  # flat indices of the surfel cubes into is_surfel
    areas_mm2: np.ndarray  # surface area inside each surfel cube, in mm^2

    @property
    def is_empty(self) -> bool:
        return self.indices.size == 0


@dataclass(frozen=True)
class _RegionAnalysis:
    """Dice and surfels of one region in a prediction and a reference crop."""

    dice: float
    pred_surface: _Surface
    ref_surface: _Surface


def _analyse_region(
    pred_crop: np.ndarray,
    ref_crop: np.ndarray,
    labels: tuple[int, ...],
    spacing: tuple[float, float, float],
) -> _RegionAnalysis:
    is_in_region = np.zeros(256, dtype=bool)
    is_in_region[list(labels)] = True
    pred_mask = is_in_region[pred_crop]
    ref_mask = is_in_region[ref_crop]
    region_dice = _dice_from_counts(
        int(np.count_nonzero(pred_mask)),
        int(np.count_nonzero(ref_mask)),
        int(np.count_nonzero(pred_mask & ref_mask)),
    )

    bounds = _union_bounds(_nonzero_bounds(pred_mask), _nonzero_bounds(ref_mask))
    if bounds is None:
        empty_surface = _extract_surface(np.zeros((2, 2, 2), dtype=bool), spacing)
        return _RegionAnalysis(dice=region_dice, pred_surface=empty_surface, ref_surface=empty_surface)

    # Shrink to the region itself: the tumor is much smaller than both kidneys.
    margin = _crop_margin(spacing, max(TOLERANCES_MM.values()))
    window = tuple(slice(max(first - margin, 0), last + margin + 1) for first, last in bounds)
    pred_mask = pred_mask[window]
    ref_mask = ref_mask[window]
    return _RegionAnalysis(
        dice=region_dice,
        pred_surface=_extract_surface(pred_mask, spacing),
        ref_surface=_extract_surface(ref_mask, spacing),
    )


def _extract_surface(mask: np.ndarray, spacing: tuple[float, float, float]) -> _Surface:
    """Find the surfels of a mask that has a zero margin of at least one voxel."""
    codes = _neighbour_codes(mask)
    # Subtracting 1 in uint8 wraps code 0 to 255 and code 255 to 254, so the
    # surfel cubes (codes 1-254) are exactly those below 254.
    is_surfel = (codes - np.uint8(1)) < 254
    indices = np.flatnonzero(is_surfel)
    areas_mm2 = _surfel_area_table(spacing)[codes.ravel()[indices]]
    return _Surface(is_surfel=is_surfel, indices=indices, areas_mm2=areas_mm2)


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Encode each 2 x 2 x 2 cube of voxels as an 8-bit code.

    Cube (i, j, k) covers voxels i..i+1, j..j+1, k..k+1, and voxel (i + a, j + b, k + c)
    sets bit ``7 - (4a + 2b + c)``. This is the encoding of the surface-distance
    package's lookup tables, built here axis by axis in three passes.
    """
    bits = mask.view(np.uint8) if mask.dtype == bool else (mask != 0).view(np.uint8)
    pairs = bits[:, :, :-1] << 1
    pairs += bits[:, :, 1:]
    quads = pairs[:, :-1, :] << 2
    quads += pairs[:, 1:, :]
    codes = quads[:-1] << 4
    codes += quads[1:]
    return codes


def _surface_dice_of_surfaces(
    pred_surface: _Surface,
    ref_surface: _Surface,
    spacing: tuple[float, float, float],
    tolerance: float,
) -> float:
    if pred_surface.is_empty and ref_surface.is_empty:
        return 1.0
    if pred_surface.is_empty or ref_surface.is_empty:
        return 0.0

    offsets = _neighbourhood_offsets(spacing, tolerance, pred_surface.is_surfel.shape)
    pred_overlap = _area_within_tolerance(pred_surface, ref_surface, offsets)
    ref_overlap = _area_within_tolerance(ref_surface, pred_surface, offsets)
    total_area = pred_surface.areas_mm2.sum() + ref_surface.areas_mm2.sum()
    return float((pred_overlap + ref_overlap) / total_area)


def _area_within_tolerance(source: _Surface, target: _Surface, offsets: np.ndarray) -> float:
    """Sum the areas of the source surfels that have a target surfel among the offsets.

    Offsets come nearest first, so most surfels are settled by the first few and
    drop out of the later lookups.
    """
    target_is_surfel = target.is_surfel.ravel()
    indices = source.indices
    areas = source.areas_mm2
    covered_area = 0.0
    for offset in offsets:
        is_near = target_is_surfel[indices + offset]
        covered_area += float(areas[is_near].sum())
        indices = indices[~is_near]
        areas = areas[~is_near]
        if indices.size == 0:
            break
    return covered_area


def _neighbourhood_offsets(
    spacing: tuple[float, float, float], tolerance: float, grid_shape: tuple[int, ...]
) -> np.ndarray:
    """Return flat index offsets of all cubes within the tolerance, nearest first.

    The distance is computed as scipy's ``distance_transform_edt`` computes it
    (scale each index step by the spacing, square, sum over the axes in order,
    square root), so a surfel exactly at the tolerance is decided the same way.
    """
    radii = [math.floor(tolerance / step) for step in spacing]
    steps = np.meshgrid(*(np.arange(-radius, radius + 1) for radius in radii), indexing="ij")
    squared = np.zeros(steps[0].shape, dtype=np.float64)
    for axis_steps, step_mm in zip(steps, spacing):
        squared += (axis_steps * step_mm) ** 2
    distance_mm = np.sqrt(squared).ravel()

    strides = (grid_shape[1] * grid_shape[2], grid_shape[2], 1)
    flat_offsets = np.zeros(distance_mm.shape, dtype=np.int64)
    for axis_steps, stride in zip(steps, strides):
        flat_offsets += axis_steps.ravel().astype(np.int64) * stride

    within = distance_mm <= tolerance
    order = np.argsort(distance_mm[within], kind="stable")
    return flat_offsets[within][order]


@functools.lru_cache(maxsize=32)
def _surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """Return the surface area in mm^2 inside a cube for each of the 256 neighbour codes.

    Each triangle's normal has the triangle's area as its length in voxel units.
    Scaling a triangle by the spacing scales the normal component along an axis
    by the product of the other two spacings.
    """
    normals = _marching_cubes_normals()
    face_scale = np.array(
        [spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1]]
    )
    areas = np.linalg.norm(normals * face_scale, axis=-1).sum(axis=-1)
    areas.setflags(write=False)
    return areas


@functools.cache
def _marching_cubes_normals() -> np.ndarray:
    """Return the triangle normals per neighbour code, shape (256, 4, 3), in voxel units.

    The table is the one of DeepMind's surface-distance package, which the KiTS23
    evaluation uses, as MONAI ships it.
    """
    # NOTE: _get_neighbour_code_to_normals_table is private in MONAI 1.6.1. The public
    # create_table_neighbour_code_to_surface_area computes the areas in float32
    # (up to 8e-8 mm^2 off), so the exact normals (multiples of 1/8) are taken and
    # the areas computed here in float64. Importing MONAI takes several seconds once.
    from monai.metrics.utils import _get_neighbour_code_to_normals_table

    normals = np.asarray(_get_neighbour_code_to_normals_table().cpu().numpy(), dtype=np.float64)
    normals.setflags(write=False)
    return normals
