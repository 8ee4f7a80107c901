"""The exported directory's README.md: what the model is and how it was trained."""

from __future__ import annotations

from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from ava.config import ModelConfig


def model_card(cfg: ModelConfig, layout: str, dtype: torch.dtype, *, total: int, active: int, step: int,
               tokens: int, val_loss: Optional[float], training_config: dict[str, Any]) -> str:
    loss = "n/a" if val_loss is None else f"{val_loss:.4f}"
    load = ("`transformers.AutoModelForCausalLM.from_pretrained(path)` or `ava.inference.load_model(path)`"
            if layout == "mixtral" else "`ava.inference.load_model(path)`")
    return f"""# {cfg.name} — Ava MoE language model

| | |
|---|---|
| layout | `{layout}` |
| dtype | {str(dtype).removeprefix("torch.")} |
| hidden / layers / heads / FFN | {cfg.hidden_size} / {cfg.num_layers} / {cfg.num_heads} / {cfg.ffn_size} |
| experts / top-k | {cfg.num_experts} / {cfg.top_k} |
| vocabulary | {cfg.vocab_size} |
| parameters (total / active per token) | {total:,} / {active:,} |
| training steps / tokens | {step:,} / {tokens:,} |
| final validation loss | {loss} |

Load with {load}; generate with `ava-generate {{path}} --prompt "..."`.
Weights are safetensors; `model.safetensors.index.json` records each shard's sha256.

## Training configuration

```yaml
{OmegaConf.to_yaml(OmegaConf.create(training_config)).rstrip()}
```
"""
