"""`ava-bench train`: one full training step (forward, backward, AdamW) of Ava's `AvaForCausalLM`
against `transformers`' `MixtralForCausalLM` of identical dimensions, batch and optimizer.

`compile`: a copy of Ava and of the grouped-experts peer with each decoder block compiled the
way `trainer.compile` does it (`ava.train.compile.compile_blocks`) times beside the eager models,
`<name>_compiled`, with the compile time (the first step less the median) as its own figure.
Inductor's CPU code is specialised on the thread count, so the first warm-up step at the second
thread count compiles again (warm-up steps are not timed).
"""

from __future__ import annotations

import copy
import re
import statistics
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ava.bench.timing import Stopwatch, matmul_rate, peak_memory
from ava.config import IGNORE_INDEX, ModelConfig, model_preset
from ava.hf.layouts import ava_to_mixtral, mixtral_incompatibilities
from ava.model.transformer import AvaForCausalLM
from ava.observe.throughput import peak_tflops

# `--reduced`: the preset's width, fewer layers and a smaller vocabulary (a step in ~1 s on a CPU).
# What MixtralForCausalLM computes: no router jitter, and dropless (a capacity that drops a slot
# makes Ava's step another function; measured: mini_mixtral's step-0 loss differed by 4.4e-4)
SAME_FUNCTION = {"router_jitter": 0.0, "capacity_factor": None}
REDUCED = {"num_layers": 2, "vocab_size": 4096, "max_seq_len": 512}
# `--quick` (and `ava-bench gpu --dry-run`): a model of one narrow layer, steps in milliseconds
QUICK = {"hidden_size": 64, "num_heads": 4, "ffn_size": 128, "num_layers": 1, "vocab_size": 512}


PEERS = ("hf", "hf_eager")  # MixtralForCausalLM with its grouped experts, and with its eager loop


