"""What the machine offers: devices, their free memory, and which dtypes each runs natively."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from ava.inference.errors import UnsupportedDtypeError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # "cpu" | "cuda:N"
    free_bytes: int
    dtypes: tuple[torch.dtype, ...]


def cpu_dtypes() -> tuple[torch.dtype, ...]:
    """fp32 and bf16 run on every CPU torch supports (bf16 natively with AVX512-BF16/AMX, else
    emulated but correct); fp16 matmuls on CPU are not offered by every build, so they are excluded."""
    return (torch.float32, torch.bfloat16)


def cuda_dtypes(index: int) -> tuple[torch.dtype, ...]:
    major, _minor = torch.cuda.get_device_capability(index)
    dtypes = [torch.float32, torch.float16]
    if major >= 8:  # Ampere and newer run bf16 natively
        dtypes.append(torch.bfloat16)
    return tuple(dtypes)


def devices() -> list[DeviceInfo]:
    """GPUs first (in index order), then the CPU."""
    found = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, _total = torch.cuda.mem_get_info(i)
            found.append(DeviceInfo(f"cuda:{i}", free, cuda_dtypes(i)))
    found.append(DeviceInfo("cpu", psutil.virtual_memory().available, cpu_dtypes()))
    return found


def device_info(name: str) -> DeviceInfo:
    for info in devices():
        if info.name == name or (name == "cuda" and info.name == "cuda:0"):
            return info
    available = [d.name for d in devices()]
    raise UnsupportedDtypeError(f"device {name!r} is not available here; available devices: {available}")


def check_dtype(dtype: torch.dtype, device: str) -> None:
    info = device_info(device)
    if dtype not in info.dtypes:
        names = [str(d).removeprefix("torch.") for d in info.dtypes]
        raise UnsupportedDtypeError(
            f"weights are {str(dtype).removeprefix('torch.')}, which {device} cannot run (it runs {names}). "
            f"Load with dtype='fp32' (or another of {names}) to cast explicitly, or choose another device."
        )
