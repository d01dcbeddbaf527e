"""Gaussian-blended sliding-window prediction of a whole volume."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference


def predict_labels(
    model: torch.nn.Module,
    image: np.ndarray,
    patch_size: Sequence[int],
    overlap: float,
    sw_batch_size: int,
    device: torch.device,
    amp: bool = False,
) -> np.ndarray:
    """Predict a label map for one scaled image.

    Args:
        model: network returning (B, classes, z, y, x) logits.
        image: float32 (z, y, x) volume, already intensity-scaled.
        patch_size: window size (z, y, x) in voxels; MONAI pads a smaller volume.
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        sw_batch_size: windows per forward pass.
        device: where the windows run.
        amp: autocast to float16 on CUDA.

    Returns:
        uint8 labels with exactly the shape of ``image``.
    """
    was_training = model.training
    model.eval()
    inputs = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    with torch.inference_mode(), torch.autocast(device.type, enabled=amp and device.type == "cuda"):
        logits = sliding_window_inference(
            inputs,
            roi_size=tuple(int(s) for s in patch_size),
            sw_batch_size=sw_batch_size,
            predictor=model,
            overlap=overlap,
            mode="gaussian",
            sw_device=device,
            device=torch.device("cpu"),
            progress=False,
        )
        labels = torch.argmax(logits[0], dim=0).to(torch.uint8).numpy()
    model.train(was_training)
    return labels
