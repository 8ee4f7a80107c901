"""Throughput and ETA from step wall times (evaluation and checkpoint time excluded), the step-time
split (data / forward / backward / step), achieved FLOP/s and MFU against a bf16 peak table."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

from ava.observe.callbacks import Callback, StepOutput, TrainState


class Throughput:
    def __init__(self, tokens_per_step: int, smoothing: float = 0.9) -> None:
        self.tokens_per_step = tokens_per_step
        self.smoothing = smoothing
        self.step_time: Optional[float] = None  # exponential moving average, seconds

    def update(self, seconds: float) -> None:
        if self.step_time is None:
            self.step_time = seconds
        else:
            self.step_time = self.smoothing * self.step_time + (1 - self.smoothing) * seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time if self.step_time else 0.0

    def eta_s(self, steps_left: int) -> float:
        return steps_left * (self.step_time or 0.0)


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class StepTimer:
    """Wall time of one step split into phases (data, forward, backward, health: the pre-step
    loss reduction, gradient norm and verdict, step: the optimizer). On an accelerator
    the kernels run asynchronously, so `sync=True` (used on log steps only) synchronises at each
    phase end to make the split exact; otherwise a phase measures launch time."""

    PHASES = ("data", "forward", "backward", "health", "step")

    def __init__(self, synchronize: Optional[Callable[[], None]] = None) -> None:
        self.synchronize = synchronize
        self.sync = False
        self.totals: Dict[str, float] = {}
        self._phase: Optional[str] = None
        self._t0 = 0.0

    def start_step(self, sync: bool) -> None:
        self.sync = sync and self.synchronize is not None
        self.totals = dict.fromkeys(self.PHASES, 0.0)

    def begin(self, phase: str) -> None:
        self._phase = phase
        self._t0 = time.perf_counter()

    def end(self) -> None:
        if self.sync and self.synchronize is not None:
            self.synchronize()
        assert self._phase is not None
        self.totals[self._phase] += time.perf_counter() - self._t0
        self._phase = None

    def metrics(self) -> Dict[str, float]:
        return {f"perf/time_{name}_s": value for name, value in self.totals.items()}


# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s per device, from the vendors' data sheets,
# which print the 2:4-sparsity figure, twice these: NVIDIA's H100 data sheet gives BF16 Tensor
# Core 1,979 TFLOPS for H100 SXM (989 dense), 1,671 for H100 NVL (835), 1,513 for H100 PCIe (756);
# its H200 data sheet 1,979 for H200 SXM (989), which is H100 SXM's compute with more memory.
# Matched as a substring of the device name, first match wins (so the specific names go first).
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0), ("A6000", 155.0), ("RTX 4090", 165.0), ("MI300X", 1307.0),
    ("MI250X", 383.0), ("MI250", 362.0),
)


def peak_tflops(device_name: str) -> Optional[float]:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def device_peak_tflops(device: Any, override: Optional[float]) -> Optional[float]:
    """The per-device peak for MFU: `trainer.monitor.peak_tflops`, else the table; None on CPU."""
    if override:
        return override
    import torch

    if getattr(device, "type", "cpu") == "cuda" and torch.cuda.is_available():
        return peak_tflops(torch.cuda.get_device_name(device))
    return None


def flops_metrics(flops_per_token: float, tokens_per_s_per_device: float,
                  peak: Optional[float]) -> Dict[str, float]:
    """Achieved TFLOP/s per device (always) and MFU (when the device's peak is known)."""
    achieved = flops_per_token * tokens_per_s_per_device / 1e12
    metrics = {"perf/tflops_per_device": achieved}
    if peak:
        metrics["perf/mfu"] = achieved / peak
    return metrics


class ThroughputMonitor(Callback):
    """Tokens/s (smoothed), ETA, and on log steps achieved TFLOP/s and MFU, from the step time the
    loop measured (`perf/step_time_s`)."""

    name = "throughput"

    def __init__(self, tokens_per_step: int, flops_per_token: float,
                 peak_tflops_per_device: Optional[float]) -> None:
        self.throughput = Throughput(tokens_per_step)
        self.flops_per_token = flops_per_token
        self.peak = peak_tflops_per_device

    def post_step(self, state: TrainState, output: StepOutput) -> None:
        t = self.throughput
        t.update(output.metrics["perf/step_time_s"])
        per_device = t.tokens_per_s / state.world_size
        output.metrics.update({"perf/tokens_per_s": t.tokens_per_s,
                               "perf/tokens_per_s_per_device": per_device,
                               "perf/eta_s": t.eta_s(state.max_steps - state.step)})
        if output.log_step:
            output.metrics.update(flops_metrics(self.flops_per_token, per_device, self.peak))
