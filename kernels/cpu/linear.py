"""Small-M CPU matmul with packed weights: y[M, N] = x[M, K] @ W[N, K]^T, for decoding and verify passes.

At batch 1 a decoder's linears are bound by the bytes of weight read. A verify pass of K+1 = 2..65 rows
should cost little more than one row, and row i of it must equal, bit for bit, the 1-row product of that
row (the lossless invariant in DESIGN.md). Stock kernels give neither: MKL/oneDNN pick other kernels and
other rounding for other M, and their bf16/f16 paths get slow for M > 1.

A weight is packed once (float32, float16 or bfloat16 storage) into groups of 32 output columns interleaved
along K, in huge pages; the C++ kernel (csrc/linear_kernel.h) streams the weights once per call whatever M is,
converts them to fp32 in registers and accumulates in fp32. Every output is one fp32 FMA chain over
k = 0..K-1, so a row's bits do not depend on M, on the thread count, or on AVX2 vs AVX-512 (chosen at run
time).

    w = PackedLinear(weight, bias, torch.float16)   # weight [N, K], once at load time
    y = w(x)                                        # x [..., K] float32 -> y [..., N] float32

GGUF's block-quantized formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) run as stored: their bytes are
repacked once (pack_gguf; 32 output columns side by side, csrc/quant.h) and each block is dequantized in
registers to exactly the float32 values `gguf.quants.dequantize` gives, then fed to the same FMA chain, so the
output equals the float32 kernel's on the dequantized weight bit for bit:

    w = PackedLinear.from_parts([("q4_1", raw_q), ("q6_k", raw_v)], k=576)  # raw: GGUF rows [n, bytes]

compute="int8" (from_parts(..., compute="int8")) runs the same blocks with integer dot products instead: each
activation row is quantized on its own to int8 in blocks of 32 (one float32 scale each), the products are
summed exactly in int32 (AVX-512 VNNI vpdpbusd, AVX2 pmaddubsw), and the float steps (the weight and activation
scales, the mins, the sum over blocks) run in one fixed order, so a row's bits still do not depend on M, the
threads or the ISA. `linear_int8_ref` is that arithmetic in numpy, bit for bit. Float parts of such a linear
stay float32 math (the plain kernel).
"""

from __future__ import annotations

import mmap
import threading

import numpy as np
import torch

from . import build

GROUP = 32  # output columns per kernel group; N is padded to a multiple of it
GGUF_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")  # run as stored
COMPUTES = ("exact", "int8")  # how GGUF blocks are multiplied: dequantized to float32, or integer dot products
FLOAT_FORMATS = ("float32", "float16", "bfloat16")
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


def format_code(fmt: str) -> int:
    """The extension's code for a storage format name: a torch float dtype name, 'int8', or a GGUF block
    format (GGUF_FORMATS, lower case). ValueError names the supported ones."""
    table = build.codes()[0]
    if not isinstance(fmt, str) or fmt not in table:
        raise ValueError(f"cpu linear: storage format must be one of {', '.join(table)}, got {fmt!r}")
    return table[fmt]


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


def pack_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """weight [N, K] (any float tensor) -> packed [ceil(N/32), K, 32] in `dtype` (float32, float16 or
    bfloat16), returned as an integer view of the same bytes (so a `.to(dtype)` sweep over a model never
    converts it). Columns past N are 0."""
    dtype_code(dtype)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"cpu linear: weight must be a [N, K] tensor, got {_describe(weight)}")
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
    return out.view({2: torch.int16, 4: torch.int32}[dtype.itemsize])


def gguf_code(fmt: str, compute: str = "exact") -> int:
    """The extension's code for GGUF block format `fmt` (GGUF_FORMATS) multiplied the `compute` way (COMPUTES:
    each has its own packed layout). ValueError names the accepted values."""
    if fmt not in GGUF_FORMATS:
        raise ValueError(f"cpu linear: a GGUF block format must be one of {', '.join(GGUF_FORMATS)}, got {fmt!r}")
    if compute not in COMPUTES:
        raise ValueError(f"cpu linear: compute must be one of {', '.join(map(repr, COMPUTES))}, got {compute!r}")
    return format_code(fmt if compute == "exact" else f"int8:{fmt}")