def peak_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak in FLOP/s (`ava.observe.throughput`'s table), None on a CPU."""
    if device.type != "cuda":
        return None
    tflops = peak_tflops(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops else None


def hf_mixtral(cfg: ModelConfig, experts_implementation: str = "grouped_mm") -> nn.Module:
    """`MixtralForCausalLM` of `cfg`'s dimensions; transformers 5 defaults to `grouped_mm` experts
    (`eager` is its per-expert loop, the default of transformers 4)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_per_head, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, router_jitter_noise=0.0,
        output_router_logits=False, tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0,
        sliding_window=None, use_cache=False,
    )
    config._experts_implementation = experts_implementation
    return MixtralForCausalLM(config)


def load_ava_into_mixtral(ava: AvaForCausalLM, hf: nn.Module) -> None:
    """Copy Ava's weights into a transformers-5 Mixtral (fused `experts.gate_up_proj` [E, 2I, H],
    gate then up; `experts.down_proj` [E, H, I]); names from `ava.hf.layouts.ava_to_mixtral`."""
    cfg = ava.cfg
    state = ava.state_dict()
    target = hf.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, t in ava_to_mixtral(state, cfg).items():
        if ".experts." in name:
            continue
        out[name.replace("block_sparse_moe.gate.", "mlp.gate.")] = t
    for i in range(cfg.num_layers):
        ex = ava.layers[i].moe.experts
        prefix = f"model.layers.{i}.mlp.experts."
        out[prefix + "gate_up_proj"] = ex.w_gate_up.transpose(1, 2).detach()
        out[prefix + "down_proj"] = ex.w_down.transpose(1, 2).detach()
    if cfg.tie_embeddings:
        out["lm_head.weight"] = state["embed_tokens.weight"]
    missing = set(target) - set(out)
    if missing:
        raise KeyError(f"no Ava tensor for Mixtral parameters {sorted(missing)}")
    hf.load_state_dict({k: out[k].to(target[k].dtype) for k in target}, strict=True)


def make_batch(vocab: int, batch: int, seq_len: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Ava's labels are shifted (labels[t] = target of position t); HF shifts internally. Both see the
    same L-1 targets per sequence (Ava's last position is ignored), so they compute the same loss."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    return {"ids": ids, "ava_labels": labels, "hf_labels": ids}


def _loss(name: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to train on, language-model loss to compare)."""
    if name.startswith("ava"):
        out = model(batch["ids"], labels=batch["ava_labels"])
        return out.loss, out.lm_loss
    out = model(input_ids=batch["ids"], labels=batch["hf_labels"])
    return out.loss, out.loss


def run_train(preset: str, *, batch: int, seq_len: int, steps: int, warmup: int, device: torch.device,
              dtype: torch.dtype, overrides: Optional[dict[str, Any]] = None, seed: int = 0,
              reduced: bool = False, thread_counts: Sequence[int] = (), peers: Sequence[str] = PEERS,
              compile: bool = False) -> dict[str, Any]:
    """The preset at its own dimensions (`reduced`: `REDUCED`'s quick shape), timed at each of
    `thread_counts` (CPU; the first is the headline, default the current count) against the
    matmul rate measured at that count, plus each model's peak step memory at the first.

    `peers`: which of `PEERS` run beside Ava; `compile`: compiled copies of Ava and of the grouped
    peer as well (module docstring)."""
    overrides = {**SAME_FUNCTION, **(REDUCED if reduced else {}), **(overrides or {})}
    overrides["max_seq_len"] = max(int(overrides.get("max_seq_len", seq_len)), seq_len)
    cfg = model_preset(preset, **overrides)
    problems = mixtral_incompatibilities(cfg)
    torch.manual_seed(seed)
    with device:  # initialised where it runs: a billion parameters are drawn in seconds on a GPU
        ava = AvaForCausalLM(cfg)
    models: dict[str, nn.Module] = {"ava": ava}
    status: dict[str, str] = {}
    for name, impl in (("hf", "grouped_mm"), ("hf_eager", "eager")):
        if name not in peers:
            continue
        if problems:
            status[name] = "not expressible as MixtralForCausalLM: " + "; ".join(problems)
            continue
        try:
            with device:
                hf = hf_mixtral(cfg, impl)
            load_ava_into_mixtral(ava, hf)
            models[name] = hf
        except ImportError as exc:
            status[name] = f"transformers not installed ({exc})"
    for m in models.values():
        m.to(device=device, dtype=dtype).train()
    if compile:
        models.update(compiled_twins(models))
    data = make_batch(cfg.vocab_size, batch, seq_len, device, seed)

    # step 0 with identical weights: the same language-model loss (a compiled model's is its first
    # training step's, so that no inference graphs are compiled besides the training ones)
    loss0 = {}
    for name, m in models.items():
        if not name.endswith(COMPILED):
            with torch.no_grad():
                loss0[name] = float(_loss(name, m, data)[1])
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1) for name, m in models.items()}

    def step(name: str) -> dict[str, float]:
        sw = Stopwatch(device)
        opts[name].zero_grad(set_to_none=True)
        sw.mark("start")
        loss, lm_loss = _loss(name, models[name], data)
        sw.mark("forward")
        if name not in loss0:  # a compiled model's first step
            loss0[name] = float(lm_loss)
        loss.backward()
        sw.mark("backward")
        opts[name].step()
        sw.mark("optimizer")
        return sw.phases_ms()

    tokens, fpt, peak = batch * seq_len, ava.flops_per_token(seq_len), peak_flops(device)
    counts = list(dict.fromkeys(thread_counts or [torch.get_num_threads()]))
    initial_threads = torch.get_num_threads()
    by_threads: dict[int, dict[str, Any]] = {}
    memory: dict[str, int] = {}
    first_ms: dict[str, float] = {}  # each model's first step: a compiled model compiles in it
    try:
        for i, threads in enumerate(counts):
            torch.set_num_threads(threads)
            rate = matmul_rate(device, dtype)
            phases: dict[str, list[dict[str, float]]] = {name: [] for name in models}
            for n in range(warmup + steps):
                now = {name: step(name) for name in models}  # interleaved: load from elsewhere hits all alike
                for name, phase in now.items():
                    first_ms.setdefault(name, sum(phase.values()))
                for name, phase in now.items():
                    if n >= warmup:
                        phases[name].append(phase)
                print(f"[{threads} thread(s)] {'warm-up' if n < warmup else 'step'} {n + 1}/{warmup + steps}: "
                      + ", ".join(f"{name} {sum(phase.values()):.0f} ms" for name, phase in now.items()), flush=True)
            if i == 0:  # a warm step (optimizer state exists): activations, gradients, transients
                print(f"[{threads} thread(s)] peak memory of one step per model (torch.profiler)", flush=True)
                memory = {name: peak_memory(lambda name=name: step(name), device) for name in models}
            by_threads[threads] = {"matmul_flops_per_s": rate, "results": {
                name: _summary(phases[name], tokens, fpt, peak, rate) for name in models}}
    finally:
        torch.set_num_threads(initial_threads)

    headline = by_threads[counts[0]]
    results: dict[str, Any] = {}
    names = ("ava", "ava_compiled", "hf", "hf_compiled", "hf_eager")  # each compiled row under its eager one
    for name in (n for n in names if compile or not n.endswith(COMPILED)):
        if name.removesuffix(COMPILED) not in ("ava", *peers):
            continue
        if name not in models:
            results[name] = {"status": status.get(name, "not run")}
            continue
        results[name] = {**headline["results"][name], "loss_step0": loss0[name], "peak_step_bytes": memory[name],
                         "parameters": sum(p.numel() for p in models[name].parameters())}
        if name.endswith(COMPILED):
            eager = results[name.removesuffix(COMPILED)]
            results[name]["compile_s"] = (first_ms[name] - results[name]["step_ms"]) / 1e3
            results[name]["speedup_vs_eager"] = results[name]["tokens_per_s"] / eager["tokens_per_s"]
    payload: dict[str, Any] = {
        "preset": preset, "reduced": reduced, "overrides": overrides, "batch": batch, "seq_len": seq_len,
        "dtype": str(dtype).split(".")[-1], "dims": _dims(cfg), "flops_per_token": fpt, "peak_flops": peak,
        "threads": counts[0], "matmul_flops_per_s": headline["matmul_flops_per_s"], "matmul_shape": "2048^3",
        "memory_method": "peak bytes allocated during one warm training step above those live before it "
                         "(parameters, optimizer state); CPU: torch.profiler's allocation trace",
        "results": results,
        "other_threads": {str(t): v for t, v in by_threads.items() if t != counts[0]},
    }
    if len(models) > 1:
        payload["loss_abs_diff_step0"] = max(abs(loss0["ava"] - loss0[n]) for n in models if n != "ava")
        payload["speedup_tokens_per_s"] = {n: results["ava"]["tokens_per_s"] / results[n]["tokens_per_s"]
                                           for n in models if n != "ava"}
        payload["memory_ratio"] = {n: results["ava"]["peak_step_bytes"] / results[n]["peak_step_bytes"]
                                   for n in models if n != "ava"}
    return payload


