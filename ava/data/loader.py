"""`BlockLoader`: an infinite, resumable, rank-sharded iterator of micro-batches of blocks.

Epoch `e` shuffles all block indices with a generator seeded by `(seed, e)`, so every rank
computes the same permutation without communication. The permutation is cut to whole global
batches (`micro_batch_size x accum x world_size` blocks), and rank `r` takes every
`world_size`-th index starting at `r`, in micro-batches of consecutive shard entries. So the
micro-batches of all ranks at a step together hold the next global batch of the permutation:
after `s` steps the blocks consumed are the first `s` global batches of the epoch's order,
whatever the world size, micro-batch and accumulation that make up that global batch. This is
what lets a run resume on another world size with the same global batch and see the same
samples (`load_state_dict(strict=False)`). Per epoch up to one global batch minus one block is
not used; the permutation changes every epoch, so different blocks each time. Every rank yields
exactly `batches_per_epoch` micro-batches per epoch, which keeps ranks in lock step.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Protocol

import numpy as np
import torch

from ava.config import IGNORE_INDEX


class Blocks(Protocol):
    """Optionally `targets`: None (or absent) when every token is a target, else `targets(i)`
    flags block i's targets; `segments(i)` is needed for `document_mask` only."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...

    def segments(self, index: int) -> np.ndarray: ...


class BlockLoader:
    """next(loader) -> {"input_ids": LongTensor[B, L], "labels": LongTensor[B, L]}, where
    `labels[:, t] == input_ids[:, t + 1]` within a block (targets already aligned) or -100 where
    that token is not a target; with `document_mask` also "document_ids" `[B, L]`, each input
    token's document within its block, which the model turns into a block-diagonal mask."""

    def __init__(self, blocks: Blocks, *, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 document_mask: bool = False, accum: int = 1) -> None:
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.blocks = blocks
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.document_mask = document_mask
        self.accum = accum
        self.num_blocks = len(blocks)
        steps_per_epoch = self.num_blocks // (micro_batch_size * accum * world_size)
        self.batches_per_epoch = steps_per_epoch * accum  # micro-batches per rank
        self.blocks_per_rank = self.batches_per_epoch * micro_batch_size
        self.epoch = 0
        self.position = 0  # batches already yielded in `epoch`
        self._order: Optional[np.ndarray] = None
        self._order_epoch = -1

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's block indices for `epoch`, in the order they are served (whole batches)."""
        if self._order_epoch != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)
            else:
                order = np.arange(self.num_blocks)
            used = order[: self.blocks_per_rank * self.world_size]
            self._order = used[self.rank:: self.world_size]
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def __iter__(self) -> BlockLoader:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.num_blocks} blocks cannot fill one global batch (micro_batch_size="
                f"{self.micro_batch_size} x accumulation {self.accum} x world_size={self.world_size}); "
                "use more data, a smaller data.seq_len or a smaller batch")
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        start = self.position * self.micro_batch_size
        indices = self.shard(self.epoch)[start:start + self.micro_batch_size]
        batch = torch.from_numpy(np.stack([self.blocks[int(i)] for i in indices])
                                 .astype(np.int64))
        self.position += 1
        out = {"input_ids": batch[:, :-1], "labels": batch[:, 1:]}
        flags = getattr(self.blocks, "targets", None)  # absent or None: every token is a target
        if flags is not None:
            targets = torch.from_numpy(np.stack([flags(int(i)) for i in indices]))
            out["labels"] = torch.where(targets[:, 1:], batch[:, 1:], IGNORE_INDEX)
        if self.document_mask:
            segments = np.stack([self.blocks.segments(int(i)) for i in indices])
            out["document_ids"] = torch.from_numpy(segments[:, :-1])
        return out

    def state_dict(self) -> Dict[str, Any]:
        """Enough to continue exactly where this loader is, plus the geometry it assumes."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size, "num_blocks": self.num_blocks,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: Dict[str, Any], strict: bool = True) -> None:
        """Continue from `state`. With `strict` (default) the seed, block count, world size and
        micro-batch size must match, which makes the continuation exact. With
        `strict=False` a different world size or micro-batch size is accepted and the
        position is mapped by the number of samples consumed so far in the epoch: the same
        samples follow when the global batch (micro x accum x world) is kept and the state was
        saved at a step boundary (see the module docstring); otherwise the continuation is
        approximate."""
        for key in ("seed", "num_blocks", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]}, this loader has "
                                 f"{getattr(self, key)}: the data or seed changed since the "
                                 "checkpoint")
        geometry = ("world_size", "micro_batch_size")
        changed = [k for k in geometry if k in state and state[k] != getattr(self, k)]
        if changed and strict:
            raise ValueError("loader state was saved with " + ", ".join(
                f"{k}={state[k]} (now {getattr(self, k)})" for k in changed)
                + "; pass strict=False to continue approximately")
        self.epoch = int(state["epoch"])
        position = int(state["position"])
        if changed:
            consumed = position * state["micro_batch_size"] * state["world_size"]
            position = consumed // (self.micro_batch_size * self.world_size)
        self.position = min(position, self.batches_per_epoch)
