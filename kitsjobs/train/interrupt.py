"""A stop request that a signal handler sets and the training loop honours at a step boundary."""

from __future__ import annotations

import threading
from typing import Optional


class StopRequest:
    """Thread- and signal-safe flag asking the training loop to checkpoint and stop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: Optional[str] = None

    def request(self, reason: str) -> None:
        """Ask the loop to stop after the current step; the first reason is kept."""
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        """Return whether a stop was requested."""
        return self._event.is_set()


class TrainingInterrupted(Exception):
    """Training stopped on request after writing a checkpoint at ``step``."""

    def __init__(self, step: int, reason: Optional[str]) -> None:
        super().__init__(f"training stopped at step {step} ({reason or 'stop requested'}); checkpoint written")
        self.step = step
        self.reason = reason
