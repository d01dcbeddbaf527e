"""Build 3D segmentation networks from MONAI by name."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from monai.networks.nets import DynUNet, SegResNet, SwinUNETR, UNet

from kitsjobs.config import ModelConfig
from kitsjobs.errors import UserError
from kitsjobs.models.planning import plan_dynunet

logger = logging.getLogger(__name__)

SEGRESNET_NORM_GROUPS = 8
"""Groups of MONAI SegResNet's default group norm; every width must be a multiple of it."""

SWINUNETR_SIZE_DIVISOR = 32
"""SwinUNETR embeds 2^3 voxel patches and merges them 4 times, so each input edge is a multiple of 2^5."""

SWINUNETR_FEATURE_DIVISOR = 12
"""SwinUNETR splits its embedding over 3, 6, 12 and 24 attention heads, so feature_size is a multiple of 12."""


def _unet(config: ModelConfig) -> torch.nn.Module:
    if len(config.strides) != len(config.channels) - 1:
        raise UserError(
            f"model.strides has {len(config.strides)} entries and model.channels has "
            f"{len(config.channels)}; give one stride fewer than channels"
        )
    return UNet(
        spatial_dims=3,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        channels=tuple(config.channels),
        strides=tuple(config.strides),
        num_res_units=config.num_res_units,
        dropout=config.dropout,
    )


def _segresnet(config: ModelConfig) -> torch.nn.Module:
    if config.init_filters <= 0 or config.init_filters % SEGRESNET_NORM_GROUPS:
        raise UserError(
            f"model.init_filters={config.init_filters} is invalid for segresnet: its group norm "
            f"splits the channels into {SEGRESNET_NORM_GROUPS} groups, so use a positive multiple "
            f"of {SEGRESNET_NORM_GROUPS}, for example 8 or 16"
        )
    return SegResNet(
        spatial_dims=3,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        init_filters=config.init_filters,
        dropout_prob=config.dropout or None,
    )


def _dynunet(config: ModelConfig) -> torch.nn.Module:
    if not config.patch_size:
        raise UserError(
            "model.patch_size is not set for dynunet, which is planned for one patch size; "
            "set model.patch_size=${data.patch_size} as conf/model/dynunet.yaml does"
        )
    if config.max_filters < config.init_filters:
        raise UserError(
            f"model.max_filters={config.max_filters} is smaller than model.init_filters="
            f"{config.init_filters}; raise max_filters or lower init_filters"
        )
    plan = plan_dynunet(config.patch_size, config.spacing_mm)
    filters = [min(config.init_filters * 2**level, config.max_filters) for level in range(plan.num_levels)]
    logger.info(
        "dynunet: kernel sizes %s, strides %s, filters %s, bottleneck %s voxels",
        [list(kernel) for kernel in plan.kernel_sizes],
        [list(stride) for stride in plan.strides],
        filters,
        list(plan.bottleneck_size_vox),
    )
    return DynUNet(
        spatial_dims=3,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        kernel_size=plan.kernel_sizes,
        strides=plan.strides,
        upsample_kernel_size=plan.strides[1:],
        filters=filters,
        dropout=config.dropout or None,
        deep_supervision=config.deep_supervision,
        # Every decoder level but the lowest gets an output head, as in nnU-Net.
        deep_supr_num=max(plan.num_levels - 2, 1),
    )


def _swinunetr(config: ModelConfig) -> torch.nn.Module:
    # NOTE: trainer.sw_roi_size is not checked here. MONAI's SwinUNETR raises a
    # ValueError at the first inference window whose edges are not multiples of 32.
    if config.patch_size:
        _check_swinunetr_patch_size(config.patch_size)
    if config.feature_size <= 0 or config.feature_size % SWINUNETR_FEATURE_DIVISOR:
        raise UserError(
            f"model.feature_size={config.feature_size} is invalid for swinunetr: it must be a positive "
            f"multiple of {SWINUNETR_FEATURE_DIVISOR}, for example 24 or 48"
        )
    return SwinUNETR(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        feature_size=config.feature_size,
        drop_rate=config.dropout,
        spatial_dims=3,
    )


def _check_swinunetr_patch_size(patch_size: list[int]) -> None:
    divisor = SWINUNETR_SIZE_DIVISOR
    is_divisible = all(size > 0 and size % divisor == 0 for size in patch_size)
    # The bottleneck is patch_size / 32, and its instance norm needs more than one voxel in training.
    if is_divisible and max(patch_size) > divisor:
        return
    suggestion = [max(divisor, -(-size // divisor) * divisor) for size in patch_size]
    if max(suggestion) == divisor:
        suggestion[-1] = 2 * divisor
    raise UserError(
        f"data.patch_size {list(patch_size)} is invalid for model=swinunetr: every edge must be a "
        f"multiple of {divisor} voxels, and at least one edge {2 * divisor} or more. Pass for example "
        f"data.patch_size=[{','.join(map(str, suggestion))}]"
    )


BUILDERS: dict[str, Callable[[ModelConfig], torch.nn.Module]] = {
    "unet": _unet,
    "segresnet": _segresnet,
    "dynunet": _dynunet,
    "swinunetr": _swinunetr,
}


def build_model(config: ModelConfig) -> torch.nn.Module:
    """Instantiate the 3D network named by ``config.name``.

    The network takes input of shape (batch, in_channels, z, y, x) and returns
    logits of shape (batch, out_channels, z, y, x). A dynunet with
    ``deep_supervision`` returns (batch, heads, out_channels, z, y, x) in training
    mode, the full-resolution output first and the lower ones upsampled.

    Raises:
        UserError: unknown name (the message lists the known ones), inconsistent
            sizes, a missing ``patch_size`` for dynunet, or a swinunetr patch size
            that is not a multiple of 32 voxels on every axis.
    """
    builder = BUILDERS.get(config.name)
    if builder is None:
        raise UserError(
            f"unknown model.name '{config.name}'; choose one of {', '.join(sorted(BUILDERS))}"
        )
    return builder(config)
