"""Elastic resume: continue a checkpoint on another world size or expert-parallel split
(`trainer.elastic=true`).

ZeRO partitions parameters and optimizer state by rank, so a checkpoint of W ranks cannot be
loaded by W' ranks as it is. DeepSpeed's own universal checkpoints reshard it: `ds_to_universal`
(run once, on rank 0, into `checkpoints/.universal/<tag>`) writes every parameter's fp32 master
weight and Adam moments whole, and an engine configured with `checkpoint.load_universal` slices
them for its own partitioning (`ava.train.ds_compat.universal_loading`). Experts under expert
parallelism live on EP ranks, outside the data-parallel partitions: `ava.train.expert_reshard`
gives the converter and the loader the expert names they need (ZeRO-1/2; ZeRO-3 with expert
parallelism on either side is refused). Ava's part is also what DeepSpeed does not know: the
global batch is kept (gradient accumulation adapts to the new world size, or the run is refused
with the numbers), the loader continues at the same sample of the same global order
(ava.data.loader), and on another world size the per-rank RNG streams, which cannot map one to
one, are re-seeded from (seed, step, rank); on the same world size (only the split changed) every
rank's loader position and RNG streams are its own, as saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from ava import dist
from ava.checkpoints import read_manifest
from ava.config import AvaConfig, ConfigError
from ava.train.checkpoint import seed_everything
from ava.train.expert_reshard import canonicalize, globally_named, names_sharded_experts, write_target_view

log = logging.getLogger("ava.train")

UNIVERSAL_DIR = ".universal"  # under the checkpoint directory: converted tags, one per source tag


def universal_info() -> Dict[str, Any]:
    """The client-state entry DeepSpeed's converter requires (Megatron writes one too)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


@dataclass(frozen=True)
class Reshard:
    """A resume from `tag_dir` (saved by `saved_world` ranks, expert-parallel split `saved_ep`) on
    `world` ranks with split `ep` and accumulation `accum`."""

    tag_dir: Path
    saved_world: int
    saved_ep: int
    saved_accum: int
    micro: int
    world: int
    ep: int
    accum: int

    @property
    def world_changed(self) -> bool:
        """Per-rank state (loader position, RNG streams) cannot map one to one."""
        return self.saved_world != self.world

    @property
    def moves_experts(self) -> bool:
        """Expert parallelism on either side: the experts change hands (ava.train.expert_reshard)."""
        return max(self.saved_ep, self.ep) > 1

    def describe(self) -> str:
        return (f"elastic resume from {self.tag_dir.name}: world size {self.saved_world} -> {self.world}, "
                f"expert_parallel_size {self.saved_ep} -> {self.ep}, gradient accumulation {self.saved_accum} "
                f"-> {self.accum}, micro-batch {self.micro}: the global batch of "
                f"{self.micro * self.accum * self.world} stays")


