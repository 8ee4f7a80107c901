"""Tensor-name layouts of an exported model: Ava's own, and `transformers`' Mixtral.

Both directions live here so that export and load can never disagree on a name or a transpose.
"""

from __future__ import annotations

import re
from dataclasses import asdict, fields
from typing import Any

import torch

from ava.config import ModelConfig
from ava.hf import family
from ava.hf.families import FAMILIES

LAYOUTS = ("ava", "mixtral", *FAMILIES)  # the layouts (model_type values) Ava reads and writes
_EXPERT_TENSOR = re.compile(r"(.+\.experts)\.")  # any layout: a layer's expert tensors
_DENSE_MLP_TENSOR = re.compile(r"(.*layers\.\d+\.mlp)\.")
_MIXTRAL_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
# Mixtral's per-expert [out, in] matrices in Ava's stacked `[E, in, out]` tensors: w1 (gate) is the
# first half of `w_gate_up`'s columns, w3 (up) the second half, w2 is `w_down`.
_MIXTRAL_GATE_UP = ("w1", "w3")
_MIXTRAL_DOWN = "w2"


def mixtral_incompatibilities(cfg: ModelConfig) -> list[str]:
    """Settings that stop `cfg` from being expressed as a stock `MixtralForCausalLM`."""
    problems = []
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm!r} (Mixtral uses 'rmsnorm')")
    if cfg.activation != "swiglu":
        problems.append(f"model.activation={cfg.activation!r} (Mixtral experts are 'swiglu')")
    if cfg.bias:
        problems.append("model.bias=true (Mixtral has no biases)")
    if cfg.overflow == "residual":
        problems.append("model.overflow='residual' (Mixtral has no shared residual FFN)")
    if cfg.eval_capacity_factor is not None:
        problems.append(f"model.eval_capacity_factor={cfg.eval_capacity_factor} (Mixtral inference is dropless)")
    if cfg.qk_norm != "none":
        problems.append(f"model.qk_norm={cfg.qk_norm!r} (Mixtral has no q/k norm)")
    if cfg.attn_bias:
        problems.append("model.attn_bias=true (Mixtral has no attention biases)")
    if cfg.moe_layers != list(range(cfg.num_layers)):
        problems.append(f"dense layers {sorted(set(range(cfg.num_layers)) - set(cfg.moe_layers))} "
                        "(every Mixtral layer is MoE)")
    if cfg.shared_experts:
        problems.append(f"model.shared_experts={cfg.shared_experts} (Mixtral has no shared experts)")
    if cfg.router_score != "softmax" or not cfg.normalize_top_k or cfg.routed_scaling_factor != 1.0:
        problems.append(f"router_score={cfg.router_score!r}, normalize_top_k={cfg.normalize_top_k}, "
                        f"routed_scaling_factor={cfg.routed_scaling_factor} (Mixtral: softmax, "
                        "renormalised, unscaled)")
    return problems


def resolve_layout(cfg: ModelConfig, layout: str) -> str:
    """`auto` picks mixtral when possible; an explicit `mixtral` or family layout that cannot be
    met is an error naming every differing setting."""
    if layout not in (*LAYOUTS, "auto"):
        raise ValueError(f"layout={layout!r} is not supported; expected one of {[*LAYOUTS, 'auto']}")
    if layout in FAMILIES:
        differing = family.incompatibilities(cfg, FAMILIES[layout])
        if differing:
            raise ValueError(f"this model cannot be exported in the {layout} layout; differing settings: "
                             + "; ".join(differing) + ". Use --layout ava (or auto).")
        return layout
    problems = mixtral_incompatibilities(cfg)
    if layout == "auto":
        return "ava" if problems else "mixtral"
    if layout == "mixtral" and problems:
        raise ValueError(
            "this model cannot be exported in the Mixtral layout; differing settings: "
            + "; ".join(problems) + ". Use --layout ava (or auto)."
        )
    return layout


def tensor_group(name: str, upcycle: bool = False) -> str:
    """The module whose stored tensors convert to Ava's together, in any layout: a layer's expert
    tensors (per expert or fused, restacked into Ava's `[E, ...]` tensors) and, when upcycling, a
    layer's dense MLP (which becomes them); any other tensor converts with its own module's."""
    found = _EXPERT_TENSOR.match(name) or (_DENSE_MLP_TENSOR.match(name) if upcycle else None)
    return found.group(1) if found else name.rsplit(".", 1)[0]


