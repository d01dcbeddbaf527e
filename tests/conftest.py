"""Shared fixtures: the read-only KiTS23 sample data and small NIfTI cases."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def kits23_data_dir() -> Path | None:
    """Return the shared KiTS23 sample folder, or None when this checkout has none."""
    candidates = [os.environ.get("KITSJOBS_KITS23_DATA"), REPO.parent / "shared" / "data" / "kits23"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "labels").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def kits23_data() -> Path:
    """The KiTS23 reference segmentations (read only)."""
    path = kits23_data_dir()
    if path is None:
        pytest.skip("KiTS23 sample data not found: set KITSJOBS_KITS23_DATA to the folder with labels/")
    return path


def write_case(folder: Path, name: str, image: np.ndarray, label: np.ndarray | None,
               spacing_mm=(3.0, 1.5, 1.5)) -> None:
    """Write one KiTS23-layout case (imaging.nii.gz, segmentation.nii.gz) with a diagonal affine."""
    affine = np.diag([*spacing_mm, 1.0])
    case = folder / name
    case.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), case / "imaging.nii.gz")
    if label is not None:
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), case / "segmentation.nii.gz")


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """The local Slurm test cluster (tests/cluster/up.sh); returns cluster_status()'s summary.

    Skips the test with the reason when no usable cluster answers, or fails it when
    KITSJOBS_REQUIRE_SLURM=1 (as CI sets it).
    """
    from slurm_cluster import REQUIRE_SLURM_ENV, cluster_status

    usable, reason = cluster_status()
    if usable:
        return reason
    if os.environ.get(REQUIRE_SLURM_ENV) == "1":
        pytest.fail(f"{REQUIRE_SLURM_ENV}=1 but no usable Slurm cluster: {reason}", pytrace=False)
    pytest.skip(reason)
