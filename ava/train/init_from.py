"""`init_from=PATH`: start training from an existing model — a directory `transformers` saved for
a family Ava reads (`ava.hf.families`, Mixtral) or an Ava export.

The architecture comes from PATH's `config.json` and replaces the `model` group's preset, so
`experiment=smoke init_from=PATH` works although smoke picks `nano`; an explicit command-line
`model.<key>=` that contradicts the checkpoint is refused naming both values. Settings that only
shape training (capacity, jitter, balance losses, expert bias, backend, checkpointing) stay the
config's. PATH's `tokenizer.json` becomes the data tokenizer, with the checkpoint's end-of-text
and padding tokens, and its weights are loaded into the model before the engine exists, module by
module (`WeightPlan`: what to read is planned from the shards' headers and checked against the
model first; each stored tensor is read once, in its stored dtype, and cast by the copy). ZeRO 0-2:
every rank loads its full model. ZeRO-3: the model is built partitioned and rank 0 alone reads,
writing one gathered module at a time (`ava.train.partitioned`).

Upcycling (`upcycle.num_experts=E upcycle.top_k=k`, a dense checkpoint): every layer's MLP
becomes E experts that start as copies of it (plus `upcycle.noise` × the weights' std of Gaussian
noise per copy), behind a router with Ava's own initialisation. With no noise the top-k weights
of identical experts sum to 1, so the upcycled model computes the dense model's function at
step 0.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from ava import dist
from ava.config import AvaConfig, ConfigError
from ava.files import sha256_file
from ava.hf.layouts import tensor_group
from ava.hf.shards import INDEX_NAME, SINGLE_NAME
from ava.inference.errors import CheckpointFormatError
from ava.inference.format import (
    ExportedModel,
    check_against,
    detect,
    read_stored,
    stored_meta,
    to_ava_layout,
    verify_checksums,
)

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


def upcycled(tensors: Dict[str, torch.Tensor], num_experts: int, noise: float,
             generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """Dense `layers.L.mlp.{gate,up,down}_proj` as `num_experts` stacked copies
    (`w_gate_up [E, H, 2I]`, `w_down [E, I, H]`); other tensors pass through."""
    out = {n: t for n, t in tensors.items() if ".mlp." not in n}
    layers = sorted({int(n.split(".")[1]) for n in tensors if ".mlp." in n})
    for layer in layers:
        p = f"layers.{layer}."
        gate, up, down = (tensors[f"{p}mlp.{w}.weight"] for w in ("gate_proj", "up_proj", "down_proj"))
        for name, one in ((f"{p}moe.experts.w_gate_up", torch.cat([gate.t(), up.t()], dim=-1)),
                          (f"{p}moe.experts.w_down", down.t())):
            copies = one.float().unsqueeze(0).repeat(num_experts, 1, 1)
            if noise:
                copies += noise * float(one.float().std()) * torch.randn(copies.shape, generator=generator)
            out[name] = copies.to(one.dtype).contiguous()
    return out


def from_checkpoint(name: str, upcycling: bool) -> bool:
    """Whether the checkpoint supplies tensor `name` of the model: all of them, but an upcycled
    model's routers, which keep the model's own initialisation."""
    return not (upcycling and ".moe.router." in name)


@dataclass
class WeightPlan:
    """Which stored tensors make each module's weights, worked out from the shards' headers
    alone and checked against the model before any weight is read. `read` then yields one
    module's tensors at a time (in their stored dtype, each stored tensor read once)."""

    source: ExportedModel
    modules: Dict[str, List[str]]  # module name -> stored tensor names, in the model's module order
    tensors: Dict[str, List[str]]  # module name -> the model's tensors they make (same order)
    num_experts: Optional[int]  # upcycling: every dense MLP becomes this many experts
    noise: float  # upcycling: the copies' perturbation (x the weights' std)
    seed: int

    @contextmanager
    def reader(self) -> Iterator[Callable[[str], Dict[str, torch.Tensor]]]:
        """`read(module)`: that module's tensors in Ava's names (stored dtype, the copy casts)."""
        generator = torch.Generator().manual_seed(self.seed)  # drawn module by module, in order

        def read(module: str) -> Dict[str, torch.Tensor]:
            try:
                tensors = to_ava_layout(self.source, read_stored(self.source, self.modules[module]))
            except CheckpointFormatError as exc:
                raise ConfigError(f"init_from={self.source.path}: {exc}") from None
            if self.num_experts is not None:
                tensors = upcycled(tensors, self.num_experts, self.noise, generator)
            return {n: t for n, t in tensors.items() if n.rsplit(".", 1)[0] == module}

        yield read


