"""Checkpoints: DeepSpeed shards + Ava's client state, a manifest, keep-last-K, resume.

Layout of `<run_dir>/checkpoints/`:

    step_00000500/              one tag per save (DeepSpeed's files, every rank's shards)
        ava_rank_00000.pt       this rank's RNG states (python, numpy, torch) and loader position
        COMPLETE.json           the manifest (size + sha256 of every file), written last
    latest                      the newest complete tag (for DeepSpeed's own tools)

A save: every rank writes its files and flushes them to stable storage (`syncfs`); barrier;
the file list is split across the ranks, each hashes its share; rank 0 gathers the digests
and writes the manifest atomically (`ava.files.atomic_write_text`); then `latest`.
DeepSpeed writes its own `latest` without a barrier or an atomic rename, so Ava passes
`save_latest=False` and never trusts it. Resume (`trainer.resume=auto`) and rollback take the
newest tag that has a manifest and matches it; incomplete and corrupt tags are skipped with a
warning naming the file. Assumes a file system shared by all ranks (the usual cluster setup);
rank 0 decides which tag and broadcasts it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from ava import dist
from ava.checkpoints import (
    LATEST,
    MANIFEST_FORMAT,
    MARKER,
    TAG_PATTERN,
    digest_files,
    is_complete,
    list_tags,
    newest_intact,
    payload_files,
    tag_for,
    verify,
)
from ava.config import ConfigError
from ava.files import atomic_write, atomic_write_text

log = logging.getLogger("ava.train")


def rank_state_name(rank: int) -> str:
    return f"ava_rank_{rank:05d}.pt"


def sync_filesystem(path: Path) -> None:
    """`syncfs(2)` on the file system holding `path` (Linux): flushes this node's dirty pages
    there, without `sync()`'s stall on every other file system of the node."""
    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


# --- per-rank state (RNG + loader), saved so that `torch.load(weights_only=True)` reads it ---

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**63)


def capture_rng() -> Dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_rng_state(state["accelerator"])


