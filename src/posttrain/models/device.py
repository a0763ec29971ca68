"""Where models run: the device, and bf16 autocast where the hardware supports it."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

import torch

log = logging.getLogger("posttrain")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_context(precision: str, device: torch.device) -> AbstractContextManager:
    """bf16 autocast where the hardware supports it; fp32 weights stay the master copy."""
    if precision != "bf16":
        return nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("bf16 not supported on this GPU; running fp32")
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
