"""Every decoder layer of a Llama-family model in one C++ call on the CPU (csrc/decoder.cpp).

At batch 1 a step is bound by the weight bytes the matmuls read, but the ~20 small torch ops per layer around
them (norms, RoPE, cache writes, residuals, SiLU) would cost their dispatch time. This runs every layer with
the packed matmul of linear.py and the row-invariant attention of attention.py, and the elementwise steps as
plain loops one row at a time, so row i of a verify pass still equals the 1-row forward at that position bit
for bit.

    decoder = Decoder(layers, rope_cos, rope_sin, dims)       # once, from packed weights
    h = decoder(x, cache_buf, starts)   # x [B, T, dim] float32 -> [B, T, dim]; new K/V rows written
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import build
from .attention import HEAD_DIM_MULTIPLE, supports_head_dim
from .linear import PackedLinear

MAX_HEAD_DIM = 512


@dataclass(frozen=True)
class DecoderDims:
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    sliding_window: int | None = None


@dataclass(frozen=True)
class LayerWeights:
    """One decoder block: float32 norm weights ([dim], q/k norms [head_dim] or None) and packed linears
    (qkv [(H + 2 H_kv) D, dim] with q, k, v rows in that order; o [dim, H D]; gate_up [2 I, dim] with the
    gate rows first; down [dim, I]), each in its own storage format (parts of a GGUF file may differ)."""

    attn_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    mlp_norm: torch.Tensor
    qkv: PackedLinear
    o: PackedLinear
    gate_up: PackedLinear
    down: PackedLinear


def unsupported_reason(dims: DecoderDims) -> str | None:
    """None when Decoder runs a model of these dims, else why not (a short phrase)."""
    if not supports_head_dim(dims.head_dim) or dims.head_dim > MAX_HEAD_DIM:
        return f"head_dim {dims.head_dim} is not a multiple of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM}"
    return None


class Decoder:
    """Every layer as one C++ object. Holds references to the packed weights, norms and rope tables
    ([max_position, head_dim] float32); nothing is copied."""

    def __init__(self, layers: list[LayerWeights], rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                 dims: DecoderDims):
        why = unsupported_reason(dims)
        if why is not None:
            raise ValueError(f"cpu decoder: cannot run this model: {why}")
        specs = []
        for lw in layers:
            norms = [None if t is None else t.detach() for t in (lw.attn_norm, lw.q_norm, lw.k_norm, lw.mlp_norm)]
            specs.append((norms, [lin.spec() for lin in (lw.qkv, lw.o, lw.gate_up, lw.down)]))
        self.n_layers = len(layers)
        self._decoder = build.load().Decoder(
            specs, rope_cos, rope_sin, dims.dim, dims.n_heads, dims.n_kv_heads, dims.head_dim,
            dims.intermediate_size, dims.norm_eps, dims.head_dim**-0.5, dims.sliding_window or 0,
        )

    def __call__(self, x: torch.Tensor, cache: torch.Tensor, starts: list[int], counts: list[int] | None = None,
                 isa: str | None = None) -> torch.Tensor:
        """x [B, T, dim] float32 (embeddings) -> hidden states [B, T, dim] after the last layer; or, ragged,
        x [M, dim] with counts[b] consecutive rows for sequence b (M = sum of counts) -> [M, dim].

        cache: [L, 2, B, H_kv, S_max, D] float32, contiguous. starts: positions each cache row held before this
        call; sequence b's t-th new K/V row is written at starts[b] + t and attends to keys 0 .. starts[b] + t.
        isa: None/'auto', 'avx2' or 'avx512'.
        """
        if counts is not None:
            if not isinstance(x, torch.Tensor) or x.dim() != 2:
                raise ValueError(f"cpu decoder: ragged x must be an [M, dim] tensor, got {type(x).__name__}")
            if not isinstance(counts, list) or not all(type(c) is int for c in counts):
                raise ValueError(f"cpu decoder: counts must be a list of ints, got {counts!r}")
            return self._decoder.forward(x, cache, starts, counts, build.isa_code(isa))
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"cpu decoder: x must be a [B, T, dim] tensor, got {type(x).__name__}")
        if not isinstance(cache, torch.Tensor):
            raise ValueError(
                f"cpu decoder: cache must be a [L, 2, B, H_kv, S_max, D] tensor, got {type(cache).__name__}"
            )
        if not isinstance(starts, list) or not all(type(s) is int for s in starts):
            raise ValueError(f"cpu decoder: starts must be a list of ints, got {starts!r}")
        B, T, dim = x.shape
        out = self._decoder.forward(x.reshape(B * T, dim), cache, starts, [], build.isa_code(isa))
        return out.view(B, T, dim)
