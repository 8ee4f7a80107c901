"""`init_from=PATH`: start training from an existing model — a directory `transformers` saved for
a family Ava reads (`ava.hf.families`, Mixtral) or an Ava export.

The architecture comes from PATH's `config.json` and replaces the `model` group's preset, so
`experiment=smoke init_from=PATH` works although smoke picks `nano`; an explicit command-line
`model.<key>=` that contradicts the checkpoint is refused naming both values. Settings that only
shape training (capacity, jitter, balance losses, expert bias, backend, checkpointing) stay the
config's. PATH's `tokenizer.json` becomes the data tokenizer, with the checkpoint's end-of-text
and padding tokens, and its weights are loaded into the model before the engine exists (on every
rank, as the seeded initialisation they replace: one full fp32 copy per rank until DeepSpeed
partitions it).

Upcycling (`upcycle.num_experts=E upcycle.top_k=k`, a dense checkpoint): every layer's MLP
becomes E experts that start as copies of it (plus `upcycle.noise` × the weights' std of Gaussian
noise per copy), behind a router with Ava's own initialisation. With no noise the top-k weights
of identical experts sum to 1, so the upcycled model computes the dense model's function at
step 0.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, List

import torch

from ava.config import AvaConfig, ConfigError
from ava.files import sha256_file
from ava.hf.shards import INDEX_NAME, SINGLE_NAME
from ava.inference.errors import CheckpointFormatError
from ava.inference.format import ExportedModel, check_against, detect, read_tensors

log = logging.getLogger("ava.train")

# model settings a run may choose for itself: they shape training, not the function learned so far
TRAINING_ONLY = ("name", "router_jitter", "capacity_factor", "eval_capacity_factor", "overflow", "routing",
                 "sinkhorn_iters", "aux_loss_coef", "aux_loss_scope", "z_loss_coef", "expert_bias",
                 "bias_update_rate", "expert_backend", "loop_min_rows_per_expert", "activation_checkpointing",
                 "init_std", "max_seq_len", "loss_chunk_rows")


def open_source(path: str) -> ExportedModel:
    """PATH checked as a model directory Ava reads, with the tokenizer it must bring."""
    root = Path(path).expanduser()
    if root.is_dir() and not (root / "tokenizer.json").is_file():
        raise ConfigError(f"init_from={path}: {root} has no tokenizer.json; Ava trains on the checkpoint's own "
                          "tokenizer: save it there (transformers: AutoTokenizer.from_pretrained(...)"
                          f".save_pretrained('{root}'))")
    try:
        return detect(root)
    except CheckpointFormatError as exc:
        raise ConfigError(f"init_from={path}: {exc}") from None


def command_line_model_keys(overrides: List[str]) -> List[str]:
    """`model.<key>` names set on the command line (`model.x=1`, `+model.x=1`, `++model.x=1`)."""
    keys = []
    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key.startswith("model.") and "=" in item:
            keys.append(key.removeprefix("model."))
    return keys


def special_tokens(source: ExportedModel) -> tuple[str, str]:
    """(eos, pad) of the checkpoint: config.json's ids as tokens, else Ava's own names."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(source.path / "tokenizer.json"))

    def token(key: str) -> str | None:
        ids = source.hf_config.get(key)
        first = ids[0] if isinstance(ids, list) and ids else ids
        return tok.id_to_token(first) if isinstance(first, int) else None

    eos = token("eos_token_id") or ("<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None else None)
    if eos is None:
        raise ConfigError(f"init_from={source.path}: config.json names no eos_token_id and the tokenizer has "
                          "no <|endoftext|>: Ava needs an end-of-text token to pack documents")
    pad = token("pad_token_id") or (
        "<|pad|>" if tok.token_to_id("<|pad|>") is not None else eos)
    return eos, pad


def apply_source(cfg: AvaConfig, source: ExportedModel, overrides: List[str]) -> AvaConfig:
    """`cfg` with the checkpoint's architecture and tokenizer; refuses a contradicting override."""
    imported = source.config
    user = cfg.model
    for key in command_line_model_keys(overrides):
        if key in TRAINING_ONLY or not hasattr(imported, key):
            continue
        if getattr(user, key) != getattr(imported, key):
            raise ConfigError(f"model.{key}={getattr(user, key)!r} contradicts init_from: "
                              f"{source.path / 'config.json'} gives {key}={getattr(imported, key)!r}; drop the "
                              "override (the architecture comes from the checkpoint)")
    model = dataclasses.replace(imported, **{k: getattr(user, k) for k in TRAINING_ONLY if k != "name"})
    if cfg.upcycle.num_experts:
        if model.moe_layers:
            raise ConfigError(f"upcycle.num_experts={cfg.upcycle.num_experts}: {source.path} is already an MoE "
                              f"model ({source.layout}, layers {model.moe_layers}); upcycle a dense checkpoint")
        model = dataclasses.replace(model, num_experts=cfg.upcycle.num_experts, top_k=cfg.upcycle.top_k,
                                    ffn_size=model.dense_ffn_size or model.ffn_size, first_dense_layers=0,
                                    dense_layers=[], dense_ffn_size=None)
    eos, pad = special_tokens(source)
    tokenizer = dataclasses.replace(cfg.data.tokenizer, path=str(source.path / "tokenizer.json"),
                                    vocab_size=None, eos_token=eos, pad_token=pad,
                                    special_tokens=list(dict.fromkeys([eos, pad])))
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, tokenizer=tokenizer))


