"""Small-M CPU matmul with packed weights: y[M, N] = x[M, K] @ W[N, K]^T, for decoding and verify passes.

At batch 1 a decoder's linears are bound by the bytes of weight read. A verify pass of K+1 = 2..65 rows
should cost little more than one row, and row i of it must equal, bit for bit, the 1-row product of that
row (the lossless invariant in DESIGN.md). Stock kernels give neither: MKL/oneDNN pick other kernels and
other rounding for other M, and their bf16/f16 paths get slow for M > 1.

This module packs a weight once (float32, float16 or bfloat16 storage, or int8 with one float32 scale per
output column) into groups of 32 output columns interleaved along K, in huge pages, and runs a C++ kernel
(engine/csrc, compiled on first use with torch.utils.cpp_extension, cached under $SPECEDIT_CACHE or
~/.cache/specedit/ext) that streams the weights once per call whatever M is, converts them to fp32 in
registers and accumulates in fp32. Every output is one fp32 FMA chain over k = 0..K-1 (times the column's
scale for int8), so a row's bits do not depend on M, on the thread count, or on AVX2 vs AVX-512 (chosen at
run time).

    w = pack(weight, torch.float16)        # weight [N, K], once at load time
    y = w(x)                               # x [..., K] float32 -> y [..., N] float32
"""

from __future__ import annotations

import mmap
import os
import platform
import shutil
import sys
import threading

import torch
from torch import nn

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}
_STORAGE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.int8: torch.int8}
_ISAS = {None: 0, "auto": 0, "avx2": 1, "avx512": 2}
_GROUP = 32  # output columns per kernel group; N is padded to a multiple of it
# One extension for the CPU kernels: this matmul, the row-invariant attention of cpu_attention.py and the
# decoder stack of cpu_stack.py.
_SOURCES = (
    "bindings.cpp",
    "decoder.cpp",
    "linear_avx2.cpp",
    "linear_avx512.cpp",
    "attention.cpp",
    "attention_avx2.cpp",
    "attention_avx512.cpp",
)

_ext = None
_error = None  # the RuntimeError of a failed build, raised again without rebuilding
_linear_fn = None  # _ext.linear once loaded: the per-call fast path skips _load()
_lock = threading.Lock()


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def _ninja_dir() -> str | None:
    """Directory holding a ninja executable, or None. The pip `ninja` package counts too."""
    found = shutil.which("ninja")
    if found:
        return os.path.dirname(found)
    try:
        import ninja  # type: ignore[import-not-found]

        return ninja.BIN_DIR
    except Exception:  # noqa: BLE001 - any failure means "no ninja"
        return None


def available() -> bool:
    """True when the kernel can be built and run here: x86-64 Linux with avx2, fma and f16c, a C++
    compiler and ninja. Does not compile anything and never raises."""
    try:
        if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
            return False
        if not {"avx2", "fma", "f16c"} <= _cpu_flags():
            return False
        cxx = os.environ.get("CXX", "c++")
        return shutil.which(cxx) is not None and _ninja_dir() is not None
    except Exception:  # noqa: BLE001 - documented never to raise
        return False


