"""Draw the next step's batch in a background thread while the current step trains."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, Optional, TypeVar

Batch = TypeVar("Batch")


class BatchPrefetcher(Generic[Batch]):
    """Return the batch of a step, drawing the one of the following step in the background.

    ``draw(step)`` must depend on ``step`` only (kitsjobs' patch sampler does), so a batch
    drawn ahead is the batch the step would have drawn itself, and results stay
    reproducible whether or not a prefetched batch is used.
    """

    def __init__(self, draw: Callable[[int], Batch]) -> None:
        self._draw = draw
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kitsjobs-patches")
        self._next: Optional[tuple[int, Future[Batch]]] = None

    def get(self, step: int) -> Batch:
        """Return the batch of ``step`` and start drawing the batch of ``step + 1``."""
        if self._next is not None and self._next[0] == step:
            batch = self._next[1].result()
        else:
            batch = self._draw(step)
        self._next = (step + 1, self._pool.submit(self._draw, step + 1))
        return batch

    def close(self) -> None:
        """Stop the background thread; a batch drawn ahead is dropped."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._next = None
