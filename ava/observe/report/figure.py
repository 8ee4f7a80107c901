"""A drawn panel: its PNG, its size, and the data it was drawn from.

Figures are `matplotlib.figure.Figure` objects rendered by the Agg canvas directly: no pyplot,
so no global backend or figure registry (safe inside a training process and in threads), and
no display is ever needed. Every figure has a fixed size in inches at a fixed DPI, so a PNG's
pixel size is known in advance (`Panel.width` x `Panel.height`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ava.observe.report.series import Series

DPI = 100
WIDE = (10.0, 3.6)  # inches: the curves across the page
HALF = (6.0, 3.4)  # one MoE layer's load over time, two or three to a row
HEATMAP = (7.0, 4.2)
# One colour per run (overlays) and per incident kind (vertical marks), colour-blind safe
RUN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf")
INCIDENT_STYLE = {"skipped step": ("#d62728", ":"), "LR backoff": ("#ff7f0e", "--"),
                  "rollback": ("#9467bd", "-"), "collapse alert": ("#8c564b", "-."),
                  "stop": ("#000000", "-")}


@dataclass
class Panel:
    """One image of the page (or a W&B media item): `series` (lines) and `matrix` (a heatmap)
    hold exactly what was drawn; `key` names it as W&B media."""

    id: str
    title: str
    png: bytes
    width: int
    height: int
    series: List[Series] = field(default_factory=list)
    matrix: Optional[List[List[float]]] = None
    caption: str = ""
    key: str = ""


def new_figure(size: Tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_panel(fig: Figure, panel_id: str, title: str, *, series: Optional[List[Series]] = None,
             matrix: Optional[List[List[float]]] = None, caption: str = "", key: str = "") -> Panel:
    """Render `fig` to PNG at its own size (no tight bounding box: the size stays fixed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    width, height = (round(v * DPI) for v in fig.get_size_inches())
    return Panel(panel_id, title, buf.getvalue(), width, height, list(series or []), matrix, caption, key)


def colour(index: int) -> str:
    return RUN_COLOURS[index % len(RUN_COLOURS)]


def empty_note(ax, text: str) -> None:
    """Say on the axes why they are empty, so a missing metric never looks like a bug."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])
