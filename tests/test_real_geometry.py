"""The whole chain on real KiTS23 geometry, through examples/real_geometry.sh."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitsjobs.metrics import METRIC_COLUMNS

REPO = Path(__file__).resolve().parents[1]
CASES = ("case_00061", "case_00257")


@pytest.mark.slow
def test_example_trains_predicts_and_scores_real_cases(kits23_data: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "real_geometry.sh"), str(kits23_data / "labels"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    for case in CASES:
        label = nib.load(kits23_data / "labels" / f"{case}.nii.gz")
        image = nib.load(tmp_path / "data" / case / "imaging.nii.gz")
        prediction = nib.load(tmp_path / "predictions" / f"{case}.nii.gz")
        assert image.shape == label.shape
        assert prediction.shape == label.shape
        np.testing.assert_allclose(prediction.affine, label.affine, atol=1e-5)
        assert nib.aff2axcodes(prediction.affine) == ("I", "P", "L")

    with (tmp_path / "scores.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["case"] for row in rows] == list(CASES)
    for row in rows:
        for column in METRIC_COLUMNS:
            assert 0.0 <= float(row[column]) <= 1.0
    assert (tmp_path / "run" / "metrics.json").exists()
