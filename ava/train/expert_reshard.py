"""The experts' part of an elastic resume onto another expert-parallel split.

DeepSpeed reshards what ZeRO partitions: `ds_to_universal` extracts and merges every rank's flat
fp32 and Adam fragments into whole tensors, and its universal loader cuts them for the new ranks,
AutoEP's experts included (0.19.8 records their placement and slices them by EP rank on load).
Ava never touches the flat buffers. What DeepSpeed cannot do is done here, on rank 0, on whole
per-parameter tensors of the universal checkpoint only:

1. `globally_named`: Ava's sharded layer is a native DeepSpeed MoE layer, whose experts are named
   by local slot (`deepspeed_experts.<j>`), so every EP rank's ZeRO fragments of *different*
   experts carry the same names and the converter merges them into one tensor (it fails with a
   shape error: native MoE is not supported by universal checkpoints, DeepSpeed issue #5716).
   The converter reads a view of the tag in which each rank's fragment index
   (`param_slice_mappings`) and the saved shapes name experts by global index, the renaming
   DeepSpeed's own per-expert model files already apply; the fragments themselves are untouched
   (the view's other files are links).
2. `canonicalize`: whatever the source split, the universal checkpoint's experts become Ava's own
   stacked `[E, ...]` tensors (ava.expert_layout), which is what an ep=1 engine loads as it is.
3. `write_target_view`: an ep>1 engine looks up its own parameter names: AutoEP's `w1/w2/w3`
   (whole, with the expert metadata DeepSpeed's loader slices by EP rank), or for the sharded
   layer one tensor per local slot j stacking the expert that slot holds on each EP rank
   (`[ep, ...]`, row r = expert r·E/ep + j, marked as an expert tensor of `ep` rows so that
   DeepSpeed's loader gives EP rank r its row r). And its optimizer has more param groups than a
   checkpoint without expert parallelism (DeepSpeed moves expert parameters into groups of their
   own, after the dense ones): the loader pairs the engine's groups with the saved ones by
   position (`zip`) and silently skips every parameter of a group without a saved partner, so
   the experts would keep their initial weights. The saved group list is extended with the
   engine's own settings for those groups (their values come from the same configuration).

Each state (fp32 master, exp_avg, exp_avg_sq) is elementwise in the parameter's shape, so the same
stack, split and transpose applies to all three, and `step` is copied. After the load,
`check_placement` compares every rank's expert tensors (DeepSpeed's `safe_get_full_*`) with the
rows of the experts it should hold, so a wrong slice fails the resume instead of training on.
Expert-parallel resharding is done under ZeRO-1 and -2 (`ava.train.elastic` refuses ZeRO-3).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ava import dist
from ava.config import ConfigError
from ava.expert_layout import (
    AUTOEP_TENSORS,
    AVA_EXPERT,
    SHARDED_EXPERT,
    ava_name,
    from_autoep,
    sharded_name,
    to_autoep,
)

log = logging.getLogger("ava.train")

STATES = ("fp32", "exp_avg", "exp_avg_sq")  # elementwise per parameter; `step` is copied
STEP = "step"
OPTIMIZER_STATE = "optimizer_state.pt"  # the universal checkpoint's param groups and ZeRO settings
MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO-1/2: rank 0's model states (shapes, ds_config)
OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")


# --- reading and writing DeepSpeed's universal per-parameter folders ---

def _load(path: Path, mmap: bool = False) -> Any:
    # DeepSpeed's own pickles, written by ds_to_universal from the run's checkpoint (trusted as resume trusts it)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def read_state(folder: Path, state: str, mmap: bool = False) -> torch.Tensor:
    blob = _load(folder / f"{state}.pt", mmap)
    return blob["param"] if isinstance(blob, dict) else blob


def _write(folder: Path, state: str, tensor: torch.Tensor, experts: Optional[int] = None) -> None:
    from deepspeed.checkpoint.constants import CAT_DIM, EP_IS_EXPERT_PARAM, EP_NUM_EXPERTS, PARAM

    blob: Dict[str, Any] = {PARAM: tensor.contiguous(), CAT_DIM: 0}
    if experts is not None:  # DeepSpeed's loader takes rows [r·n/ep, (r+1)·n/ep) for EP rank r
        blob.update({EP_IS_EXPERT_PARAM: True, EP_NUM_EXPERTS: experts})
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(blob, folder / f"{state}.pt")


def _copy_step(source: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / f"{STEP}.pt", folder / f"{STEP}.pt")


# --- 1. the sharded layer's experts by global index, for ds_to_universal ---

def _global(name: str, ep_rank: int, local: int) -> str:
    match = SHARDED_EXPERT.fullmatch(name)
    if match is None:
        return name
    return sharded_name(match[1], ep_rank * local + int(match[2]), match[3])


def names_sharded_experts(tag_dir: Path) -> bool:
    """Whether `tag_dir` holds the sharded layer's per-expert files (its experts need `globally_named`)."""
    files = sorted(tag_dir.glob("layer_*_expert_*_model_states.pt"))
    return bool(files) and any(SHARDED_EXPERT.fullmatch(key) for key in _load(files[0]))


