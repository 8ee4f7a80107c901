"""The DeepSpeed internals Ava depends on, checked once at start.

Ava skips unhealthy steps through private ZeRO optimizer methods (`ava.train.step_guard`), builds
its expert-parallel layer on AutoEP's all-to-all and DeepSpeed's expert-group helpers
(`ava.train.sharded_moe`), and releases the shared-memory segments of DeepSpeed's CPU
all-reduce by name (`ava.train.distributed`). None of these is public API, so they are pinned to
the versions the suite ran with (`pyproject.toml` states the same range) and looked up here,
before any process group exists: outside the range, or with a piece missing, the run stops with
the version, the range and the missing names instead of an AttributeError mid-step.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import List

from packaging.version import Version

from ava.config import ConfigError

TESTED_RANGE = (Version("0.19.8"), Version("0.20"))  # [low, high), as in pyproject.toml

# module -> attributes (a dotted name: an attribute of a class in that module)
REQUIRED = {
    "deepspeed.runtime.zero.stage_1_and_2": ["DeepSpeedZeroOptimizer._update_scale",
                                             "DeepSpeedZeroOptimizer.scaled_global_norm"],
    "deepspeed.runtime.zero.stage3": ["DeepSpeedZeroOptimizer_Stage3._update_scale",
                                      "DeepSpeedZeroOptimizer_Stage3._get_norm_groups"],
    "deepspeed.runtime.utils": ["combine_grad_norm_groups"],
    "deepspeed.module_inject.auto_ep_layer": ["_AllToAllV", "compute_split_plan_from_expert_indices",
                                              "AutoEPMoELayer"],
    "deepspeed.utils.groups": ["_get_expert_parallel_group_dict", "_create_expert_and_data_parallel",
                               "_get_expert_parallel_rank", "_get_expert_parallel_group"],
}
SHM_SOURCE = "ops/csrc/cpu/comm/shm.cpp"  # defines the segment name distributed.py releases


def missing_internals() -> List[str]:
    """The names in `REQUIRED` (and the shared-memory segment name) this DeepSpeed lacks."""
    from ava.train.distributed import SHM_SEGMENT_PREFIX

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
    import deepspeed

    shm = Path(deepspeed.__file__).parent / SHM_SOURCE
    if shm.is_file() and f'"{SHM_SEGMENT_PREFIX}"' not in shm.read_text():
        missing.append(f"{SHM_SOURCE}: segment name {SHM_SEGMENT_PREFIX!r}")
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
