"""Small-M CPU matmul with packed weights: y[M, N] = x[M, K] @ W[N, K]^T, for decoding and verify passes.

At batch 1 a decoder's linears are bound by the bytes of weight read. A verify pass of K+1 = 2..65 rows
should cost little more than one row, and row i of it must equal, bit for bit, the 1-row product of that
row (the lossless invariant in DESIGN.md). Stock kernels give neither: MKL/oneDNN pick other kernels and
other rounding for other M, and their bf16/f16 paths get slow for M > 1.

A weight is packed once (float32, float16 or bfloat16 storage, or int8 with one float32 scale per output
column) into groups of 32 output columns interleaved along K, in huge pages; the C++ kernel (csrc/
linear_kernel.h) streams the weights once per call whatever M is, converts them to fp32 in registers and
accumulates in fp32. Every output is one fp32 FMA chain over k = 0..K-1 (times the column's scale for int8),
so a row's bits do not depend on M, on the thread count, or on AVX2 vs AVX-512 (chosen at run time).

    w = PackedLinear(weight, bias, torch.float16)   # weight [N, K], once at load time
    y = w(x)                                        # x [..., K] float32 -> y [..., N] float32
"""

from __future__ import annotations

import mmap
import threading

import torch

from . import build

GROUP = 32  # output columns per kernel group; N is padded to a multiple of it
_HUGE_PAGE = 2 << 20
_CHUNK = 64 << 20
_linear_fn = None  # the extension's linear once loaded: the per-call fast path skips build.load()


def dtype_code(dtype: torch.dtype) -> int:
    """The extension's code for a weight storage dtype; ValueError names the supported ones."""
    table = build.codes()[0]
    name = str(dtype).removeprefix("torch.")
    if not isinstance(dtype, torch.dtype) or name not in table:
        raise ValueError(f"cpu linear: weight dtype must be one of {', '.join(table)}, got {dtype}")
    return table[name]


def map_huge(nbytes: int) -> torch.Tensor:
    """A fresh anonymous mapping of >= nbytes as a uint8 tensor, 2 MB-aligned and advised as huge pages."""
    size = -(-max(nbytes, 1) // _HUGE_PAGE) * _HUGE_PAGE
    mm = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)  # before the first touch; only a hint (THP "never": 4 KB pages)
    except (AttributeError, OSError):
        pass
    buf = torch.frombuffer(mm, dtype=torch.uint8)  # the tensor keeps the mapping alive
    start = (-buf.data_ptr()) % _HUGE_PAGE
    return buf[start : start + size]


