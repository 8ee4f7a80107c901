"""`trainer.trim_host_memory_every`: freed heap memory goes back to the OS."""

from __future__ import annotations

import psutil
import pytest
import torch

from ava.observe.callbacks import StepOutput, TrainState
from ava.train.host_memory import HostMemoryTrim, malloc_trim

pytestmark = pytest.mark.skipif(malloc_trim() is None, reason="no glibc malloc_trim here")
MIB = 2**20


def _release(trigger) -> None:
    """Leave ~150 MiB of heap holes, call `trigger(callback)`, check they went back to the OS."""
    rss = psutil.Process().memory_info
    big = torch.empty(24 * MIB, dtype=torch.uint8)
    del big  # freeing an mmapped 24 MiB chunk raises glibc's mmap threshold (max 32 MiB) past what follows
    # a step's worth of activations of varying sizes, now from the heap; the last one pins its top
    blocks = [torch.ones((2 + i % 3) * MIB // 4) for i in range(60)]
    keep = blocks.pop()
    before_free = rss().rss
    del blocks
    after_free = rss().rss
    trigger(HostMemoryTrim(every=2))
    released = after_free - rss().rss
    assert before_free - after_free < 32 * MIB < 100 * MIB < released, (before_free, after_free, released)
    assert float(keep[0]) == 1.0


def test_trim_returns_the_heap_holes_a_step_leaves():
    def two_steps(callback: HostMemoryTrim) -> None:
        rss = psutil.Process().memory_info().rss
        callback.post_step(TrainState(max_steps=4, step=1), StepOutput(loss=0.0))  # not a trim step
        assert psutil.Process().memory_info().rss > rss - 16 * MIB
        callback.post_step(TrainState(max_steps=4, step=2), StepOutput(loss=0.0))

    _release(two_steps)


def test_evaluation_and_checkpoint_saves_are_trimmed_too(tmp_path):
    """Their buffers are shaped unlike a step's; left in the heap they raised the next step's peak."""
    state = TrainState(max_steps=4, step=1)  # not a step trim: the hook itself must trim
    _release(lambda callback: callback.on_eval(state, {"val/loss": 1.0}))
    _release(lambda callback: callback.post_checkpoint_saved(state, tmp_path))


def test_zero_disables_it():
    assert HostMemoryTrim(every=0).trim is None