def globally_named(tag_dir: Path, out: Path, *, world: int, ep: int, num_experts: int) -> Path:
    """A view of `tag_dir` in `out` whose optimizer files and saved shapes name the sharded layer's
    experts by global index (see the module docstring); returns `out`."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_SHAPES, PARAM_SLICE_MAPPINGS

    from ava.train.sharded_moe import expert_parallel_rank

    local = num_experts // ep
    model_states = _load(tag_dir / MODEL_STATES)
    data_before_expert = bool((model_states.get("ds_config") or {}).get("use_data_before_expert_parallelism", False))
    out.mkdir(parents=True)
    for path in sorted(tag_dir.iterdir()):
        match = OPTIM_FILE.fullmatch(path.name)
        if match is not None:  # rank r's fragments: its local slots are its EP rank's experts
            ep_rank = expert_parallel_rank(int(match[1]), world, ep, data_before_expert)
            state = _load(path)
            mappings = state[OPTIMIZER_STATE_DICT][PARAM_SLICE_MAPPINGS]
            state[OPTIMIZER_STATE_DICT][PARAM_SLICE_MAPPINGS] = [
                OrderedDict((_global(name, ep_rank, local), where) for name, where in group.items())
                for group in mappings]
            torch.save(state, out / path.name)
        elif path.name == MODEL_STATES:  # rank 0's shapes: every EP rank's experts have the same ones
            model_states[PARAM_SHAPES] = [
                OrderedDict((_global(name, r, local), shape) for name, shape in group.items()
                            for r in (range(ep) if SHARDED_EXPERT.fullmatch(name) else (0,)))
                for group in model_states[PARAM_SHAPES]]
            torch.save(model_states, out / path.name)
        else:
            (out / path.name).symlink_to(path.resolve())
    return out


# --- 2. Ava's own layout ---

def canonicalize(zero_dir: Path, num_experts: int) -> None:
    """Rewrite the experts of a universal checkpoint's `zero/` folder in Ava's `[E, ...]` layout."""
    per_expert: Dict[Tuple[str, str], Dict[int, Path]] = {}
    for folder in zero_dir.iterdir():
        match = SHARDED_EXPERT.fullmatch(folder.name)
        if match is not None:
            per_expert.setdefault((match[1], match[3]), {})[int(match[2])] = folder
    for (layer, tensor), folders in sorted(per_expert.items()):
        missing = sorted(set(range(num_experts)) - set(folders))
        if missing:
            raise ConfigError(f"{zero_dir}: the converted checkpoint has no {tensor} of experts {missing} "
                              f"in {layer} (model.num_experts={num_experts})")
        target = zero_dir / ava_name(layer, tensor)
        for state in STATES:
            _write(target, state, torch.stack([read_state(folders[e], state) for e in range(num_experts)]))
        _copy_step(folders[0], target)
        for folder in folders.values():
            shutil.rmtree(folder)
    for up in sorted(zero_dir.glob("*.experts.w3")):  # AutoEP's (Ava's GELU experts have no w3)
        layer = up.name.removesuffix(".experts.w3")
        sources = [zero_dir / ava_name(layer, t) for t in AUTOEP_TENSORS]
        targets = [zero_dir / ava_name(layer, t) for t in ("w_gate_up", "w_down")]
        for state in STATES:
            for target, tensor in zip(targets, from_autoep(*(read_state(s, state) for s in sources)), strict=True):
                _write(target, state, tensor)
        for target in targets:
            _copy_step(up, target)
        for source in sources:
            shutil.rmtree(source)


def _ava_experts(zero_dir: Path) -> Dict[str, List[str]]:
    """MoE layer -> its expert tensors in Ava's layout."""
    layers: Dict[str, List[str]] = {}
    for folder in sorted(zero_dir.iterdir()):
        match = AVA_EXPERT.fullmatch(folder.name)
        if match is not None and (folder / "fp32.pt").is_file():
            layers.setdefault(match[1], []).append(match[2])
    return layers


# --- 3. the names an expert-parallel engine loads ---