class _Arena:
    """Where packed weights live: 64 MB chunks of huge pages, small weights side by side. A forward reads
    every weight once; with 4 KB pages the TLB misses of that walk cost ~10% of the f16 bandwidth here.
    Memory is not reused: weights are packed once per model."""

    def __init__(self):
        self.chunk = None
        self.used = 0
        self.lock = threading.Lock()

    def alloc(self, nbytes: int) -> torch.Tensor:
        if nbytes > _CHUNK // 4:
            return map_huge(nbytes)[:nbytes]
        with self.lock:
            if self.chunk is None or self.used + nbytes > self.chunk.numel():
                self.chunk, self.used = map_huge(_CHUNK), 0
            out = self.chunk[self.used : self.used + nbytes]
            self.used += -(-nbytes // 64) * 64
            return out


_arena = _Arena()


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (q [N, K] int8, scale [N] float32), symmetric per output row:
    scale = max|w| / 127, q = round(w / scale), so weight ~ scale[:, None] * q (an all-zero row gets scale 0)."""
    w = weight.detach().to("cpu", torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("cpu linear: int8 quantization needs finite weights")
    scale = w.abs().amax(dim=1) / 127 if w.shape[1] else torch.zeros(w.shape[0])
    q = torch.round(w / torch.where(scale > 0, scale, 1)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.contiguous()


def pack_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """weight [N, K] -> packed [ceil(N/32), K, 32] in `dtype`, returned as an integer view of the same bytes
    (so a `.to(dtype)` sweep over a model never converts it). Columns past N are 0. For float dtypes the
    weight is any float tensor; for int8 it is the q of quantize_int8() (the scale is kept beside it)."""
    dtype_code(dtype)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"cpu linear: weight must be a [N, K] tensor, got {_describe(weight)}")
    if (dtype == torch.int8) != (weight.dtype == torch.int8):
        raise ValueError(f"cpu linear: int8 packing takes quantize_int8()'s weight, got {weight.dtype} for {dtype}")
    n, k = weight.shape
    if dtype == torch.float16 and weight.numel():
        big = weight.detach().abs().max().item()
        if big > 65504.0 and big != float("inf"):
            raise ValueError(f"cpu linear: a weight of magnitude {big:g} overflows float16 (max 65504); use bfloat16")
    npad = -(-n // GROUP) * GROUP
    w = torch.zeros(npad, k, dtype=dtype)
    w[:n] = weight.detach().to("cpu", dtype)
    w = w.view(npad // GROUP, GROUP, k).transpose(1, 2)  # [groups, K, 32]
    out = _arena.alloc(w.numel() * w.element_size()).view(dtype).view(w.shape)
    out.copy_(w)
    return out.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[dtype.itemsize])


def _describe(x) -> str:
    return f"{x.dtype} {tuple(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__


class PackedLinear:
    """A linear layer y = x @ weight^T (+ bias) with the weight packed once for the CPU kernel.

    weight: [N, K]; bias: [N] or None (kept in float32, added after the product); dtype: storage of the
    weight (float32, float16 or bfloat16, or int8: quantize_int8's q and a float32 scale per output column,
    applied to the finished sum); products are accumulated in float32.
    Calling it: x [..., K] float32 on the CPU -> y [..., N] float32. Row i of a call over M rows equals
    bit for bit the call over that row alone, for any M and thread count.
    A plain class, not an nn.Module: calls cost ~1 us of Python, and nothing can cast the packed bytes.
    """

    __slots__ = ("bias", "code", "in_features", "out_features", "packed", "scale", "weight_dtype")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"cpu linear: weight must be a [N, K] tensor, got {_describe(weight)}")
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = dtype
        self.code = dtype_code(dtype)
        self.scale = None  # [N] float32 for int8 weights
        if dtype == torch.int8:
            weight, self.scale = quantize_int8(weight)
        self.packed = pack_weight(weight, dtype)
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,)):
            raise ValueError(f"cpu linear: bias must be a [{self.out_features}] tensor, got {_describe(bias)}")
        self.bias = None if bias is None else bias.detach().to("cpu", torch.float32).contiguous()

    @property
    def weight_bytes(self) -> int:
        """Bytes of weight one call reads (without the padding to 32 columns), int8 scales included."""
        scales = 0 if self.scale is None else self.scale.numel() * 4
        return self.out_features * self.in_features * self.packed.element_size() + scales

    def __call__(self, x: torch.Tensor, isa: str | None = None) -> torch.Tensor:
        global _linear_fn
        fn = _linear_fn
        if fn is None:
            fn = _linear_fn = build.load().linear
        if isa is None and type(x) is torch.Tensor and x.dim() == 2:  # the hot path: C++ checks dtype, device, K
            return fn(x, self.packed, self.out_features, self.in_features, self.code, self.bias, self.scale, 0)
        code = build.isa_code(isa)
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"cpu linear: x must be a [..., {self.in_features}] tensor, got {_describe(x)}")
        y = fn(x.reshape(-1, self.in_features), self.packed, self.out_features, self.in_features, self.code,
               self.bias, self.scale, code)
        return y.view(*x.shape[:-1], self.out_features)

    def __repr__(self) -> str:
        return (
            f"PackedLinear(in_features={self.in_features}, out_features={self.out_features}, "
            f"dtype={self.weight_dtype}, bias={self.bias is not None})"
        )


def stored_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] the kernel multiplies by, in float64: rounded to `dtype`, or for int8 the
    dequantized scale[:, None] * q of quantize_int8."""
    if dtype == torch.int8:
        q, scale = quantize_int8(weight)
        return q.double() * scale.double()[:, None]
    return weight.detach().to(dtype).double()


def linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch reference with the same semantics: the weight as stored in `dtype` (stored_weight), then
    x @ W^T (+ bias) in float64, returned as float32. Not bitwise equal to the kernel (another summation order)."""
    y = x.double() @ stored_weight(weight, dtype).T
    if bias is not None:
        y = y + bias.double()
    return y.float()
