"""Graceful stop on SIGTERM / SIGINT (SLURM preemption, Ctrl-C).

The handler only sets a flag. The loop finishes the current step, then all ranks agree with
one all-reduce (a rank that got the signal a moment later still stops at the same step),
save a checkpoint and exit 0. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from types import FrameType
from typing import Any, Dict, Optional

log = logging.getLogger("ava.train")


class StopRequest:
    """Context manager installing the handlers; `requested` is this rank's flag."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = True
        self.signal_name = name
        log.warning("%s received: finishing the current step, then saving a checkpoint", name)

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            # ValueError off the main thread (e.g. some notebook runners): no graceful stop there
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
