"""The curves of one or more runs overlaid: loss (against step and against tokens, incidents
marked), learning rate with the health multiplier, gradient norm, throughput with MFU, memory.

Each builder takes the runs as (label, records, events) and returns a `Panel` whose `series`
are the lines it drew, in drawing order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence

from ava.observe.report.figure import INCIDENT_STYLE, WIDE, Panel, colour, empty_note, new_figure, to_panel
from ava.observe.report.series import (
    COLLAPSE,
    LR_BACKOFF,
    Incident,
    TokenAxis,
    has_key,
    incidents,
    series,
)


@dataclass
class Curves:
    """What the curve panels need of one run."""

    label: str
    records: Sequence[Mapping[str, Any]]
    events: Sequence[Mapping[str, Any]]


MEMORY_KEYS = ("mem/host_rss_gb", "mem/cuda_allocated_gb", "mem/cuda_reserved_gb", "mem/cuda_peak_gb")
LINE = 1.4
LEFT_STYLES = ("-", "--", "-.", (0, (1, 1)))  # one per key of a panel; colour is the run's
RIGHT_STYLES = (":",)
# incident kinds drawn as a marker at the top edge: (marker, height in axes fraction)
TOP_MARKERS = {LR_BACKOFF: ("v", 0.97), COLLAPSE: ("D", 0.92)}


def _name(run: Curves, what: str, many: bool) -> str:
    return f"{run.label}: {what}" if many else what


def _mark_incidents(ax, marks: Sequence[Incident], x_of, shown: Dict[str, bool]) -> None:
    """Skipped steps, rollbacks and a stop as vertical lines; LR backoffs and collapse alerts as
    markers along the top edge (they often share a step with a skipped one). One legend entry
    per kind."""
    for mark in marks:
        col, style = INCIDENT_STYLE[mark.kind]
        x = x_of(mark.step)
        if not math.isfinite(x):
            continue
        label = None if shown.get(mark.kind) else mark.kind
        if mark.kind in TOP_MARKERS:
            ax.plot([x], [TOP_MARKERS[mark.kind][1]], marker=TOP_MARKERS[mark.kind][0], color=col,
                    linestyle="none", markersize=7, transform=ax.get_xaxis_transform(), clip_on=False,
                    label=label)
        else:
            ax.axvline(x, color=col, linestyle=style, linewidth=1.0, alpha=0.8, label=label)
        shown[mark.kind] = True


def loss_panel(runs: Sequence[Curves], *, by_tokens: bool, log_scale: bool) -> Panel:
    """Training and validation loss of every run, with its incidents marked."""
    fig = new_figure(WIDE)
    ax = fig.add_subplot()
    many, drawn, shown = len(runs) > 1, [], {}
    for i, run in enumerate(runs):
        axis = TokenAxis(run.records)
        x_of = axis.at if by_tokens else float
        for key, what, style in (("train/loss", "train loss", "-"), ("val/loss", "val loss", "--")):
            s = series(run.records, key, _name(run, what, many))
            if not s.x:
                continue
            if by_tokens:
                s = axis.convert(s)
            ax.plot(s.x, s.y, style, color=colour(i), linewidth=LINE, label=s.label,
                    marker="o" if key == "val/loss" else None, markersize=3)
            drawn.append(s)
        _mark_incidents(ax, incidents(run.events), x_of, shown)
    if not drawn:
        empty_note(ax, "no train/loss or val/loss logged")
    else:
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("tokens seen" if by_tokens else "step")
        ax.set_ylabel("loss" + (" (log scale)" if log_scale else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    title = f"Loss against {'tokens' if by_tokens else 'step'}"
    return to_panel(fig, f"loss-{'tokens' if by_tokens else 'step'}", title, series=drawn,
                    caption="solid: training loss, dashed: validation loss; incidents from events.jsonl: "
                            "vertical lines (skipped step, rollback, stop), markers along the top "
                            "(LR backoff, router-collapse alert)")


def _simple(runs: Sequence[Curves], panel_id: str, title: str, left: Sequence[tuple[str, str]],
            right: Sequence[tuple[str, str]] = (), *, ylabel: str, rlabel: str = "",
            log_y: bool = False, caption: str = "", missing: str = "") -> Panel:
    """Keys on the left axis (solid) and on a right axis (dotted) against step, every run."""
    fig = new_figure(WIDE)
    ax = fig.add_subplot()
    many, drawn = len(runs) > 1, []
    twin = ax.twinx() if any(has_key(r.records, k) for r in runs for k, _ in right) else None
    handles = []
    for i, run in enumerate(runs):
        for axis, keys, styles in ((ax, left, LEFT_STYLES), (twin, right, RIGHT_STYLES)):
            for j, (key, what) in enumerate(keys):
                if axis is None or not has_key(run.records, key):
                    continue
                s = series(run.records, key, _name(run, what, many))
                handles += axis.plot(s.x, s.y, linestyle=styles[j % len(styles)], color=colour(i),
                                     linewidth=LINE, label=s.label)
                drawn.append(s)
    if not drawn:
        empty_note(ax, missing or f"no {', '.join(k for k, _ in left)} logged")
    else:
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log_y and all(v > 0 for s in drawn for v in s.y if math.isfinite(v)):
            ax.set_yscale("log")
        if twin is not None:
            twin.set_ylabel(rlabel)
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8, loc="best")
    return to_panel(fig, panel_id, title, series=drawn, caption=caption)


def lr_panel(runs: Sequence[Curves]) -> Panel:
    return _simple(runs, "lr", "Learning rate and health multiplier", [("train/lr", "learning rate")],
                   [("health/lr_multiplier", "health LR multiplier")], ylabel="learning rate",
                   rlabel="LR multiplier", caption="solid: the LR applied (schedule x multiplier); "
                   "dotted: the health monitor's multiplier (1 = no backoff)")


def grad_norm_panel(runs: Sequence[Curves], *, log_scale: bool) -> Panel:
    return _simple(runs, "grad-norm", "Gradient norm", [("train/grad_norm", "gradient norm")],
                   ylabel="global gradient norm", log_y=log_scale,
                   caption="gaps: non-finite norms (those steps were skipped)")


def throughput_panel(runs: Sequence[Curves]) -> Panel:
    mfu = any(has_key(r.records, "perf/mfu") for r in runs)
    right = [("perf/mfu", "MFU")] if mfu else [("perf/tflops_per_device", "TFLOP/s per device")]
    return _simple(runs, "throughput", "Throughput" + (" and MFU" if mfu else ""),
                   [("perf/tokens_per_s", "tokens/s")], right, ylabel="tokens/s (all ranks)",
                   rlabel="MFU" if mfu else "achieved TFLOP/s per device",
                   caption="dotted: " + ("model FLOPs utilisation" if mfu else
                                         "achieved TFLOP/s (MFU unknown: no peak FLOP/s for this device)"))


def memory_panel(runs: Sequence[Curves]) -> Panel:
    keys = [(k, k.removeprefix("mem/").removesuffix("_gb").replace("_", " ")) for k in MEMORY_KEYS]
    return _simple(runs, "memory", "Memory", keys, ylabel="GB", caption="rank 0's process, on log steps",
                   missing="no mem/* metrics logged")


def curve_panels(runs: Sequence[Curves], *, log_scale: bool) -> List[Panel]:
    return [loss_panel(runs, by_tokens=False, log_scale=log_scale),
            loss_panel(runs, by_tokens=True, log_scale=log_scale),
            lr_panel(runs), grad_norm_panel(runs, log_scale=log_scale),
            throughput_panel(runs), memory_panel(runs)]
