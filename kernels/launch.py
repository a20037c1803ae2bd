"""What the Triton launchers share: the device's streaming-multiprocessor count, which sizes their grids."""

from __future__ import annotations

import functools

import torch

DEFAULT_SMS = 132  # H100 SXM; used when no CUDA device is queried (interpreter runs)


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (DEFAULT_SMS elsewhere, so interpreter runs plan the same
    grids as an H100)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS
