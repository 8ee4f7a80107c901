"""Recognise and verify an exported model directory, and read its tensors (safetensors only).

A raw DeepSpeed checkpoint, a pickle weight file, a missing shard or a shard whose checksum
differs is refused here with a message that names the file and the fix.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ava.config import ConfigError, ModelConfig
from ava.files import sha256_file
from ava.hf import family
from ava.hf.families import FAMILIES
from ava.hf.layouts import LAYOUTS, mixtral_to_ava, model_config_from_hf
from ava.hf.shards import INDEX_NAME, SINGLE_NAME, STORED_DTYPES
from ava.inference.errors import CheckpointFormatError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
log = logging.getLogger("ava.inference")


@dataclass
class ExportedModel:
    path: Path
    layout: str  # "ava" | "mixtral" | a family's model_type (`ava.hf.families`)
    config: ModelConfig
    hf_config: dict[str, Any]
    shards: dict[str, str]  # tensor name (as stored) -> shard file


def _is_deepspeed_checkpoint(path: Path) -> bool:
    return (path / "latest").is_file() or any(path.glob("*model_states.pt")) or any(path.glob("*/*model_states.pt"))


def detect(path: str | Path) -> ExportedModel:
    """Classify `path` and check that every file the index promises is present."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointFormatError(f"{path} is not a directory; pass the directory that ava-export wrote")
    if _is_deepspeed_checkpoint(path):
        raise CheckpointFormatError(
            f"{path} is a raw DeepSpeed training checkpoint, not an exported model. "
            f"Export it first: ava-export {path} {path.name}-export"
        )
    config_path = path / "config.json"
    index_path = path / INDEX_NAME
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not index_path.is_file() and not (path / SINGLE_NAME).is_file():
        hint = f" It holds pickle-based weights ({', '.join(pickles)}), which Ava never loads." if pickles else ""
        raise CheckpointFormatError(
            f"{path} has no {INDEX_NAME} or {SINGLE_NAME}: not an Ava export.{hint} Re-export with ava-export."
        )
    if not config_path.is_file():
        raise CheckpointFormatError(f"{path} is missing config.json; the export is incomplete, re-run ava-export")
    if not (path / "tokenizer.json").is_file():
        raise CheckpointFormatError(f"{path} is missing tokenizer.json; the export is incomplete, re-run ava-export")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointFormatError(f"{config_path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    layout = hf.get("model_type", "")
    if layout not in LAYOUTS:
        raise CheckpointFormatError(
            f"{config_path}: model_type={layout!r} is not supported; expected one of {sorted(LAYOUTS)}"
        )
    try:
        cfg = FAMILIES[layout].model_config(hf) if layout in FAMILIES else model_config_from_hf(hf)
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise CheckpointFormatError(f"{config_path}: {err}") from None
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        shards = index["weight_map"]
    else:
        with safe_open(path / SINGLE_NAME, framework="pt") as f:
            shards = dict.fromkeys(f.keys(), SINGLE_NAME)
    missing = sorted({s for s in shards.values() if not (path / s).is_file()})
    if missing:
        raise CheckpointFormatError(f"{path} is missing weight shard(s) {missing}; the export is incomplete")
    return ExportedModel(path, layout, cfg, hf, shards)


def verify_checksums(model: ExportedModel) -> None:
    """Recompute each shard's sha256 against the index; a flipped byte names its file. A
    directory `transformers` saved has no checksums: it loads, and says so once."""
    if "ava_config" not in model.hf_config:
        log.info("%s was not written by ava-export: it has no checksums, so its shards were not verified",
                 model.path)
        return
    index_path = model.path / INDEX_NAME
    if not index_path.is_file():
        return
    recorded = json.loads(index_path.read_text()).get("metadata", {}).get("sha256", {})
    for shard in sorted(set(model.shards.values())):
        expected = recorded.get(shard)
        if expected is None:
            raise CheckpointFormatError(f"{index_path} records no sha256 for {shard}; re-export the model")
        actual = sha256_file(model.path / shard)
        if actual != expected:
            raise CheckpointFormatError(
                f"{model.path / shard} is corrupt: sha256 {actual[:16]}... differs from the index's "
                f"{expected[:16]}...; re-copy or re-export the model"
            )


def read_tensors(model: ExportedModel, verify: bool = True) -> dict[str, torch.Tensor]:
    """All tensors in Ava's names and stored dtypes (no cast)."""
    if verify:
        verify_checksums(model)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(model.shards.values())):
        try:
            with safe_open(model.path / shard, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[name] = f.get_tensor(name)
        except Exception as err:  # safetensors raises its own error types for truncated headers
            raise CheckpointFormatError(f"{model.path / shard} cannot be read as safetensors: {err}") from None
    return to_ava_layout(model, tensors)


def to_ava_layout(model: ExportedModel, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stored tensors (all of them, or those of whole `tensor_group`s) in Ava's names and
    layout, keeping their dtypes; meta tensors give the names and shapes without any data."""
    if model.layout == "ava":
        return tensors
    try:
        if model.layout == "mixtral":
            tensors = mixtral_to_ava(tensors, model.config)
        else:
            tensors = family.to_ava(tensors, model.config)
    except KeyError as err:
        raise CheckpointFormatError(f"{model.path}: {err.args[0]}") from None
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def stored_meta(model: ExportedModel) -> dict[str, torch.Tensor]:
    """Every stored tensor as a meta tensor of its stored shape and dtype, from the shards'
    headers alone: a loader plans and checks with these before it reads any weight."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(model.shards.values())):
        try:
            with safe_open(model.path / shard, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    view = f.get_slice(name)
                    code = view.get_dtype()
                    if code not in STORED_DTYPES:
                        raise CheckpointFormatError(f"{model.path / shard}: {name} is stored as {code}; Ava reads "
                                                    f"{', '.join(STORED_DTYPES)}")
                    out[name] = torch.empty(view.get_shape(), dtype=STORED_DTYPES[code], device="meta")
        except CheckpointFormatError:
            raise
        except Exception as err:  # safetensors raises its own error types for truncated headers
            raise CheckpointFormatError(f"{model.path / shard} cannot be read as safetensors: {err}") from None
    return out


def read_stored(model: ExportedModel, names: list[str]) -> dict[str, torch.Tensor]:
    """The stored tensors `names`, in their stored dtype, one at a time; each shard they live in
    is opened once and closed before returning: safetensors maps a shard into memory, and the
    pages a read touched stay resident (counted in the process's RSS) until it is closed."""
    by_shard: dict[str, list[str]] = {}
    for name in names:
        by_shard.setdefault(model.shards[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for shard, inside in by_shard.items():
        try:
            with safe_open(model.path / shard, framework="pt") as f:
                for name in inside:
                    out[name] = f.get_tensor(name)
        except Exception as err:  # a truncated shard shows only when its data is read
            raise CheckpointFormatError(f"{model.path / shard} cannot be read as safetensors: {err}") from None
    return out


def check_against(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    """Missing, unexpected or mis-shaped tensors, each named, before anything is loaded."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = sorted(
        f"{n}: stored {tuple(tensors[n].shape)}, model expects {tuple(expected[n].shape)}"
        for n in set(tensors) & set(expected) if tensors[n].shape != expected[n].shape
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra}")
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes))
    if problems:
        raise CheckpointFormatError(f"{path} does not match its config.json: " + " | ".join(problems))
