"""DeepSpeed checkpoint (any ZeRO stage, any world size) → one fp32 state dict.

ZeRO 1-3 (and the bf16 optimizer) go through DeepSpeed's own `zero_to_fp32`, which knows every
partition layout and returns the fp32 master weights. Stage 0 keeps no partitioned optimizer
state, so its module state in `mp_rank_00_model_states.pt` is already the whole model.
Both files are DeepSpeed pickles: exporting trusts the checkpoint directory exactly as resuming
does; the export it produces is safetensors only.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

MODEL_STATES = "mp_rank_00_model_states.pt"


def consolidate(save_dir: Path, tag: str, quiet: bool = True) -> dict[str, torch.Tensor]:
    ckpt = Path(save_dir) / tag
    if any(ckpt.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sink = io.StringIO()
        with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
            state = get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
    else:
        files = sorted(ckpt.glob("*model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{ckpt} holds no DeepSpeed model or optimizer state files")
        blob = torch.load(files[0], map_location="cpu", weights_only=False)  # DeepSpeed pickle, see above
        state = blob["module"]
    return {name: t.detach().to(torch.float32) if t.is_floating_point() else t.detach() for name, t in state.items()}