def plan_weights(source: ExportedModel, expected: Dict[str, torch.Tensor], upcycle_noise: float | None = None,
                 seed: int = 0) -> WeightPlan:
    """The `WeightPlan` for a model whose state dict (tensors or meta tensors) is `expected`;
    a missing, unexpected or mis-shaped tensor is refused naming it, before anything is read."""
    upcycling = upcycle_noise is not None
    wanted = {n: t for n, t in expected.items() if from_checkpoint(n, upcycling)}
    num_experts = None
    if upcycling:
        num_experts = next(t.shape[0] for n, t in expected.items() if n.endswith("moe.experts.w_down"))
    try:
        stored = stored_meta(source)
        groups: Dict[str, List[str]] = {}
        for name in stored:
            groups.setdefault(tensor_group(name, upcycling), []).append(name)
        converted: Dict[str, torch.Tensor] = {}
        modules: Dict[str, List[str]] = {}
        for names in groups.values():
            tensors = to_ava_layout(source, {n: stored[n] for n in names})
            if upcycling:
                tensors = upcycled(tensors, num_experts, 0.0, torch.Generator())
            for module in {n.rsplit(".", 1)[0] for n in tensors}:  # one, but for an unexpected name
                modules.setdefault(module, []).extend(names)
            converted.update(tensors)
        check_against(converted, wanted, source.path)
    except CheckpointFormatError as exc:
        raise ConfigError(f"init_from={source.path}: {exc}") from None
    floating = {t.dtype for t in stored.values() if t.is_floating_point()}
    target = next(iter(wanted.values())).dtype
    if floating - {target}:
        log.info("init_from: stored %s weights become %s master weights for training",
                 "/".join(sorted(str(d).removeprefix("torch.") for d in floating)), str(target).removeprefix("torch."))
    order = [m for m in dict.fromkeys(n.rsplit(".", 1)[0] for n in wanted) if m in modules]
    made: Dict[str, List[str]] = {}
    for name in converted:
        made.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return WeightPlan(source, {m: modules[m] for m in order}, {m: made[m] for m in order}, num_experts,
                      upcycle_noise or 0.0, seed)


def verify_once(source: ExportedModel) -> None:
    """An Ava export's shards against their recorded sha256: rank 0 hashes them (one full read),
    every rank gets the verdict, so all stop together on a corrupt file."""
    problem = None
    if dist.rank() == 0:
        try:
            verify_checksums(source)
        except CheckpointFormatError as exc:
            problem = str(exc)
    problem = dist.broadcast_object(problem)
    if problem:
        raise ConfigError(f"init_from={source.path}: {problem}")


def load_weights(model: torch.nn.Module, source: ExportedModel, upcycle_noise: float | None = None,
                 seed: int = 0) -> None:
    """The checkpoint's tensors into `model` (fp32 master weights: a bf16 checkpoint is upcast
    for training, and says so); `upcycle_noise` not None: the dense MLPs become the experts.
    Module by module, each stored tensor freed once copied (`copy_` casts): never a second copy
    of the model beside it. (ZeRO-3 loads into the partitions: `ava.train.partitioned`.)"""
    verify_once(source)
    state = model.state_dict()
    plan = plan_weights(source, state, upcycle_noise, seed)
    with torch.no_grad(), plan.reader() as read:
        for module in plan.modules:
            for name, value in read(module).items():
                state[name].copy_(value)
