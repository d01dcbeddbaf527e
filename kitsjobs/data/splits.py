"""Deterministic k-fold split of case names."""

from __future__ import annotations

import random

from kitsjobs.errors import UserError


def kfold_split(names: list[str], num_folds: int, fold: int, seed: int) -> dict[str, list[str]]:
    """Split case names into training and validation for one fold.

    The names are sorted, shuffled with ``seed``, then dealt round-robin into
    ``num_folds`` folds, so the split depends only on the names and the seed.

    Returns:
        ``{"train": [...], "val": [...]}``, each sorted.

    Raises:
        UserError: fewer cases than folds, or a fold index out of range.
    """
    if num_folds < 2:
        raise UserError(f"data.num_folds={num_folds} is too small; use 2 or more")
    if not 0 <= fold < num_folds:
        raise UserError(f"data.fold={fold} is out of range; use 0 to {num_folds - 1}")
    if len(names) < num_folds:
        raise UserError(
            f"{len(names)} case(s) cannot be split into data.num_folds={num_folds} folds; "
            f"lower data.num_folds to at most {max(len(names), 2)} or add cases"
        )
    shuffled = sorted(names)
    random.Random(seed).shuffle(shuffled)
    val = sorted(shuffled[fold::num_folds])
    train = sorted(name for name in shuffled if name not in set(val))
    return {"train": train, "val": val}