COMPILE = ("ava", "hf")  # hf_eager, transformers' per-expert loop, breaks its graph at every expert
COMPILED = "_compiled"


def compiled_twins(models: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """`<name>_compiled`: a copy of each of `COMPILE` with its decoder blocks compiled in place
    (Ava's `layers`, Mixtral's `model.layers`), the same weights."""
    from ava.train.compile import compile_blocks

    twins = {}
    for name in COMPILE:
        if name in models:
            twin = copy.deepcopy(models[name])
            compile_blocks(twin if name == "ava" else twin.model)
            twins[f"{name}{COMPILED}"] = twin
    return twins


def _summary(phases: list[dict[str, float]], tokens: int, flops_per_token: float, peak: Optional[float],
             matmul_rate: float) -> dict[str, Any]:
    """Median step and phases, spread, tokens/s and the achieved FLOP/s against the peak and the
    measured matmul rate."""
    totals = [sum(p.values()) for p in phases]
    step_ms = statistics.median(totals)
    q = statistics.quantiles(totals, n=4) if len(totals) >= 4 else [min(totals), 0, max(totals)]
    r: dict[str, Any] = {
        "status": "ok", "step_ms": step_ms, "step_iqr_ms": q[2] - q[0], "steps": len(totals),
        **{f"{k}_ms": statistics.median(p[k] for p in phases) for k in ("forward", "backward", "optimizer")},
        "tokens_per_s": tokens / (step_ms / 1e3),
    }
    r["flops_per_s"] = r["tokens_per_s"] * flops_per_token
    r["mfu"] = r["flops_per_s"] / peak if peak else None
    r["matmul_fraction"] = r["flops_per_s"] / matmul_rate
    return r


def _dims(cfg: ModelConfig) -> str:
    return (f"H={cfg.hidden_size} L={cfg.num_layers} heads={cfg.num_heads} I={cfg.ffn_size} "
            f"E={cfg.num_experts} k={cfg.top_k} V={cfg.vocab_size}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values stay strings for Hydra to type-check against the schema."""
    out = {}
    for item in items:
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", item)
        if not m:
            raise SystemExit(f"ava-bench: override {item!r} is not key=value")
        out[m.group(1)] = m.group(2)
    return out
