"""Helpers shared by the argparse command-line entry points."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """Parse an argparse option value that must be an integer of at least 1."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """Parse an argparse option value that must be an integer of at least 0."""
    return _whole_number(text, 0)


def finite_float(text: str) -> float:
    """Parse an argparse option value that must be a finite number (no nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """Parse an argparse option value that must be a finite number above 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    return value


def user_path(text: str) -> Path:
    """Parse a path option, expanding a leading ``~`` that the shell left as typed (``--out=~/x``)."""
    return Path(text).expanduser()
