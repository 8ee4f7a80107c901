"""`ava-bench moe`: forward+backward of one MoE layer, Ava against its peers, on identical
weights, inputs and routing; outputs and input gradients compared where semantics agree."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ava.bench import peers
from ava.bench.timing import peak_memory, time_interleaved

MEAN_NORM = 4.0  # norm of the inputs' common mean, what skewed routing keys on
SKEW = 1.5  # Zipf-like exponent of skewed routing: expert e gets logit bias -SKEW * log(e + 1)
DEEPSPEED_MAX_BYTES = 1 << 30  # DeepSpeed's [E, C, H] dispatch buffer above this: skipped (with reason)
AGREE_TOL = 1e-4  # max |difference| (relative to max |ava|) that counts as "same function", fp32
AGREE_TOL_BF16 = 3e-2  # the same in bf16, whose 8-bit mantissa rounds each product and partial sum

# Peers compared with Ava (the "fastest peer" target); bounds are reference points, not peers.
PEERS = ("naive", "hf", "hf_eager", "deepspeed")
BOUNDS = ("dense", "roofline")
# Ava with each `model.expert_backend` forced (`ava` runs `auto`): what `auto` chose between;
# neither peers nor bounds.
VARIANTS = ("ava_loop", "ava_grouped")
IMPLS = ("ava", *VARIANTS, *BOUNDS, *PEERS)


@dataclass(frozen=True)
class Point:
    tokens: int
    experts: int
    top_k: int
    hidden: int
    ffn: int
    routing: str  # balanced | skewed
    # DeepSeek-V3's router (sigmoid scores, a per-expert bias for the choice) instead of softmax,
    # and shared experts of width I that every token passes through: Ava's own rows only (no peer
    # computes these), against the dense bound of the same active FLOPs
    router: str = "softmax"  # softmax | sigmoid_bias
    shared: int = 0

    @property
    def label(self) -> str:
        extra = (" sigm+bias" if self.router != "softmax" else "") + (f" +{self.shared}sh" if self.shared else "")
        return f"T{self.tokens} E{self.experts} k{self.top_k} H{self.hidden}/I{self.ffn} {self.routing[:4]}{extra}"

    @property
    def active(self) -> int:
        """Expert FFNs a token passes through: its top-k and the shared ones."""
        return self.top_k + self.shared

    @property
    def flops(self) -> int:
        """Expert matmul FLOPs of forward+backward: 3 matmuls of H x I per (token, expert) pair,
        2 FLOPs per multiply-add, backward twice the forward."""
        return 3 * 2 * 3 * self.tokens * self.active * self.hidden * self.ffn


def default_sweep() -> list[Point]:
    """One axis at a time around a base point (finishes in a few minutes on 2 CPU cores)."""
    base = Point(4096, 8, 2, 256, 512, "balanced")
    pts = [
        base,
        Point(512, 8, 2, 256, 512, "balanced"),
        Point(16384, 8, 2, 256, 512, "balanced"),
        Point(4096, 8, 1, 256, 512, "balanced"),
        Point(4096, 64, 2, 256, 512, "balanced"),
        Point(4096, 64, 8, 256, 512, "balanced"),
        Point(4096, 64, 8, 256, 128, "balanced"),  # fine-grained (OLMoE/Qwen3-MoE: many narrow experts)
        Point(4096, 64, 8, 256, 128, "balanced", router="sigmoid_bias"),
        Point(4096, 64, 8, 256, 128, "balanced", shared=1),
        Point(4096, 8, 2, 512, 1024, "balanced"),
        Point(4096, 8, 2, 256, 512, "skewed"),
        Point(4096, 64, 2, 256, 512, "skewed"),
    ]
    return pts


def full_sweep() -> list[Point]:
    pts = []
    for t, e, k, (h, i), r in itertools.product(
        (512, 2048, 4096, 8192, 16384), (8, 64), (1, 2, 8), ((256, 512), (512, 1024), (1024, 2816)),
        ("balanced", "skewed"),
    ):
        if k < e:
            pts.append(Point(t, e, k, h, i, r))
    return pts


def gpu_sweep() -> list[Point]:
    """`ava-bench gpu`'s bf16 sweep (one H100/H200, about a minute): the `base` preset's MoE layer
    (H768/I3072, E8 k2) from 4k to 64k tokens and skewed, fine-grained experts at OLMoE's width
    (H2048/I1024, E64 k8), and Mixtral-8x7B's layer (H4096/I14336, E8 k2) last, as it takes the
    longest to set up (1.4B expert weights drawn on the host)."""
    return [
        Point(16384, 8, 2, 768, 3072, "balanced"),
        Point(4096, 8, 2, 768, 3072, "balanced"),
        Point(65536, 8, 2, 768, 3072, "balanced"),
        Point(16384, 8, 2, 768, 3072, "skewed"),
        Point(16384, 64, 8, 2048, 1024, "balanced"),
        Point(16384, 64, 8, 2048, 1024, "skewed"),
        Point(8192, 8, 2, 4096, 14336, "balanced"),
    ]


def quick_sweep() -> list[Point]:
    """Seconds, for tests and smoke runs."""
    return [Point(256, 8, 2, 64, 128, "balanced"), Point(256, 8, 1, 64, 128, "skewed"),
            Point(256, 8, 2, 64, 128, "balanced", router="sigmoid_bias", shared=1)]


def build(name: str, w: peers.MoEWeights, pt: Point) -> tuple[Optional[nn.Module], str]:
    """The implementation, or None and the reason it cannot run at this point."""
    options = {"router_score": "sigmoid", "expert_bias": True} if pt.router == "sigmoid_bias" else {}
    if pt.shared:
        options["shared_experts"] = pt.shared
    if name == "ava":
        return peers.ava_layer(w, pt.top_k, **options), ""
    if name in VARIANTS:
        return peers.ava_layer(w, pt.top_k, backend="loop" if name == "ava_loop" else "grouped_mm", **options), ""
    if name == "dense":
        return peers.DenseMLP(w, pt.active), ""
    if name == "roofline":
        return peers.Roofline(w, pt.active), ""
    if options:
        return None, "n/a: computes softmax top-k without shared experts"
    if name == "naive":
        return peers.NaiveMoE(w, pt.top_k), ""
    if name in ("hf", "hf_eager"):
        try:
            return peers.hf_mixtral_block(w, pt.top_k, "grouped_mm" if name == "hf" else "eager"), ""
        except ImportError as exc:
            return None, f"transformers not installed ({exc})"
    if name == "deepspeed":
        # dropless DeepSpeed pads every expert to the largest expert's load: [E, C, H] buffers
        est_c = pt.tokens * pt.top_k // pt.experts * (4 if pt.routing == "skewed" else 1)
        need = pt.experts * min(est_c, pt.tokens) * max(pt.hidden, pt.ffn) * 4
        if need > DEEPSPEED_MAX_BYTES:
            return None, f"skipped: [E,C,·] buffers ≈ {need / 2**30:.1f} GiB"
        why = peers.init_deepspeed_single_process()
        if why:
            return None, why
        try:
            return peers.deepspeed_moe(w, pt.top_k), ""
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"
    raise ValueError(name)


def semantics_agree(name: str, pt: Point) -> bool:
    if name in BOUNDS:
        return False
    if name == "deepspeed":
        return pt.top_k >= 2  # DeepSpeed's top-1 gate does not renormalise the kept weight
    return True


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, trains: bool) -> Callable[[], None]:
    def step() -> None:
        for p in module.parameters():
            p.grad = None
        xi = x.detach().requires_grad_(trains)
        y = module(xi)
        if trains:
            y.backward(grad)
    return step


def agree_tol(dtype: torch.dtype) -> float:
    return AGREE_TOL if dtype == torch.float32 else AGREE_TOL_BF16


def run_point(pt: Point, *, warmup: int, repeats: int, device: torch.device, impls=IMPLS,
              seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Every implementation at `pt`, all with the same weights (drawn in fp32, then cast to
    `dtype`), inputs and output gradient."""
    gen = torch.Generator().manual_seed(seed)
    skew = SKEW if pt.routing == "skewed" else 0.0
    w = peers.MoEWeights.random(pt.experts, pt.hidden, pt.ffn, skew=skew, mean_norm=MEAN_NORM, generator=gen)
    x = peers.make_inputs(pt.tokens, pt.hidden, mean_norm=MEAN_NORM, generator=gen).to(device, dtype)
    grad = torch.randn(pt.tokens, pt.hidden, generator=gen).to(device, dtype)
    _, expert_TK = peers.route(x, w.router_EH.to(device, dtype), pt.top_k)
    load = torch.bincount(expert_TK.reshape(-1), minlength=pt.experts).float()
    w = peers.MoEWeights(*(t.to(device) for t in (w.router_EH, w.gate_EHI, w.up_EHI, w.down_EIH)))

    modules, notes = {}, {}
    for name in impls:
        module, why = build(name, w, pt)
        if module is None:
            notes[name] = why
        else:
            modules[name] = module.to(device=device, dtype=dtype).train()

    # correctness: output and input gradient against Ava's
    ref_y = ref_g = None
    errors: dict[str, Optional[float]] = {}
    for name, module in modules.items():
        if name not in ("ava",) and not semantics_agree(name, pt):
            continue
        xi = x.detach().clone().requires_grad_(True)
        y = module(xi)
        y.backward(grad)
        if name == "ava":
            ref_y, ref_g = y.detach(), xi.grad.detach()
            continue
        scale = ref_y.abs().max().clamp_min(1e-12)
        gscale = ref_g.abs().max().clamp_min(1e-12)
        err = max(float((y.detach() - ref_y).abs().max() / scale), float((xi.grad - ref_g).abs().max() / gscale))
        errors[name] = err

    fns = {name: fwd_bwd(m, x, grad, trains=name != "roofline") for name, m in modules.items()}
    timings = time_interleaved(fns, warmup=warmup, repeats=repeats, device=device)

    memory = {}
    for name, module in modules.items():
        if name == "roofline":
            continue
        for p in module.parameters():
            p.grad = None
        xi = x.detach().requires_grad_(True)
        memory[name] = peak_memory(lambda m=module, xi=xi: m(xi), device)

    results = {}
    for name in impls:
        entry: dict = {"status": "ok" if name in modules else notes[name]}
        if name in timings:
            t = timings[name]
            entry.update(t.to_dict())
            entry["tokens_per_s"] = pt.tokens / (t.median_ms / 1e3)
            entry["gflops"] = pt.flops / (t.median_ms / 1e3) / 1e9
        if name in memory:
            entry["peak_fwd_bytes"] = memory[name]
        if name in errors:
            entry["max_rel_err_vs_ava"] = errors[name]
            entry["agrees"] = errors[name] <= agree_tol(dtype)
        results[name] = entry

    ava_ms = results["ava"].get("median_ms")
    peer_ms = {n: results[n]["median_ms"] for n in PEERS if "median_ms" in results.get(n, {})}
    summary: dict = {"expert_load_max_over_mean": float(load.max() / load.mean())}
    if ava_ms and peer_ms:
        best = min(peer_ms, key=peer_ms.get)
        summary.update(best_peer=best, speedup_vs_best_peer=peer_ms[best] / ava_ms)
    if ava_ms and "median_ms" in results.get("dense", {}):
        summary["ava_over_dense_time"] = ava_ms / results["dense"]["median_ms"]
    if "peak_fwd_bytes" in results.get("dense", {}) and "peak_fwd_bytes" in results["ava"]:
        summary["ava_over_dense_memory"] = results["ava"]["peak_fwd_bytes"] / results["dense"]["peak_fwd_bytes"]
    return {"point": asdict(pt), "label": pt.label, "flops": pt.flops, "results": results, "summary": summary}


