"""Observability: the loop's callback interface, and the callbacks that watch a run.

The loop produces one flat dict of metrics per step (`train/loss`, `perf/tokens_per_s`, ...) and
per evaluation (`val/loss`, `val/ppl`); monitors add theirs in `post_step`, and the sinks
(console, JSONL, W&B; rank 0) receive them in `log_metrics`. A new callback subclasses
`Callback` (see `ava.observe.callbacks` for the hooks and their order).
"""

from ava.observe.callbacks import Callback, CallbackList, StepOutput, TrainState
from ava.observe.console import ConsoleSink
from ava.observe.jsonl import JsonlSink
from ava.observe.sinks import build_sinks
from ava.observe.throughput import Throughput
from ava.observe.wandb_sink import WandbSink

__all__ = [
    "Callback",
    "CallbackList",
    "ConsoleSink",
    "JsonlSink",
    "StepOutput",
    "Throughput",
    "TrainState",
    "WandbSink",
    "build_sinks",
]
