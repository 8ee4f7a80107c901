"""Expert panels of one run: the layer x expert load heatmap at the latest heatmap step, load
over time per layer, Gini and entropy per layer, dropped fraction, the expert bias when on.

`expert_load_panels(records)` is also the W&B entry point: given the metrics records seen so far
(JSONL-shaped, `{"step": N, "moe/load_heatmap": [[...], ...], ...}`), it returns the heatmap and
the per-layer load-over-time images with their W&B keys, the same pictures as the page.
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from ava.observe.report.figure import HALF, HEATMAP, WIDE, Panel, empty_note, new_figure, to_panel
from ava.observe.report.series import Series, expert_bias, has_key, heatmaps, layers_with, series

ANNOTATE_MAX_CELLS = 16 * 16  # above this many cells, numbers in the cells are unreadable
HEATMAP_MEDIA_KEY = "moe/load_heatmap_image"
LOAD_MEDIA_KEY = "moe/layer{layer}/load_over_time"
LEGEND_COLUMNS = 5
NO_HEATMAP = "no moe/load_heatmap logged (logger.heatmap_every=0?)"


def moe_layer_ids(records: Sequence[Mapping[str, Any]], rows: int) -> List[int]:
    """The model's index of each heatmap row: a heatmap lists the MoE layers in order, and a model
    with dense layers (DeepSeek's first layer) names them by `moe/layer{L}/*` keys that skip those."""
    ids = layers_with(records, "gini")
    return ids if len(ids) == rows else list(range(rows))


def _matrix_panel(matrix: List[List[float]], step: int, panel_id: str, title: str, *, label: str,
                  cmap: str, centre: Optional[float], key: str = "", caption: str = "",
                  row_names: Optional[List[int]] = None) -> Panel:
    """A layers x experts image with a colour bar, the values written in small matrices."""
    fig = new_figure(HEATMAP)
    ax = fig.add_subplot()
    finite = [v for row in matrix for v in row if math.isfinite(v)] or [0.0]
    if centre is None:
        vmin, vmax = 0.0, max(max(finite), 1e-12)
    else:
        spread = max(abs(v - centre) for v in finite) or 1e-12
        vmin, vmax = centre - spread, centre + spread
    image = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    layers, experts = len(matrix), max(len(r) for r in matrix)
    if layers * experts <= ANNOTATE_MAX_CELLS:
        for li, row in enumerate(matrix):
            for ei, v in enumerate(row):
                ax.text(ei, li, f"{v:.2f}", ha="center", va="center", fontsize=9,
                        color="white" if (v - vmin) < 0.5 * (vmax - vmin) else "black")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(experts))
    ax.set_yticks(range(layers), labels=[str(n) for n in (row_names or range(layers))])
    ax.set_title(f"step {step}", fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    return to_panel(fig, panel_id, title, matrix=matrix, key=key, caption=caption)


def heatmap_panel(records: Sequence[Mapping[str, Any]], panel_id: str = "experts-heatmap") -> Panel:
    """Load fractions per layer and expert at the latest heatmap step (balanced: 1/E each)."""
    maps = heatmaps(records)
    title = "Expert load at the latest heatmap step"
    if not maps:
        fig = new_figure(HEATMAP)
        empty_note(fig.add_subplot(), NO_HEATMAP)
        return to_panel(fig, panel_id, title, key=HEATMAP_MEDIA_KEY)
    step, matrix = maps[-1]
    experts = max(len(r) for r in matrix)
    return _matrix_panel(matrix, step, panel_id, title, label="fraction of the layer's tokens",
                         cmap="viridis", centre=None, key=HEATMAP_MEDIA_KEY,
                         row_names=moe_layer_ids(records, len(matrix)),
                         caption=f"balanced: {1 / experts:.3f} per expert; a dark cell is an expert "
                                 "that gets (almost) no tokens")


def load_over_time_panel(records: Sequence[Mapping[str, Any]], row: int,
                         panel_id: Optional[str] = None) -> Panel:
    """One MoE layer (heatmap row `row`): each expert's load fraction at every heatmap step, the
    balanced level, and the layer's dropped fraction (right axis) where capacity drops tokens."""
    all_maps = heatmaps(records)
    rows = max((len(m) for _, m in all_maps), default=row + 1)
    layer = moe_layer_ids(records, rows)[row] if row < rows else row  # the model's layer index
    maps = [(step, m[row]) for step, m in all_maps if row < len(m)]
    fig = new_figure(HALF)
    ax = fig.add_subplot()
    title = f"Layer {layer}: expert load over time"
    drawn: List[Series] = []
    if not maps:
        empty_note(ax, NO_HEATMAP)
    else:
        steps = tuple(float(s) for s, _ in maps)
        experts = max(len(row) for _, row in maps)
        last = maps[-1][1]
        for e in range(experts):
            values = tuple(row[e] if e < len(row) else math.nan for _, row in maps)
            dead = e < len(last) and last[e] == 0.0
            s = Series(f"expert {e}" + (" (no tokens)" if dead else ""), steps, values)
            ax.plot(s.x, s.y, marker="o", markersize=3, linewidth=1.2, label=s.label,
                    linestyle="--" if dead else "-")
            drawn.append(s)
        ax.axhline(1 / experts, color="#444444", linestyle=":", linewidth=1.0, label="balanced (1/E)")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("step")
        ax.set_ylabel("load fraction")
        drop_key = f"moe/layer{layer}/dropped_fraction"
        if has_key(records, drop_key):
            drops = series(records, drop_key, "dropped fraction")
            if any(v > 0 for v in drops.y):
                twin = ax.twinx()
                twin.plot(drops.x, drops.y, color="#999999", linestyle=":", linewidth=1.0)
                twin.set_ylabel("dropped fraction (dotted grey)", fontsize=8)
                drawn.append(drops)
        ax.grid(alpha=0.3)
        fig.legend(fontsize=7, ncol=min(experts + 1, LEGEND_COLUMNS), loc="outside lower center")
    return to_panel(fig, panel_id or f"experts-load-layer{layer}", title, series=drawn,
                    key=LOAD_MEDIA_KEY.format(layer=layer))


def heatmap_layers(records: Sequence[Mapping[str, Any]]) -> int:
    maps = heatmaps(records)
    return max(len(m) for _, m in maps) if maps else 0


def expert_load_panels(records: Sequence[Mapping[str, Any]]) -> List[Panel]:
    """The W&B media (and the page's) of the expert load: the heatmap at the latest heatmap
    record, then one load-over-time image per layer. [] when no record holds a heatmap."""
    layers = heatmap_layers(records)
    if not layers:
        return []
    return [heatmap_panel(records), *(load_over_time_panel(records, layer) for layer in range(layers))]


def _per_layer_lines(ax, records: Sequence[Mapping[str, Any]], name: str) -> List[Series]:
    drawn = []
    for layer in layers_with(records, name):
        s = series(records, f"moe/layer{layer}/{name}", f"layer {layer}")
        ax.plot(s.x, s.y, linewidth=1.2, label=s.label)
        drawn.append(s)
    return drawn


def balance_panel(records: Sequence[Mapping[str, Any]], panel_id: str = "experts-gini-entropy") -> Panel:
    """Gini (0: balanced) and entropy (log E: balanced) of the load, per layer."""
    fig = new_figure(WIDE)
    left, right = fig.subplots(1, 2)
    drawn: List[Series] = []
    for ax, name, ylabel in ((left, "gini", "Gini of the load (0 = balanced)"),
                             (right, "entropy", "entropy of the load (nats)")):
        lines = _per_layer_lines(ax, records, name)
        drawn += [Series(f"{s.label} {name}", s.x, s.y) for s in lines]
        if not lines:
            empty_note(ax, f"no moe/layer*/{name} logged")
            continue
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(lines) > 6 else 1)
    maps = heatmaps(records)
    if maps and drawn:
        experts = max(len(r) for r in maps[-1][1])
        right.axhline(math.log(experts), color="#444444", linestyle=":", linewidth=1.0)
    return to_panel(fig, panel_id, "Balance per layer: Gini and entropy", series=drawn,
                    caption="dotted: the entropy of a perfectly balanced layer, log E")


