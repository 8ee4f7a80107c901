"""Perplexity of a loaded model on packed token blocks (how much int8 or a cast costs in quality)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ava.inference.loader import LoadedModel


@torch.no_grad()
def perplexity(loaded: LoadedModel, blocks: Sequence[np.ndarray], batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over every position of every block (`seq_len + 1` ids)."""
    device = loaded.model.embed_tokens.weight.device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = torch.as_tensor(np.stack([np.asarray(blocks[i], dtype=np.int64)
                                          for i in range(start, min(start + batch_size, len(blocks)))]))
        inputs, labels = batch[:, :-1].to(device), batch[:, 1:].to(device)
        logits = loaded.model(inputs).logits.float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                                 reduction="sum").item()
        count += labels.numel()
    if count == 0:
        raise ValueError("no blocks to evaluate")
    return math.exp(total / count)
