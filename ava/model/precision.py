"""What `torch.autocast` means for Ava's hand-written autograd nodes, which it does not see into."""

from __future__ import annotations

from typing import Optional

import torch


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype `torch.autocast` computes matmuls in on this device type, None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
