"""Exceptions for mistakes a user can fix, reported as one line without a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Invalid input from the user: a config value, a path, a dataset.

    The message names the value and says how to fix it; entry points print it
    on one line and exit with status 2.
    """
