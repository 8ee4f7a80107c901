"""Environment record, JSON output and the rich tables `ava-bench` prints last."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table


def versions(packages: Sequence[str]) -> dict[str, Optional[str]]:
    """Installed version of each package (None: not installed)."""
    out: dict[str, Optional[str]] = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    """Device, thread count and library versions, recorded with every result."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "device": str(device), "device_name": name, "torch_threads": threads, "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "versions": versions(("torch", "deepspeed", "transformers", "numpy")),
    }


def write_json(path: Optional[str], payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))


def _ms(entry: dict) -> str:
    if "median_ms" not in entry:
        return "—"
    return f"{entry['median_ms']:.1f}±{entry['iqr_ms'] / 2:.1f}"


def moe_table(payload: dict[str, Any]) -> Table:
    from ava.bench.moe_bench import IMPLS

    env = payload["environment"]
    table = Table(title=f"ava-bench moe — fwd+bwd ms (median±IQR/2), {env['device_name']}, "
                        f"{env['torch_threads']} threads, fp32", title_justify="left")
    table.add_column("point", no_wrap=True)
    for name in IMPLS:
        table.add_column(name, justify="right", no_wrap=True)
    for col in ("best peer", "ava vs peer", "ava/dense", "ava GFLOP/s", "mem ava/dense", "agree (rel err ≤ 1e-4)"):
        table.add_column(col, justify="right", no_wrap=True)
    notes: dict[str, str] = {}
    for row in payload["points"]:
        res, summ = row["results"], row["summary"]
        cells = [row["label"]]
        for name in IMPLS:
            entry = res.get(name, {})
            cell = _ms(entry)
            if entry.get("status", "ok") != "ok":
                mark = notes.setdefault(entry["status"], f"[{len(notes) + 1}]")
                cell = f"n/a {mark}"
            cells.append(cell)
        agree = [f"{n}{'✓' if e['agrees'] else '✗'}" for n, e in res.items() if "agrees" in e]
        cells += [
            summ.get("best_peer", "—"),
            f"{summ['speedup_vs_best_peer']:.2f}x" if "speedup_vs_best_peer" in summ else "—",
            f"{summ['ava_over_dense_time']:.2f}" if "ava_over_dense_time" in summ else "—",
            f"{res['ava']['gflops']:.0f}" if "gflops" in res["ava"] else "—",
            f"{summ['ava_over_dense_memory']:.2f}" if "ava_over_dense_memory" in summ else "—",
            " ".join(agree) or "—",
        ]
        table.add_row(*cells)
    if notes:
        table.caption = "  ".join(f"{mark} {why}" for why, mark in notes.items())
        table.caption_justify = "left"
    return table


def train_table(payload: dict[str, Any]) -> Table:
    env = payload["environment"]
    gpu = env["device"].startswith("cuda")
    shape = "reduced shape" if payload.get("reduced") else "own dimensions"
    table = Table(title=f"ava-bench train — {payload['preset']} ({shape}) {payload['dims']}, batch "
                        f"{payload['batch']}x{payload['seq_len']}, {env['device_name']}, {payload['threads']} "
                        f"threads, {payload['dtype']}", title_justify="left")
    others = sorted(payload.get("other_threads", {}), key=int)
    cols = ["model", "step ms (median±IQR/2)", "forward", "backward", "optimizer", "tokens/s",
            "TFLOP/s" if gpu else "GFLOP/s", "of matmul", "MFU", "peak step MiB", "loss@0", "vs HF"]
    compiled = any("compile_s" in r for r in payload["results"].values())
    if compiled:  # `--compile`: what compiling costs once and gains per step
        cols += ["compile s", "vs eager"]
    for t in others:
        cols += [f"tokens/s {t} thr", f"vs HF {t} thr"]
    for col in cols:
        table.add_column(col, justify="right" if col != "model" else "left")
    base = payload["results"].get("hf", {}).get("tokens_per_s")
    scale = 1e12 if gpu else 1e9
    for name, r in payload["results"].items():
        if "step_ms" not in r:
            table.add_row(name, f"n/a: {r.get('status')}", *["—"] * (len(cols) - 2))
            continue
        cells = [
            name, f"{r['step_ms']:.0f}±{r['step_iqr_ms'] / 2:.0f}", f"{r['forward_ms']:.0f}", f"{r['backward_ms']:.0f}",
            f"{r['optimizer_ms']:.0f}", f"{r['tokens_per_s']:.0f}", f"{r['flops_per_s'] / scale:.1f}",
            f"{r['matmul_fraction']:.0%}", f"{r['mfu']:.1%}" if r.get("mfu") is not None else "—",
            f"{r['peak_step_bytes'] / 2**20:,.0f}", f"{r['loss_step0']:.5f}",
            f"{r['tokens_per_s'] / base:.2f}x" if base else "—",
        ]
        if compiled:
            cells += [f"{r['compile_s']:.1f}", f"{r['speedup_vs_eager']:.2f}x"] if "compile_s" in r else ["—", "—"]
        for t in others:
            res = payload["other_threads"][t]["results"]
            cells += [f"{res[name]['tokens_per_s']:.0f}",
                      f"{res[name]['tokens_per_s'] / res['hf']['tokens_per_s']:.2f}x" if "hf" in res else "—"]
        table.add_row(*cells)
    rates = [f"{payload['threads']} thr {payload['matmul_flops_per_s'] / scale:.1f}"] + [
        f"{t} thr {payload['other_threads'][t]['matmul_flops_per_s'] / scale:.1f}" for t in others]
    caption = (f"'of matmul': achieved FLOP/s (model.flops_per_token x tokens/s) over a {payload['matmul_shape']} "
               f"matmul measured in this run ({', '.join(rates)} {'TFLOP/s' if gpu else 'GFLOP/s'})")
    if "loss_abs_diff_step0" in payload:
        caption += (f"; step-0 loss |Ava − HF| = {payload['loss_abs_diff_step0']:.2e} (identical weights); "
                    f"FLOPs/token = {payload['flops_per_token']:,}")
    table.caption, table.caption_justify = caption, "left"
    return table


