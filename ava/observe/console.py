"""The console sink: a rich progress bar on interactive terminals and a log line every
`trainer.log_every` steps; incidents, alerts and rollbacks as warnings."""

from __future__ import annotations

import logging
import sys
from typing import Any, List, Mapping, Optional

from ava.observe.callbacks import Callback, TrainState
from ava.observe.throughput import format_count, format_duration

log = logging.getLogger("ava.train")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ConsoleSink(Callback):
    """A rich progress bar (step, loss, tokens/s, ETA) on interactive terminals, and a
    concise log line every `log_every` steps (always, so logs and CI show progress)."""

    name = "console"

    def __init__(self, max_steps: int, log_every: int, progress_bar: bool = True,
                 start_step: int = 0) -> None:
        self.max_steps = max_steps
        self.log_every = log_every
        self._progress: Any = None
        self._task: Any = None
        self._redirected: List[Any] = []
        if progress_bar and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("eta"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False)
            self._task = self._progress.add_task("train", total=max_steps, completed=start_step,
                                                 loss="-", tps="-")
            real = (sys.stdout, sys.stderr)
            self._progress.start()  # replaces sys.stdout/err with proxies that print above it
            # console log handlers hold the real streams: send them through the proxies too
            self._redirected = []
            for handler in logging.getLogger().handlers:
                if type(handler) is logging.StreamHandler and handler.stream in real:
                    proxy = sys.stdout if handler.stream is real[0] else sys.stderr
                    self._redirected.append((handler, handler.setStream(proxy)))

    def log_metrics(self, state: Optional[TrainState], metrics: Mapping[str, Any], step: int) -> None:
        if "val/loss" in metrics:
            log.info("eval step %d: val loss %.4f | ppl %.2f", step, metrics["val/loss"],
                     metrics.get("val/ppl", float("nan")))
        if "train/loss" not in metrics:
            return
        tps = format_count(metrics.get("perf/tokens_per_s", 0.0))
        if self._progress is not None:
            self._progress.update(self._task, completed=step,
                                  loss=f"{metrics['train/loss']:.4f}", tps=tps)
        if step % self.log_every == 0 or step == self.max_steps:
            grad = metrics.get("train/grad_norm")
            extra = ""
            if "mem/host_rss_gb" in metrics:
                extra += f" | rss {metrics['mem/host_rss_gb']:.1f}G"
            if "mem/cuda_peak_gb" in metrics:
                extra += f" | gpu peak {metrics['mem/cuda_peak_gb']:.1f}G"
            if "perf/mfu" in metrics:
                extra += f" | mfu {100 * metrics['perf/mfu']:.1f}%"
            if metrics.get("health/skipped_steps"):
                extra += f" | skipped {int(metrics['health/skipped_steps'])}"
            log.info("step %d/%d | loss %.4f | lr %.2e | grad %s | %s tok/s%s | eta %s",
                     step, self.max_steps, metrics["train/loss"], metrics.get("train/lr", 0.0),
                     "-" if grad is None else f"{grad:.3f}", tps, extra,
                     format_duration(metrics.get("perf/eta_s", 0.0)))

    def on_event(self, state: Optional[TrainState], record: Mapping[str, Any]) -> None:
        kind = record.get("event")
        if kind == "incident":
            worst = ", ".join(f"{n} {v:.3g}" for n, v in (record.get("worst_grad_norms") or [])[:3])
            log.warning("step %s skipped: %s (value %s, z %s); LR x%.3g%s", record.get("step"),
                        record.get("kind"), _fmt(record.get("value")), _fmt(record.get("z")),
                        record.get("lr_multiplier", 1.0), f"; largest grads: {worst}" if worst else "")
        elif kind in ("alert", "rollback"):  # a stop is logged as an error by the trainer
            log.warning("%s", record.get("text") or record)

    def close(self) -> None:
        if self._progress is not None:
            for handler, stream in self._redirected:
                handler.setStream(stream)
            self._progress.stop()
            self._progress = None
