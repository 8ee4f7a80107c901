"""What every Hugging Face family module provides, and the tensor names the Llama-style
families share.

A family module (`olmoe`, `qwen2_moe`, `qwen3_moe`, `llama`, `qwen2`, `qwen3`) defines
`MODEL_TYPE` and `model_config(config) -> ModelConfig`: every `config.json` field that changes the
function is mapped, and one Ava cannot express is refused naming the field and its value (a
`ValueError`), never ignored. The tensor names are the same scheme in all of them (Llama's, with
`mlp.gate` + `mlp.experts.E.*` for MoE layers and `mlp.shared_expert*` for Qwen2-MoE), so they
are translated here once; adding a family is one module and one line in `FAMILIES`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch

from ava.config import ModelConfig

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_FUSED = {"mlp.experts.gate_up_proj": "w_gate_up", "mlp.experts.down_proj": "w_down"}  # [E, 2I, H], [E, H, I]
_RENAMES = (("input_layernorm.", "attn_norm."), ("post_attention_layernorm.", "moe_norm."),
            ("self_attn.", "attn."), ("mlp.shared_expert_gate.", "moe.shared.gate."),
            ("mlp.shared_expert.", "moe.shared.ffn."), ("mlp.gate.", "moe.router.gate."))


def refuse(config: Mapping[str, Any], key: str, allowed: Callable[[Any], bool], why: str) -> None:
    """A field whose value Ava cannot express: refused with its name and value."""
    if key in config and not allowed(config[key]):
        raise ValueError(f"{key}={config[key]!r}: {why}, so this model cannot load")


def common_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` fields every Llama-style family maps the same way (RMSNorm, SwiGLU, no
    biases unless the family says so, default RoPE), after refusing what none of them can be."""
    refuse(config, "hidden_act", lambda v: v == "silu", "Ava's experts and MLPs are SwiGLU (silu)")
    rope = dict(config.get("rope_parameters") or {})
    refuse({"rope_type": rope.get("rope_type", "default")}, "rope_type", lambda v: v == "default",
           "Ava implements only the default RoPE")
    refuse(config, "rope_scaling", lambda v: not v, "Ava implements only the default RoPE")
    refuse(config, "use_sliding_window", lambda v: not v, "Ava's attention has no sliding window")
    refuse(config, "mlp_bias", lambda v: not v, "Ava's MLPs have no biases in this layout")
    refuse(config, "partial_rotary_factor", lambda v: v == 1.0, "Ava rotates whole heads")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim")
    return dict(
        name=str(config.get("_name_or_path") or config.get("model_type", "hf")),
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=None if kv_heads == heads else kv_heads,
        head_dim=None if head_dim in (None, config["hidden_size"] // heads) else head_dim,
        max_seq_len=config.get("max_position_embeddings", 4096),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        norm="rmsnorm", norm_eps=config.get("rms_norm_eps", 1e-6), activation="swiglu", bias=False,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        # what runs at inference: dropless and jitter-free (training settings come from config)
        router_jitter=0.0, capacity_factor=None,
    )


def dense_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """A dense model as an Ava model whose every layer is dense (the expert fields are unused)."""
    return dict(ffn_size=config["intermediate_size"], num_experts=1, top_k=1,
                first_dense_layers=config["num_hidden_layers"])


def sparse_layers(config: Mapping[str, Any]) -> list[int]:
    """Qwen-MoE's dense layers: those in `mlp_only_layers`, and those `decoder_sparse_step` skips."""
    step = int(config.get("decoder_sparse_step") or 1)
    only = set(config.get("mlp_only_layers") or [])
    return [i for i in range(config["num_hidden_layers"]) if i in only or (i + 1) % step != 0]


def to_ava(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Stored names (per-expert `gate/up/down_proj [out, in]`, or the fused `gate_up_proj
    [E, 2I, H]` + `down_proj [E, H, I]` of newer checkpoints) to Ava's stacked
    `w_gate_up [E, H, 2I]` (gate's columns, then up's) and `w_down [E, I, H]`."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            out[name.removeprefix("model.")] = t
            continue
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = t
            continue
        m = _LAYER.fullmatch(name)
        if m is None:
            raise KeyError(f"{name}: not a tensor of this family's layout")
        layer, rest = int(m.group(1)), m.group(2)
        prefix = f"layers.{layer}."
        e = _EXPERT.fullmatch(rest)
        if e is not None:
            experts.setdefault((layer, e.group(2)), {})[int(e.group(1))] = t
            continue
        if rest in _FUSED:
            out[prefix + "moe.experts." + _FUSED[rest]] = t.transpose(1, 2).contiguous()
            continue
        if layer not in cfg.moe_layers and rest.startswith("mlp."):  # a dense layer's MLP, as named
            out[prefix + rest] = t
            continue
        out[prefix + _rename(rest, _RENAMES)] = t
    for layer in sorted({layer for layer, _ in experts}):
        stacked = {w: stack_experts(experts.get((layer, w), {}), layer, w, cfg.num_experts)
                   for w in ("gate_proj", "up_proj", "down_proj")}
        out[f"layers.{layer}.moe.experts.w_gate_up"] = torch.cat([stacked["gate_proj"], stacked["up_proj"]],
                                                                 dim=-1).contiguous()
        out[f"layers.{layer}.moe.experts.w_down"] = stacked["down_proj"]
    return out


def _rename(rest: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """`rest` with its first matching prefix replaced."""
    for old, new in pairs:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def stack_experts(per_expert: dict[int, torch.Tensor], layer: int | str, w: str, num_experts: int) -> torch.Tensor:
    """One layer's per-expert `[out, in]` matrices of projection `w` as Ava's stacked `[E, in, out]`."""
    missing = sorted(set(range(num_experts)) - set(per_expert))
    if missing:
        raise KeyError(f"layer {layer} is missing expert tensors for experts {missing} ({w})")
    return torch.stack([per_expert[e].t() for e in range(num_experts)]).contiguous()


# ---------------------------------------------------------------- out: Ava -> a family's layout
def common_config(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
    """The `config.json` keys every Llama-style family writes, as `transformers` names them."""
    return {
        "architectures": [architecture], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "use_cache": True,
    }


def dense_layer_ids(cfg: ModelConfig) -> list[int]:
    return sorted(set(range(cfg.num_layers)) - set(cfg.moe_layers))


def signature(cfg: ModelConfig) -> dict[str, Any]:
    """What decides the function an exported model computes (training-only settings left out)."""
    sig: dict[str, Any] = {k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "num_layers", "num_heads", "kv_heads", "dim_per_head", "qk_norm",
        "attn_bias", "norm", "norm_eps", "activation", "bias", "rope_theta", "tie_embeddings", "moe_layers",
        "eval_capacity_factor", "expert_bias")}
    sig["residual overflow FFN"] = cfg.overflow == "residual"
    if cfg.moe_layers:
        sig.update({k: getattr(cfg, k) for k in ("ffn_size", "num_experts", "top_k", "router_score",
                                                 "normalize_top_k", "routed_scaling_factor")})
        sig["shared experts (width, gate)"] = ((cfg.shared_experts * (cfg.shared_ffn_size or cfg.ffn_size),
                                               cfg.shared_expert_gate) if cfg.shared_experts else None)
    if dense_layer_ids(cfg):
        sig["dense MLP width"] = cfg.dense_ffn_size or cfg.ffn_size
    return sig


def incompatibilities(cfg: ModelConfig, module: Any) -> list[str]:
    """Settings of `cfg` the family `module` cannot express: what its `config.json` would read
    back as differs. [] when the family computes exactly this model."""
    try:
        back = signature(module.model_config(module.hf_config(cfg)))
    except (ValueError, KeyError) as exc:
        return [str(exc)]
    ours = signature(cfg)
    return [f"{k}={ours[k]!r} (the {module.MODEL_TYPE} layout gives {back.get(k)!r})"
            for k in ours if ours[k] != back.get(k)]


def from_ava(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `to_ava`, in the per-expert layout `transformers`' `save_pretrained` writes."""
    out: dict[str, torch.Tensor] = {}
    renames = tuple((new, old) for old, new in _RENAMES)
    for name, t in state.items():
        if name in ("embed_tokens.weight", "norm.weight"):
            out["model." + name] = t
            continue
        if name == "lm_head.weight":
            out[name] = t
            continue
        _, layer, rest = name.split(".", 2)
        prefix = f"model.layers.{layer}."
        if rest in ("moe.experts.w_gate_up", "moe.experts.w_down"):
            if rest.endswith("w_gate_up"):
                parts = dict(zip(("gate_proj", "up_proj"), t.chunk(2, dim=-1), strict=True))
            else:
                parts = {"down_proj": t}
            for w, stacked in parts.items():
                for e in range(cfg.num_experts):
                    out[f"{prefix}mlp.experts.{e}.{w}.weight"] = stacked[e].t().contiguous()
            continue
        if rest.startswith("mlp."):  # a dense layer's MLP, named alike
            out[prefix + rest] = t
            continue
        out[prefix + _rename(rest, renames)] = t
    return out