def plan_reshard(cfg: AvaConfig, tag_dir: Optional[Path], world: int) -> Optional[Reshard]:
    """The reshard that resuming from `tag_dir` (what `trainer.resume` resolved to) needs on `world`
    ranks, or None when there is none to resume or it was saved by this many ranks with this
    expert-parallel split. Raises `ConfigError` for what cannot be resharded (before any engine)."""
    t = cfg.trainer
    if not t.elastic or tag_dir is None:
        return None
    manifest = read_manifest(tag_dir)
    saved_world, ep = int(manifest.get("world_size", world)), t.expert_parallel_size
    saved_ep = int(manifest.get("expert_parallel_size", 1))
    if (saved_world, saved_ep) == (world, ep):
        return None
    where = (f"checkpoint {tag_dir} (saved by {saved_world} rank(s) with expert_parallel_size={saved_ep}, "
             f"resumed by {world} with {ep})")
    relaunch = (f"relaunch with {saved_world} rank(s) and trainer.expert_parallel_size={saved_ep}, or export it "
                "with ava-export and start a new run directory")
    if "micro_batch_size" not in manifest or "zero_stage" not in manifest:
        raise ConfigError(f"{where}: its manifest does not record the batch layout and ZeRO stage (saved by an "
                          f"older Ava); {relaunch}")
    stage = int(manifest["zero_stage"])
    if stage == 0:
        raise ConfigError(f"{where}: ZeRO stage 0 has no partitioned optimizer state for DeepSpeed's universal "
                          f"checkpoint to reshard; {relaunch}")
    if stage == 3 and max(saved_ep, ep) > 1:
        raise ConfigError(f"{where}: trainer.elastic reshards expert parallelism under ZeRO stage 1 or 2 only "
                          "(DeepSpeed 0.19.8 keeps ZeRO-3 experts in its partition-native AutoEP format, which "
                          f"Ava's expert conversion does not read); {relaunch}")
    saved_micro, saved_accum = int(manifest["micro_batch_size"]), int(manifest["grad_accum_steps"])
    global_batch = saved_micro * saved_accum * saved_world
    micro = t.micro_batch_size
    if global_batch % (micro * world):
        raise ConfigError(f"{where}: the global batch of {global_batch} (micro {saved_micro} x accumulation "
                          f"{saved_accum} x {saved_world} ranks) is not a multiple of trainer.micro_batch_size="
                          f"{micro} x {world} ranks; choose a micro-batch size that divides {global_batch // world}")
    return Reshard(tag_dir=tag_dir, saved_world=saved_world, saved_ep=saved_ep, saved_accum=saved_accum,
                   micro=micro, world=world, ep=ep, accum=global_batch // (micro * world))


def adapted(cfg: AvaConfig, reshard: Reshard) -> AvaConfig:
    """`cfg` with the accumulation that keeps the saved global batch."""
    trainer = dataclasses.replace(cfg.trainer, grad_accum_steps=reshard.accum, global_batch_size=None)
    return dataclasses.replace(cfg, trainer=trainer)


def to_universal(reshard: Reshard, expert_parallel: Optional[str], num_experts: int,
                 param_groups: List[Dict[str, Any]]) -> Path:
    """`reshard.tag_dir` converted by DeepSpeed's `ds_to_universal` (rank 0 converts, once per tag;
    every rank waits), with the experts in the names this run's engine (`expert_parallel`:
    None, "autoep" or "sharded"; its optimizer's `param_groups`) loads; returns the universal tag
    directory."""
    tag_dir = reshard.tag_dir
    out = tag_dir.parent / UNIVERSAL_DIR / tag_dir.name
    failure: Optional[str] = None
    if dist.rank() == 0:
        try:
            if not (out / "zero").is_dir():
                log.info("elastic resume: converting %s to DeepSpeed's universal format in %s", tag_dir.name, out)
                _convert(reshard, out, num_experts)
            if reshard.moves_experts:
                write_target_view(out / "zero", expert_parallel, reshard.ep, num_experts, param_groups)
        except Exception as exc:  # DeepSpeed raises AssertionError/RuntimeError/...; name the step
            failure = f"{type(exc).__name__}: {exc}"
    if dist.world_size() > 1:
        failure = dist.broadcast_object(failure)
    if failure is not None:
        raise ConfigError(f"elastic resume: DeepSpeed's ds_to_universal could not convert {tag_dir}: {failure}")
    return out


def _convert(reshard: Reshard, out: Path, num_experts: int) -> None:
    """Into a scratch directory first, renamed once whole: an interrupted conversion is redone."""
    from deepspeed.checkpoint import ds_to_universal

    scratch, named = out.with_name(f".tmp-{out.name}"), out.with_name(f".named-{out.name}")
    for leftover in (scratch, named):
        shutil.rmtree(leftover, ignore_errors=True)
    source = reshard.tag_dir
    try:
        if reshard.saved_ep > 1 and names_sharded_experts(source):
            source = globally_named(source, named, world=reshard.saved_world, ep=reshard.saved_ep,
                                    num_experts=num_experts)
        args = argparse.Namespace(input_folder=str(source), output_folder=str(scratch), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # checkpoints saved before Ava wrote the info
        ds_to_universal.main(args)
        canonicalize(scratch / "zero", num_experts)
        scratch.rename(out)
    finally:
        for leftover in (scratch, named):
            shutil.rmtree(leftover, ignore_errors=True)


RESEED_STRIDE = 1_000_003  # a prime: (seed, step, rank) triples never collide for rank < stride


def reseed(seed: int, step: int, rank: int) -> None:
    """Fresh per-rank RNG streams for a new world size: rank r's saved stream has no counterpart
    when the ranks change, so every rank seeds python, numpy and torch from (seed, step, rank)."""
    seed_everything((seed * RESEED_STRIDE + step) * RESEED_STRIDE + rank)
    if rank == 0:
        log.info("elastic resume: RNG streams re-seeded per rank from (seed %d, step %d, rank)", seed, step)
