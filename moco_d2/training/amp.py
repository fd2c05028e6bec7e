"""bf16 autocast shared by pretraining, lincls and the benchmarks."""

import contextlib
import logging

import torch

logger = logging.getLogger("moco_d2")


def bf16_supported(device: torch.device) -> bool:
    """CPUs always run bf16 autocast; CUDA devices only from Ampere on."""
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``enabled`` and the device supports it, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    if not bf16_supported(device):
        logger.warning("--amp: %s has no bf16 support; running in fp32", device)
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
