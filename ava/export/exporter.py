"""`export_checkpoint`: a training checkpoint → the directory `ava.inference` loads.

SOURCE is a run directory (its newest complete checkpoint is used) or one checkpoint tag
directory. Nothing about ZeRO's layout is re-implemented here: `consolidate` defers to DeepSpeed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf

from ava.checkpoints import MARKER, RUN_CHAT_TEMPLATE, newest_intact, verify
from ava.config import ModelConfig
from ava.export.card import model_card
from ava.export.consolidate import consolidate
from ava.export.writer import write_export_dir
from ava.hf import family
from ava.hf.families import FAMILIES
from ava.hf.layouts import ava_to_mixtral, hf_config, resolve_layout
from ava.model import AvaForCausalLM

log = logging.getLogger("ava.export")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


class ExportError(ValueError):
    """The source cannot be exported; the message names the path and what to do."""


@dataclass
class CheckpointSource:
    run_dir: Path
    ckpt_dir: Path  # DeepSpeed's save_dir
    tag: str
    client_state: dict[str, Any]


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1GiB' or a plain byte count."""
    t = str(text).strip().upper().replace(" ", "")
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if t.endswith(unit) and t[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * SIZE_UNITS[unit])
    if t.isdigit():
        return int(t)
    raise ExportError(f"max_shard_size={text!r} is not a size; expected e.g. '2GB', '500MB' or a byte count")


def _client_state(tag_dir: Path) -> dict[str, Any]:
    """Ava's client state rides in DeepSpeed's rank-0 model-states pickle (trusted, as for resume)."""
    # mp_rank_00_model_states.pt (ZeRO 0-2) or zero_pp_rank_0_mp_rank_00_model_states.pt (ZeRO-3);
    # not AutoEP's per-expert layer_L_expert_e_mp_rank_00_model_states.pt
    files = sorted(f for f in tag_dir.glob("*mp_rank_00_model_states.pt") if not f.name.startswith("layer_"))
    if not files:
        raise ExportError(f"{tag_dir} has no DeepSpeed model-states file; is it a checkpoint directory?")
    blob = torch.load(files[0], map_location="cpu", weights_only=False)
    return {k: v for k, v in blob.items() if k not in ("module", "optimizer", "lr_scheduler")}


RUN_DIR_SIGNS = ("checkpoints", "train.log", ".hydra", "metrics.jsonl", "status.json")


def _is_run_dir(path: Path) -> bool:
    """What `ava-train` leaves in a run directory before (or without) its first checkpoint."""
    return any((path / name).exists() for name in RUN_DIR_SIGNS)


def locate(source: Path) -> CheckpointSource:
    source = Path(source)
    if not source.is_dir():
        raise ExportError(f"{source} does not exist or is not a directory; pass a run directory or a checkpoint tag")
    if (source / MARKER).is_file():
        problems = verify(source)
        if problems:
            raise ExportError(f"{source} is corrupt: " + "; ".join(problems) + "; export an older checkpoint")
        tag_dir = source
    elif _is_run_dir(source):
        found, rejected = newest_intact(source / "checkpoints")
        if found is None and rejected:
            raise ExportError(f"{source / 'checkpoints'} holds no intact checkpoint: " + "; ".join(rejected))
        if found is None:
            raise ExportError(
                f"{source} is a run directory with no checkpoint yet: training saves one every "
                "trainer.save_every steps and at the end (trainer.save_at_end). Wait for the first "
                "save, or let the run finish, then export again")
        tag_dir = found
    elif any(source.glob("*model_states.pt")):
        raise ExportError(f"{source} is a checkpoint whose save never completed (no {MARKER}); export an older one")
    else:
        raise ExportError(f"{source} is neither a run directory (with checkpoints/, train.log or "
                          ".hydra/) nor a checkpoint tag directory (with {MARKER})")
    ckpt_dir = tag_dir.parent
    run_dir = ckpt_dir.parent if ckpt_dir.name == "checkpoints" else ckpt_dir
    return CheckpointSource(run_dir, ckpt_dir, tag_dir.name, _client_state(tag_dir))


def _model_config(src: CheckpointSource) -> tuple[ModelConfig, dict[str, Any]]:
    full = src.client_state.get("config") or {}
    if "model" not in full:
        raise ExportError(f"{src.ckpt_dir / src.tag}: the checkpoint carries no training config (client 'config')")
    known = set(ModelConfig.__dataclass_fields__)
    return ModelConfig(**{k: v for k, v in full["model"].items() if k in known}), full