def build_dir() -> str:
    """Where the compiled extension is cached: $SPECEDIT_CACHE/ext/... or ~/.cache/specedit/ext/..."""
    root = os.environ.get("SPECEDIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "specedit")
    tag = f"cpu_linear-torch{torch.__version__.split('+')[0]}-py{sys.version_info[0]}{sys.version_info[1]}"
    return os.path.join(root, "ext", tag)


def _load():
    """The compiled extension; built on first use (tens of seconds), then loaded from the cache."""
    global _ext, _linear_fn, _error
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is not None:
            return _ext
        if _error is not None:  # one failed build per process is enough
            raise _error
        if not available():
            raise RuntimeError(
                "specedit.cpu_linear needs x86-64 Linux with avx2/fma/f16c, a C++ compiler and ninja "
                "(pip install ninja)"
            )
        ninja_dir = _ninja_dir()
        if ninja_dir and shutil.which("ninja") is None:
            os.environ["PATH"] = ninja_dir + os.pathsep + os.environ.get("PATH", "")
        from torch.utils.cpp_extension import load

        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
        out = build_dir()
        os.makedirs(out, exist_ok=True)
        try:
            _ext = load(
                name="specedit_cpu_linear",
                sources=[os.path.join(src, f) for f in _SOURCES],
                # -fopenmp: at::parallel_for is inline and only spawns threads when compiled with it;
                # at run time libgomp.so.1 resolves to the copy torch already loaded (one thread pool).
                # -ffp-contract=off: GCC would otherwise fuse a written a * b + c into an FMA where it
                # sees fit, maybe differently in the AVX2 and AVX-512 copies; every FMA is explicit.
                extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"],
                extra_ldflags=["-fopenmp"],
                extra_include_paths=[src],
                build_directory=out,
                verbose=False,
            )
            _linear_fn = _ext.linear
        except Exception as e:  # the build log is in the message; keep its end, where the error is
            tail = "\n".join(str(e).splitlines()[-40:])
            _error = RuntimeError(
                f"specedit.cpu_linear: compiling the C++ kernel in {out} failed "
                f"(compiler {os.environ.get('CXX', 'c++')}). Last lines of the output:\n{tail}"
            )
            raise _error from e
        return _ext


def best_isa() -> str:
    """'avx512' or 'avx2': the instruction set the kernel uses on this CPU (builds the extension)."""
    return _load().best_isa()


_HUGE_PAGE = 2 << 20
_CHUNK = 64 << 20


def _map(nbytes: int) -> torch.Tensor:
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
    every weight once; with 4 KB pages the TLB misses of that walk cost ~10% of the f16 bandwidth here
    (SmolLM2 f16 forward 4.8 -> 4.3 ms). Memory is not reused: weights are packed once per model."""

    def __init__(self):
        self.chunk = None
        self.used = 0
        self.lock = threading.Lock()

    def alloc(self, nbytes: int) -> torch.Tensor:
        if nbytes > _CHUNK // 4:
            return _map(nbytes)[:nbytes]
        with self.lock:
            if self.chunk is None or self.used + nbytes > self.chunk.numel():
                self.chunk, self.used = _map(_CHUNK), 0
            out = self.chunk[self.used : self.used + nbytes]
            self.used += -(-nbytes // 64) * 64
            return out


_arena = _Arena()


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (q [N, K] int8, scale [N] float32), symmetric per output row:
    scale = max|w| / 127, q = round(w / scale), so weight ~ scale[:, None] * q (an all-zero row gets scale 0)."""
    w = weight.detach().to("cpu", torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("cpu_linear: int8 quantization needs finite weights")
    scale = w.abs().amax(dim=1) / 127 if w.shape[1] else torch.zeros(w.shape[0])
    q = torch.round(w / torch.where(scale > 0, scale, 1)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.contiguous()


def pack_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """weight [N, K] -> packed [ceil(N/32), K, 32] in `dtype`, returned as an integer view of the same bytes
    (so a `.to(dtype)` sweep over a model never converts it). Columns past N are 0. For float dtypes the
    weight is any float tensor; for int8 it is the q of quantize_int8() (the scale is kept beside it)."""
    if dtype not in _DTYPES:
        raise ValueError(f"cpu_linear: weight dtype must be float32, float16, bfloat16 or int8, got {dtype}")
    if weight.dim() != 2:
        raise ValueError(f"cpu_linear: weight must be [N, K], got shape {tuple(weight.shape)}")
    if (dtype == torch.int8) != (weight.dtype == torch.int8):
        raise ValueError(f"cpu_linear: int8 packing takes quantize_int8()'s weight, got {weight.dtype} for {dtype}")
    n, k = weight.shape
    if dtype == torch.float16 and weight.numel():
        big = weight.detach().abs().max().item()
        if big > 65504.0 and big != float("inf"):
            raise ValueError(f"cpu_linear: a weight of magnitude {big:g} overflows float16 (max 65504); use bfloat16")
    npad = -(-n // _GROUP) * _GROUP
    w = torch.zeros(npad, k, dtype=dtype)
    w[:n] = weight.detach().to("cpu", dtype)
    w = w.view(npad // _GROUP, _GROUP, k).transpose(1, 2)  # [groups, K, 32]
    out = _arena.alloc(w.numel() * w.element_size()).view(dtype).view(w.shape)
    out.copy_(w)
    return out.view(_STORAGE[dtype])


class PackedLinear:
    """A linear layer y = x @ weight^T (+ bias) with the weight packed once for the CPU kernel.

    weight: [N, K]; bias: [N] or None (kept in float32, added after the product); dtype: storage of the
    weight (float32, float16 or bfloat16, or int8: quantize_int8's q and a float32 scale per output column,
    applied to the finished sum); products are accumulated in float32.
    Calling it: x [..., K] float32 on the CPU -> y [..., N] float32. Row i of a call over M rows equals
    bit for bit the call over that row alone, for any M and thread count.
    A plain class, not an nn.Module: calls cost ~1 us of Python, and nothing can cast the packed bytes.
    """

    __slots__ = ("_code", "bias", "in_features", "out_features", "packed", "scale", "weight_dtype")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16):
        if weight.dim() != 2:
            raise ValueError(f"cpu_linear: weight must be [N, K], got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = dtype
        self.scale = None  # [N] float32 for int8 weights
        if dtype == torch.int8:
            weight, self.scale = quantize_int8(weight)
        self.packed = pack_weight(weight, dtype)
        self._code = _DTYPES[dtype]
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"cpu_linear: bias must be [{self.out_features}], got {tuple(bias.shape)}")
        self.bias = None if bias is None else bias.detach().to("cpu", torch.float32).contiguous()

    @classmethod
    def from_linear(cls, lin: nn.Linear, dtype: torch.dtype = torch.float16) -> PackedLinear:
        return cls(lin.weight, lin.bias, dtype)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weight one call reads (without the padding to 32 columns), int8 scales included."""
        scales = 0 if self.scale is None else self.scale.numel() * 4
        return self.out_features * self.in_features * self.packed.element_size() + scales

    def __call__(self, x: torch.Tensor, isa: str | None = None) -> torch.Tensor:
        fn = _linear_fn or _load().linear
        if x.dim() == 2 and isa is None:  # the hot path: no reshapes; C++ checks dtype, device, K
            return fn(x, self.packed, self.out_features, self.in_features, self._code, self.bias, self.scale, 0)
        if isa not in _ISAS:
            raise ValueError(f"cpu_linear: isa must be one of {list(_ISAS)}, got {isa!r}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"cpu_linear: x must be [..., {self.in_features}], got {tuple(x.shape)}")
        y = fn(
            x.reshape(-1, self.in_features),
            self.packed,
            self.out_features,
            self.in_features,
            self._code,
            self.bias,
            self.scale,
            _ISAS[isa],
        )
        return y.view(*x.shape[:-1], self.out_features)

    def __repr__(self) -> str:
        return (
            f"PackedLinear(in_features={self.in_features}, out_features={self.out_features}, "
            f"dtype={self.weight_dtype}, bias={self.bias is not None})"
        )


def pack(weight: torch.Tensor, dtype: torch.dtype = torch.float16, bias: torch.Tensor | None = None) -> PackedLinear:
    """Pack weight [N, K] (and bias [N]) once, at load time. See PackedLinear."""
    return PackedLinear(weight, bias, dtype)


def linear(x: torch.Tensor, w: PackedLinear, isa: str | None = None) -> torch.Tensor:
    """x [..., K] float32 (CPU) @ w^T (+ bias) -> [..., N] float32. isa: None/'auto', 'avx2' or 'avx512'
    (tests use it to check that the two paths agree bit for bit)."""
    return w(x, isa=isa)


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
