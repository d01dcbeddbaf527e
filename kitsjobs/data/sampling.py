"""Class-balanced patch sampling that reads memory maps and resumes exactly.

Each patch is a pure function of (seed, step, index in batch), so a job resumed at step N
draws the same patches as an uninterrupted run would at step N. A patch is centred on a
voxel of a class drawn with ``class_ratios`` (background, kidney, tumor, cyst); a case that
lacks a class shares that class's probability among the classes it has. Only the patch's
window of a memory-mapped volume is read. Once a batch is copied, the pages it touched are
dropped from the process's resident memory, and the OS keeps them in its page cache. The
resident memory of a long run thus stays near one batch instead of growing to the dataset's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kitsjobs.data.cache import FOREGROUND_CLASSES, release_mapped_pages, sample_class_points
from kitsjobs.data.volumes import Volume

# Foreground voxel coordinates kept per class and case to centre patches on; a uniform
# sample is enough to cover every structure and bounds memory on large cases.
MAX_POINTS_PER_CLASS = 10000
NUM_CLASSES = 1 + len(FOREGROUND_CLASSES)


def check_class_ratios(class_ratios: Sequence[float]) -> np.ndarray:
    """Return the ratios as probabilities summing to 1.

    Raises:
        ValueError: not four non-negative numbers with a positive sum.
    """
    ratios = np.asarray(list(class_ratios), dtype=np.float64)
    if ratios.shape != (NUM_CLASSES,) or (ratios < 0).any() or ratios.sum() <= 0:
        raise ValueError(
            f"class_ratios={list(class_ratios)} is invalid; give {NUM_CLASSES} non-negative weights "
            "(background, kidney, tumor, cyst) with a positive sum, e.g. [0.4, 0.2, 0.2, 0.2]"
        )
    return ratios / ratios.sum()


class PatchSampler:
    """Draw training batches of (image, label) patches from labelled volumes.

    Args:
        volumes: cases with labels; arrays may be memory maps (float16 images are converted
            per patch). A volume's ``class_points`` are used when present, otherwise they are
            sampled from its label once, here.
        patch_size: (z, y, x) in voxels; a volume smaller than this is zero-padded, centred.
        class_ratios: weights of centring a patch on a random voxel (background) or on a
            kidney, tumor or cyst voxel.
        seed: base seed of the sampling.

    Raises:
        ValueError: no volume, a volume without labels, or invalid ratios or patch size.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        patch_size: Sequence[int],
        class_ratios: Sequence[float],
        seed: int,
    ) -> None:
        if not volumes:
            raise ValueError("PatchSampler needs at least one volume")
        unlabeled = [v.name for v in volumes if v.label is None]
        if unlabeled:
            raise ValueError(f"training volumes need labels; these have none: {', '.join(unlabeled)}")
        self.patch_size = tuple(int(s) for s in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size={list(patch_size)} is invalid; give three positive sizes (z, y, x)")
        self.ratios = check_class_ratios(class_ratios)
        self.volumes = list(volumes)
        self.seed = seed
        self._points = [self._points_by_class(v, seed) for v in self.volumes]
        self._case_ratios = [self._ratios_for(points) for points in self._points]

    @staticmethod
    def _points_by_class(volume: Volume, seed: int) -> dict[int, np.ndarray]:
        points = volume.class_points
        if points is None:
            points, _ = sample_class_points(volume.label, MAX_POINTS_PER_CLASS, seed)  # type: ignore[arg-type]
        return {cls: points[points[:, 0] == cls, 1:] for cls in FOREGROUND_CLASSES}

    def _ratios_for(self, points: dict[int, np.ndarray]) -> np.ndarray:
        present = np.array([True] + [len(points[cls]) > 0 for cls in FOREGROUND_CLASSES])
        ratios = np.where(present, self.ratios, 0.0)
        if ratios.sum() == 0:
            # Only background is present and its weight is zero: centre anywhere.
            ratios[0] = 1.0
        return ratios / ratios.sum()

    def sample(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the batch of ``step``: images (B, 1, z, y, x) float32, labels (B, 1, z, y, x) int64."""
        images = np.zeros((batch_size, 1, *self.patch_size), dtype=np.float32)
        labels = np.zeros((batch_size, 1, *self.patch_size), dtype=np.int64)
        case_indices = set()
        for index in range(batch_size):
            rng = np.random.default_rng([self.seed, step, index])
            case_indices.add(self._draw_patch(rng, images[index, 0], labels[index, 0]))
        for case_index in case_indices:
            volume = self.volumes[case_index]
            release_mapped_pages(volume.image)
            release_mapped_pages(volume.label)
        return images, labels

    def _draw_patch(self, rng: np.random.Generator, image_out: np.ndarray, label_out: np.ndarray) -> int:
        """Copy one patch into the output arrays; return the index of the case it came from."""
        case_index = int(rng.integers(len(self.volumes)))
        volume = self.volumes[case_index]
        shape = volume.image.shape
        cls = int(rng.choice(NUM_CLASSES, p=self._case_ratios[case_index]))
        if cls == 0:
            centre = np.array([rng.integers(s) for s in shape])
        else:
            points = self._points[case_index][cls]
            centre = points[int(rng.integers(len(points)))]

        source, target = [], []
        for c, p, s in zip(centre, self.patch_size, shape):
            if s >= p:
                start = int(np.clip(int(c) - p // 2, 0, s - p))
                source.append(slice(start, start + p))
                target.append(slice(0, p))
            else:
                offset = (p - s) // 2
                source.append(slice(0, s))
                target.append(slice(offset, offset + s))
        image_out[tuple(target)] = volume.image[tuple(source)]
        label_out[tuple(target)] = volume.label[tuple(source)]  # type: ignore[index]
        return case_index