def pack_gguf(raw: torch.Tensor, fmt: str, k: int, compute: str = "exact") -> torch.Tensor:
    """GGUF blocks of a weight [N, K] -> the kernel's layout (csrc/quant.h), as uint8 bytes in huge pages.

    raw: uint8 [N, K / block * block_bytes] (GGUF rows, e.g. a memory-mapped tensor's data); fmt: one of
    GGUF_FORMATS; compute: 'exact' or 'int8' (the int8 kernel's layout: quants grouped by 4 consecutive k).
    The bytes are only moved (scales and quants are kept as stored), at GGUF's size (Q4_K, Q5_K: +1/8 bit per
    weight)."""
    code = gguf_code(fmt, compute)
    if not isinstance(raw, torch.Tensor) or raw.dim() != 2 or raw.dtype != torch.uint8:
        raise ValueError(f"cpu linear: GGUF blocks must be a uint8 [N, row bytes] tensor, got {_describe(raw)}")
    ext = build.load()
    out = _arena.alloc(ext.packed_nbytes(raw.shape[0], k, code))
    ext.repack(raw.contiguous(), raw.shape[0], k, code, out)
    return out


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] float (K a multiple of 32, finite) -> its GGUF Q8_0 blocks, uint8 [N, K / 32 * 34], from
    gguf's own quantizer (llama.cpp's: per 32 k, d = max|w| / 127 stored as float16, q = round(w / d))."""
    import gguf

    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"cpu linear: weight must be a [N, K] tensor, got {_describe(weight)}")
    n, k = weight.shape
    if k % 32:
        raise ValueError(f"cpu linear: Q8_0 blocks hold 32 input features, but the weight has {k}")
    w = weight.detach().to("cpu", torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("cpu linear: Q8_0 quantization needs finite weights")
    return torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0))


def _describe(x) -> str:
    return f"{x.dtype} {tuple(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__


class PackedLinear:
    """A linear layer y = x @ weight^T (+ bias) with the weight packed once for the CPU kernel.

    weight: [N, K]; bias: [N] or None (kept in float32, added after the product); dtype: storage of the
    weight (float32, float16 or bfloat16); products are accumulated in float32. `from_parts` builds one from
    GGUF blocks (and float parts), e.g. a fused q/k/v whose tensors have different types, multiplied 'exact'
    or 'int8' (`compute`; for a float weight in int8, quantize_q8_0 it first).
    Calling it: x [..., K] float32 on the CPU -> y [..., N] float32. Row i of a call over M rows equals
    bit for bit the call over that row alone, for any M and thread count.
    A plain class, not an nn.Module: calls cost ~1 us of Python, and nothing can cast the packed bytes.
    """

    __slots__ = ("bias", "compute", "in_features", "out_features", "parts", "weight_dtype")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"cpu linear: weight must be a [N, K] tensor, got {_describe(weight)}")
        self.out_features, self.in_features = weight.shape
        self.weight_dtype, self.compute = dtype, "exact"
        code = dtype_code(dtype)
        # parts: (packed bytes, columns, format code), as the extension takes them
        self.parts = [(pack_weight(weight, dtype), self.out_features, code)]
        self._set_bias(bias)

    @classmethod
    def from_parts(cls, parts: list[tuple[str, torch.Tensor]], k: int, bias: torch.Tensor | None = None,
                   compute: str = "exact"):
        """A linear whose output columns are `parts` in order, each (format, data): a GGUF block format
        (GGUF_FORMATS) with data its raw blocks uint8 [n, row bytes] (see pack_gguf), or a float format
        (FLOAT_FORMATS) with data a float tensor [n, k] stored in that format. k: input features.
        compute: how the GGUF parts multiply, 'exact' (float32 on gguf's dequantized values) or 'int8'
        (integer dot products on activation rows quantized to int8, see the module docstring); float parts
        are float32 math either way."""
        if compute not in COMPUTES:
            raise ValueError(f"cpu linear: compute must be one of {', '.join(map(repr, COMPUTES))}, got {compute!r}")
        self = cls.__new__(cls)
        self.in_features, self.out_features, self.compute = k, 0, compute
        self.parts = []
        for fmt, data in parts:
            if fmt in GGUF_FORMATS:
                packed, code = pack_gguf(data, fmt, k, compute), gguf_code(fmt, compute)
            elif fmt in FLOAT_FORMATS:
                if not isinstance(data, torch.Tensor) or tuple(data.shape[1:]) != (k,):
                    raise ValueError(f"cpu linear: a {fmt} part must be a [n, {k}] tensor, got {_describe(data)}")
                packed, code = pack_weight(data, getattr(torch, fmt)), format_code(fmt)
            else:
                raise ValueError(f"cpu linear: part format must be one of {GGUF_FORMATS + FLOAT_FORMATS}, got {fmt!r}")
            self.parts.append((packed, data.shape[0], code))
            self.out_features += data.shape[0]
        fmts = sorted({fmt for fmt, _ in parts})
        self.weight_dtype = fmts[0] if len(fmts) == 1 else "+".join(fmts)
        self._set_bias(bias)
        return self

    def _set_bias(self, bias):
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,)):
            raise ValueError(f"cpu linear: bias must be a [{self.out_features}] tensor, got {_describe(bias)}")
        self.bias = None if bias is None else bias.detach().to("cpu", torch.float32).contiguous()

    @property
    def packed(self) -> torch.Tensor:
        """The packed bytes of a single-part weight."""
        assert len(self.parts) == 1, "a multi-part weight has one packed tensor per part"
        return self.parts[0][0]

    @property
    def code(self) -> int:
        """The format code of a single-part weight."""
        assert len(self.parts) == 1, "a multi-part weight has one format code per part"
        return self.parts[0][2]

    @property
    def weight_bytes(self) -> int:
        """Bytes of weight one call reads (without the padding to 32 columns)."""
        total = 0
        for packed, n, _ in self.parts:
            padded = -(-n // GROUP) * GROUP
            total += packed.numel() * packed.element_size() * n // max(padded, 1)
        return total

    def spec(self) -> tuple[list, torch.Tensor | None]:
        """(parts, bias) as the extension's linear and Decoder take them."""
        return self.parts, self.bias

    def __call__(self, x: torch.Tensor, isa: str | None = None) -> torch.Tensor:
        global _linear_fn
        fn = _linear_fn
        if fn is None:
            fn = _linear_fn = build.load().linear
        if isa is None and type(x) is torch.Tensor and x.dim() == 2:  # the hot path: C++ checks dtype, device, K
            return fn(x, self.parts, self.in_features, self.bias, 0)
        code = build.isa_code(isa)
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"cpu linear: x must be a [..., {self.in_features}] tensor, got {_describe(x)}")
        y = fn(x.reshape(-1, self.in_features), self.parts, self.in_features, self.bias, code)
        return y.view(*x.shape[:-1], self.out_features)

    def __repr__(self) -> str:
        return (
            f"PackedLinear(in_features={self.in_features}, out_features={self.out_features}, "
            f"dtype={self.weight_dtype}, compute={self.compute}, bias={self.bias is not None})"
        )