def dropped_panel(records: Sequence[Mapping[str, Any]], panel_id: str = "experts-dropped") -> Panel:
    """The fraction of token assignments dropped by expert capacity: the step's mean over layers
    (every step) and per layer (log steps)."""
    fig = new_figure(WIDE)
    ax = fig.add_subplot()
    drawn: List[Series] = []
    if has_key(records, "moe/dropped_fraction"):
        s = series(records, "moe/dropped_fraction", "mean over layers")
        ax.plot(s.x, s.y, color="#000000", linewidth=1.4, label=s.label)
        drawn.append(s)
    drawn += _per_layer_lines(ax, records, "dropped_fraction")
    if not drawn:
        empty_note(ax, "no dropped fraction logged")
    else:
        ax.set_xlabel("step")
        ax.set_ylabel("dropped fraction")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(drawn) > 6 else 1)
    dropped = any(v > 0 for s in drawn for v in s.y)
    return to_panel(fig, panel_id, "Dropped fraction", series=drawn,
                    caption="token assignments over an expert's capacity (model.capacity_factor)"
                    if dropped else "0 everywhere: dropless routing, or capacity never reached")


def bias_panel(records: Sequence[Mapping[str, Any]], panel_id: str = "experts-bias") -> Optional[Panel]:
    """The auxiliary-loss-free balancing bias per layer and expert, when the run logs it."""
    found: Optional[Tuple[int, List[List[float]]]] = expert_bias(records)
    if found is None:
        return None
    step, matrix = found
    return _matrix_panel(matrix, step, panel_id, "Expert bias (auxiliary-loss-free balancing)",
                         label="bias added to the selection scores", cmap="coolwarm", centre=0.0,
                         row_names=moe_layer_ids(records, len(matrix)),
                         caption="red: raised for an under-loaded expert, blue: lowered for an over-loaded one")


def expert_panels(records: Sequence[Mapping[str, Any]], prefix: str = "") -> List[Panel]:
    """Every expert panel of one run, ids prefixed with `prefix` (to tell runs apart)."""
    panels = [heatmap_panel(records, f"{prefix}experts-heatmap")]
    layers = heatmap_layers(records) or len(layers_with(records, "gini"))
    names = moe_layer_ids(records, layers)
    panels += [load_over_time_panel(records, row, f"{prefix}experts-load-layer{names[row]}") for row in range(layers)]
    panels += [balance_panel(records, f"{prefix}experts-gini-entropy"),
               dropped_panel(records, f"{prefix}experts-dropped")]
    bias = bias_panel(records, f"{prefix}experts-bias")
    return panels + ([bias] if bias else [])
