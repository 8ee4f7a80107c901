"""Memory monitor: host RSS (and how full the host is), open file descriptors, accelerator
allocated/reserved/peak, and a warning before an out-of-memory risk (usage above
`trainer.monitor.memory_warn_fraction`)."""

from __future__ import annotations

import logging
from typing import Dict, Optional

import torch

from ava.observe.callbacks import Callback, StepOutput, TrainState

log = logging.getLogger("ava.train")

GB = 1024**3


def peak_rss() -> int:
    """This process's peak resident set in bytes (`ru_maxrss`: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryMonitor(Callback):
    """Adds a reading to the metrics of every log step."""

    name = "memory"

    def __init__(self, warn_fraction: float, device: Optional[torch.device] = None) -> None:
        import psutil

        self.warn_fraction = warn_fraction
        self.process = psutil.Process()
        self.total_host = psutil.virtual_memory().total
        self.device = device if device is not None and device.type == "cuda" else None
        self._warned: Dict[str, bool] = {}

    def post_step(self, state: TrainState, output: StepOutput) -> None:
        if output.log_step:
            output.metrics.update(self.sample())

    def sample(self) -> Dict[str, float]:
        """One reading (cheap: no device sync; CUDA counters are host-side)."""
        import psutil

        rss = self.process.memory_info().rss
        vm = psutil.virtual_memory()
        metrics = {"mem/host_rss_gb": rss / GB, "mem/host_peak_rss_gb": peak_rss() / GB,
                   "mem/host_used_fraction": 1.0 - vm.available / vm.total}
        if hasattr(self.process, "num_fds"):  # POSIX: a leak of files or sockets shows here
            metrics["mem/open_fds"] = float(self.process.num_fds())
        if self.device is not None:
            total = torch.cuda.get_device_properties(self.device).total_memory
            reserved = torch.cuda.memory_reserved(self.device)
            metrics.update({
                "mem/cuda_allocated_gb": torch.cuda.memory_allocated(self.device) / GB,
                "mem/cuda_reserved_gb": reserved / GB,
                "mem/cuda_peak_gb": torch.cuda.max_memory_allocated(self.device) / GB,
                "mem/cuda_used_fraction": reserved / total,
            })
        self._check(metrics)
        return metrics

    def _check(self, metrics: Dict[str, float]) -> None:
        for key, what in (("mem/host_used_fraction", "host memory"),
                          ("mem/cuda_used_fraction", "accelerator memory")):
            value = metrics.get(key)
            if value is None:
                continue
            high = value >= self.warn_fraction
            if high and not self._warned.get(key):
                log.warning("OOM risk: %s %.0f%% used (warning above %.0f%%, "
                            "trainer.monitor.memory_warn_fraction): lower trainer.micro_batch_size, "
                            "enable model.activation_checkpointing or a higher ZeRO stage",
                            what, 100 * value, 100 * self.warn_fraction)
            self._warned[key] = high
