from __future__ import annotations

import numpy as np
import pytest

from kitsjobs.data.sampling import PatchSampler
from kitsjobs.data.volumes import Volume, scale_intensity


def _volume(shape=(10, 40, 40), name="case") -> Volume:
    label = np.zeros(shape, np.uint8)
    label[4:6, 30:33, 5:8] = 2
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    return Volume(name, image, label, np.eye(4), (3.0, 1.0, 1.0))


def test_foreground_ratio_one_always_hits_foreground() -> None:
    sampler = PatchSampler([_volume()], (4, 8, 8), foreground_ratio=1.0, seed=0)
    for step in range(20):
        _, labels = sampler.sample(step, batch_size=2)
        assert labels.shape == (2, 1, 4, 8, 8)
        assert (labels.reshape(2, -1) > 0).any(axis=1).all()


def test_patch_larger_than_volume_is_padded() -> None:
    volume = _volume(shape=(5, 12, 12))
    volume.label[:] = 0
    volume.label[2, 6, 6] = 1
    sampler = PatchSampler([volume], (16, 16, 16), foreground_ratio=1.0, seed=0)
    images, labels = sampler.sample(0, batch_size=1)
    assert images.shape == (1, 1, 16, 16, 16)
    assert labels.sum() == 1
    assert np.count_nonzero(images) <= 5 * 12 * 12


def test_sampling_depends_only_on_seed_and_step() -> None:
    first = PatchSampler([_volume(), _volume(name="b")], (4, 8, 8), 0.5, seed=7)
    second = PatchSampler([_volume(), _volume(name="b")], (4, 8, 8), 0.5, seed=7)
    second.sample(0, 2)
    second.sample(1, 2)
    np.testing.assert_array_equal(first.sample(5, 2)[0], second.sample(5, 2)[0])
    assert not np.array_equal(first.sample(5, 2)[0], first.sample(6, 2)[0])


def test_bad_foreground_ratio_is_rejected() -> None:
    with pytest.raises(ValueError, match="foreground_ratio=1.5"):
        PatchSampler([_volume()], (4, 8, 8), foreground_ratio=1.5, seed=0)


def test_scale_intensity_clips_and_scales() -> None:
    hu = np.array([-1000, -200, 100, 400, 3000], dtype=np.int16)
    np.testing.assert_allclose(scale_intensity(hu, -200, 400), [0.0, 0.0, 0.5, 1.0, 1.0])
