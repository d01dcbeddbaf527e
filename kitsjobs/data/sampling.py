"""Patch sampling that guarantees foreground patches and resumes exactly.

Each patch is a pure function of (seed, step, index in batch), so a job resumed
at step N draws the same patches as an uninterrupted run would at step N.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import SpatialPad

from kitsjobs.data.volumes import Volume

# Foreground voxel coordinates kept per case to centre patches on; a random
# subset is enough to cover every structure and bounds memory on large cases.
MAX_FOREGROUND_POINTS = 20000


class PatchSampler:
    """Draw training batches of (image, label) patches from loaded volumes.

    Args:
        volumes: cases with labels.
        patch_size: (z, y, x) in voxels; volumes smaller than this are padded.
        foreground_ratio: fraction of patches centred on a voxel with label > 0.
        seed: base seed of the sampling.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        patch_size: Sequence[int],
        foreground_ratio: float,
        seed: int,
    ) -> None:
        if not volumes:
            raise ValueError("PatchSampler needs at least one volume")
        if not 0.0 <= foreground_ratio <= 1.0:
            raise ValueError(f"foreground_ratio={foreground_ratio} must be within [0, 1]")
        self.volumes = list(volumes)
        self.patch_size = tuple(int(s) for s in patch_size)
        self.foreground_ratio = foreground_ratio
        self.seed = seed
        self._pad = SpatialPad(spatial_size=self.patch_size, mode="constant")
        self._foreground = [self._foreground_points(v, seed) for v in self.volumes]

    @staticmethod
    def _foreground_points(volume: Volume, seed: int) -> np.ndarray:
        assert volume.label is not None, "training volumes carry labels"
        points = np.argwhere(volume.label > 0)
        if len(points) > MAX_FOREGROUND_POINTS:
            rng = np.random.default_rng([seed, len(points)])
            points = points[rng.choice(len(points), MAX_FOREGROUND_POINTS, replace=False)]
        return points

    def sample(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the batch of ``step``: images (B, 1, z, y, x) float32, labels (B, 1, z, y, x) int64."""
        images, labels = [], []
        for index in range(batch_size):
            rng = np.random.default_rng([self.seed, step, index])
            image, label = self._draw_patch(rng)
            images.append(image)
            labels.append(label)
        return np.stack(images), np.stack(labels)

    def _draw_patch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        case_index = int(rng.integers(len(self.volumes)))
        volume = self.volumes[case_index]
        points = self._foreground[case_index]
        shape = volume.image.shape

        if len(points) and rng.random() < self.foreground_ratio:
            centre = points[int(rng.integers(len(points)))]
        else:
            centre = np.array([rng.integers(s) for s in shape])

        start = [
            int(np.clip(c - p // 2, 0, max(s - p, 0)))
            for c, p, s in zip(centre, self.patch_size, shape)
        ]
        window = tuple(slice(b, b + p) for b, p in zip(start, self.patch_size))
        image = self._pad(volume.image[window][None])
        label = self._pad(volume.label[window][None])  # type: ignore[index]
        return np.asarray(image, dtype=np.float32), np.asarray(label, dtype=np.int64)
