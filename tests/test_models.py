"""Tests of the network factory and the DynUNet planner on real MONAI networks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from monai.losses import DiceCELoss
from monai.networks.nets import DynUNet, SegResNet, SwinUNETR, UNet

from kitsjobs.config import ModelConfig
from kitsjobs.errors import UserError
from kitsjobs.launch import resolve_config
from kitsjobs.models.factory import BUILDERS, build_model
from kitsjobs.models.planning import plan_dynunet

PATCH_SIZE = [16, 32, 32]
# SwinUNETR divides each edge by 32, and its instance norm needs more than 1 voxel there.
SWIN_PATCH_SIZE = [64, 32, 32]
NUM_CLASSES = 4

SMALL_MODELS = {
    "unet": (ModelConfig(name="unet", channels=[4, 8, 16], strides=[2, 2]), PATCH_SIZE, UNet),
    "segresnet": (ModelConfig(name="segresnet", init_filters=8), PATCH_SIZE, SegResNet),
    "dynunet": (
        ModelConfig(name="dynunet", init_filters=4, max_filters=16, patch_size=PATCH_SIZE),
        PATCH_SIZE,
        DynUNet,
    ),
    "swinunetr": (
        ModelConfig(name="swinunetr", feature_size=12, patch_size=SWIN_PATCH_SIZE),
        SWIN_PATCH_SIZE,
        SwinUNETR,
    ),
}


def train_one_step(model: torch.nn.Module, patch_size: list[int]) -> tuple[torch.Tensor, float]:
    """Run a forward and backward pass with DiceCE on random data; return the logits and loss."""
    torch.manual_seed(0)
    image = torch.rand(2, 1, *patch_size)
    label = torch.randint(0, NUM_CLASSES, (2, 1, *patch_size))
    model.train()
    logits = model(image)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    loss.backward()
    return logits, float(loss.detach())


def test_builders_cover_every_model() -> None:
    assert sorted(BUILDERS) == sorted(SMALL_MODELS)


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_model_forward_backward(name: str) -> None:
    config, patch_size, network_type = SMALL_MODELS[name]
    torch.manual_seed(0)
    model = build_model(config)

    logits, loss = train_one_step(model, patch_size)

    assert isinstance(model, network_type)
    assert tuple(logits.shape) == (2, NUM_CLASSES, *patch_size)
    assert torch.isfinite(torch.tensor(loss))
    gradients = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    assert gradients, "no parameter received a gradient"
    assert all(bool(torch.isfinite(gradient).all()) for gradient in gradients)
    assert sum(float(gradient.abs().sum()) for gradient in gradients) > 0


def test_dynunet_deep_supervision_outputs() -> None:
    config = ModelConfig(
        name="dynunet", init_filters=4, max_filters=16, patch_size=PATCH_SIZE, deep_supervision=True
    )
    model = build_model(config)
    image = torch.rand(2, 1, *PATCH_SIZE)

    model.train()
    training_output = model(image)
    model.eval()
    with torch.no_grad():
        inference_output = model(image)

    # Four levels: the full-resolution head plus one for each decoder level but the lowest.
    assert tuple(training_output.shape) == (2, 3, NUM_CLASSES, *PATCH_SIZE)
    assert tuple(inference_output.shape) == (2, NUM_CLASSES, *PATCH_SIZE)
    training_output[:, 0].mean().backward()
    assert any(parameter.grad is not None for parameter in model.parameters())


def test_dynunet_filters_double_up_to_max() -> None:
    config = ModelConfig(name="dynunet", init_filters=32, max_filters=320, patch_size=[64, 128, 128])

    model = build_model(config)

    assert list(model.filters) == [32, 64, 128, 256, 320, 320]


def test_plan_isotropic_patch() -> None:
    plan = plan_dynunet([64, 128, 128])

    assert plan.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
    assert plan.kernel_sizes == ((3, 3, 3),) * 6
    assert plan.bottleneck_size_vox == (4, 4, 4)


def test_plan_thick_slices() -> None:
    # 5 mm slices: in-plane axes are halved until their voxels reach within 2x of the slices.
    plan = plan_dynunet([32, 128, 128], spacing_mm=[5.0, 0.8, 0.8])

    assert plan.strides == ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert plan.kernel_sizes == ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    assert plan.bottleneck_size_vox == (4, 4, 4)


def test_plan_stops_at_odd_edge() -> None:
    plan = plan_dynunet([20, 48, 48])

    assert plan.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 2, 2))
    assert plan.bottleneck_size_vox == (5, 6, 6)


@pytest.mark.parametrize(
    ("patch_size", "spacing_mm", "expected_words"),
    [
        ([6, 6, 6], None, ["model.patch_size [6, 6, 6] is too small", "[64, 128, 128]"]),
        ([64, 128], None, ["model.patch_size must be 3 positive voxel counts", "[64, 128]"]),
        ([64, 128, 128], [1.0, 0.0, 1.0], ["model.spacing_mm must be 3 positive", "[1.0, 0.0, 1.0]"]),
    ],
    ids=["too-small", "two-axes", "zero-spacing"],
)
def test_plan_rejects_bad_geometry(
    patch_size: list[int], spacing_mm: list[float] | None, expected_words: list[str]
) -> None:
    with pytest.raises(UserError) as raised:
        plan_dynunet(patch_size, spacing_mm)

    for word in expected_words:
        assert word in str(raised.value)


def test_swinunetr_rejects_patch_not_multiple_of_32() -> None:
    config = ModelConfig(name="swinunetr", patch_size=[40, 128, 100])

    with pytest.raises(UserError) as raised:
        build_model(config)

    message = str(raised.value)
    assert "data.patch_size [40, 128, 100] is invalid for model=swinunetr" in message
    assert "multiple of 32" in message
    assert "data.patch_size=[64,128,128]" in message


def test_swinunetr_rejects_single_voxel_bottleneck() -> None:
    config = ModelConfig(name="swinunetr", patch_size=[32, 32, 32])

    with pytest.raises(UserError) as raised:
        build_model(config)

    assert "at least one edge 64 or more" in str(raised.value)
    assert "data.patch_size=[32,32,64]" in str(raised.value)


def test_swinunetr_rejects_feature_size() -> None:
    config = ModelConfig(name="swinunetr", feature_size=16, patch_size=SWIN_PATCH_SIZE)

    with pytest.raises(UserError, match="model.feature_size=16 is invalid for swinunetr"):
        build_model(config)


def test_segresnet_rejects_init_filters() -> None:
    with pytest.raises(UserError, match="model.init_filters=12 is invalid for segresnet"):
        build_model(ModelConfig(name="segresnet", init_filters=12))


def test_dynunet_needs_patch_size() -> None:
    with pytest.raises(UserError, match=r"model.patch_size is not set for dynunet"):
        build_model(ModelConfig(name="dynunet"))


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(UserError) as raised:
        build_model(dataclasses.replace(ModelConfig(), name="vnet"))

    message = str(raised.value)
    assert "\n" not in message
    assert message == "unknown model.name 'vnet'; choose one of dynunet, segresnet, swinunetr, unet"


@pytest.mark.parametrize("name", ["dynunet", "swinunetr"])
def test_model_preset_takes_data_patch_size(name: str) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"model={name}", "data.patch_size=[32,64,96]"])

    config = resolve_config(cfg)

    assert config.model.name == name
    assert config.model.patch_size == [32, 64, 96]


def test_dynunet_plans_with_data_spacing() -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        resampled = compose("config", overrides=["model=dynunet", "data.spacing_mm=[3.0,0.8,0.8]"])
        native = compose("config", overrides=["model=dynunet"])

    assert resolve_config(resampled).model.spacing_mm == [3.0, 0.8, 0.8]
    assert resolve_config(native).model.spacing_mm is None
