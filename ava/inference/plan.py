"""Memory estimate from the actual tensors, and the device plan (which block lives where).

Units of placement are `embed` (embedding, final norm and the tied LM head, kept together so the
logits matmul never crosses devices) and each `layers.N` block. Activations move between
devices at block boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch

from ava.config import ModelConfig
from ava.inference.errors import InsufficientMemoryError

DeviceMap = Union[str, Mapping[str, str]]


def unit_of(tensor_name: str) -> str:
    if tensor_name.startswith("layers."):
        return ".".join(tensor_name.split(".")[:2])
    return "embed"


def unit_bytes(tensors: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype] = None) -> dict[str, int]:
    """Bytes per placement unit, at `dtype` if a cast is requested, else as stored."""
    sizes: dict[str, int] = {}
    for name, t in tensors.items():
        itemsize = (torch.empty((), dtype=dtype).element_size() if dtype is not None and t.is_floating_point()
                    else t.element_size())
        sizes[unit_of(name)] = sizes.get(unit_of(name), 0) + t.numel() * itemsize
    return sizes


def kv_cache_bytes(cfg: ModelConfig, context_len: int, batch_size: int, dtype: torch.dtype) -> int:
    """Keys and values for every block: 2 x batch x context x kv_heads x head_dim per layer (the
    cache holds the kv heads only: grouped-query attention shrinks it by num_heads/num_kv_heads)."""
    per_token = 2 * cfg.kv_heads * cfg.dim_per_head
    return cfg.num_layers * batch_size * context_len * per_token * torch.empty((), dtype=dtype).element_size()


@dataclass
class DevicePlan:
    placement: dict[str, str]  # unit -> device
    bytes_per_device: dict[str, int]

    def describe(self) -> str:
        parts = [f"{dev}: {n / 2**20:.1f} MiB" for dev, n in self.bytes_per_device.items()]
        return ", ".join(parts)


def _layer_units(cfg: ModelConfig) -> list[str]:
    return [f"layers.{i}" for i in range(cfg.num_layers)]


def make_plan(
    cfg: ModelConfig,
    sizes: Mapping[str, int],
    device_map: DeviceMap,
    *,
    kv_bytes_per_layer: int,
    max_memory: Optional[Mapping[str, int]] = None,
    gpu_layers: Optional[int] = None,
    gpus: tuple[str, ...] = (),
) -> DevicePlan:
    """Place units; check each device's total (weights + its layers' KV cache) against its budget."""
    layers = _layer_units(cfg)
    if gpu_layers is not None:
        if not gpus:
            raise InsufficientMemoryError(f"gpu_layers={gpu_layers} asked for, but no GPU is available here")
        placement = {"embed": gpus[0], **{u: gpus[0] if i < gpu_layers else "cpu" for i, u in enumerate(layers)}}
    elif isinstance(device_map, Mapping):
        unknown = sorted(set(device_map) - {"embed", *layers})
        missing = sorted({"embed", *layers} - set(device_map))
        if unknown or missing:
            raise ValueError(f"device_map: unknown units {unknown}, unplaced units {missing}; "
                             f"units are 'embed' and 'layers.0' .. 'layers.{cfg.num_layers - 1}'")
        placement = dict(device_map)
    elif device_map == "auto":
        placement = _auto(layers, sizes, kv_bytes_per_layer, max_memory or {}, gpus)
    else:
        placement = dict.fromkeys(["embed", *layers], device_map)

    used: dict[str, int] = {}
    for unit, dev in placement.items():
        used[dev] = used.get(dev, 0) + sizes.get(unit, 0) + (kv_bytes_per_layer if unit != "embed" else 0)
    for dev, need in used.items():
        budget = (max_memory or {}).get(dev)
        if budget is not None and need > budget:
            raise InsufficientMemoryError(
                f"the plan needs {need / 2**20:.1f} MiB on {dev} (weights + KV cache) but max_memory allows "
                f"{budget / 2**20:.1f} MiB. Raise max_memory['{dev}'], shorten the context or batch, "
                "quantize with quantize='int8', or place fewer layers there."
            )
    return DevicePlan(placement, used)


def _auto(layers: list[str], sizes: Mapping[str, int], kv: int, max_memory: Mapping[str, int],
          gpus: tuple[str, ...]) -> dict[str, str]:
    """Fill GPUs in order, layer by layer, up to their budget; the rest goes to the CPU."""
    placement: dict[str, str] = {}
    order = ["embed", *layers]
    for gpu in gpus:
        budget = max_memory.get(gpu)
        if budget is None:
            free, _ = torch.cuda.mem_get_info(torch.device(gpu))
            budget = int(free * 0.9)
        while order:
            unit = order[0]
            need = sizes.get(unit, 0) + (kv if unit != "embed" else 0)
            if need > budget:
                break
            budget -= need
            placement[unit] = gpu
            order.pop(0)
    for unit in order:
        placement[unit] = "cpu"
    return placement
