"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NoReturn

from kitsjobs.errors import UserError

# Errors of the destination that a user fixes: a full disk or quota, a read-only or
# forbidden folder.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, fsync, then rename.

    The temporary file sits in the same folder, so the rename is atomic on POSIX
    file systems; it is removed if ``write`` raises, and ``path`` keeps its old content.

    Raises:
        UserError: the disk is full or the folder is read-only or forbidden.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise_write_error(path, error)
    try:
        # mkstemp creates the file readable by its owner only; give it the mode a plain
        # open() would, so teammates on a shared file system can read results.
        os.fchmod(descriptor, 0o666 & ~_current_umask())
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise_write_error(path, error)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def raise_write_error(path: Path, error: OSError) -> NoReturn:
    """Re-raise a failed write: a full disk, a read-only or a forbidden folder as a UserError.

    Raises:
        UserError: ``error`` is ENOSPC, EDQUOT, EROFS, EACCES or EPERM; the message
            names ``path`` and the system's text for the error.
        OSError: ``error`` itself for any other cause.
    """
    if error.errno not in WRITE_ERRNOS:
        raise error
    raise UserError(
        f"cannot write {path}: {error.strerror} ({errno.errorcode[error.errno]}); free disk space or "
        "choose a writable output folder (hydra.run.dir=... or hydra.sweep.dir=...)"
    ) from error


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def atomic_write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def _current_umask() -> int:
    # The umask can only be read by setting it; it is set straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
