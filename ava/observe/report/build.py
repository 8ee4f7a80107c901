"""`write_report(run_dirs, out)`: read the runs, draw every panel, write the page.

The page for one run lands in `<run_dir>/report.html` (a sweep directory: `<sweep_dir>/
report.html`); for several directories, in `report.html` of the current directory, unless `out`
says where. It is written to a temporary name and renamed, so a reader never sees half a page.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

from ava.observe.report.curves import Curves, curve_panels
from ava.observe.report.experts import expert_panels
from ava.observe.report.page import Group, RunHeader, Section, render
from ava.observe.report.records import ReportError
from ava.observe.report.runs import RunData, load_runs

REPORT_FILE = "report.html"
MAX_WARNINGS = 20  # unreadable lines listed on the page; the count is always complete


def default_out(run_dirs: Sequence[Path]) -> Path:
    return Path(run_dirs[0]) / REPORT_FILE if len(run_dirs) == 1 else Path(REPORT_FILE)


def sections(runs: Sequence[RunData], log_scale: bool) -> List[Section]:
    curves = curve_panels([Curves(r.label, r.records, r.events) for r in runs], log_scale=log_scale)
    loss, rest = curves[:2], curves[2:]
    expert_groups = []
    for i, run in enumerate(runs):
        panels = expert_panels(run.records, prefix=f"run{i}-" if len(runs) > 1 else "")
        loads = [p for p in panels if "-load-layer" in p.id]
        others = [p for p in panels if p not in loads]
        heading = run.label if len(runs) > 1 else ""
        expert_groups += [Group(heading, others[:1]), Group("Load over time per layer" if not heading else "",
                                                            loads, grid=True), Group("", others[1:])]
    return [Section("loss", "Loss", [Group("", loss)]),
            Section("optimisation", "Optimisation and performance", [Group("", rest)]),
            Section("experts", "Experts", expert_groups)]


def write_runs(runs: Sequence[RunData], out: Path, log_scale: bool = False) -> Path:
    """Draw already loaded runs (`runs.load_runs`) into the page `out`; returns `out`."""
    bad = [b for r in runs for b in r.bad_lines]
    warnings = [str(b) for b in bad[:MAX_WARNINGS]]
    if len(bad) > MAX_WARNINGS:
        warnings.append(f"... and {len(bad) - MAX_WARNINGS} more")
    rows = [r.summary.rows() for r in runs]
    summary = [(name, [row[i][1] for row in rows]) for i, (name, _) in enumerate(rows[0])]
    summary.insert(0, ("overrides", [" ".join(r.overrides) or "none" for r in runs]))
    title = "Ava report: " + (runs[0].label if len(runs) == 1 else f"{len(runs)} runs")
    page = render(title, [RunHeader(r.label, str(r.path)) for r in runs], summary,
                  sections(runs, log_scale), warnings, len(bad))
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target


def write_report(run_dirs: List[Path], out: Optional[Path] = None, log_scale: bool = False) -> Path:
    """Write the HTML report of `run_dirs` (run or Hydra sweep directories, overlaid) and
    return its path. Raises `ReportError` for input it cannot draw (the message names the file)."""
    if not run_dirs:
        raise ReportError("no run directory given")
    runs = load_runs([Path(p) for p in run_dirs])
    return write_runs(runs, Path(out) if out is not None else default_out(run_dirs), log_scale)
