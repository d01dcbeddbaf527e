from __future__ import annotations

import os
import stat
from pathlib import Path

from kitsjobs.fsutil import atomic_write_json


def test_atomic_write_follows_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "metrics.json", {"dice": 1.0})
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode)
    assert mode == 0o644
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]
