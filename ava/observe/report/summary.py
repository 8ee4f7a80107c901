"""The run's summary table: model size, data counts, world size, ZeRO stage, wall time, export.

Each fact comes from the most direct record a run leaves: `train.log` holds the lines the trainer
prints once (parameters, the data validation report, the process group, the DeepSpeed engine, the
final "done" line, an export's "exported ... to PATH" line); the metrics give the world size
(tokens/s over tokens/s per device) and the time span when the log lacks them; `status.json`
says how the last attempt ended. A fact found nowhere is None and shows as "unknown".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ava.observe.report.records import as_float

LOG_FILE = "train.log"
STATUS_FILE = "status.json"
PARAMS = re.compile(r"model (\S+): ([\d,]+) parameters \(([\d,]+) active per token\)")
DATA_COUNTS = re.compile(r"data validation: records read (\d+), kept (\d+), skipped (\d+)")
DATA_BLOCKS = re.compile(r"(\d+) tokens, (\d+) train \+ (\d+) val blocks")
WORLD = re.compile(r"process group: (\w+), (\d+) rank\(s\)")
ZERO = re.compile(r"ZeRO stage (\d)")
DONE = re.compile(r"done: step (\d+).*, ([\d.]+)s$")
PRESET_STAGE = re.compile(r"zero(\d)(_\w+)?")
EXPORTED = re.compile(r"exported (\w+) layout \((\w+)\) to (.+)$")


@dataclass
class RunSummary:
    model: Optional[str] = None
    total_params: Optional[int] = None
    active_params: Optional[int] = None
    records_read: Optional[int] = None
    records_kept: Optional[int] = None
    records_skipped: Optional[int] = None
    train_tokens: Optional[int] = None
    train_blocks: Optional[int] = None
    val_blocks: Optional[int] = None
    world_size: Optional[int] = None
    backend: Optional[str] = None
    zero_stage: Optional[int] = None
    steps: Optional[int] = None
    tokens_seen: Optional[int] = None
    wall_s: Optional[float] = None
    status: Optional[str] = None
    export: Optional[str] = None
    incidents: int = 0
    rollbacks: int = 0
    alerts: int = 0

    def rows(self) -> List[tuple[str, str]]:
        """(name, value) pairs as the page shows them."""
        def n(v: Optional[int]) -> str:
            return "unknown" if v is None else f"{v:,}"

        wall = "unknown" if self.wall_s is None else _duration(self.wall_s)
        data = "unknown" if self.records_read is None else (
            f"{self.records_read:,} read, {self.records_kept:,} kept, {self.records_skipped:,} skipped")
        if self.train_tokens is not None:
            data += f"; {self.train_tokens:,} tokens, {self.train_blocks:,} train + {self.val_blocks:,} val blocks"
        world = n(self.world_size) + (f" ({self.backend})" if self.backend else "")
        return [("model", self.model or "unknown"),
                ("parameters (total / active per token)", f"{n(self.total_params)} / {n(self.active_params)}"),
                ("data records", data), ("world size", world),
                ("ZeRO stage", "unknown" if self.zero_stage is None else str(self.zero_stage)),
                ("steps / tokens seen", f"{n(self.steps)} / {n(self.tokens_seen)}"),
                ("wall time", wall), ("status", self.status or "unknown"),
                ("incidents / rollbacks / alerts", f"{self.incidents} / {self.rollbacks} / {self.alerts}"),
                ("final export", self.export or "none")]


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m {s:02d}s" if hours else (f"{m}m {s:02d}s" if m else f"{seconds:.1f}s")


def _last(pattern: re.Pattern[str], lines: Sequence[str]) -> Optional[re.Match[str]]:
    for line in reversed(lines):
        match = pattern.search(line)
        if match:
            return match
    return None


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def _world_from_metrics(records: Sequence[Mapping[str, Any]]) -> Optional[int]:
    for r in reversed(records):
        total, per = as_float(r.get("perf/tokens_per_s")), as_float(r.get("perf/tokens_per_s_per_device"))
        if total > 0 and per > 0:
            return round(total / per)
    return None


def summarise(run_dir: Path, records: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]],
              config: Mapping[str, Any]) -> RunSummary:
    log_path = Path(run_dir) / LOG_FILE
    lines = log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []
    s = RunSummary()
    if m := _last(PARAMS, lines):
        s.model, s.total_params, s.active_params = m.group(1), _int(m.group(2)), _int(m.group(3))
    else:
        s.model = (config.get("model") or {}).get("name")
    if m := _last(DATA_COUNTS, lines):
        s.records_read, s.records_kept, s.records_skipped = (int(g) for g in m.groups())
    if m := _last(DATA_BLOCKS, lines):
        s.train_tokens, s.train_blocks, s.val_blocks = (int(g) for g in m.groups())
    if m := _last(WORLD, lines):
        s.backend, s.world_size = m.group(1), int(m.group(2))
    else:
        s.world_size = _world_from_metrics(records)
    if m := _last(ZERO, lines):
        s.zero_stage = int(m.group(1))
    elif m := PRESET_STAGE.fullmatch(str((config.get("deepspeed") or {}).get("config", ""))):
        s.zero_stage = int(m.group(1))  # the ds_configs preset's name: zero0 ... zero3_offload
    if m := _last(EXPORTED, lines):
        s.export = f"{m.group(3)} ({m.group(1)} layout, {m.group(2)})"
    for e in events:
        if e.get("event") == "export" and e.get("path"):
            s.export = str(e["path"])
    train = [r for r in records if "train/loss" in r]
    if train:
        s.steps = int(train[-1]["step"])
        tokens = as_float(train[-1].get("train/tokens_seen"))
        s.tokens_seen = int(tokens) if tokens == tokens else None
    if m := _last(DONE, lines):
        s.wall_s = float(m.group(2))
    else:
        times = [as_float(r.get("time")) for r in records if "time" in r]
        s.wall_s = max(times) - min(times) if len(times) > 1 else None
    status_path = Path(run_dir) / STATUS_FILE
    if status_path.is_file():
        try:
            status = json.loads(status_path.read_text())
            s.status = f"{status.get('status')} at step {status.get('step')} (exit {status.get('exit_status')})"
        except (ValueError, AttributeError):
            s.status = f"{status_path} is unreadable"
    kinds: Dict[str, int] = {}
    for e in events:
        kinds[str(e.get("event"))] = kinds.get(str(e.get("event")), 0) + 1
    s.incidents, s.rollbacks, s.alerts = kinds.get("incident", 0), kinds.get("rollback", 0), kinds.get("alert", 0)
    return s
