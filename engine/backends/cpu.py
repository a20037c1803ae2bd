"""The CPU backend: the C++ kernels of specedit.kernels.cpu. Every linear is packed once (weights stored in the
chosen dtype, activations float32) and all decoder blocks run in one call (DecoderStack), so a decode step
streams the weights once and a verify row equals the 1-row step bit for bit."""

from __future__ import annotations

import torch

from ..cache import KVCache
from ..kernels.cpu.attention import attention
from ..kernels.cpu.linear import PackedLinear
from ..kernels.cpu.stack import DecoderStack, LayerWeights, StackDims


def attend_cpu(q: torch.Tensor, cache: KVCache, layer: int, scale: float) -> torch.Tensor:
    """Same contract as attend_torch, through the row-invariant CPU attention (used when the blocks run one
    torch op at a time; the fused stack calls the same kernel itself)."""
    return attention(q, cache.k(layer), cache.v(layer), list(cache.lengths), scale, window=cache.sliding_window)


class FusedLayers:
    """model.fused_layers of the CPU backend: every block in one DecoderStack call on the cache's buffer."""

    def __init__(self, stack: DecoderStack):
        self.stack = stack

    def __call__(self, x: torch.Tensor, cache: KVCache, starts: list[int], counts: list[int] | None = None,
                 isa: str | None = None) -> torch.Tensor:
        """x [B, T, dim] float32 -> [B, T, dim], or ragged x [M, dim] with counts[b] rows for row b -> [M, dim];
        starts: each row's length before this forward."""
        return self.stack(x, cache.buf, starts, counts, isa)


def stack_dims(cfg) -> StackDims:
    return StackDims(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.norm_eps,
                     cfg.sliding_window)


def pack_model(model, weight_dtype: torch.dtype) -> None:
    """Swap every nn.Linear of `model` for a PackedLinear in `weight_dtype` and fuse its blocks.

    Packed layers are plain attributes, not modules: their bytes are never cast by a `.to()`, and a call skips
    nn.Module dispatch."""
    owners = [(blk.attn, n) for blk in model.layers for n in ("wqkv", "wo")]
    owners += [(blk.mlp, n) for blk in model.layers for n in ("w13", "w2")] + [(model, "lm_head")]
    for owner, name in owners:
        lin = getattr(owner, name)
        delattr(owner, name)
        setattr(owner, name, PackedLinear(lin.weight, lin.bias, weight_dtype))
    layers = [
        LayerWeights(
            blk.attn_norm.weight, None if blk.attn.q_norm is None else blk.attn.q_norm.weight,
            None if blk.attn.k_norm is None else blk.attn.k_norm.weight, blk.mlp_norm.weight,
            blk.attn.wqkv, blk.attn.wo, blk.mlp.w13, blk.mlp.w2,
        )
        for blk in model.layers
    ]
    model.fused_layers = FusedLayers(DecoderStack(layers, model.rope_cos, model.rope_sin, stack_dims(model.cfg)))
