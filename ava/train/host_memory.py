"""Give the freed host memory of each step back to the OS (glibc's `malloc_trim`).

A training step on a CPU allocates and frees activations of a few MiB each whose sizes follow the
routing (tokens per expert change every step). glibc serves them from its heap once its dynamic
mmap threshold has risen past them, and the holes their varying sizes leave are never returned,
so the resident set climbs far above what one step needs. A trim after each step costs a few
percent of the step; a fixed low mmap threshold instead would make every large tensor page-fault
in afresh, which costs more. Elsewhere (macOS, musl) there is no `malloc_trim`, and nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from pathlib import Path
from typing import Callable, Dict, Optional

from ava.observe.callbacks import Callback, StepOutput, TrainState

log = logging.getLogger("ava.train")


def malloc_trim() -> Optional[Callable[[], int]]:
    """glibc's `malloc_trim(0)` (1 when memory went back to the OS), or None without glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: int(trim(0))


class HostMemoryTrim(Callback):
    """`malloc_trim` every `every` optimizer steps (`trainer.trim_host_memory_every`), and after each
    evaluation (its full logits, shaped unlike a step's, left in the heap raised the next step's
    peak) and each checkpoint save (its serialisation buffers are as unlike a step's)."""

    name = "host_memory_trim"

    def __init__(self, every: int) -> None:
        self.every = every
        self.trim = malloc_trim() if every else None
        if every and self.trim is None:
            log.info("trainer.trim_host_memory_every=%d: this C library has no malloc_trim; not trimming", every)

    def post_step(self, state: TrainState, output: StepOutput) -> None:
        if self.trim is not None and state.step % self.every == 0:
            self.trim()

    def on_eval(self, state: TrainState, metrics: Dict[str, float]) -> None:
        if self.trim is not None:
            self.trim()

    def post_checkpoint_saved(self, state: TrainState, tag_dir: Path) -> None:
        if self.trim is not None:
            self.trim()
