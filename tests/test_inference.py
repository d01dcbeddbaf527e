"""Slab-bounded sliding-window inference and the original-geometry pipeline."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from kitsjobs.data.cache import PreprocessSettings
from kitsjobs.data.phantom import labels_to_image
from kitsjobs.infer.pipeline import predict_file
from kitsjobs.infer.sliding import (
    SlidingWindowSettings,
    _accumulator_device,
    _smaller_settings,
    predict_labels,
    window_starts,
)

CPU = torch.device("cpu")
MARKER_HU = 2500
# A window where the marker (2500 HU) scales to 0.875 and the phantom (at most about 600 HU) to 0.4.
BAND_SETTINGS = dict(hu_min=-1000.0, hu_max=3000.0)


class IntensityBands(torch.nn.Module):
    """A 1x1x1 convolution whose logits make voxels scaled above 0.7 class 1, others class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1] = 100.0
            self.conv.bias.copy_(torch.tensor([0.0, -70.0, -100.0, -100.0]))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.conv(inputs)


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(3, 1, 4, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()


@pytest.fixture(scope="module")
def marked_case(tmp_path_factory: pytest.TempPathFactory, kits23_data: Path) -> tuple[Path, tuple[slice, ...]]:
    """A phantom of case_00061 (29 x 512 x 512, IPL affine) with a bright block at a known place."""
    label_file = nib.load(kits23_data / "labels" / "case_00061.nii.gz")
    labels = np.asarray(label_file.dataobj).astype(np.uint8)
    image = labels_to_image(labels, label_file.header.get_zooms()[:3], seed=0)
    block = (slice(10, 13), slice(200, 212), slice(300, 312))
    image[block] = MARKER_HU
    header = label_file.header.copy()
    header.set_data_dtype(np.int16)
    path = tmp_path_factory.mktemp("marked") / "case_00061.nii.gz"
    nib.save(nib.Nifti1Image(image, label_file.affine, header), path)
    return path, block


@pytest.mark.parametrize("roi, overlap", [((16, 32, 32), 0.5), ((64, 32, 32), 0.25), ((16, 96, 16), 0.0)])
def test_matches_monai_whole_volume(roi, overlap) -> None:
    model = _unet()
    image = np.random.default_rng(0).random((40, 70, 50), dtype=np.float32)
    labels = predict_labels(model, image, roi, overlap, 3, CPU)
    with torch.inference_mode():
        expected = sliding_window_inference(
            torch.from_numpy(image)[None, None], roi, 3, lambda x: torch.softmax(model(x), 1),
            overlap=overlap, mode="gaussian",
        )[0].argmax(0).numpy()
    np.testing.assert_array_equal(labels, expected)


def test_float16_memory_map_input(tmp_path: Path) -> None:
    image = np.random.default_rng(1).random((30, 40, 40), dtype=np.float32).astype(np.float16)
    np.save(tmp_path / "image.npy", image)
    mapped = np.load(tmp_path / "image.npy", mmap_mode="r")
    model = _unet()
    np.testing.assert_array_equal(
        predict_labels(model, mapped, (16, 32, 32), 0.5, 2, CPU),
        predict_labels(model, image.astype(np.float32), (16, 32, 32), 0.5, 2, CPU),
    )


def test_ensemble_of_copies_equals_one_model() -> None:
    model = _unet()
    image = np.random.default_rng(2).random((20, 40, 40), dtype=np.float32)
    single = predict_labels(model, image, (16, 32, 32), 0.5, 2, CPU)
    np.testing.assert_array_equal(predict_labels([model, model], image, (16, 32, 32), 0.5, 2, CPU), single)


def test_mirror_tta_averages_flips() -> None:
    model = _unet()
    image = np.random.default_rng(3).random((16, 32, 32), dtype=np.float32)
    labels = predict_labels(model, image, (16, 32, 32), 0.0, 1, CPU, mirror_axes=(2,))
    with torch.inference_mode():
        inputs = torch.from_numpy(image)[None, None]
        mean = (torch.softmax(model(inputs), 1) + torch.softmax(model(inputs.flip(4)), 1).flip(4)) / 2
    np.testing.assert_array_equal(labels, mean[0].argmax(0).numpy())


def test_window_starts_cover_axis() -> None:
    assert window_starts(10, 16, 0.5) == [0]
    assert window_starts(100, 32, 0.5) == [0, 16, 32, 48, 64, 68]
    assert window_starts(64, 32, 0.0) == [0, 32]


class _OutOfMemoryAboveOneWindow(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bands = IntensityBands()
        self.batch_sizes: list[int] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(inputs.shape[0])
        if inputs.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.bands(inputs)


def test_out_of_memory_retries_smaller_batches(caplog: pytest.LogCaptureFixture) -> None:
    image = np.random.default_rng(4).random((16, 64, 64), dtype=np.float32)
    model = _OutOfMemoryAboveOneWindow()
    with caplog.at_level(logging.WARNING, logger="kitsjobs.infer.sliding"):
        labels = predict_labels(model, image, (16, 32, 32), 0.5, 4, CPU)
    np.testing.assert_array_equal(labels, predict_labels(IntensityBands(), image, (16, 32, 32), 0.5, 1, CPU))
    assert model.batch_sizes[:2] == [4, 2]
    assert set(model.batch_sizes[2:]) == {1}
    assert "out of memory" in caplog.text
    assert "sw_batch_size=1" in caplog.text


def test_other_errors_are_not_retried() -> None:
    class Broken(torch.nn.Module):
        calls = 0

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            Broken.calls += 1
            raise RuntimeError("shape mismatch in a layer")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        predict_labels(Broken(), np.zeros((8, 8, 8), np.float32), (8, 8, 8), 0.5, 4, CPU)
    assert Broken.calls == 1


def test_large_slab_accumulates_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test machines have no GPU, so the free memory CUDA reports is faked: 24 GiB.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 * 2**30, 24 * 2**30))
    gpu = torch.device("cuda", 0)
    auto = SlidingWindowSettings((128, 128, 128), accumulate_on="auto")
    # 4 classes x 128 slices x 512 x 512 x 4 bytes = 0.5 GiB, at most a quarter of the free memory.
    assert _accumulator_device(auto, gpu, 4 * 128 * 512 * 512 * 4) == gpu
    # 7 GiB is more than a quarter of 24 GiB: the slab goes to host memory.
    assert _accumulator_device(auto, gpu, 7 * 2**30) == CPU
    assert _accumulator_device(SlidingWindowSettings((128, 128, 128), accumulate_on="device"), gpu, 7 * 2**30) == gpu
    assert _accumulator_device(SlidingWindowSettings((128, 128, 128), accumulate_on="cpu"), gpu, 1) == CPU
    assert _accumulator_device(auto, CPU, 1) == CPU


