"""Graceful stop on SIGTERM / SIGINT (SLURM preemption, Ctrl-C).

The handler only sets a flag. The loop finishes the current step, then all ranks agree with
one all-reduce (a rank that got the signal a moment later still stops at the same step),
save a checkpoint and exit with the shell's status for the signal: 130 after SIGINT, 143 after
SIGTERM. A chain like `ava-train ... && ava-export ...` therefore stops after a Ctrl-C instead of
exporting a half-trained model, and a scheduler script can tell "stopped early, resume me"
from "finished" (0) and "failed" (1, 2, 3). A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from types import FrameType
from typing import Any, Dict, Optional

log = logging.getLogger("ava.train")

# 128 + signal number: what a shell reports for a process ended by that signal
EXIT_STATUS = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


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

    @property
    def exit_status(self) -> int:
        """The status a run stopped early exits with (SIGTERM's when another rank got the signal)."""
        return EXIT_STATUS.get(self.signal_name or "SIGTERM", EXIT_STATUS["SIGTERM"])

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