def _tokenizer_file(src: CheckpointSource) -> Path:
    for candidate in (src.ckpt_dir / src.tag / "tokenizer.json", src.run_dir / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    raise ExportError(f"no tokenizer.json in {src.ckpt_dir / src.tag} or {src.run_dir}; "
                      "the trainer copies it into the run directory at start")


# the MoE family a dense family becomes when upcycled (Llama becomes Mixtral: `auto` picks it)
UPCYCLED_FAMILY = {"qwen3": "qwen3_moe", "qwen2": "qwen2_moe", "llama": "mixtral"}


def export_checkpoint(
    source: Path,
    out_dir: Path,
    *,
    layout: str = "auto",
    dtype: Optional[str] = None,
    max_shard_size: str = "2GB",
    progress: Callable[[str], None] = log.info,
    replace: bool = False,
) -> Path:
    """Locate the checkpoint, consolidate it with DeepSpeed's tools, then `export_state_dict`."""
    src = locate(source)
    cfg, full_config = _model_config(src)
    if layout == "auto":  # a run started from a family's checkpoint goes back to that family
        family_name = ((full_config or {}).get("source") or {}).get("family")
        family_name = UPCYCLED_FAMILY.get(family_name, family_name) if cfg.moe_layers else family_name
        if family_name in FAMILIES and not family.incompatibilities(cfg, FAMILIES[family_name]):
            layout = family_name
    resolve_layout(cfg, layout)  # fail on an impossible layout before the slow consolidation
    tokenizer = _tokenizer_file(src)
    template = src.run_dir / RUN_CHAT_TEMPLATE
    progress(f"consolidating {src.ckpt_dir / src.tag} with DeepSpeed's zero_to_fp32")
    state = consolidate(src.ckpt_dir, src.tag)
    val = src.client_state.get("val_losses") or {}
    info = TrainingInfo(step=int(src.client_state.get("step", 0)), tokens=int(src.client_state.get("tokens_seen", 0)),
                        val_loss=val.get("last"), config=full_config, source_tag=src.tag,
                        chat_template=template.read_text("utf-8") if template.is_file() else None)
    return export_state_dict(state, cfg, out_dir, tokenizer=tokenizer, layout=layout, dtype=dtype,
                             max_shard_size=max_shard_size, info=info, progress=progress, replace=replace)


@dataclass
class TrainingInfo:
    """What the model card and index metadata say about how the weights were made."""

    step: int = 0
    tokens: int = 0
    val_loss: Optional[float] = None
    config: Optional[dict[str, Any]] = None
    source_tag: str = "in-memory"
    chat_template: Optional[str] = None  # the template the run rendered its conversations with


def export_state_dict(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: Path,
    *,
    tokenizer: Path,
    layout: str = "auto",
    dtype: Optional[str] = None,
    max_shard_size: str = "2GB",
    info: Optional[TrainingInfo] = None,
    progress: Callable[[str], None] = log.info,
    replace: bool = False,
) -> Path:
    """Check `state` against the model's own state dict, cast only if asked, rename, write atomically."""
    info = info or TrainingInfo(config={"model": asdict(cfg)})
    chosen = resolve_layout(cfg, layout)
    with torch.device("meta"):
        meta_model = AvaForCausalLM(cfg)
    expected = meta_model.state_dict()
    if set(state) != set(expected):
        raise ExportError(f"checkpoint tensors differ from the model config: missing "
                          f"{sorted(set(expected) - set(state))}, unexpected {sorted(set(state) - set(expected))}")
    if dtype is not None:
        if dtype not in DTYPES:
            raise ExportError(f"--dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        state = {n: t.to(DTYPES[dtype]) if t.is_floating_point() else t for n, t in state.items()}
    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(stored) != 1:
        raise ExportError(f"weights mix dtypes {sorted(map(str, stored))}; pass --dtype to pick one explicitly")
    out_dtype = stored.pop()
    if chosen == "mixtral":
        tensors = ava_to_mixtral(state, cfg)
    elif chosen in FAMILIES:
        tensors = family.from_ava(state, cfg)
    else:
        tensors = state
    specials = {t["content"]: t["id"] for t in json.loads(Path(tokenizer).read_text()).get("added_tokens", [])}
    names = ((info.config or {}).get("data") or {}).get("tokenizer") or {}  # the run's own special tokens
    eos_token, pad_token = names.get("eos_token", "<|endoftext|>"), names.get("pad_token", "<|pad|>")
    eos = specials.get(eos_token, 0)
    pad = specials.get(pad_token, eos)
    full_config = info.config or {"model": asdict(cfg)}
    card = model_card(cfg, chosen, out_dtype, total=meta_model.num_parameters(),
                      active=meta_model.num_parameters(active_only=True), step=info.step, tokens=info.tokens,
                      val_loss=info.val_loss, training_config=full_config)
    json_files = {
        "config.json": hf_config(cfg, chosen, out_dtype, eos, pad),
        "generation_config.json": {"eos_token_id": eos, "pad_token_id": pad, "max_new_tokens": 64},
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token,
                                  "pad_token": pad_token, "model_max_length": cfg.max_seq_len,
                                  "clean_up_tokenization_spaces": False},
    }
    if info.chat_template is not None:  # trained on conversations: apply_chat_template renders what it learned
        json_files["tokenizer_config.json"]["chat_template"] = info.chat_template
    text_files = {"README.md": card, "training_config.yaml": OmegaConf.to_yaml(OmegaConf.create(full_config))}
    metadata = {"format": "ava-export", "layout": chosen, "source_tag": info.source_tag, "step": str(info.step)}
    out = write_export_dir(Path(out_dir), tensors, json_files, text_files, {"tokenizer.json": Path(tokenizer)},
                           parse_size(max_shard_size), metadata, progress, replace)
    progress(f"exported {chosen} layout ({str(out_dtype).removeprefix('torch.')}) to {out}")
    return out
