"""Build 3D segmentation networks from MONAI by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.nets import SegResNet, UNet

from kitsjobs.config import ModelConfig
from kitsjobs.errors import UserError


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
    return SegResNet(
        spatial_dims=3,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        init_filters=config.init_filters,
        dropout_prob=config.dropout or None,
    )


BUILDERS: dict[str, Callable[[ModelConfig], torch.nn.Module]] = {
    "unet": _unet,
    "segresnet": _segresnet,
}


def build_model(config: ModelConfig) -> torch.nn.Module:
    """Instantiate the network named by ``config.name``.

    Raises:
        UserError: unknown name (the message lists the known ones) or
            inconsistent sizes.
    """
    builder = BUILDERS.get(config.name)
    if builder is None:
        raise UserError(
            f"unknown model.name '{config.name}'; choose one of {', '.join(sorted(BUILDERS))}"
        )
    return builder(config)