class GGUFEmbedding(torch.nn.Module):
    """A token embedding kept in a GGUF block format: rows gathered and dequantized on lookup to exactly the
    float32 values gguf's dequantize gives. Its packed bytes can be shared with a tied lm_head
    (PackedLinear.from_parts on the same table: `as_linear`).

    weight: the table's raw blocks uint8 [V, row bytes]; fmt: a GGUF_FORMATS name; dim: the embedding width;
    compute: the layout, 'exact' or 'int8' (what a tied lm_head multiplies with; lookups are exact either way)."""

    def __init__(self, raw: torch.Tensor, fmt: str, dim: int, compute: str = "exact"):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.fmt, self.compute = raw.shape[0], dim, fmt, compute
        self.code = gguf_code(fmt, compute)
        self.packed = pack_gguf(raw, fmt, dim, compute)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [...] int -> [..., dim] float32."""
        rows = build.load().dequant_cols(self.packed, self.num_embeddings, self.embedding_dim, self.code,
                                         tokens.reshape(-1))
        return rows.view(*tokens.shape, self.embedding_dim)

    def as_linear(self) -> PackedLinear:
        """lm_head = this table (tied embeddings), sharing the packed bytes."""
        lin = PackedLinear.__new__(PackedLinear)
        lin.in_features, lin.out_features, lin.weight_dtype, lin.bias = (self.embedding_dim, self.num_embeddings,
                                                                          self.fmt, None)
        lin.compute, lin.parts = self.compute, [(self.packed, self.num_embeddings, self.code)]
        return lin


def stored_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] the kernel multiplies by, in float64: rounded to `dtype`."""
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


