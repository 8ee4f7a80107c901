"""Token generation: KV-cache incremental decoding, greedy or sampled, batched with left padding.

Cached decoding feeds one token per step against the cache; `use_cache=False` re-runs the
whole sequence each step. Both must give the same greedy tokens (a test holds them equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ava.inference.errors import GenerationError
from ava.model import AvaForCausalLM


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # EOS cannot be chosen before this many new tokens (transformers' rule)
    stop_at_eos: bool = True  # False: go on past EOS (a document boundary) to max_new_tokens
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    repetition_penalty: float = 1.0  # 1.0: off; >1 discourages tokens already in the sequence
    seed: Optional[int] = None
    stop_strings: list[str] = field(default_factory=list)
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise GenerationError(f"min_new_tokens={self.min_new_tokens} must be in [0, max_new_tokens="
                                  f"{self.max_new_tokens}]")
        if self.do_sample and self.temperature <= 0:
            raise GenerationError(f"temperature={self.temperature} must be > 0 when sampling (or use greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise GenerationError(f"top_k={self.top_k} must be >= 0 and repetition_penalty="
                                  f"{self.repetition_penalty} > 0")


def process_logits(logits_BV: torch.Tensor, seqs_BS: torch.Tensor, mask_BS: torch.Tensor,
                   cfg: GenerationConfig) -> torch.Tensor:
    """Repetition penalty (CTRL), temperature, top-k, top-p — in that order, as `transformers` does."""
    logits = logits_BV.float()
    if cfg.repetition_penalty != 1.0:
        seen = torch.where(mask_BS.bool(), seqs_BS, torch.zeros_like(seqs_BS))
        picked = logits.gather(1, seen)
        picked = torch.where(picked > 0, picked / cfg.repetition_penalty, picked * cfg.repetition_penalty)
        penalised = logits.scatter(1, seen, picked)
        # padding positions point at token 0: only penalise token 0 where it really occurs
        really_seen_0 = ((seqs_BS == 0) & mask_BS.bool()).any(dim=1)
        penalised[:, 0] = torch.where(really_seen_0, penalised[:, 0], logits[:, 0])
        logits = penalised
    if not cfg.do_sample:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) > cfg.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), -torch.inf)
    return logits


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate_tokens(
    model: AvaForCausalLM,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    *,
    eos_id: Optional[int],
    pad_id: int,
    on_token: Optional[Callable[[int, int], None]] = None,
    should_stop: Optional[Callable[[int, list[int]], bool]] = None,
) -> list[list[int]]:
    """New tokens for each prompt (EOS excluded when it ends a row; included where
    `cfg.stop_at_eos` is off). `on_token(row, token)` streams; `should_stop(row, new_tokens)` ends
    a row early (stop strings are checked there on decoded text)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("empty prompt: give at least one token of text to continue from")
    device = model.embed_tokens.weight.device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    generator = None
    if cfg.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    batch = len(prompts)
    done = [False] * batch
    new: list[list[int]] = [[] for _ in range(batch)]
    past = None
    step_ids = ids
    for _ in range(cfg.max_new_tokens):
        if cfg.use_cache:
            out = model(step_ids, attention_mask=mask, past_key_values=past, use_cache=True)
            past = out.past_key_values
        else:
            out = model(ids, attention_mask=mask)
        logits = out.logits[:, -1]
        if eos_id is not None and cfg.min_new_tokens:
            early = torch.tensor([len(n) < cfg.min_new_tokens for n in new], device=device)
            logits = logits.clone()
            logits[early, eos_id] = -torch.inf
        logits = process_logits(logits, ids, mask, cfg)
        if cfg.do_sample:
            next_ids = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            next_ids = logits.argmax(dim=-1)
        next_ids = torch.where(torch.tensor(done, device=device), torch.full_like(next_ids, pad_id), next_ids)
        for row, tok in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if eos_id is not None and tok == eos_id and cfg.stop_at_eos:
                done[row] = True
                continue
            new[row].append(tok)
            if on_token is not None:
                on_token(row, tok)
            if should_stop is not None and should_stop(row, new[row]):
                done[row] = True
        if all(done):
            break
        step_ids = next_ids[:, None]
        ids = torch.cat([ids, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        if ids.shape[1] >= model.cfg.max_seq_len:
            break
    return new
