"""Which directories are runs, and what each holds: records, events, overrides, summary.

A run directory is what `ava-train` leaves (metrics.jsonl, train.log, .hydra/, checkpoints/,
status.json); a Hydra sweep directory holds `multirun.yaml` and one numbered run directory per
job (`0/`, `1/`, ...). Each run is named on the page by the overrides that tell it apart from the
other runs drawn with it (from `.hydra/overrides.yaml`), else by its directory name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence

import yaml

from ava.observe.report.records import BadLine, ReportError, load_events, load_metrics
from ava.observe.report.summary import RunSummary, summarise

RUN_DIR_SIGNS = ("metrics.jsonl", "train.log", ".hydra", "checkpoints", "status.json")
SWEEP_FILE = "multirun.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
CONFIG_FILE = Path(".hydra") / "config.yaml"


@dataclass
class RunData:
    """Everything the page draws for one run."""

    path: Path
    records: List[Dict[str, Any]]
    events: List[Dict[str, Any]]
    overrides: List[str]
    config: Dict[str, Any]
    summary: RunSummary
    bad_lines: List[BadLine] = field(default_factory=list)
    label: str = ""


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_DIR_SIGNS)


def sweep_runs(path: Path) -> List[Path]:
    """The numbered job directories of a Hydra sweep directory, in job order ([] if none)."""
    jobs = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit() and is_run_dir(p)]
    return sorted(jobs, key=lambda p: int(p.name))


def find_runs(paths: Sequence[Path]) -> List[Path]:
    """Run directories, in order: each path is a run directory or a sweep directory (expanded)."""
    found: List[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReportError(f"{path} does not exist")
        if not path.is_dir():
            raise ReportError(f"{path} is not a directory: pass a run directory (with metrics.jsonl) "
                              "or a Hydra sweep directory")
        if is_run_dir(path):
            found.append(path)
            continue
        jobs = sweep_runs(path)
        if not jobs and (path / SWEEP_FILE).is_file():
            raise ReportError(f"{path} is a Hydra sweep directory with no run in it yet (no numbered "
                              "directory with metrics.jsonl)")
        if not jobs:
            raise ReportError(f"{path} is not a run directory (no metrics.jsonl, train.log, .hydra/, "
                              "checkpoints/ or status.json) nor a Hydra sweep directory "
                              f"({SWEEP_FILE} and numbered run directories)")
        found.extend(jobs)
    return found


def _yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return None  # the summary shows "unknown" rather than stopping the report


def load_run(path: Path) -> RunData:
    """One run directory's records, events, overrides and summary (`ReportError` if its
    metrics.jsonl is missing, empty or unreadable)."""
    metrics = load_metrics(path)
    events = load_events(path)
    overrides = _yaml(path / OVERRIDES_FILE)
    config = _yaml(path / CONFIG_FILE)
    config = config if isinstance(config, dict) else {}
    return RunData(path=path, records=metrics.records, events=events.records,
                   overrides=[str(o) for o in overrides] if isinstance(overrides, list) else [],
                   config=config, summary=summarise(path, metrics.records, events.records, config),
                   bad_lines=[*metrics.bad, *events.bad])


def label_runs(runs: Sequence[RunData]) -> None:
    """Name each run by its overrides that not every run shares (all of them for a single run,
    minus the noisy ones); fall back to the directory name, made unique."""
    common = set.intersection(*(set(r.overrides) for r in runs)) if len(runs) > 1 else set()
    seen: Dict[str, int] = {}
    for run in runs:
        own = [o for o in run.overrides if o not in common and not o.startswith("hydra.")]
        label = ", ".join(own) if len(runs) > 1 and own else run.path.name
        seen[label] = seen.get(label, 0) + 1
        run.label = label if seen[label] == 1 else f"{label} ({seen[label]})"


def load_runs(paths: Sequence[Path]) -> List[RunData]:
    runs = [load_run(p) for p in find_runs(paths)]
    label_runs(runs)
    return runs