def describe(source: ExportedModel) -> Dict[str, Any]:
    """What the run records about where its weights came from (the resolved config's `source`)."""
    index = source.path / INDEX_NAME
    weights = index if index.is_file() else source.path / SINGLE_NAME
    return {"path": str(source.path.resolve()), "family": source.layout, "file": weights.name,
            "sha256": sha256_file(weights)}


def upcycled(tensors: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], noise: float,
             generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """Dense `layers.L.mlp.{gate,up,down}_proj` as E stacked copies (`w_gate_up [E, H, 2I]`,
    `w_down [E, I, H]`); the routers keep the model's own initialisation (`expected`)."""
    out = {n: t for n, t in tensors.items() if ".mlp." not in n}
    layers = sorted({int(n.split(".")[1]) for n in tensors if ".mlp." in n})
    for layer in layers:
        p = f"layers.{layer}."
        gate, up, down = (tensors[f"{p}mlp.{w}.weight"] for w in ("gate_proj", "up_proj", "down_proj"))
        for name, one in ((f"{p}moe.experts.w_gate_up", torch.cat([gate.t(), up.t()], dim=-1)),
                          (f"{p}moe.experts.w_down", down.t())):
            copies = one.float().unsqueeze(0).repeat(expected[name].shape[0], 1, 1)
            if noise:
                copies += noise * float(one.float().std()) * torch.randn(copies.shape, generator=generator)
            out[name] = copies.to(one.dtype).contiguous()
        out[f"{p}moe.router.gate.weight"] = expected[f"{p}moe.router.gate.weight"]
    return out


def load_weights(model: torch.nn.Module, source: ExportedModel, upcycle_noise: float | None = None,
                 seed: int = 0) -> None:
    """The checkpoint's tensors into `model` (fp32 master weights: a bf16 checkpoint is upcast
    for training, and says so); `upcycle_noise` not None: the dense MLPs become the experts."""
    tensors = read_tensors(source)
    expected = model.state_dict()
    if upcycle_noise is not None:
        tensors = upcycled(tensors, expected, upcycle_noise, torch.Generator().manual_seed(seed))
    try:
        check_against(tensors, expected, source.path)
    except CheckpointFormatError as exc:
        raise ConfigError(f"init_from={source.path}: {exc}") from None
    stored = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    target = next(iter(expected.values())).dtype
    if any(t.is_floating_point() and t.dtype != target for t in tensors.values()):
        log.info("init_from: stored %s weights become %s master weights for training", "/".join(stored),
                 str(target).removeprefix("torch."))
    # tensor by tensor, each freed once copied (copy_ casts): never a second full-precision copy
    # of the model beside it, as a cast state dict for load_state_dict would be
    with torch.no_grad():
        for name, value in list(expected.items()):
            value.copy_(tensors.pop(name))

