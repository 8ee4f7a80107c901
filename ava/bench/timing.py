"""Timing and memory measurement: warm-up, repeats, median and spread; CUDA events on GPU."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    """Milliseconds per call over `repeats` timed calls (after `warmup` untimed ones)."""

    median_ms: float
    min_ms: float
    max_ms: float
    iqr_ms: float  # interquartile range: the spread that ignores one-off stalls
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def _summarise(samples_ms: list[float]) -> Timing:
    samples = sorted(samples_ms)
    if len(samples) >= 4:
        q1, _, q3 = statistics.quantiles(samples, n=4)
        iqr = q3 - q1
    else:
        iqr = samples[-1] - samples[0]
    return Timing(statistics.median(samples), samples[0], samples[-1], iqr, len(samples))


def time_fn(fn: Callable[[], object], *, warmup: int, repeats: int, device: torch.device) -> Timing:
    """Median and spread of `fn()`; on CUDA each call is bracketed by events (no per-call host sync
    inside `fn`, one synchronize per sample to read the event)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return _summarise(samples)


class Stopwatch:
    """Wall-clock phases of one call (forward / backward / optimizer), CUDA events on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def phases_ms(self) -> dict[str, float]:
        """Milliseconds between consecutive marks, named by the later mark."""
        if self.device.type == "cuda":
            self.marks[-1][1].synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:], strict=False):
            out[name] = a.elapsed_time(b) if self.device.type == "cuda" else (b - a) * 1e3
        return out


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of one `n`³ matmul at the current thread count: the roofline a step's achieved rate
    is a fraction of, measured in the same process and moment as the step."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timing = time_fn(lambda: a @ b, warmup=1, repeats=repeats, device=device)
    return 2 * n ** 3 / (timing.median_ms / 1e3)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during `fn()` above the bytes live before it. For a forward pass under
    autograd: saved activations plus transient buffers, i.e. activation memory; for a training
    step: that plus the gradients and the optimizer's transients.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: the allocation/free trace that
    `torch.profiler` records with `profile_memory=True` (every c10 CPU allocator event), summed in
    time order. Tensors live before the call (parameters, optimizer state) are not counted.
    The result of `fn()` is kept alive until the peak is read, so saved tensors count.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() == torch.device("cpu").type or str(e.device_type()).endswith("CPU"):
            live += e.nbytes()
            peak = max(peak, live)
    del out
    return peak


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
                     device: torch.device) -> dict[str, Timing]:
    """Like `time_fn` for several functions, round-robin (one call of each per round), so a burst
    of load from elsewhere on the machine hits every implementation alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(time_fn(fn, warmup=0, repeats=1, device=device).median_ms)
    return {name: _summarise(s) for name, s in samples.items()}
