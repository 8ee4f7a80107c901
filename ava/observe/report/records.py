"""Reading `metrics.jsonl` and `events.jsonl` as the JSONL sink wrote them, robustly.

A run killed mid-write leaves a truncated last line, and a disk hiccup can leave a garbled one:
such a line is skipped and *counted* (`BadLine`, reported on the page and on stderr with its
file:line), never a traceback. A file that is missing or holds no record at all is a
`ReportError` naming the file, because there is nothing to draw.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"

# The JSONL sink writes non-finite floats as these strings (JSON has no inf/nan)
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class ReportError(Exception):
    """Input the report cannot draw: the message names the file or directory and what to do."""


@dataclass(frozen=True)
class BadLine:
    """One skipped line: where it is and why it was unreadable."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class JsonlRead:
    """The records of one JSONL file, in file order, and the lines that were skipped."""

    path: Path
    records: List[Dict[str, Any]] = field(default_factory=list)
    bad: List[BadLine] = field(default_factory=list)


def as_float(value: Any) -> float:
    """A metric value as a float: numbers as they are, the sink's "nan"/"inf" strings decoded;
    anything else (a list, a string, None) is NaN, which plots as a gap."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return NON_FINITE.get(value, math.nan)
    return math.nan


def read_jsonl(path: Path) -> JsonlRead:
    """Every line that is a JSON object with an integer "step"; other lines skipped and counted.
    An absent file reads as empty (callers decide whether that is an error)."""
    out = JsonlRead(Path(path))
    if not out.path.is_file():
        return out
    with open(out.path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except ValueError:
                truncated = not line.endswith("\n")
                out.bad.append(BadLine(out.path, number, "truncated line (the run was stopped mid-write?)"
                                       if truncated else "not valid JSON"))
                continue
            if not isinstance(record, dict):
                out.bad.append(BadLine(out.path, number, "not a JSON object"))
            elif not isinstance(record.get("step"), int) or isinstance(record.get("step"), bool):
                out.bad.append(BadLine(out.path, number, 'no integer "step"'))
            else:
                out.records.append(record)
    return out


def load_metrics(run_dir: Path) -> JsonlRead:
    """`<run_dir>/metrics.jsonl`, which must exist and hold at least one readable record."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ReportError(f"{path}: no such file: the run has logged nothing yet, or it ran with "
                          "logger.jsonl=false")
    read = read_jsonl(path)
    if not read.records and not read.bad:
        raise ReportError(f"{path} is empty: the run has not logged a step yet")
    if not read.records:
        raise ReportError(f"{path} holds no readable record ({len(read.bad)} bad line(s), the first: "
                          f"{read.bad[0]})")
    return read


def load_events(run_dir: Path) -> JsonlRead:
    """`<run_dir>/events.jsonl` (incidents, rollbacks, alerts, a stop); absent means none."""
    return read_jsonl(Path(run_dir) / EVENTS_FILE)
