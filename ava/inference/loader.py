"""`load_model`: format detection → compatibility → memory estimate → device plan → load →
health check → ready. Every consumer (the CLI, plugins, Python callers) goes through here."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from tokenizers import Tokenizer
from torch import nn

from ava.inference.errors import AvaInferenceError, CheckpointFormatError, GenerationError, InsufficientMemoryError
from ava.inference.format import ExportedModel, check_against, detect, read_tensors
from ava.inference.generate import GenerationConfig, generate_tokens
from ava.inference.hardware import DTYPES, check_dtype, devices
from ava.inference.plan import DeviceMap, DevicePlan, kv_cache_bytes, make_plan, unit_bytes
from ava.inference.quantize import quantize_model_int8
from ava.model import AvaForCausalLM
from ava.model.rope import RotaryEmbedding

log = logging.getLogger("ava.inference")
QUANTIZABLE = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight",
               "experts.w1", "experts.w2", "experts.w_gate_up", "experts.w_down")


@dataclass
class LoadOptions:
    device_map: DeviceMap = "cpu"
    dtype: Optional[str] = None  # None: keep the stored dtype; else an explicit cast
    max_memory: Optional[dict[str, int]] = None  # bytes per device ("cpu", "cuda:0", ...)
    gpu_layers: Optional[int] = None
    fallback: bool = False
    quantize: Optional[str] = None  # None | "int8"
    # tokens per sequence (prompt + new) the KV cache is planned for; default: the generation
    # defaults' max_new_tokens (`ava-generate` passes its longest prompt + --max-new-tokens)
    context_len: Optional[int] = None
    batch_size: int = 1
    verify_checksums: bool = True
    generation: dict[str, Any] = field(default_factory=dict)  # defaults for GenerationConfig


@dataclass
class LoadedModel:
    """A ready model: weights placed, tokenizer loaded, generation defaults set."""

    model: AvaForCausalLM
    tokenizer: Tokenizer
    export: ExportedModel
    plan: DevicePlan
    dtype: torch.dtype
    quantized_bytes: Optional[tuple[int, int]] = None
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    planned_tokens: int = 0  # context_len x batch_size the KV cache estimate assumed

    @property
    def eos_id(self) -> Optional[int]:
        return self.export.hf_config.get("eos_token_id")

    @property
    def pad_id(self) -> int:
        pad = self.export.hf_config.get("pad_token_id")
        return pad if pad is not None else (self.eos_id or 0)

    def generate(self, prompts: Union[str, list[str]], on_text: Optional[Callable[[int, str], None]] = None,
                 **overrides: Any) -> Union[str, list[str]]:
        """Continue each prompt; `on_text(row, piece)` streams decoded text as it is produced."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        if any(not t.strip() for t in texts):
            raise GenerationError("empty prompt: give some text to continue from")
        cfg = GenerationConfig(**{**self.generation_defaults, **overrides})
        encoded = [self.tokenizer.encode(t).ids for t in texts]
        needed = len(texts) * (max(map(len, encoded)) + cfg.max_new_tokens)
        if needed > self.planned_tokens:
            log.info("this request needs a KV cache for %d tokens, more than the %d the memory plan "
                     "assumed: pass context_len (and batch_size) to load_model to plan for it",
                     needed, self.planned_tokens)
        decoded = [""] * len(texts)

        def decode_new(row: int, tokens: list[int]) -> str:
            return decode_documents(self.tokenizer, tokens, self.eos_id)

        def should_stop(row: int, tokens: list[int]) -> bool:
            text = decode_new(row, tokens)
            if on_text is not None and len(text) > len(decoded[row]):
                on_text(row, text[len(decoded[row]):])
            decoded[row] = text
            return any(s in text for s in cfg.stop_strings)

        new = generate_tokens(self.model, encoded, cfg, eos_id=self.eos_id, pad_id=self.pad_id,
                              should_stop=should_stop)
        outs = []
        for tokens in new:
            text = decode_new(0, tokens)
            for s in cfg.stop_strings:
                if s in text:
                    text = text[: text.index(s)]
            outs.append(text)
        return outs[0] if single else outs

    def health_check(self) -> bool:
        """One forward pass on two tokens; finite logits of the right shape."""
        device = self.model.embed_tokens.weight.device
        with torch.no_grad():
            logits = self.model(torch.tensor([[self.pad_id, self.pad_id]], device=device)).logits
        return logits.shape[-1] == self.model.cfg.vocab_size and bool(torch.isfinite(logits).all())


DOCUMENT_BREAK = "\n\n"  # how an EOS inside generated text reads (training puts one after every document)


def decode_documents(tokenizer: Tokenizer, tokens: list[int], eos_id: Optional[int]) -> str:
    """Text of `tokens`; each EOS (generation went on past it) becomes a blank line."""
    if eos_id is None or eos_id not in tokens:
        return tokenizer.decode(tokens, skip_special_tokens=True)
    pieces, start = [], 0
    for i, tok in enumerate([*tokens, eos_id]):
        if tok == eos_id:
            pieces.append(tokenizer.decode(tokens[start:i], skip_special_tokens=True))
            start = i + 1
    return DOCUMENT_BREAK.join(pieces)


def _move_inputs_hook(device: torch.device) -> Callable:
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def move(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.to(device)
            if isinstance(x, tuple):
                return tuple(move(v) for v in x)
            return x
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}
    return hook


