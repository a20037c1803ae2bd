"""The Triton backend: verification attention and the fused accept as Triton kernels (specedit.kernels), the
linears through PyTorch. On CUDA it is the default; on a CPU it runs under TRITON_INTERPRET=1, slowly, for
tests. The kernel has no sliding-window mask, so a sliding-window model's context is capped at its window."""

from __future__ import annotations

import torch

from ..cache import KVCache
from ..kernels.verify_attention import verify_attention


def attend_triton(q: torch.Tensor, cache: KVCache, layer: int, scale: float) -> torch.Tensor:
    """Same contract as attend_torch, through the verification-attention kernel; reads the cache's device-side
    lengths (no host ints, no per-layer tensor)."""
    return verify_attention(q, cache.k(layer), cache.v(layer), cache.lengths_dev, scale=scale)
