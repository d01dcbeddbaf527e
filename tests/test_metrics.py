"""Tests of kitsjobs.metrics against the official KiTS23 values and hand-checked cases."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
from conftest import kits23_data_dir
from scipy import ndimage

from kitsjobs import metrics
from kitsjobs.metrics import (
    METRIC_COLUMNS,
    REGIONS,
    TOLERANCES_MM,
    compute_case_metrics,
    dice,
    surface_dice,
)

OFFICIAL_VALUE_TOLERANCE = 1e-6
SLOW_CASES = {"case_00151"}
DATA_DIR = kits23_data_dir()
needs_data = pytest.mark.skipif(
    DATA_DIR is None,
    reason="KiTS23 sample data not found: set KITSJOBS_KITS23_DATA to the folder with labels/",
)


def read_expected(prediction_set: str) -> list[dict[str, str]]:
    if DATA_DIR is None:
        return []
    with open(DATA_DIR / "expected" / f"{prediction_set}.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def expected_params(prediction_set: str) -> list[object]:
    params = []
    for row in read_expected(prediction_set):
        marks = [pytest.mark.slow] if row["case"] in SLOW_CASES else []
        params.append(pytest.param(prediction_set, row, id=f"{prediction_set}-{row['case']}", marks=marks))
    return params


def read_case(prediction_set: str, case: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    assert DATA_DIR is not None
    reference_image = nib.load(DATA_DIR / "labels" / f"{case}.nii.gz")
    prediction = np.asanyarray(nib.load(DATA_DIR / prediction_set / f"{case}.nii.gz").dataobj)
    reference = np.asanyarray(reference_image.dataobj)
    spacing_mm = tuple(float(zoom) for zoom in reference_image.header.get_zooms()[:3])
    return prediction, reference, spacing_mm


@needs_data
@pytest.mark.parametrize(
    ("prediction_set", "expected"), expected_params("annotator2") + expected_params("shifted")
)
def test_case_metrics_match_official(prediction_set: str, expected: dict[str, str]) -> None:
    prediction, reference, spacing_mm = read_case(prediction_set, expected["case"])

    result = compute_case_metrics(prediction, reference, spacing_mm)

    assert tuple(result) == METRIC_COLUMNS
    for column in METRIC_COLUMNS:
        expected_value = float(expected[column])
        assert result[column] == pytest.approx(expected_value, abs=OFFICIAL_VALUE_TOLERANCE), column


def box_mask(
    shape: tuple[int, int, int], start: tuple[int, int, int], size: tuple[int, int, int]
) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(first, first + length) for first, length in zip(start, size))] = True
    return mask


def test_dice_both_empty_is_one() -> None:
    empty = np.zeros((4, 5, 6), dtype=bool)
    assert dice(empty, empty) == 1.0


def test_dice_one_empty_is_zero() -> None:
    empty = np.zeros((4, 5, 6), dtype=bool)
    full = box_mask((4, 5, 6), (1, 1, 1), (2, 2, 2))
    assert dice(full, empty) == 0.0
    assert dice(empty, full) == 0.0


def test_dice_shifted_box() -> None:
    reference = box_mask((10, 10, 10), (2, 2, 2), (4, 4, 4))
    prediction = box_mask((10, 10, 10), (3, 2, 2), (4, 4, 4))
    # 48 shared voxels out of 64 + 64.
    assert dice(prediction, reference) == 0.75


def test_surface_dice_both_empty_is_one() -> None:
    empty = np.zeros((4, 5, 6), dtype=bool)
    assert surface_dice(empty, empty, (1.0, 1.0, 1.0), 1.0) == 1.0


def test_surface_dice_one_empty_is_zero() -> None:
    empty = np.zeros((6, 6, 6), dtype=bool)
    full = box_mask((6, 6, 6), (1, 1, 1), (3, 3, 3))
    assert surface_dice(full, empty, (1.0, 1.0, 1.0), 1.0) == 0.0
    assert surface_dice(empty, full, (1.0, 1.0, 1.0), 1.0) == 0.0


def test_surface_dice_identical_masks_is_one() -> None:
    mask = box_mask((8, 9, 10), (0, 2, 3), (5, 4, 7))
    assert surface_dice(mask, mask, (3.0, 0.7, 0.7), 0.0) == pytest.approx(1.0, abs=1e-12)


def test_surface_dice_anisotropic_shift() -> None:
    reference = box_mask((12, 12, 12), (3, 3, 3), (5, 5, 5))
    shifted_along_slices = box_mask((12, 12, 12), (4, 3, 3), (5, 5, 5))
    shifted_along_columns = box_mask((12, 12, 12), (3, 3, 4), (5, 5, 5))
    tolerance_mm = 0.9

    # Isotropic: the cube is symmetric, so both shifts score the same. The faces across
    # the shift move by 1 mm, beyond the tolerance.
    isotropic_slices = surface_dice(shifted_along_slices, reference, (1.0, 1.0, 1.0), tolerance_mm)
    isotropic_columns = surface_dice(shifted_along_columns, reference, (1.0, 1.0, 1.0), tolerance_mm)
    assert isotropic_slices == pytest.approx(isotropic_columns, abs=1e-12)
    assert isotropic_slices < 1.0

    # Every surfel moves by one voxel. Along columns (0.5 mm) that stays within the
    # tolerance. Along slices (2 mm) the faces across the slice axis fall outside, and
    # they weigh less than in the isotropic case because their surfels are 1 x 0.5 mm.
    spacing_mm = (2.0, 1.0, 0.5)
    anisotropic_columns = surface_dice(shifted_along_columns, reference, spacing_mm, tolerance_mm)
    anisotropic_slices = surface_dice(shifted_along_slices, reference, spacing_mm, tolerance_mm)
    assert anisotropic_columns == pytest.approx(1.0, abs=1e-12)
    assert anisotropic_slices < 1.0
    assert abs(anisotropic_slices - isotropic_slices) > 0.1
    expected = surface_dice_by_distance_transform(shifted_along_slices, reference, spacing_mm, tolerance_mm)
    assert anisotropic_slices == pytest.approx(expected, abs=1e-12)


def surface_dice_by_distance_transform(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_mm: tuple[float, ...], tolerance_mm: float
) -> float:
    """Compute Surface Dice the direct way: distance transforms over the whole cube grid."""
    weights = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])

    def codes_of(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask.astype(np.int32), 1)
        return ndimage.correlate(padded, weights, mode="constant", cval=0)

    pred_codes = codes_of(pred_mask)
    ref_codes = codes_of(ref_mask)
    pred_surfels = (pred_codes != 0) & (pred_codes != 255)
    ref_surfels = (ref_codes != 0) & (ref_codes != 255)
    if not pred_surfels.any() or not ref_surfels.any():
        return float(pred_surfels.any() == ref_surfels.any())

    distance_to_ref = ndimage.distance_transform_edt(~ref_surfels, sampling=spacing_mm)
    distance_to_pred = ndimage.distance_transform_edt(~pred_surfels, sampling=spacing_mm)
    area_table = metrics._surfel_area_table(tuple(float(step) for step in spacing_mm))
    pred_areas = area_table[pred_codes[pred_surfels]]
    ref_areas = area_table[ref_codes[ref_surfels]]
    pred_overlap = pred_areas[distance_to_ref[pred_surfels] <= tolerance_mm].sum()
    ref_overlap = ref_areas[distance_to_pred[ref_surfels] <= tolerance_mm].sum()
    return float((pred_overlap + ref_overlap) / (pred_areas.sum() + ref_areas.sum()))


def random_blob(rng: np.random.Generator, shape: tuple[int, int, int], level: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.random(shape), sigma=1.5)
    return noise > np.quantile(noise, level)


@pytest.mark.parametrize(
    "spacing_mm", [(1.0, 1.0, 1.0), (2.0, 0.7, 0.5), (0.4, 0.9, 1.3), (5.0, 0.39, 0.39)]
)
@pytest.mark.parametrize("tolerance_mm", [0.0, *TOLERANCES_MM.values(), 2.5])
def test_surface_dice_matches_distance_transform(
    spacing_mm: tuple[float, ...], tolerance_mm: float
) -> None:
    rng = np.random.default_rng(seed=7)
    for _ in range(3):
        # The blobs cover about 40 % of the array and touch its borders.
        reference = random_blob(rng, (14, 17, 15), 0.6)
        prediction = random_blob(rng, (14, 17, 15), 0.6)

        expected = surface_dice_by_distance_transform(prediction, reference, spacing_mm, tolerance_mm)

        result = surface_dice(prediction, reference, spacing_mm, tolerance_mm)

        assert result == pytest.approx(expected, abs=1e-12)


def test_area_table_matches_monai_public_table() -> None:
    torch_table = pytest.importorskip("monai.metrics.utils").create_table_neighbour_code_to_surface_area
    spacing_mm = (0.5, 0.8105469, 0.8105469)
    monai_areas = torch_table(spacing_mm)[0].cpu().numpy()
    assert np.allclose(metrics._surfel_area_table(spacing_mm), monai_areas, rtol=0, atol=1e-6)


def test_case_metrics_empty_volumes() -> None:
    empty = np.zeros((5, 6, 7), dtype=np.uint8)
    assert compute_case_metrics(empty, empty, (1.0, 1.0, 1.0)) == dict.fromkeys(METRIC_COLUMNS, 1.0)


def test_case_metrics_empty_prediction() -> None:
    reference = np.zeros((8, 8, 8), dtype=np.uint8)
    reference[2:6, 2:6, 2:6] = 1
    reference[3:5, 3:5, 3:5] = 2
    prediction = np.zeros_like(reference)

    result = compute_case_metrics(prediction, reference, (1.0, 1.0, 1.0))

    assert result == dict.fromkeys(METRIC_COLUMNS, 0.0)


def test_case_metrics_region_absent_in_both() -> None:
    reference = np.zeros((8, 8, 8), dtype=np.uint8)
    reference[2:6, 2:6, 2:6] = 1
    prediction = reference.copy()

    result = compute_case_metrics(prediction, reference, (1.0, 1.0, 1.0))

    # No tumor or cyst anywhere: every region scores 1, and mass and tumor are empty in both.
    assert result == dict.fromkeys(METRIC_COLUMNS, 1.0)


def test_case_metrics_regions_use_their_labels() -> None:
    reference = np.zeros((12, 12, 12), dtype=np.uint8)
    reference[2:10, 2:10, 2:10] = 1
    reference[3:6, 3:6, 3:6] = 2
    reference[6:9, 6:9, 6:9] = 3
    prediction = reference.copy()
    prediction[6:9, 6:9, 6:9] = 2  # the cyst predicted as tumor
    spacing_mm = (1.5, 0.8, 0.8)

    result = compute_case_metrics(prediction, reference, spacing_mm)

    assert result["dice_kidney_and_mass"] == 1.0
    assert result["dice_mass"] == 1.0
    assert result["dice_tumor"] == pytest.approx(2 * 27 / (54 + 27))
    assert result["sd_mass"] == pytest.approx(1.0, abs=1e-12)
    for region, labels in REGIONS.items():
        expected = surface_dice(
            np.isin(prediction, labels), np.isin(reference, labels), spacing_mm, TOLERANCES_MM[region]
        )
        assert result[f"sd_{region}"] == pytest.approx(expected, abs=1e-12), region


def test_case_metrics_memory_order_and_dtype() -> None:
    rng = np.random.default_rng(seed=3)
    shape = (10, 12, 14)
    reference = random_blob(rng, shape, 0.5).astype(np.uint8)
    reference[random_blob(rng, shape, 0.8)] = 2
    prediction = random_blob(rng, shape, 0.5).astype(np.uint8)
    prediction[random_blob(rng, shape, 0.9)] = 3
    spacing_mm = (2.0, 0.7, 0.9)
    expected = compute_case_metrics(prediction, reference, spacing_mm)

    fortran_result = compute_case_metrics(
        np.asfortranarray(prediction), np.asfortranarray(reference), spacing_mm
    )
    float_result = compute_case_metrics(
        prediction.astype(np.float32), reference.astype(np.int16), spacing_mm
    )

    assert fortran_result == expected
    assert float_result == expected


def test_shape_mismatch_names_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
        compute_case_metrics(np.zeros((4, 5, 6), np.uint8), np.zeros((4, 5, 7), np.uint8), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
        dice(np.zeros((4, 5, 6), bool), np.zeros((4, 5, 7), bool))
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
        surface_dice(np.zeros((4, 5, 6), bool), np.zeros((4, 5, 7), bool), (1.0, 1.0, 1.0), 1.0)


@pytest.mark.parametrize(
    ("dtype", "bad_value", "shown"),
    [(np.uint8, 7, "7"), (np.int16, -1, "-1"), (np.float32, 1.5, "1.5"), (np.float32, np.nan, "nan")],
)
def test_invalid_prediction_labels_named(dtype: type, bad_value: float, shown: str) -> None:
    reference = np.zeros((4, 5, 6), dtype=np.uint8)
    prediction = np.zeros((4, 5, 6), dtype=dtype)
    prediction[1, 2, 3] = bad_value

    with pytest.raises(ValueError, match=r"prediction contains labels outside \{0, 1, 2, 3\}") as error:
        compute_case_metrics(prediction, reference, (1.0, 1.0, 1.0))

    assert shown in str(error.value)


def test_invalid_reference_labels_named() -> None:
    reference = np.full((4, 5, 6), 4, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"reference contains labels outside .*: 4\."):
        compute_case_metrics(np.zeros((4, 5, 6), np.uint8), reference, (1.0, 1.0, 1.0))


@pytest.mark.parametrize(
    "spacing_mm", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0), (-1.0, 1.0, 1.0)]
)
def test_invalid_spacing_rejected(spacing_mm: tuple[float, ...]) -> None:
    volume = np.zeros((4, 5, 6), dtype=np.uint8)
    with pytest.raises(ValueError, match="spacing_mm must be 3 positive finite"):
        compute_case_metrics(volume, volume, spacing_mm)


def test_non_3d_volume_rejected() -> None:
    volume = np.zeros((4, 5), dtype=np.uint8)
    with pytest.raises(ValueError, match="expected a 3D array"):
        compute_case_metrics(volume, volume, (1.0, 1.0, 1.0))


def team_rows(dice_value: float, surface_dice_value: float, cases: int = 2) -> list[dict[str, float]]:
    row = {column: dice_value for column in METRIC_COLUMNS if column.startswith("dice_")}
    row.update({column: surface_dice_value for column in METRIC_COLUMNS if column.startswith("sd_")})
    return [dict(row) for _ in range(cases)]


def test_rank_teams_orders_by_aggregate_rank() -> None:
    rankings = metrics.rank_teams(
        {
            "low": team_rows(0.5, 0.5),
            "dice_first": team_rows(0.9, 0.6),
            "sd_first": team_rows(0.8, 0.7),
        }
    )

    assert [ranking.team for ranking in rankings] == ["dice_first", "sd_first", "low"]
    assert [ranking.dice_rank for ranking in rankings] == [1.0, 2.0, 3.0]
    assert [ranking.surface_dice_rank for ranking in rankings] == [2.0, 1.0, 3.0]
    assert [ranking.aggregate_rank for ranking in rankings] == [1.5, 1.5, 3.0]
    # Equal aggregate ranks share the place; the team name orders them.
    assert [ranking.place for ranking in rankings] == [1, 1, 3]
    assert rankings[0].mean_dice == pytest.approx(0.9)
    assert rankings[0].mean_surface_dice == pytest.approx(0.6)


def test_rank_teams_means_over_cases_and_regions() -> None:
    rows = team_rows(1.0, 1.0)
    rows[1] = {column: 0.0 for column in METRIC_COLUMNS}
    rows[1]["dice_tumor"] = 0.6

    (ranking,) = metrics.rank_teams({"only": rows})

    assert ranking.mean_dice == pytest.approx((3 * 1.0 + 0.6) / 6)
    assert ranking.mean_surface_dice == pytest.approx(0.5)
    assert ranking.place == 1


def test_rank_descending_ties_share_mean_rank() -> None:
    assert metrics.rank_descending([0.8, 0.9, 0.8, 0.1]) == [2.5, 1.0, 2.5, 4.0]


@pytest.mark.parametrize(
    ("teams", "message"),
    [
        ({}, "at least one team"),
        ({"empty": []}, "team empty has no case"),
        ({"partial": [{"dice_tumor": 1.0}]}, "team partial: case metrics lack the columns"),
    ],
    ids=["no-team", "no-case", "missing-column"],
)
def test_rank_teams_rejects_bad_input(teams: dict[str, list[dict[str, float]]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.rank_teams(teams)


def test_rank_descending_rejects_nan() -> None:
    with pytest.raises(ValueError, match="cannot rank NaN scores"):
        metrics.rank_descending([0.5, float("nan")])