def _place(model: AvaForCausalLM, plan: DevicePlan) -> None:
    """Move each unit to its device; hooks carry activations across block boundaries."""
    embed_dev = torch.device(plan.placement["embed"])
    for module in (model.embed_tokens, model.norm, model.rotary, *([model.lm_head] if model.lm_head else [])):
        module.to(embed_dev)
    model.norm.register_forward_pre_hook(_move_inputs_hook(embed_dev), with_kwargs=True)
    for i, layer in enumerate(model.layers):
        dev = torch.device(plan.placement[f"layers.{i}"])
        layer.to(dev)
        if dev != embed_dev or any(plan.placement[f"layers.{j}"] != plan.placement["embed"] for j in range(i)):
            layer.register_forward_pre_hook(_move_inputs_hook(dev), with_kwargs=True)


def _sizes(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, quantize: Optional[str]) -> dict[str, int]:
    sizes = unit_bytes(tensors, dtype)
    if quantize == "int8":
        itemsize = torch.empty((), dtype=dtype).element_size()
        for name, t in tensors.items():
            if name.endswith(QUANTIZABLE):
                unit = ".".join(name.split(".")[:2])
                sizes[unit] -= t.numel() * (itemsize - 1)
    return sizes


def _build(export: ExportedModel, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
           plan: DevicePlan, quantize: Optional[str]) -> tuple[AvaForCausalLM, Optional[tuple[int, int]]]:
    cfg = export.config
    with torch.device("meta"):
        model = AvaForCausalLM(cfg)
    check_against(tensors, model.state_dict(), export.path)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.rotary = RotaryEmbedding(cfg.dim_per_head, cfg.max_seq_len, cfg.rope_theta)  # buffers are not stored
    model.eval()
    quantized = quantize_model_int8(model) if quantize == "int8" else None
    _place(model, plan)
    return model, quantized


def _plans_to_try(opts: LoadOptions, gpus: tuple[str, ...], num_layers: int) -> list[tuple[str, dict[str, Any]]]:
    """Progressive fallback: full GPU → partial GPU (halving GPU layers) → CPU."""
    first = {"device_map": opts.device_map, "gpu_layers": opts.gpu_layers}
    if not opts.fallback or not gpus:
        return [("as requested", first)]
    tries = [("as requested", first)]
    n = opts.gpu_layers if opts.gpu_layers is not None else num_layers
    while n > 1:
        n //= 2
        tries.append((f"partial GPU: {n} layers on {gpus[0]}", {"device_map": "cpu", "gpu_layers": n}))
    tries.append(("CPU only", {"device_map": "cpu", "gpu_layers": None}))
    return tries


def load_model(path: Union[str, Path], **options: Any) -> LoadedModel:
    """Load an `ava-export` directory. Options: see `LoadOptions`."""
    opts = LoadOptions(**options)
    export = detect(path)
    tensors = read_tensors(export, verify=opts.verify_checksums)
    stored = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(stored) != 1:
        raise CheckpointFormatError(f"{export.path} mixes floating dtypes {sorted(map(str, stored))}; re-export")
    stored_dtype = stored.pop()
    if opts.dtype is not None:
        if opts.dtype not in DTYPES:
            raise AvaInferenceError(f"dtype={opts.dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        dtype = DTYPES[opts.dtype]
        if dtype != stored_dtype:
            log.info("casting weights %s -> %s as requested (dtype=%s)", stored_dtype, dtype, opts.dtype)
            tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}
    else:
        dtype = stored_dtype
    if opts.quantize not in (None, "int8"):
        raise AvaInferenceError(f"quantize={opts.quantize!r} is not supported; expected None or 'int8'")

    cfg = export.config
    context = min(opts.context_len or GenerationConfig(**opts.generation).max_new_tokens, cfg.max_seq_len)
    kv_per_layer = kv_cache_bytes(cfg, context, opts.batch_size, dtype) // cfg.num_layers
    sizes = _sizes(tensors, dtype, opts.quantize)
    gpus = tuple(d.name for d in devices() if d.name.startswith("cuda"))
    tries = _plans_to_try(opts, gpus, cfg.num_layers)
    last_error: Optional[BaseException] = None
    for label, attempt in tries:
        try:
            plan = make_plan(cfg, sizes, attempt["device_map"], kv_bytes_per_layer=kv_per_layer,
                             max_memory=opts.max_memory, gpu_layers=attempt["gpu_layers"], gpus=gpus)
            for dev in set(plan.placement.values()):
                check_dtype(dtype, dev)
            model, quantized = _build(export, dict(tensors), dtype, plan, opts.quantize)
            loaded = LoadedModel(model, Tokenizer.from_file(str(export.path / "tokenizer.json")), export, plan,
                                 dtype, quantized, dict(opts.generation), context * opts.batch_size)
            if not loaded.health_check():
                raise AvaInferenceError(f"{export.path}: health check failed (non-finite logits after loading)")
            log.info("loaded %s (%s layout, %s) — %s; the plan assumed a KV cache for %d tokens x batch %d "
                     "(context_len; the model allows %d)", export.path, export.layout, dtype, plan.describe(),
                     context, opts.batch_size, cfg.max_seq_len)
            return loaded
        except (torch.OutOfMemoryError, InsufficientMemoryError) as err:
            last_error = err
            if len(tries) > 1:
                log.warning("load %s failed: %s; trying the next fallback", label, err)
    assert last_error is not None
    raise last_error
