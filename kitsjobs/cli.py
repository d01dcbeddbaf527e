"""Helpers shared by the argparse command-line entry points."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """Parse an argparse option value that must be an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
