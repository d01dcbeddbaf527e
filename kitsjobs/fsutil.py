"""Atomic file writes, and the checks a command runs on its output paths before writing.

An atomic write leaves a reader the old file or the new one, never half of one. The output
checks keep a command's results away from its inputs and from files the user did not ask to
replace.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from kitsjobs.errors import UserError

# Existing files listed in the message of check_output_folder.
_MAX_FILES_IN_MESSAGE = 5

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
    fsync_path(path.parent)


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


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def check_output_file(
    path: Path,
    option: str,
    inputs: Sequence[tuple[str, Path]],
    overwrite: bool = False,
    suffix: str | None = None,
) -> None:
    """Check a file that a command will write, so the command can stop before reading its inputs.

    The file must lie outside every input folder and must not be an input file (symlinks
    resolved), even with ``overwrite``. Its folder must exist, so a mistyped path creates no folders.
    It must not exist unless ``overwrite`` is true, and it must end in ``suffix`` when given.

    Args:
        path: the output file.
        option: the command-line flag that names it, such as ``--csv``, used in messages.
        inputs: (flag, path) of every input folder or file the command reads.
        overwrite: allow replacing an existing file.
        suffix: required ending of the file name, such as ``.zip``; None accepts any.

    Raises:
        UserError: naming ``option``, the path and one fix, for the first rule broken.
    """
    path = Path(path).expanduser()
    check_outside_inputs(path, option, inputs)
    if suffix is not None and not path.name.endswith(suffix):
        example = path.with_name(f"{Path(path.name).stem}{suffix}")
        raise UserError(f"{option} {path} does not end in {suffix}; pass a file name such as {example}")
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; pass a file path inside it")
    if not path.parent.is_dir():
        raise UserError(f"{option} {path}: folder {path.parent} not found; create it first or choose another path")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UserError(f"{option} {path} exists; choose another path, or add --overwrite to replace it")


def check_output_folder(
    folder: Path,
    option: str,
    inputs: Sequence[tuple[str, Path]],
    file_names: Sequence[str],
    overwrite: bool = False,
) -> None:
    """Check a folder that a command will fill with ``file_names``, so the command can stop before any work.

    The folder must lie outside every input folder (symlinks resolved), even with ``overwrite``.
    It may be missing, and is then created by the command, but its parent must exist. Without
    ``overwrite``, none of ``file_names`` may exist in it. Other files in it are never touched.

    Args:
        folder: the output folder.
        option: the command-line flag that names it, such as ``--output``, used in messages.
        inputs: (flag, path) of every input folder or file the command reads.
        file_names: names of the files the command will write into ``folder``.
        overwrite: allow replacing existing files of ``file_names``.

    Raises:
        UserError: naming ``option``, the folder (and up to five existing files) and one fix.
    """
    folder = Path(folder).expanduser()
    check_outside_inputs(folder, option, inputs)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder} is a file, not a folder; choose a folder path")
    if not folder.exists():
        if not folder.parent.is_dir():
            raise UserError(
                f"{option} {folder}: folder {folder.parent} not found; create it first or choose another path"
            )
        return
    if overwrite:
        return
    existing = [folder / name for name in file_names if (folder / name).exists() or (folder / name).is_symlink()]
    if existing:
        listed = ", ".join(str(path) for path in existing[:_MAX_FILES_IN_MESSAGE])
        more = f" and {len(existing) - _MAX_FILES_IN_MESSAGE} more" if len(existing) > _MAX_FILES_IN_MESSAGE else ""
        raise UserError(
            f"{option} {folder} already contains {len(existing)} of the {len(file_names)} file(s) to write "
            f"({listed}{more}); choose another {option}, or add --overwrite to replace them"
        )


def check_outside_inputs(path: Path, option: str, inputs: Sequence[tuple[str, Path]]) -> None:
    """Check that ``path`` is neither an input file nor inside an input folder, symlinks resolved.

    Raises:
        UserError: naming ``option``, ``path``, the input's flag and folder, and the fix.
    """
    target = Path(path).expanduser().resolve()
    for input_option, input_path in inputs:
        source = Path(input_path).expanduser().resolve()
        if target == source and not source.is_dir():
            raise UserError(f"{option} {path} is the {input_option} file; choose another path")
        if target == source or source in target.parents:
            raise UserError(
                f"{option} {path} is inside the {input_option} folder {input_path}, which is never written; "
                "choose a path outside it"
            )


def require_input_folder(folder: Path, option: str, expected: str) -> None:
    """Check that an input folder exists.

    Args:
        folder: the folder to read.
        option: the command-line flag that names it, such as ``--images``.
        expected: what the folder should contain, for the message ("CT images").

    Raises:
        UserError: ``folder`` is missing or is a file, naming ``option`` and the fix.
    """
    if not Path(folder).expanduser().is_dir():
        raise UserError(f"{option} {folder} not found or not a folder; pass an existing folder of {expected}")
