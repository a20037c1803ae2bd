"""Row-invariant CPU attention over the KV cache, for decoding (T = 1) and verify passes (T = K + 1).

The lossless invariant (DESIGN.md) needs row i of a verify pass to equal, bit for bit, the 1-row pass at
that position. PyTorch SDPA does not promise it: a T-row call with a mask rounds differently from a
1-row call over the row's prefix. This kernel (csrc/attention*.{h,cpp}, in the extension of build.py) gives
every reduction an order fixed by the key index and the feature index alone:

    s_j  = fp32 FMA chain over d = 0..D-1 of (q * scale * log2 e)[d] * k_j[d]
    per absolute key block of 256: m_b = max s_j, p_j = exp2(s_j - m_b) (one vector routine),
         l_b = sum p_j (lane j % 16, fixed tree), o_b[d] = FMA chain over j of p_j * v_j[d]
    out  = sum_b exp2(m_b - m) o_b / sum_b exp2(m_b - m) l_b, blocks in increasing order

so a row's output depends only on its q and its visible keys: not on T, on the other rows, on the number
of threads, or on AVX2 vs AVX-512 (both give the same bits). Cache slots past the lengths are never read.
Outside a row's own range but inside [0, length) keys contribute an exact +0, provided their values
are finite (they are the cache's valid positions).

    out = attention(q, k_cache, v_cache, lengths, scale, window=None)
"""

from __future__ import annotations

import torch

from . import build

HEAD_DIM_MULTIPLE = 16  # the kernel's vector tiles cover D in steps of 16 floats
_attention_fn = None  # the extension's attention once loaded


def supports_head_dim(d: int) -> bool:
    """True when the kernel runs heads of `d` features."""
    return d > 0 and d % HEAD_DIM_MULTIPLE == 0


def _check(q, k_cache, v_cache, lengths, scale, window, isa) -> None:
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"cpu attention: {name} must be a tensor, got {type(x).__name__}")
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4:
            raise ValueError(
                f"cpu attention: {name} must be a 4-d float32 CPU tensor, got {x.dtype} {tuple(x.shape)} on {x.device}"
            )
    B, T, H, D = q.shape
    Bk, Hkv, S, Dk = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"cpu attention: v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(
            f"cpu attention: caches [B, H_kv, S_max, D] = {tuple(k_cache.shape)} do not match q [B, T, H, D] = "
            f"{tuple(q.shape)}"
        )
    if not supports_head_dim(D):
        raise ValueError(f"cpu attention: head dim must be a positive multiple of {HEAD_DIM_MULTIPLE}, got {D}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"cpu attention: {H} query heads are not a multiple of {Hkv} kv heads")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError(
            f"cpu attention: cache rows must be contiguous in D, got strides {k_cache.stride()} and {v_cache.stride()}"
        )
    if not isinstance(lengths, (list, tuple)) or len(lengths) != B:
        raise ValueError(f"cpu attention: lengths must be a list of {B} ints, got {lengths!r}")
    for n in lengths:
        if not isinstance(n, int) or isinstance(n, bool) or not T <= n <= S:
            raise ValueError(f"cpu attention: each length must be an int in [T={T}, S_max={S}], got {lengths}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0 or scale == float("inf"):
        raise ValueError(f"cpu attention: scale must be a positive finite float, got {scale!r}")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"cpu attention: window must be None or an int >= 1, got {window!r}")
    build.isa_code(isa)


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: list[int],
    scale: float,
    window: int | None = None,
    isa: str | None = None,
) -> torch.Tensor:
    """Bottom-right causal attention of T new rows per sequence over the cache, row-invariant.

    q: [B, T, H, D] float32 (any strides; copied only if D is not contiguous).
    k_cache, v_cache: [B, H_kv, S_max, D] float32, strided views (e.g. cache.buf[layer, 0]); not copied.
    lengths: B ints, valid positions per sequence INCLUDING the T new rows (T <= length <= S_max).
    scale: softmax scale (1/sqrt(D) usually). window: None, or Mistral's sliding window W.
    isa: None/'auto', 'avx2' or 'avx512' (tests use it to check the two paths agree bit for bit).

    Query row i of sequence b sits at position p = lengths[b] - T + i and sees keys j with
    max(0, p - W + 1) <= j <= p (W = infinity without a window); head h reads kv head h // (H // H_kv):

        T = 3, length 6:  keys 0 1 2 3 4 5
              row 0 (p=3)    x x x x . .
              row 1 (p=4)    x x x x x .
              row 2 (p=5)    x x x x x x

    Returns out [B, T, H, D] float32, with out[b, i] equal bit for bit to the 1-row call
    attention(q[b:b+1, i:i+1], k_cache[b:b+1], v_cache[b:b+1], [p + 1], scale, window).
    """
    global _attention_fn
    # The C++ side checks shapes, strides, lengths and scale itself (ValueError); validating again here
    # would cost ~3 us per call, 30 times per decoded token. What it cannot see is checked first, and a
    # failed call is re-checked here so that every bad input surfaces as a ValueError naming it.
    if (window is not None and (type(window) is not int or window < 1)) or type(lengths) is not list:
        _check(q, k_cache, v_cache, lengths, scale, window, isa)
    fn = _attention_fn
    if fn is None:
        fn = _attention_fn = build.load().attention
    try:
        return fn(q, k_cache, v_cache, lengths, scale, window or 0, build.isa_code(isa))
    except (TypeError, ValueError, RuntimeError):
        _check(q, k_cache, v_cache, lengths, scale, window, isa)
        raise


def attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: list[int],
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Pure-torch reference with the same signature and semantics, in float64, returned as float32.
    Reads only positions < lengths[b] of the caches."""
    B, T, H, D = q.shape
    G = H // k_cache.shape[1]
    out = torch.empty(B, T, H, D, dtype=torch.float64)
    for b, n in enumerate(lengths):
        k = k_cache[b, :, :n].double().repeat_interleave(G, dim=0)  # [H, n, D]
        v = v_cache[b, :, :n].double().repeat_interleave(G, dim=0)
        s = torch.einsum("thd,hnd->htn", q[b].double(), k) * scale  # [H, T, n]
        pos = n - T + torch.arange(T)[:, None]  # [T, 1]
        j = torch.arange(n)[None, :]
        visible = j <= pos
        if window is not None:
            visible &= j > pos - window
        s = s.masked_fill(~visible, float("-inf"))
        out[b] = torch.einsum("htn,hnd->thd", torch.softmax(s, dim=-1), v)
    return out.float()