# ---- compute="int8": the same arithmetic in numpy, bit for bit ------------------------------------------------

def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fma(a, b, c) with one rounding, elementwise. a * b is exact in float64; the float64 sum s is
    then rounded once more, which differs from one rounding only when s lands exactly on a float32 midpoint
    with a nonzero error, so there s is nudged one float64 step toward the exact sum first."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    t = s - p
    err = (p - (s - t)) + (c64 - t)  # exact: s + err == p + c (Knuth's two-sum)
    mid = (s.view(np.uint64) & np.uint64((1 << 29) - 1)) == np.uint64(1 << 28)
    s = np.where(mid & (err != 0), np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def quantize_rows_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [M, K] float32 (K a multiple of 32) -> (q [M, K] int8, d [M, K / 32] float32): per 32-k block,
    d = max|x| / 127 and q = round-half-even(x * (1 / d)) (0 where d is 0), as the kernels quantize a row."""
    m, k = x.shape
    xb = np.asarray(x, np.float32).reshape(m, k // 32, 32)
    d = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(xb * inv[..., None]), -127, 127).astype(np.int8)
    return q.reshape(m, k), d


def gguf_unpack(raw: np.ndarray, fmt: str, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """GGUF blocks uint8 [N, row bytes] of a weight [N, k] -> (q [N, k] int32: the signed integer each weight
    is a multiple of, s [N, k / sub] float32: its sub-block's scale, o [N, k / sub] float32 or None: the
    sub-block's offset (Q4_1 / Q5_1: + m; Q4_K / Q5_K: - dmin * mn, given as dmin * mn), sub: k per sub-block),
    so that gguf's dequantized weight is s * q (+ m, or - o) with gguf's roundings (tests check that)."""
    import gguf

    n = raw.shape[0]
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt.upper()]]
    b = np.ascontiguousarray(raw).reshape(n, k // block, size)

    def f16(at):
        return b[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float32)

    def nib32(qs):  # element s * 16 + i is nibble s of qs[i]
        return np.concatenate([qs & 15, qs >> 4], -1).astype(np.int32)

    def bits32(at):  # bit e of the u32 at `at`, for e = 0..31
        u = b[..., at : at + 4].copy().view(np.uint32)
        return ((u >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32)

    o = None
    if fmt == "q8_0":
        s, q = f16(0), b[..., 2:].view(np.int8).astype(np.int32)
    elif fmt in ("q4_0", "q4_1"):
        at = 2 if fmt == "q4_0" else 4
        s, q = f16(0), nib32(b[..., at : at + 16]) - (8 if fmt == "q4_0" else 0)
        o = f16(2) if fmt == "q4_1" else None
    elif fmt in ("q5_0", "q5_1"):
        at = 2 if fmt == "q5_0" else 4
        q = nib32(b[..., at + 4 : at + 20]) | (bits32(at) << 4)
        s, q = f16(0), q - (16 if fmt == "q5_0" else 0)
        o = f16(2) if fmt == "q5_1" else None
    elif fmt in ("q4_k", "q5_k"):
        d, dmin, sc6 = f16(0), f16(2), b[..., 4:16].astype(np.int32)
        sc = np.concatenate([sc6[..., 0:4] & 63, (sc6[..., 8:12] & 15) | ((sc6[..., 0:4] >> 2) & 48)], -1)
        mn = np.concatenate([sc6[..., 4:8] & 63, (sc6[..., 8:12] >> 4) | ((sc6[..., 4:8] >> 2) & 48)], -1)
        at = 16 if fmt == "q4_k" else 48
        qs = b[..., at : at + 128].reshape(n, k // 256, 4, 32).astype(np.int32)
        q = np.stack([qs & 15, qs >> 4], 3).reshape(n, k // 256, 256)  # element 64 j + 32 s + i
        if fmt == "q5_k":
            qh = b[..., 16:48].astype(np.int32)  # bit e // 32 of qh[e % 32]
            q = q | (((qh[..., None, :] >> np.arange(8)[:, None]) & 1).reshape(n, k // 256, 256) << 4)
        s = d[..., None] * sc.astype(np.float32)
        o = dmin[..., None] * mn.astype(np.float32)
    elif fmt == "q6_k":
        ql, qh = b[..., 0:128].astype(np.int32), b[..., 128:192].astype(np.int32)
        e = np.arange(256)
        h, r = e // 128, e % 128
        lo = (ql[..., h * 64 + r % 64] >> (4 * (r // 64))) & 15
        hi = (qh[..., h * 32 + r % 32] >> (2 * (r // 32))) & 3
        q = (lo | (hi << 4)) - 32
        s = f16(208)[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)
    else:
        raise ValueError(f"gguf_unpack: unknown format {fmt!r}")
    sub = 16 if fmt == "q6_k" else 32
    return q.reshape(n, k), s.reshape(n, k // sub).astype(np.float32), None if o is None else o.reshape(n, -1), sub


def linear_int8_ref(x: np.ndarray, raw: np.ndarray, fmt: str, bias: np.ndarray | None = None) -> np.ndarray:
    """compute="int8" in numpy: x [M, K] float32, raw the GGUF blocks uint8 [N, row bytes] of a weight [N, K] in
    `fmt` -> y [M, N] float32, bit for bit what the kernels give (see csrc/int8_kernel.h): per sub-block of
    `sub` k in order, acc = fma(s * dx, float(I), acc), then for formats with a min acc = fma(+-o, sx, acc),
    where I is the exact integer dot product of the weight's and the row's quants, dx the row's 32-k block
    scale and sx = dx * float(the block's sum of quants); the bias is added last."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    xq, dx = quantize_rows_ref(x)
    sx = (dx * xq.reshape(m, k // 32, 32).astype(np.int32).sum(-1).astype(np.float32)).astype(np.float32)
    q, s, o, sub = gguf_unpack(raw, fmt, k)
    n = q.shape[0]
    ints = np.einsum("mjk,njk->mnj", xq.reshape(m, k // sub, sub).astype(np.int64),
                     q.reshape(n, k // sub, sub).astype(np.int64))
    acc = np.zeros((m, n), np.float32)
    for j in range(k // sub):
        b32 = j * sub // 32
        t = (s[None, :, j] * dx[:, None, b32]).astype(np.float32)
        acc = _fma32(t, ints[:, :, j].astype(np.float32), acc)
        if o is not None:
            sign = np.float32(1 if fmt in ("q4_1", "q5_1") else -1)
            acc = _fma32(np.broadcast_to(sign * o[None, :, j], (m, n)), np.broadcast_to(sx[:, None, b32], (m, n)), acc)
    if bias is not None:
        acc = (acc + np.asarray(bias, np.float32)).astype(np.float32)
    return acc
