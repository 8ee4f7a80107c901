"""The DeepSpeed internals Ava depends on, checked once at start.

Ava skips unhealthy steps through private ZeRO optimizer methods (`ava.train.step_guard`), builds
its expert-parallel layer on AutoEP's all-to-all and DeepSpeed's expert-group helpers
(`ava.train.sharded_moe`), keeps DeepSpeed from compiling its CPU shared-memory all-reduce
(`skip_shm_all_reduce`), switches DeepSpeed's universal-checkpoint loading on for one load
through the engine's config, mending what its ZeRO-3 loader gets wrong (`universal_loading`, for
`ava.train.elastic`), and builds ZeRO-3 models through a `zero.Init` whose per-module hook it
extends (`ava.train.partitioned`). None of these is public API, so they are pinned to the versions
the suite ran with (`pyproject.toml` states the same range) and looked up here, before any process
group exists: outside the range, or with a piece missing, the run stops with the version, the
range and the missing names instead of an AttributeError mid-step.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List

from packaging.version import Version

from ava.config import ConfigError

TESTED_RANGE = (Version("0.19.8"), Version("0.20"))  # [low, high), as in pyproject.toml

# module -> attributes (a dotted name: an attribute of a class in that module)
REQUIRED = {
    "deepspeed.runtime.zero.stage_1_and_2": ["DeepSpeedZeroOptimizer._update_scale",
                                             "DeepSpeedZeroOptimizer.scaled_global_norm"],
    "deepspeed.runtime.zero.stage3": ["DeepSpeedZeroOptimizer_Stage3._update_scale",
                                      "DeepSpeedZeroOptimizer_Stage3._get_norm_groups",
                                      "DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3"],
    "deepspeed.runtime.utils": ["combine_grad_norm_groups"],
    "deepspeed.runtime.zero.partition_parameters": ["Init._post_init_method", "DEFAULT_TENSOR_OVERRIDES",
                                                    "is_zero_param"],
    "deepspeed.module_inject.auto_ep_layer": ["_AllToAllV", "compute_split_plan_from_expert_indices",
                                              "AutoEPMoELayer"],
    "deepspeed.utils.groups": ["_get_expert_parallel_group_dict", "_create_expert_and_data_parallel",
                               "_get_expert_parallel_rank", "_get_expert_parallel_group"],
    "deepspeed.ops": ["__compatible_ops__"],
    "deepspeed.ops.op_builder.cpu": ["ShareMemCommBuilder.NAME"],
}


def missing_internals() -> List[str]:
    """The names in `REQUIRED` this DeepSpeed lacks."""
    missing = []
    for module_name, names in REQUIRED.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        for dotted in names:
            obj: object = module
            for part in dotted.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    missing.append(f"{module_name}.{dotted}")
                    break
    return missing


def check_deepspeed(version: str | None = None) -> None:
    """Raise `ConfigError` when the installed DeepSpeed (or `version`) is outside the tested
    range or lacks an internal Ava uses."""
    import deepspeed

    found = Version(version or deepspeed.__version__)
    low, high = TESTED_RANGE
    wanted = f"deepspeed>={low},<{high}"
    if not low <= found < high:
        raise ConfigError(f"DeepSpeed {found} is installed; Ava is tested with {wanted} (it uses "
                          f"DeepSpeed internals that change between releases): "
                          f"pip install '{wanted}'")
    missing = missing_internals()
    if missing:
        raise ConfigError(f"DeepSpeed {found} lacks internals Ava uses: {', '.join(missing)}; "
                          f"install a release Ava is tested with: pip install '{wanted}'")


def skip_shm_all_reduce() -> None:
    """Call before `deepspeed.init_distributed`: its CPU backend would otherwise JIT-compile the
    shared-memory all-reduce kernel (`ShareMemCommBuilder`) that only DeepSpeed's tensor-parallel
    inference calls (`inference_all_reduce`, which falls back to the process group without it).
    Ava never calls it, and the build cost the main job 25 s on its first run and two compiler
    processes of 1.5 GB each, and every multi-rank run a 69 MB /dev/shm segment per rank."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


@contextmanager
def universal_loading(engine: Any, universal_tag: Path) -> Iterator[None]:
    """Loads inside this block read `universal_tag`, a DeepSpeed universal checkpoint.

    DeepSpeed reads `checkpoint.load_universal` from its config at load time; it is on for this
    one load only, so a later rollback in the same run loads Ava's own tags as saved. Its ZeRO-3
    loader (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`, 0.19.8) gets two things wrong
    that stages 1 and 2 get right, and this mends both: it gives every param group the
    hyperparameters of the saved group 0 (Ava's no-decay group would decay), and it gives every
    sub-group's Adam state one shared `step` tensor, which torch's Adam increments in place once
    per sub-group and optimizer step (the second group's bias correction would run a step ahead,
    then two, ...).
    """
    config = engine._config  # DeepSpeedConfig: the documented switch, set for this load alone
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    groups = engine.optimizer.optimizer.param_groups  # the torch optimizer's, inside ZeRO's
    names = [group.get("name") for group in groups]  # read now: the ZeRO-3 load overwrites them too
    try:
        yield
    finally:
        config.load_universal_checkpoint = before
    if engine.zero_optimization_stage() == 3:
        _restore_group_hyperparameters(groups, names, universal_tag)
        _unshare_steps(engine.optimizer.optimizer.state)


def _restore_group_hyperparameters(groups: List[dict], names: List[Any], universal_tag: Path) -> None:
    import torch
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS

    path = universal_tag / "zero" / "optimizer_state.pt"
    saved = torch.load(path, map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT][PARAM_GROUPS]
    saved_names = [group.get("name") for group in saved]
    if names != saved_names:
        raise ConfigError(f"{path}: the checkpoint's optimizer param groups {saved_names} are not this run's "
                          f"{names}; resume with the optimizer settings it was saved with")
    for group, saved_group in zip(groups, saved, strict=True):
        group.update({key: value for key, value in saved_group.items() if key != "params"})


def _unshare_steps(state: Any) -> None:
    import torch

    for param_state in state.values():
        if torch.is_tensor(param_state.get("step")):
            param_state["step"] = param_state["step"].clone()
