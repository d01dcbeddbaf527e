from __future__ import annotations

import sys

import numpy as np
import pytest

from kitsjobs.data.cache import release_mapped_pages
from kitsjobs.data.sampling import PatchSampler, check_class_ratios
from kitsjobs.data.volumes import Volume, scale_intensity


def _volume(shape=(10, 40, 40), name="case", cyst: bool = True) -> Volume:
    label = np.zeros(shape, np.uint8)
    label[1:9, 2:20, 2:20] = 1
    label[4:6, -8:-5, 5:8] = 2
    if cyst:
        label[7, shape[1] - 6, shape[2] - 6] = 3
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    return Volume(name, image, label, np.eye(4), (3.0, 1.0, 1.0))


def _centre_labels(labels: np.ndarray) -> np.ndarray:
    _, _, z, y, x = labels.shape
    return labels[:, 0, z // 2, y // 2, x // 2]


def test_tumor_only_ratio_centres_on_tumor() -> None:
    sampler = PatchSampler([_volume()], (3, 7, 7), class_ratios=[0, 0, 1, 0], seed=0)
    for step in range(20):
        _, labels = sampler.sample(step, batch_size=2)
        assert labels.shape == (2, 1, 3, 7, 7)
        assert (_centre_labels(labels) == 2).all()


def test_class_ratios_balance_classes() -> None:
    sampler = PatchSampler([_volume()], (3, 7, 7), class_ratios=[0, 1, 1, 1], seed=3)
    centres = np.concatenate([_centre_labels(sampler.sample(step, 4)[1]) for step in range(150)])
    fractions = [np.mean(centres == cls) for cls in (1, 2, 3)]
    # 600 draws with p = 1/3 each: a standard deviation of 0.019.
    for fraction in fractions:
        assert abs(fraction - 1 / 3) < 0.08


def test_missing_class_goes_to_present_ones() -> None:
    sampler = PatchSampler([_volume(cyst=False)], (3, 7, 7), class_ratios=[0, 0, 0, 1], seed=0)
    centres = np.concatenate([_centre_labels(sampler.sample(step, 2)[1]) for step in range(10)])
    # Without a cyst, the cyst's weight falls to background, the only other class with weight.
    assert not (centres == 3).any()
    assert sampler._case_ratios[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_patch_larger_than_volume_is_padded() -> None:
    # 29 slices at 5 mm against a 64-slice patch, as in KiTS23 case_00061.
    volume = _volume(shape=(29, 12, 12))
    volume.label[:] = 0
    volume.label[2, 6, 6] = 1
    sampler = PatchSampler([volume], (64, 16, 16), class_ratios=[0, 1, 0, 0], seed=0)
    images, labels = sampler.sample(0, batch_size=1)
    assert images.shape == (1, 1, 64, 16, 16)
    assert labels.sum() == 1
    assert np.count_nonzero(images) == 29 * 12 * 12
    assert labels[0, 0, (64 - 29) // 2 + 2, 2 + 6, 2 + 6] == 1


def test_padded_sampling_is_deterministic() -> None:
    volume = _volume(shape=(29, 40, 40))
    first = PatchSampler([volume], (64, 16, 16), [0.4, 0.2, 0.2, 0.2], seed=5)
    second = PatchSampler([volume], (64, 16, 16), [0.4, 0.2, 0.2, 0.2], seed=5)
    second.sample(0, 3)
    for kind in range(2):
        np.testing.assert_array_equal(first.sample(9, 3)[kind], second.sample(9, 3)[kind])


def test_sampling_depends_only_on_seed_and_step() -> None:
    first = PatchSampler([_volume(), _volume(name="b")], (4, 8, 8), [0.5, 0.5, 0, 0], seed=7)
    second = PatchSampler([_volume(), _volume(name="b")], (4, 8, 8), [0.5, 0.5, 0, 0], seed=7)
    second.sample(0, 2)
    second.sample(1, 2)
    np.testing.assert_array_equal(first.sample(5, 2)[0], second.sample(5, 2)[0])
    assert not np.array_equal(first.sample(5, 2)[0], first.sample(6, 2)[0])


def test_memory_map_patches_equal_in_memory(tmp_path) -> None:
    volume = _volume(shape=(20, 30, 30))
    np.save(tmp_path / "image.npy", volume.image.astype(np.float16))
    np.save(tmp_path / "label.npy", volume.label)
    mapped = Volume("case", np.load(tmp_path / "image.npy", mmap_mode="r"),
                    np.load(tmp_path / "label.npy", mmap_mode="r"), np.eye(4), (3.0, 1.0, 1.0))
    in_memory = Volume("case", volume.image.astype(np.float16).astype(np.float32), volume.label,
                       np.eye(4), (3.0, 1.0, 1.0))
    a = PatchSampler([mapped], (8, 16, 16), [0.4, 0.2, 0.2, 0.2], seed=1).sample(3, 2)
    b = PatchSampler([in_memory], (8, 16, 16), [0.4, 0.2, 0.2, 0.2], seed=1).sample(3, 2)
    assert a[0].dtype == np.float32
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def _file_backed_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("RssFile is missing from /proc/self/status")


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")


@linux_only
def test_sampling_releases_pages_of_memory_maps(tmp_path) -> None:
    shape = (64, 256, 512)  # 16 MiB of float16, 8 MiB of labels
    image = np.lib.format.open_memmap(tmp_path / "image.npy", mode="w+", dtype=np.float16, shape=shape)
    image[:] = 0.5
    label = np.lib.format.open_memmap(tmp_path / "label.npy", mode="w+", dtype=np.uint8, shape=shape)
    label[:, 100:140, 200:260] = 1
    del image, label
    mapped = Volume("case", np.load(tmp_path / "image.npy", mmap_mode="r"),
                    np.load(tmp_path / "label.npy", mmap_mode="r"), np.eye(4), (1.0, 1.0, 1.0))

    float(mapped.image.astype(np.float32).sum())  # reads every page of the image
    before = _file_backed_resident_bytes()
    sampler = PatchSampler([mapped], (16, 32, 32), [0.5, 0.5, 0, 0], seed=0)
    images, labels = sampler.sample(0, batch_size=2)
    after = _file_backed_resident_bytes()

    assert (images == 0.5).all()
    assert labels.any()
    # The 16 MiB read before sampling are no longer counted in this process's resident memory.
    assert before - after > 12 * 2**20


def test_release_leaves_writable_arrays_alone(tmp_path) -> None:
    array = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.uint8, shape=(4096,))
    array[:] = 7
    release_mapped_pages(array)
    release_mapped_pages(np.zeros(3))
    release_mapped_pages(None)
    assert (array == 7).all()


@pytest.mark.parametrize("ratios", [[1.5, -1, 0, 0], [0, 0, 0, 0], [1, 1, 1]])
def test_bad_class_ratios_are_rejected(ratios) -> None:
    with pytest.raises(ValueError, match="class_ratios="):
        check_class_ratios(ratios)


def test_scale_intensity_clips_and_scales() -> None:
    hu = np.array([-1000, -200, 100, 400, 3000], dtype=np.int16)
    np.testing.assert_allclose(scale_intensity(hu, -200, 400), [0.0, 0.0, 0.5, 1.0, 1.0])
