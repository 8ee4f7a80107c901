"""The JSONL sink: `metrics.jsonl` and `events.jsonl` in the run directory, one JSON object per
line (non-finite floats as strings, so every line parses with any JSON reader)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from ava.observe.callbacks import Callback, TrainState


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value



class JsonlSink(Callback):
    """One JSON object per line in `<run_dir>/metrics.jsonl`: `{"step": N, "time": ..., ...}`,
    and events in `<run_dir>/events.jsonl`. Appends, so a resumed run continues the same files."""

    name = "jsonl"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.events_path = self.path.with_name("events.jsonl")
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (closed by close())
        self._events: Any = None

    def log_metrics(self, state: Optional[TrainState], metrics: Mapping[str, Any], step: int) -> None:
        record: Dict[str, Any] = {"step": step, "time": round(time.time(), 3)}
        for key, value in metrics.items():
            record[key] = _jsonable(value)
        self._file.write(json.dumps(record) + "\n")

    def on_event(self, state: Optional[TrainState], record: Mapping[str, Any]) -> None:
        if self._events is None:
            self._events = open(self.events_path, "a", buffering=1)  # noqa: SIM115
        line = {"time": round(time.time(), 3), **_jsonable(dict(record))}
        self._events.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._file.close()
        if self._events is not None:
            self._events.close()
