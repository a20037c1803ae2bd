"""The PyTorch backend: F.linear and SDPA in the model's dtype, the pure-torch accept. Runs anywhere; a verify
row can round differently from the 1-row step (other GEMM and SDPA kernels for other row counts). (Named
pytorch.py: a submodule called torch would shadow the torch package inside specedit.backends.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cache import KVCache


def attend_torch(q: torch.Tensor, cache: KVCache, layer: int, scale: float) -> torch.Tensor:
    """Bottom-right causal attention of q [B, T, H, D] over the cache (which holds the T new rows).

    PyTorch SDPA; with one row per sequence and no mask needed it reads the valid prefix directly.
    """
    B, T, H, D = q.shape
    lengths = cache.lengths
    n = max(lengths)
    k = cache.k(layer)[:, :, :n]  # [B, H_kv, n, D]
    v = cache.v(layer)[:, :, :n]
    window = cache.sliding_window
    mask = None
    if T > 1 or min(lengths) != n or (window is not None and n > window):
        kpos = torch.arange(n, device=q.device)
        qpos = cache.positions  # [B, T] absolute positions
        mask = kpos[None, None, :] <= qpos[:, :, None]  # [B, T, n]
        if window is not None:
            mask &= kpos[None, None, :] > qpos[:, :, None] - window
        mask = mask[:, None]  # [B, 1, T, n]
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=mask, scale=scale, enable_gqa=H != k.shape[1]
    )
    return o.transpose(1, 2)  # [B, T, H, D]
