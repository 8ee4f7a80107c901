"""Validation: the mean LM loss per target token over fixed, unshuffled blocks (every evaluation sees the same
data), reduced over ranks, and its perplexity."""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional

import torch

from ava import dist
from ava.config import IGNORE_INDEX
from ava.data import BlockLoader, Blocks

log = logging.getLogger("ava.train")

MAX_LOG_PPL = 50.0  # exp() of a diverged loss would overflow; the loss itself is still logged


class Evaluator:
    def __init__(self, blocks: Blocks, *, micro_batch_size: int, batches: int, seed: int,
                 document_mask: bool = False) -> None:
        self.blocks, self.micro, self.batches, self.seed = blocks, micro_batch_size, batches, seed
        self.document_mask = document_mask
        self._warned = False

    def __call__(self, engine: Any) -> Optional[Dict[str, float]]:
        """`trainer.eval_batches` micro-batches per rank; None (said once) when the validation
        split cannot fill one micro-batch on every rank."""
        loader = BlockLoader(self.blocks, micro_batch_size=self.micro, rank=dist.rank(),
                             world_size=dist.world_size(), seed=self.seed, shuffle=False,
                             document_mask=self.document_mask)
        batches = min(self.batches, loader.batches_per_epoch)
        if batches == 0:
            if not self._warned:
                log.warning("evaluation skipped: %d validation blocks cannot fill one micro-batch "
                            "of %d on each of %d ranks (raise data.val_fraction)",
                            len(self.blocks), self.micro, dist.world_size())
                self._warned = True
            return None
        device = engine.device
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for _ in range(batches):
                batch = {k: v.to(device) for k, v in next(loader).items()}
                out = engine(**batch)
                targets = (batch["labels"] != IGNORE_INDEX).sum().double()  # the mean is over target tokens
                total[0] += out.lm_loss.double() * targets
                total[1] += targets
        engine.train()
        dist.all_reduce_sum(total)
        val_loss = float(total[0] / total[1].clamp_min(1))
        return {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, MAX_LOG_PPL))}