def ep_table(payload: dict[str, Any]) -> Table:
    env = payload["environment"]
    table = Table(title=f"ava-bench ep — {payload['preset']}, {payload['ranks']} ranks x batch "
                        f"{payload['batch_per_rank']}x{payload['seq_len']}, ZeRO-{payload['zero_stage']}, "
                        f"{env['device_name']}", title_justify="left")
    for col in ("expert parallel", "layer", "step ms (median)", "min–max", "tokens/s", "vs ep=1",
                "expert params / rank", "loss@0"):
        table.add_column(col, justify="left" if col in ("expert parallel", "layer") else "right")
    base = payload["results"].get("ep1", {}).get("tokens_per_s")
    for name, r in payload["results"].items():
        if r.get("status") != "ok":
            table.add_row(name, "—", f"n/a: {r.get('status')}", *["—"] * 5)
            continue
        table.add_row(name, r["implementation"], f"{r['step_ms']:.0f}",
                      f"{r['step_min_ms']:.0f}–{r['step_max_ms']:.0f}",
                      f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / base:.2f}x" if base else "—",
                      f"{r['expert_params_per_rank']:,}", f"{r['losses'][0]:.5f}")
    return table


def gpu_table(payload: dict[str, Any]) -> Table:
    """`ava-bench gpu`'s rows (`gpu_bench.rows`): one per measured thing, a failed part's error."""
    env = payload["environment"]
    gpu = env["device"].startswith("cuda")
    unit, scale = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)
    peak = payload.get("peak_flops")
    title = (f"ava-bench gpu{' --dry-run' if payload['dry_run'] else ''} — {env['device_name']}, torch "
             f"{env['versions'].get('torch')}, {payload['dtype']}, "
             f"MFU against {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'no known peak'}, {payload['seconds']:.0f} s")
    table = Table(title=title, title_justify="left")
    for col in ("part", "row", "ms", "tokens/s", unit, "MFU", "vs transformers", "notes"):
        table.add_column(col, justify="left" if col in ("part", "row", "notes") else "right",
                         no_wrap=col not in ("notes", "row"))

    def num(value: Optional[float], fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    for r in payload["rows"]:
        table.add_row(r["part"], r["row"], num(r["ms"], ",.2f"), num(r["tokens_per_s"], ",.0f"),
                      num(None if r["flops_per_s"] is None else r["flops_per_s"] / scale, ",.1f"),
                      num(r["mfu"], ".1%"), num(r["vs_transformers"], ".2f") + ("x" if r["vs_transformers"] else ""),
                      r["notes"])
    parts = payload["parts"]
    table.caption = ("; ".join(f"{name} {p['seconds']:.0f}/{p['cap_s']} s" for name, p in parts.items())
                     + f". {payload['dtype_note']}. moe: fwd+bwd of one layer, ms median, TFLOP/s of the expert "
                       "matmuls; vs transformers: its time over Ava's (moe) or Ava's tokens/s over its (steps)")
    table.caption_justify = "left"
    return table


def print_last(table: Table) -> None:
    Console(width=240).print(table)
