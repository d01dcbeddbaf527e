"""Training checkpoints: atomic writes and loading that never runs code.

Files live in RUN/checkpoints/: ``latest.pt`` (newest), ``previous.pt`` (the one
before) and ``best.pt`` (best validation score). Everything stored is tensors,
numbers, strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import io
import logging
import pickle
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from kitsjobs.fsutil import atomic_write, raise_write_error

logger = logging.getLogger(__name__)

LATEST = "latest.pt"
PREVIOUS = "previous.pt"
BEST = "best.pt"


def save_checkpoint(folder: Path, state: dict[str, Any], is_best: bool = False) -> Path:
    """Write ``state`` as the latest checkpoint, keeping the former latest as previous.

    A failed write leaves the former latest checkpoint as it was.

    Returns:
        The path of the new latest checkpoint.

    Raises:
        UserError: the disk is full or the folder is read-only (message names the path).
    """
    folder = Path(folder)
    # torch.save turns a failed file write into a RuntimeError without the OS error, so
    # the state is serialized in memory and written by atomic_write, which reports it.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    staged = folder / ".staged.pt"
    atomic_write(staged, lambda file: file.write(payload))

    latest = folder / LATEST
    try:
        if latest.exists():
            latest.replace(folder / PREVIOUS)
        staged.replace(latest)
    except OSError as error:
        raise_write_error(latest, error)
    if is_best:
        atomic_write(folder / BEST, lambda file: file.write(payload))
    return latest


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint file with ``weights_only=True`` (no pickled code runs).

    torch's UserWarning about an unusual pickle protocol (a file written by ``pickle.dump``
    rather than ``torch.save``) is silenced, because the load then fails anyway and callers
    report that failure in their own words.

    Raises:
        RuntimeError, EOFError, OSError: the file is truncated, corrupt or unreadable.
        pickle.UnpicklingError: the file is not a torch checkpoint, or it contains objects
            other than tensors and plain values.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(Path(path), map_location="cpu", weights_only=True)


def load_latest(folder: Path) -> Optional[dict[str, Any]]:
    """Load the newest readable checkpoint of a run, or return None when there is none.

    A corrupt ``latest.pt`` falls back to ``previous.pt`` with a warning naming both.
    """
    candidates = [Path(folder) / LATEST, Path(folder) / PREVIOUS]
    existing = [path for path in candidates if path.exists()]
    for index, path in enumerate(existing):
        try:
            return load_checkpoint(path)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
            fallback = existing[index + 1] if index + 1 < len(existing) else None
            logger.warning(
                "checkpoint %s is unreadable (%s); %s",
                path,
                error,
                f"using {fallback} instead" if fallback else "no older checkpoint to use",
            )
    return None


def set_aside(checkpoint_dir: Path, *companions: Path) -> Optional[Path]:
    """Move an earlier run's checkpoints (and companion files) to a timestamped folder.

    Used when a run starts fresh (``trainer.resume=false``) in a folder that has
    checkpoints: nothing is deleted. Returns the folder they went to, or None
    when there was nothing to move.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir() or not any(checkpoint_dir.iterdir()):
        return None
    target = checkpoint_dir.parent / f"set_aside_{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
    target.mkdir()
    checkpoint_dir.replace(target / checkpoint_dir.name)
    for companion in companions:
        if Path(companion).exists():
            Path(companion).replace(target / Path(companion).name)
    logger.warning("trainer.resume=false: earlier checkpoints moved to %s", target)
    return target
