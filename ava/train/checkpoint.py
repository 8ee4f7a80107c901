"""Checkpoints: DeepSpeed shards + Ava's client state, a completeness marker, keep-last-K, resume.

Layout of `<run_dir>/checkpoints/`:

    step_00000500/              one tag per save (DeepSpeed's files, every rank's shards)
        ava_rank_00000.pt       this rank's RNG states (python, numpy, torch) and loader position
        COMPLETE.json           written by rank 0 only after a barrier that every rank reaches
                                once its shards are on disk; a tag without it is never resumed
    latest                      the newest complete tag (for DeepSpeed's own tools)

DeepSpeed writes its `latest` without a barrier or an atomic rename, so Ava passes
`save_latest=False` and writes its own after the marker. Resume (`trainer.resume=auto`) picks
the newest tag that has a marker. Assumes a file system shared by all ranks (the usual cluster
setup); rank 0 decides which tag and broadcasts it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from ava.checkpoints import LATEST, MARKER, TAG_PATTERN, is_complete, list_tags, newest_complete, tag_for
from ava.config import ConfigError
from ava.train import distributed

log = logging.getLogger("ava.train")


def rank_state_name(rank: int) -> str:
    return f"ava_rank_{rank:05d}.pt"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- per-rank state (RNG + loader), saved so that `torch.load(weights_only=True)` reads it ---

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

    def __init__(self, ckpt_dir: Path, keep_last: int) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = distributed.rank()
        self.world_size = distributed.world_size()

    # ---- save ----
    def save(self, engine: Any, step: int, client_state: Dict[str, Any],
             rank_state: Dict[str, Any]) -> Path:
        """Save tag `step_N` on every rank; mark it complete once all ranks are done."""
        start = time.perf_counter()
        tag = tag_for(step)
        tag_dir = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a stale, interrupted save of the same step
                shutil.rmtree(tag_dir)
        distributed.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state,
                               save_latest=False)
        tag_dir.mkdir(parents=True, exist_ok=True)
        path = tag_dir / rank_state_name(self.rank)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(rank_state, tmp)
        os.replace(tmp, path)
        distributed.barrier()  # every rank's shards are on disk past this point
        if self.rank == 0:
            marker = {"tag": tag, "step": step, "world_size": self.world_size,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "files": sorted(p.name for p in tag_dir.iterdir())}
            _atomic_write(tag_dir / MARKER, json.dumps(marker, indent=1) + "\n")
            _atomic_write(self.dir / LATEST, tag)
            self.prune(step)
        distributed.barrier()
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
        chosen, error = distributed.broadcast_object((chosen, error))
        if error:
            raise ConfigError(error)
        return Path(chosen) if chosen else None

    def resolve_before(self, max_step: int) -> Optional[Path]:
        """The newest complete tag with step <= `max_step` (a rollback target), decided on rank 0
        and broadcast; None when there is none."""
        chosen: Optional[str] = None
        if self.rank == 0:
            for step, tag_dir in reversed(list_tags(self.dir)):
                if step <= max_step and is_complete(tag_dir):
                    chosen = str(tag_dir)
                    break
        chosen = distributed.broadcast_object(chosen)
        return Path(chosen) if chosen else None

    def _resolve_local(self, spec: str) -> Optional[Path]:
        if spec == "never":
            return None
        if spec == "auto":
            return newest_complete(self.dir)
        path = Path(spec)
        if not path.exists() and (self.dir / spec).exists():
            path = self.dir / spec
        if not path.is_dir():
            raise ConfigError(f"trainer.resume={spec!r}: no such checkpoint directory "
                              f"(nor a tag in {self.dir})")
        if TAG_PATTERN.match(path.name) or (path / MARKER).exists():
            if not is_complete(path):
                raise ConfigError(f"trainer.resume={spec!r}: {path} is incomplete (no {MARKER}): "
                                  "its save was interrupted")
            return path
        found = newest_complete(path)
        if found is None:
            raise ConfigError(f"trainer.resume={spec!r}: no complete checkpoint in {path}")
        return found

    def load(self, engine: Any, tag_dir: Path) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
        """Load model, optimizer and LR schedule; return (client state, this rank's state)."""
        load_path, client_state = engine.load_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
            load_lr_scheduler_states=True)
        if load_path is None:
            raise ConfigError(f"trainer.resume: DeepSpeed could not load {tag_dir}")
        rank_file = tag_dir / rank_state_name(self.rank)
        rank_state = None
        if rank_file.is_file():
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        return dict(client_state or {}), rank_state
