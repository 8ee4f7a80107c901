"""Elastic resume: continue a checkpoint on another world size (`trainer.elastic=true`).

ZeRO partitions parameters and optimizer state by rank, so a checkpoint of W ranks cannot be
loaded by W' ranks as it is. DeepSpeed's own universal checkpoints reshard it: `ds_to_universal`
(run once, on rank 0, into `checkpoints/.universal/<tag>`) writes every parameter's fp32 master
weight and Adam moments whole, and an engine configured with `checkpoint.load_universal` slices
them for its own partitioning (`ava.train.ds_compat.universal_loading`). Ava's part is what
DeepSpeed does not know: the global batch is kept (gradient accumulation adapts to the new world
size, or the run is refused with the numbers), the loader continues at the same sample of the
same global order (ava.data.loader), and the per-rank RNG streams, which cannot map one to one,
are re-seeded from (seed, step, rank).
Expert parallelism (whose experts live on different ranks outside ZeRO's partitions) is not
resharded: a change of world size with `trainer.expert_parallel_size > 1` is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from ava import dist
from ava.checkpoints import read_manifest
from ava.config import AvaConfig, ConfigError
from ava.train.checkpoint import seed_everything

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
    """A resume from `tag_dir` (saved by `saved_world` ranks) on `world` ranks with `accum`."""

    tag_dir: Path
    saved_world: int
    saved_accum: int
    micro: int
    world: int
    accum: int

    def describe(self) -> str:
        return (f"elastic resume from {self.tag_dir.name}: world size {self.saved_world} -> {self.world}, "
                f"gradient accumulation {self.saved_accum} -> {self.accum}, micro-batch {self.micro}: "
                f"the global batch of {self.micro * self.accum * self.world} stays")


def plan_reshard(cfg: AvaConfig, tag_dir: Optional[Path], world: int) -> Optional[Reshard]:
    """The reshard that resuming from `tag_dir` (what `trainer.resume` resolved to) needs on `world`
    ranks, or None when there is none to resume or it was saved by this many ranks. Raises
    `ConfigError` for what cannot be resharded."""
    t = cfg.trainer
    if not t.elastic or tag_dir is None:
        return None
    manifest = read_manifest(tag_dir)
    saved_world = int(manifest.get("world_size", world))
    if saved_world == world:
        return None
    where = f"checkpoint {tag_dir} (saved by {saved_world} rank(s), resumed by {world})"
    saved_ep = int(manifest.get("expert_parallel_size", 1))
    if saved_ep > 1 or t.expert_parallel_size > 1:
        raise ConfigError(f"{where}: trainer.elastic does not reshard expert parallelism (saved with "
                          f"expert_parallel_size={saved_ep}, now {t.expert_parallel_size}); relaunch with "
                          f"{saved_world} rank(s), or export it with ava-export and start a new run directory")
    if "micro_batch_size" not in manifest or "zero_stage" not in manifest:
        raise ConfigError(f"{where}: its manifest does not record the batch layout and ZeRO stage (saved by an "
                          f"older Ava); relaunch with {saved_world} rank(s)")
    if int(manifest["zero_stage"]) == 0:
        raise ConfigError(f"{where}: ZeRO stage 0 has no partitioned optimizer state for DeepSpeed's universal "
                          "checkpoint to reshard; relaunch with the same world size")
    saved_micro, saved_accum = int(manifest["micro_batch_size"]), int(manifest["grad_accum_steps"])
    global_batch = saved_micro * saved_accum * saved_world
    micro = t.micro_batch_size
    if global_batch % (micro * world):
        raise ConfigError(f"{where}: the global batch of {global_batch} (micro {saved_micro} x accumulation "
                          f"{saved_accum} x {saved_world} ranks) is not a multiple of trainer.micro_batch_size="
                          f"{micro} x {world} ranks; choose a micro-batch size that divides {global_batch // world}")
    return Reshard(tag_dir=tag_dir, saved_world=saved_world, saved_accum=saved_accum, micro=micro, world=world,
                   accum=global_batch // (micro * world))


def adapted(cfg: AvaConfig, reshard: Reshard) -> AvaConfig:
    """`cfg` with the accumulation that keeps the saved global batch."""
    trainer = dataclasses.replace(cfg.trainer, grad_accum_steps=reshard.accum, global_batch_size=None)
    return dataclasses.replace(cfg, trainer=trainer)


def to_universal(tag_dir: Path) -> Path:
    """`tag_dir` converted by DeepSpeed's `ds_to_universal` (rank 0 converts, once per tag; every
    rank waits); returns the universal tag directory."""
    out = tag_dir.parent / UNIVERSAL_DIR / tag_dir.name
    failure: Optional[str] = None
    if dist.rank() == 0 and not (out / "zero").is_dir():
        from deepspeed.checkpoint import ds_to_universal

        scratch = out.with_name(f".tmp-{out.name}")
        shutil.rmtree(scratch, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(scratch), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # checkpoints saved before Ava wrote the info
        log.info("elastic resume: converting %s to DeepSpeed's universal format in %s", tag_dir.name, out)
        try:
            ds_to_universal.main(args)
            scratch.rename(out)  # whole or absent: an interrupted conversion is redone
        except Exception as exc:  # DeepSpeed raises AssertionError/RuntimeError/...; name the step
            shutil.rmtree(scratch, ignore_errors=True)
            failure = f"{type(exc).__name__}: {exc}"
    if dist.world_size() > 1:
        failure = dist.broadcast_object(failure)
    if failure is not None:
        raise ConfigError(f"elastic resume: DeepSpeed's ds_to_universal could not convert {tag_dir}: {failure}")
    return out


RESEED_STRIDE = 1_000_003  # a prime: (seed, step, rank) triples never collide for rank < stride


def reseed(seed: int, step: int, rank: int) -> None:
    """Fresh per-rank RNG streams for a new world size: rank r's saved stream has no counterpart
    when the ranks change, so every rank seeds python, numpy and torch from (seed, step, rank)."""
    seed_everything((seed * RESEED_STRIDE + step) * RESEED_STRIDE + rank)
    if rank == 0:
        log.info("elastic resume: RNG streams re-seeded per rank from (seed %d, step %d, rank)", seed, step)
