"""Capture and restore every random number generator a training step uses.

States are stored as tensors and plain lists, so a checkpoint holding them still
loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """Return the Python, NumPy, torch CPU and CUDA generator states."""
    numpy_state = np.random.get_state()
    return {
        "python": _python_state_to_plain(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(numpy_state[1], dtype=np.int64)),
            "position": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states written by ``capture_rng_state``.

    CUDA states are restored only when as many devices are visible as were saved.
    """
    random.setstate(_python_state_from_plain(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((
        "MT19937",
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["position"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
        torch.cuda.set_rng_state_all(cuda_states)


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_plain(plain: list) -> tuple:
    version, internal, gauss = plain
    return (version, tuple(internal), gauss)
