"""From records to what is drawn: one value per step for a key, incidents as marks.

A rollback (and a resumed run) logs some steps twice; the later record is the one the run kept,
so every series takes the last value logged for each step, sorted by step. Validation records
share steps with training records but carry other keys, so they never shadow each other.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ava.observe.report.records import as_float

TOKENS_KEY = "train/tokens_seen"
HEATMAP_KEY = "moe/load_heatmap"  # the same key as ava.observe.sinks.HEATMAP_KEY
LAYER_KEY = re.compile(r"^moe/layer(\d+)/(.+)$")
# Expert-bias keys (auxiliary-loss-free balancing) the report draws when a run logs them: a
# layers x experts list like the heatmap, or one list of experts per layer
BIAS_KEY = "moe/expert_bias"
LAYER_BIAS_NAME = "expert_bias"


@dataclass(frozen=True)
class Series:
    """One drawn line: x and y exactly as plotted (tests compare them with the JSONL)."""

    label: str
    x: Tuple[float, ...]
    y: Tuple[float, ...]


def last_per_step(records: Sequence[Mapping[str, Any]], key: str) -> Dict[int, Any]:
    """step -> the last value logged under `key` at that step."""
    values: Dict[int, Any] = {}
    for record in records:
        if key in record:
            values[int(record["step"])] = record[key]
    return dict(sorted(values.items()))


def series(records: Sequence[Mapping[str, Any]], key: str, label: str = "") -> Series:
    """`key` against step, as floats (non-finite values kept: they plot as gaps)."""
    values = last_per_step(records, key)
    return Series(label or key, tuple(float(s) for s in values), tuple(as_float(v) for v in values.values()))


def has_key(records: Sequence[Mapping[str, Any]], key: str) -> bool:
    return any(key in r for r in records)


class TokenAxis:
    """Step -> tokens seen, from `train/tokens_seen`; steps between logged ones interpolate
    linearly, steps before the first one scale from zero (for events and validation points)."""

    def __init__(self, records: Sequence[Mapping[str, Any]]) -> None:
        pairs = [(s, as_float(v)) for s, v in last_per_step(records, TOKENS_KEY).items()]
        self.steps = [float(s) for s, v in pairs if math.isfinite(v)]
        self.tokens = [v for s, v in pairs if math.isfinite(v)]

    def __bool__(self) -> bool:
        return bool(self.steps)

    def at(self, step: float) -> float:
        if not self.steps:
            return math.nan
        i = bisect_right(self.steps, step)
        if i == 0:
            return self.tokens[0] * step / self.steps[0] if self.steps[0] else self.tokens[0]
        if i == len(self.steps):
            if len(self.steps) == 1:
                return self.tokens[0] * step / self.steps[0] if self.steps[0] else self.tokens[0]
            per_step = (self.tokens[-1] - self.tokens[-2]) / (self.steps[-1] - self.steps[-2])
            return self.tokens[-1] + per_step * (step - self.steps[-1])
        s0, s1, t0, t1 = self.steps[i - 1], self.steps[i], self.tokens[i - 1], self.tokens[i]
        return t0 + (t1 - t0) * (step - s0) / (s1 - s0)

    def convert(self, s: Series) -> Series:
        return Series(s.label, tuple(self.at(x) for x in s.x), s.y)


def layers_with(records: Sequence[Mapping[str, Any]], name: str) -> List[int]:
    """The MoE layers that logged `moe/layer{i}/{name}`, in order."""
    found = set()
    for record in records:
        for key in record:
            match = LAYER_KEY.match(key)
            if match and match.group(2) == name:
                found.add(int(match.group(1)))
    return sorted(found)


def matrices(records: Sequence[Mapping[str, Any]], key: str) -> List[Tuple[int, List[List[float]]]]:
    """(step, layers x experts values) of every record whose `key` is a list of lists (the
    load heatmap, the expert bias), last per step."""
    out = []
    for step, value in last_per_step(records, key).items():
        if isinstance(value, list) and value and all(isinstance(row, list) and row for row in value):
            out.append((step, [[as_float(v) for v in row] for row in value]))
    return out


def heatmaps(records: Sequence[Mapping[str, Any]]) -> List[Tuple[int, List[List[float]]]]:
    """(step, layers x experts load fractions) of every `moe/load_heatmap` record."""
    return matrices(records, HEATMAP_KEY)


def expert_bias(records: Sequence[Mapping[str, Any]]) -> Optional[Tuple[int, List[List[float]]]]:
    """(step, layers x experts bias) at the latest step that logged one, or None."""
    whole = matrices(records, BIAS_KEY)
    if whole:
        return whole[-1]
    layers = layers_with(records, LAYER_BIAS_NAME)
    if not layers:
        return None
    rows, step = [], -1
    for layer in layers:
        last_step, value = list(last_per_step(records, f"moe/layer{layer}/{LAYER_BIAS_NAME}").items())[-1]
        step = max(step, last_step)
        rows.append([as_float(v) for v in value] if isinstance(value, list) else [as_float(value)])
    return step, rows


# ---------------------------------------------------------------- incidents
SKIPPED, LR_BACKOFF, ROLLBACK, COLLAPSE, STOP = "skipped step", "LR backoff", "rollback", "collapse alert", "stop"
INCIDENT_KINDS = (SKIPPED, LR_BACKOFF, ROLLBACK, COLLAPSE, STOP)


@dataclass(frozen=True)
class Incident:
    """One mark on the curves: its step, which of `INCIDENT_KINDS`, and a one-line description."""

    step: int
    kind: str
    text: str


def incidents(events: Sequence[Mapping[str, Any]]) -> List[Incident]:
    """Marks from `events.jsonl`: every health incident is a skipped step, and an LR backoff
    too when it left the LR multiplier below 1; rollbacks, router-collapse alerts and a stop."""
    out: List[Incident] = []
    for e in events:
        kind, step = e.get("event"), int(e["step"])
        if kind == "incident":
            out.append(Incident(step, SKIPPED, f"step {step} skipped: {e.get('kind', '?')}"))
            multiplier = as_float(e.get("lr_multiplier", 1.0))
            if multiplier < 1.0:  # the health monitor backs the LR off after an incident
                out.append(Incident(step, LR_BACKOFF, f"LR multiplier {multiplier:.3g} after step {step}"))
        elif kind == "rollback":
            out.append(Incident(step, ROLLBACK, f"rollback at step {step} to step {e.get('to_step', '?')}"))
        elif kind == "alert":
            out.append(Incident(step, COLLAPSE, str(e.get("text") or e.get("title") or "alert")))
        elif kind == "stop":
            out.append(Incident(step, STOP, str(e.get("title") or "stopped")))
    return out