def test_gpu_out_of_memory_moves_slab_first() -> None:
    settings = SlidingWindowSettings((128, 128, 128), sw_batch_size=4, accumulate_on="auto")
    gpu = torch.device("cuda", 0)
    first = _smaller_settings(settings, gpu)
    assert (first.accumulate_on, first.sw_batch_size) == ("cpu", 4)
    second = _smaller_settings(first, gpu)
    assert (second.accumulate_on, second.sw_batch_size) == ("cpu", 2)
    third = _smaller_settings(second, gpu)
    assert third.sw_batch_size == 1
    assert _smaller_settings(third, gpu) is None


def test_original_grid_without_resampling(marked_case) -> None:
    path, block = marked_case
    settings = PreprocessSettings(**BAND_SETTINGS)
    labels = predict_file(IntensityBands(), path, settings, (16, 128, 128), 0.25, 2, CPU)
    source = nib.load(path)
    assert labels.shape == source.shape == (29, 512, 512)
    expected = np.zeros(source.shape, np.uint8)
    expected[block] = 1
    np.testing.assert_array_equal(labels, expected)


def test_original_grid_after_resampling(marked_case, tmp_path: Path) -> None:
    from kitsjobs.data.volumes import save_labels

    path, block = marked_case
    settings = PreprocessSettings(spacing_mm=(2.5, 2.0, 2.0), **BAND_SETTINGS)
    labels = predict_file(IntensityBands(), path, settings, (32, 96, 96), 0.25, 2, CPU)
    source = nib.load(path)
    assert labels.shape == source.shape

    # The block's centre voxel comes back labelled; voxels 4 away from it on every side do not.
    assert labels[11, 206, 306] == 1
    assert labels[block].mean() > 0.5
    outside = labels.copy()
    outside[9:15, 196:216, 296:316] = 0
    assert not outside.any()

    save_labels(tmp_path / "case_00061.nii.gz", labels, source)
    written = nib.load(tmp_path / "case_00061.nii.gz")
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    assert nib.aff2axcodes(written.affine) == ("I", "P", "L")
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