def ava_to_mixtral(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename Ava tensors to Mixtral names; stacked experts (`w_gate_up [E, H, 2I]` split into gate
    and up, `w_down [E, I, H]`) become per-expert `[out, in]` matrices."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            prefix = f"model.layers.{idx}."
            if rest.startswith("moe.experts."):
                ava_name = rest.rsplit(".", 1)[1]
                if ava_name == "w_gate_up":
                    parts = dict(zip(_MIXTRAL_GATE_UP, t.chunk(2, dim=-1), strict=True))
                elif ava_name == "w_down":
                    parts = {_MIXTRAL_DOWN: t}
                else:
                    raise KeyError(f"{name}: Mixtral has no expert tensor for {ava_name!r}")
                for w, stacked in parts.items():
                    for e in range(cfg.num_experts):
                        out[f"{prefix}block_sparse_moe.experts.{e}.{w}.weight"] = stacked[e].t().contiguous()
                continue
            rest = (rest.replace("attn_norm.", "input_layernorm.")
                    .replace("moe_norm.", "post_attention_layernorm.")
                    .replace("attn.", "self_attn.")
                    .replace("moe.router.gate.", "block_sparse_moe.gate."))
            out[prefix + rest] = t
        elif name == "lm_head.weight":
            out[name] = t
        else:  # embed_tokens.weight, norm.weight
            out["model." + name] = t
    return out


def mixtral_to_ava(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `ava_to_mixtral`: restack per-expert matrices into `w_gate_up [E, H, 2I]` (w1's
    columns, then w3's) and `w_down [E, I, H]`."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _MIXTRAL_EXPERT.fullmatch(name)
        if m:
            layer, e, w = m.groups()
            experts.setdefault((layer, w), {})[int(e)] = t
            continue
        if name == "lm_head.weight":
            out[name] = t
            continue
        name = name.removeprefix("model.")
        name = (name.replace("input_layernorm.", "attn_norm.")
                .replace("post_attention_layernorm.", "moe_norm.")
                .replace("self_attn.", "attn.")
                .replace("block_sparse_moe.gate.", "moe.router.gate."))
        out[name] = t
    for layer in sorted({layer for layer, _ in experts}, key=int):
        stacked = {w: family.stack_experts(experts.get((layer, w), {}), layer, w, cfg.num_experts)
                   for w in (*_MIXTRAL_GATE_UP, _MIXTRAL_DOWN)}
        out[f"layers.{layer}.moe.experts.w_gate_up"] = torch.cat(
            [stacked[w] for w in _MIXTRAL_GATE_UP], dim=-1).contiguous()
        out[f"layers.{layer}.moe.experts.w_down"] = stacked[_MIXTRAL_DOWN]
    return out


def hf_config(cfg: ModelConfig, layout: str, dtype: torch.dtype, eos_id: int, pad_id: int) -> dict[str, Any]:
    """`config.json`: Mixtral's exact keys for that layout, plus Ava's full config for exact reloads."""
    dtype_name = str(dtype).removeprefix("torch.")
    common: dict[str, Any] = {"torch_dtype": dtype_name, "eos_token_id": eos_id, "pad_token_id": pad_id,
                              "ava_config": asdict(cfg)}
    if layout in FAMILIES:
        return {**FAMILIES[layout].hf_config(cfg), "bos_token_id": eos_id, **common}
    if layout == "ava":
        return {"architectures": ["AvaForCausalLM"], "model_type": "ava", "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
                "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.ffn_size,
                "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
                "rope_theta": cfg.rope_theta, "norm": cfg.norm, "hidden_act": cfg.activation,
                "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings, **common}
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
        "router_aux_loss_coef": cfg.aux_loss_coef, "router_jitter_noise": 0.0, "output_router_logits": False,
        "sliding_window": None, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True, "bos_token_id": eos_id, **common,
    }


# config.json keys that change a Mixtral's function in ways Ava's model does not implement
UNSUPPORTED_MIXTRAL = {"sliding_window": "Ava's attention has no sliding window",
                       "rope_scaling": "Ava implements only the default RoPE"}


def model_config_from_hf(config: dict[str, Any]) -> ModelConfig:
    """Ava's config from `config.json`: exact when Ava wrote it, else mapped from Mixtral's keys."""
    if "ava_config" in config:
        known = {f.name for f in fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in config["ava_config"].items() if k in known})
    for key, why in UNSUPPORTED_MIXTRAL.items():
        if config.get(key) not in (None, {}):
            raise ValueError(f"{key}={config[key]!r}: {why}, so this model cannot load")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim")
    rope = config.get("rope_parameters") or {}
    return ModelConfig(
        name=config.get("_name_or_path", "mixtral"), vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
        num_heads=heads, num_kv_heads=None if kv_heads == heads else kv_heads,
        head_dim=None if head_dim in (None, config["hidden_size"] // heads) else head_dim,
        ffn_size=config["intermediate_size"],
        num_experts=config["num_local_experts"], top_k=config["num_experts_per_tok"],
        max_seq_len=config.get("max_position_embeddings", 4096),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 1e6))),
        norm="rmsnorm", norm_eps=config.get("rms_norm_eps", 1e-5), activation="swiglu", bias=False,
        tie_embeddings=config.get("tie_word_embeddings", False),
    )
