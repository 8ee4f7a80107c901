"""Observability: metric sinks (console, JSONL, W&B) and the callback interface of the loop.

The loop produces one flat dict of metrics per step (`train/loss`, `perf/tokens_per_s`, ...),
and per evaluation (`val/loss`, `val/ppl`); every `MetricsSink` receives them on rank 0.
`Callback`s get the loop's hooks and may keep state that is saved in checkpoints.
"""

from ava.observe.callbacks import Callback, CallbackList, StepOutput, TrainState
from ava.observe.sinks import ConsoleSink, JsonlSink, MetricsSink, WandbSink, build_sinks
from ava.observe.throughput import Throughput

__all__ = [
    "Callback",
    "CallbackList",
    "ConsoleSink",
    "JsonlSink",
    "MetricsSink",
    "StepOutput",
    "Throughput",
    "TrainState",
    "WandbSink",
    "build_sinks",
]
