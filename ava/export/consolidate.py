"""DeepSpeed checkpoint (any ZeRO stage, any world size) → one fp32 state dict.

ZeRO 1-3 (and the bf16 optimizer) go through DeepSpeed's own `zero_to_fp32`, which knows every
partition layout and returns the fp32 master weights. Stage 0 keeps no partitioned optimizer
state, so its module state in `mp_rank_00_model_states.pt` is already the whole model.
Both files are DeepSpeed pickles: exporting trusts the checkpoint directory exactly as resuming
does; the export it produces is safetensors only.

Expert-parallel checkpoints (`trainer.expert_parallel_size` > 1) partition experts over
expert-parallel ranks, which `zero_to_fp32` refuses. Under ZeRO-1/2 each expert is saved whole
in its own `layer_L_expert_e_mp_rank_00_model_states.pt` and the other tensors in
`mp_rank_00_model_states.pt`: both are read as saved (the training dtype: exact for fp32; for
bf16, the bf16 weights rather than ZeRO's fp32 master copy). Under ZeRO-3 (AutoEP only)
DeepSpeed's `ds_to_universal` consolidates the fp32 master tensors. Experts are restacked into
Ava's `[E, ...]` tensors from either layout:
- AutoEP (`layers.L.moe.experts.w1.<e>`): `w1`/`w3` `[I, H]`, `w2` `[H, I]` per expert, into
  `w_gate_up [E, H, 2I]` / `w_down [E, I, H]`;
- Ava's sharded layer (`layers.L.moe.deepspeed_moe.experts.deepspeed_experts.<e>.w1`): Ava's
  own per-expert tensors, stacked as they are.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

from ava.checkpoints import read_manifest
from ava.expert_layout import SHARDED_EXPERT, from_autoep

MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_FILES = "layer_*_expert_*_mp_rank_*_model_states.pt"  # expert parallel, ZeRO-1/2: one per expert
_AUTOEP_KEY = re.compile(r"(.+\.experts\.w[123])\.(\d+)")  # e.g. layers.0.moe.experts.w1.3


def consolidate(save_dir: Path, tag: str, quiet: bool = True) -> dict[str, torch.Tensor]:
    ckpt = Path(save_dir) / tag
    if int(read_manifest(ckpt).get("expert_parallel_size", 1)) > 1 or any(ckpt.glob(EXPERT_FILES)):
        state = expert_parallel_state(ckpt, quiet)
    elif any(ckpt.glob("*optim_states.pt")):
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


def expert_parallel_state(tag_dir: Path, quiet: bool = True) -> dict[str, torch.Tensor]:
    """An expert-parallel checkpoint's weights in Ava's names and layout (see the module docstring)."""
    expert_files = sorted(tag_dir.glob(EXPERT_FILES))
    state = _saved_modules(tag_dir, expert_files) if expert_files else _universal(tag_dir, quiet)
    for name in [n for n in state if n.endswith(".experts.w3")]:  # AutoEP's (Ava's GELU has w1 and w2 only)
        prefix = name.removesuffix(".w3")
        w1, w2, w3 = (state.pop(f"{prefix}.{w}") for w in ("w1", "w2", "w3"))
        state[f"{prefix}.w_gate_up"], state[f"{prefix}.w_down"] = from_autoep(w1, w2, w3)
    return state


def _saved_modules(tag_dir: Path, expert_files: list[Path]) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: the module state plus every expert file, experts stacked `[E, ...]` per tensor."""
    path = tag_dir / MODEL_STATES
    if not path.is_file():
        raise FileNotFoundError(f"{tag_dir} holds expert files but no {MODEL_STATES}")
    state = dict(torch.load(path, map_location="cpu", weights_only=False)["module"])  # DeepSpeed pickle
    per_expert: dict[str, dict[int, torch.Tensor]] = {}
    for file in expert_files:
        for key, tensor in torch.load(file, map_location="cpu", weights_only=False).items():
            autoep, sharded = _AUTOEP_KEY.fullmatch(key), SHARDED_EXPERT.fullmatch(key)
            if autoep is not None:
                name, expert = autoep[1], int(autoep[2])
            elif sharded is not None:
                name, expert = f"{sharded[1]}.experts.{sharded[3]}", int(sharded[2])
            else:
                raise ValueError(f"{file}: unexpected tensor {key!r} (expected '<layer>.experts.w1|w2|w3.<expert>' "
                                 "or '<layer>.deepspeed_moe.experts.deepspeed_experts.<expert>.<tensor>')")
            per_expert.setdefault(name, {})[expert] = tensor
    for name, tensors in per_expert.items():
        num_experts = state[name.split(".experts.")[0] + ".router.gate.weight"].shape[0]
        missing = sorted(set(range(num_experts)) - set(tensors))
        if missing:
            raise FileNotFoundError(f"{tag_dir}: no saved {name} for experts {missing} of {num_experts}")
        state[name] = torch.stack([tensors[e] for e in range(num_experts)])
    return state


def _universal(tag_dir: Path, quiet: bool) -> dict[str, torch.Tensor]:
    """ZeRO-3: DeepSpeed's `ds_to_universal`, one fp32 master tensor per parameter."""
    import argparse
    import tempfile

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    with tempfile.TemporaryDirectory(prefix="ava-export-universal-") as tmp:
        args = argparse.Namespace(input_folder=str(tag_dir), output_folder=tmp, num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=False)
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
            ds_to_universal(args)
        state = {}
        for param_dir in sorted((Path(tmp) / "zero").iterdir()):
            if (param_dir / "fp32.pt").is_file():
                blob = torch.load(param_dir / "fp32.pt", map_location="cpu", weights_only=False)
                state[param_dir.name] = blob["param"] if isinstance(blob, dict) else blob
    # ZeRO-3 universal tensors come out flat; the saved shapes restore them (as DeepSpeed's
    # universal loader does). Experts come out whole ([E, ...]), larger than rank 0's shapes.
    blob = torch.load(next(iter(sorted(tag_dir.glob("*_model_states.pt")))), map_location="cpu", weights_only=False)
    shapes = {name: shape for group in blob.get("param_shapes", []) for name, shape in group.items()}
    for name, shape in shapes.items():
        if name in state and state[name].numel() == torch.Size(shape).numel():
            state[name] = state[name].reshape(shape)
    return state