class CheckpointManager:
    """Saves, prunes and finds checkpoints of one run (every rank holds one)."""

    def __init__(self, ckpt_dir: Path, keep_last: int, verify_hashes: bool = True) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.verify_hashes = verify_hashes
        self.rank = dist.rank()
        self.world_size = dist.world_size()

    # ---- save ----
    def save(self, engine: Any, step: int, client_state: Dict[str, Any],
             rank_state: Dict[str, Any],
             files_written: Optional[Callable[[int], None]] = None,
             meta: Optional[Dict[str, Any]] = None) -> Path:
        """Save tag `step_N` on every rank; write its manifest once all ranks are done.
        `files_written(step)` runs on every rank between its own files and the barrier (the
        fault drill's kill point: shards on disk, no manifest). `meta` goes into the manifest
        (what resume checks before loading: e.g. the data fingerprint)."""
        start = time.perf_counter()
        tag = tag_for(step)
        tag_dir = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a stale, interrupted save of the same step
                shutil.rmtree(tag_dir)
        dist.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state,
                               save_latest=False)
        tag_dir.mkdir(parents=True, exist_ok=True)
        path = tag_dir / rank_state_name(self.rank)
        # durability comes from the syncfs below, which covers every file of the tag
        atomic_write(path, lambda tmp: torch.save(rank_state, tmp), durable=False)
        if files_written is not None:
            files_written(step)
        # flush this node's writes (its own shards) to stable storage: on a network file system
        # only the writing node can, and the manifest must never outlive its files
        sync_filesystem(tag_dir)
        dist.barrier()  # every rank's files are on disk past this point
        names = dist.broadcast_object(payload_files(tag_dir) if self.rank == 0 else None)
        mine = digest_files(tag_dir, names[self.rank::self.world_size])
        digests = dist.all_gather_object(mine)
        if self.rank == 0:
            files = {name: d for part in digests for name, d in part.items()}
            manifest = {"format": MANIFEST_FORMAT, "tag": tag, "step": step,
                        "world_size": self.world_size,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        **(meta or {}), "files": dict(sorted(files.items()))}
            atomic_write_text(tag_dir / MARKER, json.dumps(manifest, indent=1) + "\n")
            atomic_write_text(self.dir / LATEST, tag)
            self.prune(step)
        dist.barrier()
        log.info("saved checkpoint %s (%.1fs)", tag_dir, time.perf_counter() - start)
        return tag_dir

    def prune(self, current_step: int) -> None:
        """Keep the newest `keep_last` complete tags up to `current_step`; drop interrupted ones."""
        tags = [(s, d) for s, d in list_tags(self.dir) if s <= current_step]
        complete = [(s, d) for s, d in tags if is_complete(d)]
        doomed = [d for _, d in complete[:-self.keep_last]]
        doomed += [d for s, d in tags if not is_complete(d) and s != current_step]
        for tag_dir in doomed:
            shutil.rmtree(tag_dir, ignore_errors=True)
            log.info("removed old checkpoint %s", tag_dir.name)

    # ---- resume ----
    def resolve(self, spec: str) -> Optional[Path]:
        """The tag directory `trainer.resume=spec` names (decided on rank 0, broadcast)."""
        chosen: Optional[str] = None
        error: Optional[str] = None
        if self.rank == 0:
            try:
                found = self._resolve_local(spec)
                chosen = str(found) if found else None
            except ConfigError as exc:
                error = str(exc)
        chosen, error = dist.broadcast_object((chosen, error))
        if error:
            raise ConfigError(error)
        return Path(chosen) if chosen else None

    def resolve_before(self, max_step: int) -> Optional[Path]:
        """The newest intact tag with step <= `max_step` (a rollback target), decided on rank 0
        and broadcast; None when there is none."""
        chosen: Optional[str] = None
        if self.rank == 0:
            found, _ = newest_intact(self.dir, max_step=max_step, hashes=self.verify_hashes)
            chosen = str(found) if found else None
        chosen = dist.broadcast_object(chosen)
        return Path(chosen) if chosen else None

    def _newest(self, ckpt_dir: Path, spec: str) -> Optional[Path]:
        """The newest intact tag of `ckpt_dir`. Only interrupted saves and nothing else: None
        (nothing was ever complete, nothing is lost). Complete tags that are all corrupt: an
        error, because starting over would silently throw the run away."""
        found, rejected = newest_intact(ckpt_dir, hashes=self.verify_hashes)
        if found is None and any(is_complete(d) for _, d in list_tags(ckpt_dir)):
            raise ConfigError(
                f"trainer.resume={spec!r}: no intact checkpoint left in {ckpt_dir}: "
                + " | ".join(rejected) + ". Restore the files from a copy, or start over "
                "with trainer.resume=never (or another hydra.run.dir)")
        return found

    def _resolve_local(self, spec: str) -> Optional[Path]:
        if spec == "never":
            return None
        if spec == "auto":
            return self._newest(self.dir, spec)
        path = Path(spec)
        if not path.exists() and (self.dir / spec).exists():
            path = self.dir / spec
        if not path.is_dir():
            raise ConfigError(f"trainer.resume={spec!r}: no such checkpoint directory "
                              f"(nor a tag in {self.dir})")
        if TAG_PATTERN.match(path.name) or (path / MARKER).exists():
            problems = verify(path, hashes=self.verify_hashes)
            if problems:
                raise ConfigError(f"trainer.resume={spec!r}: {path} cannot be resumed: "
                                  + "; ".join(problems))
            return path
        found = self._newest(path, spec)
        if found is None:
            raise ConfigError(f"trainer.resume={spec!r}: no complete checkpoint in {path}")
        return found

    def load(self, engine: Any, tag_dir: Path, rank_state_from: Optional[Path] = None,
             rank: Optional[int] = None) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
        """Load model, optimizer and LR schedule; return (client state, this rank's state, or
        `rank`'s in `rank_state_from` when the tag loaded is a converted copy)."""
        load_path, client_state = engine.load_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
            load_lr_scheduler_states=True)
        if load_path is None:
            raise ConfigError(f"trainer.resume: DeepSpeed could not load {tag_dir}")
        rank_file = (rank_state_from or tag_dir) / rank_state_name(self.rank if rank is None else rank)
        rank_state = None
        if rank_file.is_file():
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        return dict(client_state or {}), rank_state
