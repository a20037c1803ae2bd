"""The whole decoder stack in one C++ call on the CPU (engine/csrc/decoder.cpp, in the cpu_linear extension).

At batch 1 a step is bound by the weight bytes the matmuls read, but the ~20 small torch ops per layer
around them (norms, RoPE, cache writes, residuals, SiLU) cost their dispatch time: SmolLM2 float32, 1 row,
11.0 ms per forward with the layers in Python, of which 7.7 ms are matmuls. Fused, plain decode went from
69 to 84 tok/s (float16 weights: 108 to 152) in the same run. This runs every layer of a Transformer whose
linears are packed (Transformer.pack_linears) with the same packed matmul and row-invariant attention, and
the elementwise steps as plain loops, one row at a time, so row i of a verify pass still equals the 1-row
forward at that position bit for bit.

    stack = CpuStack(model)                  # after model.pack_linears(dtype)
    h = stack(x, cache, starts)              # x [B, T, dim] float32 -> [B, T, dim]; K/V rows written
"""

from __future__ import annotations

import torch

from . import cpu_linear
from .cache import KVCache


def supported(model) -> str | None:
    """None when CpuStack can run `model`, else why not (a short phrase)."""
    cfg = model.cfg
    if cfg.head_dim % 16 or cfg.head_dim > 512:
        return f"head_dim {cfg.head_dim} is not a multiple of 16 up to 512"
    if not all(isinstance(getattr(blk.attn, "wqkv", None), cpu_linear.PackedLinear) for blk in model.layers):
        return "linears are not packed"
    if model.rope_cos is None or model.rope_cos.dtype != torch.float32 or model.rope_cos.device.type != "cpu":
        return "rope tables are not float32 on the CPU"
    return None


class CpuStack:
    """Every layer of `model` (packed linears, float32 norms and rope tables on the CPU) as one C++ object.

    Holds references to the model's packed weights, norm weights and rope tables; nothing is copied.
    """

    def __init__(self, model):
        why = supported(model)
        if why is not None:
            raise ValueError(f"cpu_stack: cannot fuse this model: {why}")
        cfg = model.cfg
        layers = []
        for blk in model.layers:
            a, m = blk.attn, blk.mlp
            norms = [blk.attn_norm.weight, None if a.q_norm is None else a.q_norm.weight,
                     None if a.k_norm is None else a.k_norm.weight, blk.mlp_norm.weight]
            layers.append([None if t is None else t.detach() for t in norms]
                          + [t for lin in (a.wqkv, a.wo, m.w13, m.w2) for t in (lin.packed, lin.bias, lin.scale)])
        dtype = cpu_linear._DTYPES[model.layers[0].attn.wqkv.weight_dtype]
        self._stack = cpu_linear._load().Stack(
            layers, model.rope_cos, model.rope_sin, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.norm_eps, cfg.head_dim**-0.5, cfg.sliding_window or 0, dtype,
        )

    def __call__(self, x: torch.Tensor, cache: KVCache, starts: list[int], isa: str | None = None) -> torch.Tensor:
        """x [B, T, dim] float32 (embeddings) -> hidden states [B, T, dim] after the last layer.

        starts: positions each cache row held before this call; the T new K/V rows are written at
        starts[b] + t and row t attends to keys 0 .. starts[b] + t. The caller advances cache.lengths.
        isa: None/'auto', 'avx2' or 'avx512'.
        """
        if isa not in cpu_linear._ISAS:
            raise ValueError(f"cpu_stack: isa must be one of {list(cpu_linear._ISAS)}, got {isa!r}")
        B, T, dim = x.shape
        out = self._stack.forward(x.reshape(B * T, dim), cache.buf, starts, cpu_linear._ISAS[isa])
        return out.view(B, T, dim)