MEMORY_METHOD = (
    "peak bytes allocated during one forward pass under autograd, above the bytes live before it "
    "(saved activations + transients; parameters and gradients excluded). CPU: torch.profiler "
    "profile_memory allocation/free trace summed in time order; CUDA: max_memory_allocated."
)


def targets(rows: list[dict]) -> dict:
    """The issue's CPU targets, checked on this run's numbers (reported, never asserted)."""
    speed = [r["summary"]["speedup_vs_best_peer"] for r in rows if "speedup_vs_best_peer" in r["summary"]]
    dense_e8k2 = [r["summary"]["ava_over_dense_time"] for r in rows
                  if r["point"]["experts"] == 8 and r["point"]["top_k"] == 2 and "ava_over_dense_time" in r["summary"]]
    mem = [r["summary"]["ava_over_dense_memory"] for r in rows if "ava_over_dense_memory" in r["summary"]]
    return {
        "ava_at_least_as_fast_as_fastest_peer_everywhere": bool(speed) and min(speed) >= 1.0,
        "min_speedup_vs_best_peer": min(speed) if speed else None,
        "ava_within_1.25x_dense_for_E8_k2": bool(dense_e8k2) and max(dense_e8k2) <= 1.25,
        "max_ava_over_dense_time_E8_k2": max(dense_e8k2) if dense_e8k2 else None,
        "peak_activation_memory_within_1.5x_dense": bool(mem) and max(mem) <= 1.5,
        "max_ava_over_dense_memory": max(mem) if mem else None,
    }