def write_target_view(zero_dir: Path, impl: Optional[str], ep: int, num_experts: int,
                      param_groups: List[Dict[str, Any]]) -> None:
    """The expert folders an engine with `impl` ("autoep", "sharded") at `ep` > 1 looks up, and a
    saved param group for each of the engine's `param_groups` (their settings, without params)."""
    for stale in zero_dir.glob("*.deepspeed_moe.experts.deepspeed_experts.*"):  # another split's view
        shutil.rmtree(stale)
    _cover_param_groups(zero_dir / OPTIMIZER_STATE, param_groups)
    if impl is None or ep == 1:
        return
    local = num_experts // ep
    for layer, tensors in _ava_experts(zero_dir).items():
        if impl == "autoep":
            gate_up, down = zero_dir / ava_name(layer, "w_gate_up"), zero_dir / ava_name(layer, "w_down")
            for state in STATES:
                for tensor, name in zip(to_autoep(read_state(gate_up, state), read_state(down, state)),
                                        AUTOEP_TENSORS, strict=True):
                    _write(zero_dir / ava_name(layer, name), state, tensor, experts=num_experts)
            for name in AUTOEP_TENSORS:
                _copy_step(gate_up, zero_dir / ava_name(layer, name))
            continue
        for tensor in tensors:
            source = zero_dir / ava_name(layer, tensor)
            stacked = {state: read_state(source, state) for state in STATES}
            for slot in range(local):
                rows = torch.arange(ep) * local + slot  # the expert slot `slot` holds on each EP rank
                target = zero_dir / sharded_name(layer, slot, tensor)
                for state, value in stacked.items():
                    _write(target, state, value[rows], experts=ep)
                _copy_step(source, target)


def _cover_param_groups(path: Path, param_groups: List[Dict[str, Any]]) -> None:
    from deepspeed.checkpoint.constants import PARAM_GROUPS

    state = _load(path)
    saved = state[PARAM_GROUPS]
    if len(saved) < len(param_groups):
        state[PARAM_GROUPS] = [*saved, *({**group, "params": []} for group in param_groups[len(saved):])]
        torch.save(state, path)


# --- after the load: every rank holds its experts, as saved ---

def _expected(name: str, zero_dir: Path, ep_rank: int, local: int) -> Dict[str, torch.Tensor]:
    """What parameter `name` of this rank must hold after the load, per state, from Ava's layout."""
    rows = slice(ep_rank * local, (ep_rank + 1) * local)
    sharded = SHARDED_EXPERT.fullmatch(name)
    if sharded is not None:
        source = zero_dir / ava_name(sharded[1], sharded[3])
        expert = ep_rank * local + int(sharded[2])
        return {state: read_state(source, state, mmap=True)[expert] for state in STATES}
    layer, tensor = AVA_EXPERT.fullmatch(name).groups()  # type: ignore[union-attr]
    if tensor in AUTOEP_TENSORS and (zero_dir / ava_name(layer, "w_gate_up") / "fp32.pt").is_file():
        gate_up, down = zero_dir / ava_name(layer, "w_gate_up"), zero_dir / ava_name(layer, "w_down")
        expected = {}
        for state in STATES:
            w1_w2_w3 = to_autoep(read_state(gate_up, state, mmap=True)[rows], read_state(down, state, mmap=True)[rows])
            expected[state] = w1_w2_w3[AUTOEP_TENSORS.index(tensor)]
        return expected
    return {state: read_state(zero_dir / name, state, mmap=True)[rows] for state in STATES}


def check_placement(module: Any, zero_dir: Path, num_experts: int) -> str:
    """Compare every expert tensor this rank holds after the load with the checkpoint's rows for its
    experts (fp32 master and Adam moments); raise `ConfigError` naming the first difference, else
    return (rank 0) one line saying which experts each rank holds. Every rank must call it: DeepSpeed
    gathers each parameter's partitions over its data-parallel group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    layers = [m for _, m in module.named_modules() if hasattr(m, "num_local_experts") and hasattr(m, "ep_rank")]
    ep_rank, local = (layers[0].ep_rank, layers[0].num_local_experts) if layers else (0, num_experts)
    problems: List[str] = []
    checked = 0
    for name, param in module.named_parameters():
        if SHARDED_EXPERT.fullmatch(name) is None and AVA_EXPERT.fullmatch(name) is None:
            continue
        held = {"fp32": safe_get_full_fp32_param(param),
                **{s: safe_get_full_optimizer_state(param, s) for s in ("exp_avg", "exp_avg_sq")}}
        for state, expected in _expected(name, zero_dir, ep_rank, local).items():
            value = held[state]
            if value is None or not torch.equal(value.float().reshape(expected.shape), expected):
                problems.append(f"{name} ({state})")
        checked += 1
    first = ep_rank * local
    mine = (first, first + local, checked, problems[:3])
    everyone = dist.all_gather_object(mine) if dist.world_size() > 1 else [mine]
    wrong = [f"rank {r}: {', '.join(p)}" for r, (_, _, _, p) in enumerate(everyone) if p]
    if wrong:
        raise ConfigError(f"elastic resume: after the load these expert tensors differ from the checkpoint's: "
                          f"{'; '.join(wrong)}")
    held_by = ", ".join(f"rank {r} experts [{a}, {b})" for r, (a, b, _, _) in enumerate(everyone))
    return (f"elastic resume: {held_by} of {num_experts} in each of {len(_ava_experts(zero_dir))} MoE layers; "
            f"their fp32 weights and Adam moments equal the checkpoint's ({everyone[0][2]} tensors on rank 0)")
