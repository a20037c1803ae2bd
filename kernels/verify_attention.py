"""Verification attention: the K+1 new rows of each sequence attend over its cached prefix.

Three parts, as every kernel file here: the Triton kernels, the launcher `verify_attention` (checks shapes,
dtypes, strides and capacity, then launches), and the pure-torch reference `verify_attention_ref` with the same
signature.

Masking is bottom-right causal. With Q new rows already written at the end of a cache of ``L = cache_lens[b]``
valid rows, query row i sits at absolute position ``L - Q + i`` and sees keys ``0 .. L - Q + i``::

    keys  ->  0 1 2 3 4 5 6        (L = 7, Q = 3)
    row 0     x x x x x . .
    row 1     x x x x x x .
    row 2     x x x x x x x

(PyTorch SDPA's ``is_causal=True`` is top-left aligned when Q != L, which is not this mask.)

Layout of the work. One program owns one (sequence, KV head, KV split, row tile): all ``G = H // H_kv`` query
heads of the KV group and all Q rows are packed into one tile of ``M = Q * G`` rows (row m is query row
``m // G`` of head ``kv_head * G + m % G``), so each K/V block is read from memory once per group instead of
once per query head. Long caches are split across programs (flash-decoding): every split writes an
unnormalized float32 partial output with its running max and sum, and a small combine kernel merges them.
When one split is enough the split kernel writes the final output directly and no combine runs.

Split boundaries are absolute key positions (multiples of ``split_len``, which is a multiple of BLOCK_N and is
chosen on the host from ``max_len``, default the cache capacity), never derived from a row's own length, so
the same key position is reduced in the same block and split whatever Q is. Keep ``max_len`` constant between
the verify pass and the 1-row pass when comparing them bit for bit. (The tile height still follows Q * G, and
whether the tensor-core instructions picked for different heights round identically is the hardware's
business: a parity test on the GPU is what settles it.)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import num_sms

__all__ = ["verify_attention", "verify_attention_ref"]

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256
_MIN_KEYS_PER_SPLIT = 128  # a shorter split costs more in partial-output traffic than it saves
_MAX_SPLITS = 128  # combine kernel loads all splits of a row at once


@triton.jit(do_not_specialize=["num_q", "num_splits", "split_len"])
def _verify_attention_split_kernel(
    q_ptr, k_ptr, v_ptr, cache_lens_ptr, out_ptr, part_o_ptr, part_m_ptr, part_l_ptr,
    num_q, num_splits, split_len, s_max, qk_scale,
    stride_q_b, stride_q_q, stride_q_h, stride_q_d,
    stride_k_b, stride_k_h, stride_k_s, stride_k_d,
    stride_v_b, stride_v_h, stride_v_s, stride_v_d,
    stride_out_b, stride_out_q, stride_out_h, stride_out_d,
    H_KV: tl.constexpr,  # KV heads: program id 1 is b * H_KV + kv_head
    GROUP: tl.constexpr,  # query heads per KV head: the row packing m -> (m // GROUP, m % GROUP)
    HEAD_DIM: tl.constexpr,  # true head dim; BLOCK_D pads it to a power of two with masks
    BLOCK_M: tl.constexpr,  # packed (row, head) tile, power of two >= 16 for tl.dot
    BLOCK_N: tl.constexpr,  # keys per iteration
    BLOCK_D: tl.constexpr,  # padded head dim, power of two >= 16 for tl.dot
    SINGLE_SPLIT: tl.constexpr,  # one split covers the cache: write the final output, skip the combine
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no silent tf32), "tf32" otherwise (ignored)
):
    pid_split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // H_KV
    kv_head = pid_bh % H_KV

    # Clamp to the capacity so that a bad length can never read outside the buffer.
    kv_len = tl.minimum(tl.maximum(tl.load(cache_lens_ptr + b), 0), s_max)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = offs_m < num_q * GROUP
    q_row = offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    last_key = kv_len - num_q + q_row  # inclusive, per packed row

    start = pid_split * split_len
    end = tl.minimum(start + split_len, kv_len)
    if pid_split == num_splits - 1:
        end = kv_len
    # The last valid row of this tile sees the most keys; nothing past it is needed.
    tile_last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, num_q * GROUP - 1) // GROUP
    end = tl.minimum(end, kv_len - num_q + tile_last_row + 1)
    if start >= end:
        # Nothing to do; the combine kernel never reads this (split, row) pair (same rule on both sides).
        return

    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    offs_d64 = offs_d.to(tl.int64)
    b64 = b.to(tl.int64)

    q_ptrs = (q_ptr + b64 * stride_q_b + q_row.to(tl.int64)[:, None] * stride_q_q
              + head.to(tl.int64)[:, None] * stride_q_h + offs_d64[None, :] * stride_q_d)
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)

    k_base = k_ptr + b64 * stride_k_b + kv_head.to(tl.int64) * stride_k_h
    v_base = v_ptr + b64 * stride_v_b + kv_head.to(tl.int64) * stride_v_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        offs_n64 = offs_n.to(tl.int64)
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + offs_n64[:, None] * stride_k_s + offs_d64[None, :] * stride_k_d,
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        visible = n_valid[None, :] & (offs_n[None, :] <= last_key[:, None])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: avoid -inf - -inf
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n64[:, None] * stride_v_s + offs_d64[None, :] * stride_v_d,
                    mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    store_mask = row_valid[:, None] & d_valid[None, :]
    if SINGLE_SPLIT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l == 0 only for a row with no visible key
        out_ptrs = (out_ptr + b64 * stride_out_b + q_row.to(tl.int64)[:, None] * stride_out_q
                    + head.to(tl.int64)[:, None] * stride_out_h + offs_d64[None, :] * stride_out_d)
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # Partials are contiguous [B, Q, H, num_splits, (HEAD_DIM)] float32.
        row = (b64 * num_q + q_row.to(tl.int64)) * (H_KV * GROUP) + head.to(tl.int64)
        slot = row * num_splits + pid_split
        tl.store(part_o_ptr + slot[:, None] * HEAD_DIM + offs_d64[None, :], acc, mask=store_mask)
        tl.store(part_m_ptr + slot, m_i, mask=row_valid)
        tl.store(part_l_ptr + slot, l_i, mask=row_valid)


@triton.jit(do_not_specialize=["num_q", "num_splits", "split_len"])
def _verify_attention_combine_kernel(
    part_o_ptr, part_m_ptr, part_l_ptr, cache_lens_ptr, out_ptr,
    num_q, num_splits, split_len, s_max,
    stride_out_b, stride_out_q, stride_out_h, stride_out_d,
    NUM_HEADS: tl.constexpr,  # query heads: program id is (b * num_q + row) * NUM_HEADS + head
    HEAD_DIM: tl.constexpr,  # true head dim (row length of the partial outputs)
    BLOCK_S: tl.constexpr,  # splits, padded to a power of two
    BLOCK_D: tl.constexpr,  # head dim, padded to a power of two
):
    row = tl.program_id(0).to(tl.int64)
    head = row % NUM_HEADS
    q_row = (row // NUM_HEADS) % num_q
    b = row // NUM_HEADS // num_q
    kv_len = tl.minimum(tl.maximum(tl.load(cache_lens_ptr + b), 0), s_max)
    last_key = kv_len - num_q + q_row

    offs_s = tl.arange(0, BLOCK_S)
    # Same rule as the split kernel: split s was written for this row iff it starts at a visible key.
    s_valid = (offs_s < num_splits) & (offs_s.to(tl.int64) * split_len <= last_key)
    slot = row * num_splits + offs_s
    m = tl.load(part_m_ptr + slot, mask=s_valid, other=float("-inf"))
    l_part = tl.load(part_l_ptr + slot, mask=s_valid, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    w = tl.where(s_valid, w, 0.0)

    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    o = tl.load(part_o_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_valid[:, None] & d_valid[None, :], other=0.0)
    num = tl.sum(w[:, None] * o, 0)
    den = tl.sum(w * l_part, 0)
    out = num / tl.where(den == 0.0, 1.0, den)
    tl.store(out_ptr + b * stride_out_b + q_row * stride_out_q + head * stride_out_h + offs_d * stride_out_d,
             out.to(out_ptr.dtype.element_ty), mask=d_valid)



def _check_inputs(q, k_cache, v_cache, cache_lens, scale):
    """Validate the arguments; returns (B, Q, H, D, H_kv, S_max, scale)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_lens", cache_lens)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Q, H, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [B, H_kv, S_max, D], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    B, Q, H, D = q.shape
    Bk, H_kv, S_max, Dk = k_cache.shape
    if Bk != B:
        raise ValueError(f"batch mismatch: q has B={B}, k_cache has B={Bk}")
    if Dk != D:
        raise ValueError(f"head_dim mismatch: q has D={D}, k_cache has D={Dk}")
    if H_kv == 0 or H % H_kv != 0:
        raise ValueError(f"query heads H={H} must be a positive multiple of KV heads H_kv={H_kv}")
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim D={D} must be in [1, {_MAX_HEAD_DIM}]")
    if Q < 1:
        raise ValueError(f"q must hold at least one new row, got Q={Q}")
    if Q > S_max:
        raise ValueError(f"Q={Q} new rows do not fit a cache of capacity S_max={S_max}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} not supported; use float32, float16 or bfloat16")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"dtype mismatch: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    devices = {q.device, k_cache.device, v_cache.device, cache_lens.device}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got q {q.device}, k_cache {k_cache.device}, "
                         f"v_cache {v_cache.device}, cache_lens {cache_lens.device}")
    if cache_lens.dtype != torch.int32:
        raise ValueError(f"cache_lens must be int32, got {cache_lens.dtype}")
    if cache_lens.shape != (B,):
        raise ValueError(f"cache_lens must have shape [B]=({B},), got {tuple(cache_lens.shape)}")
    if cache_lens.device.type == "cpu" and B > 0:
        # Free here; on a GPU this would be a device->host sync per layer per step, so it is skipped there
        # (the kernel clamps lengths to S_max, so it still never reads outside the buffer).
        lo, hi = int(cache_lens.min()), int(cache_lens.max())
        if lo < Q:
            raise ValueError(f"cache_lens must include the Q={Q} new rows, got min(cache_lens)={lo} "
                             f"(cache_lens={cache_lens.tolist()})")
        if hi > S_max:
            raise ValueError(f"cache_lens exceed the capacity S_max={S_max}: max(cache_lens)={hi}")
    if scale is None:
        scale = D ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return B, Q, H, D, H_kv, S_max, scale


def _plan(B, Q, H, H_kv, D, S_eff, device, dtype, num_splits):
    """Tile sizes, split count and launch settings.

    float16/bfloat16: 64 keys per iteration and up to 128 packed rows (32 and 64 for head_dim 256), 3 stages.
    float32 uses full-precision dots, which run on the FMA units with the operands in registers, so its tiles
    are smaller (32 keys, up to 64 rows) to stay within shared memory and registers; it exists for parity
    checks, not speed. (Register and shared-memory use were checked by compiling for sm_90a.)
    """
    G = H // H_kv
    block_d = max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:
        block_n, max_m, num_stages = 32, (64 if block_d <= 128 else 32), 2
    else:
        block_n, max_m, num_stages = (64, 128, 3) if block_d <= 128 else (32, 64, 2)
    block_m = min(max(16, triton.next_power_of_2(Q * G)), max_m)
    num_warps = 8 if block_m >= 128 or block_d >= 256 else 4
    m_tiles = triton.cdiv(Q * G, block_m)
    n_blocks = triton.cdiv(S_eff, block_n)
    if num_splits is None:
        # Enough programs for about two per SM, but no split shorter than _MIN_KEYS_PER_SPLIT keys. Q (and
        # so m_tiles) is left out on purpose: the split boundaries must not depend on Q (see module doc).
        base = max(1, B * H_kv)
        num_splits = min(triton.cdiv(2 * num_sms(device), base), triton.cdiv(S_eff, _MIN_KEYS_PER_SPLIT))
    num_splits = max(1, min(int(num_splits), n_blocks, _MAX_SPLITS))
    split_len = triton.cdiv(n_blocks, num_splits) * block_n
    num_splits = triton.cdiv(S_eff, split_len)
    return {"G": G, "block_d": block_d, "block_n": block_n, "block_m": block_m, "m_tiles": m_tiles,
            "num_splits": num_splits, "split_len": split_len, "num_warps": num_warps, "num_stages": num_stages}


def verify_attention(q, k_cache, v_cache, cache_lens, scale=None, *, max_len=None, num_splits=None):
    """Attention of the Q = K+1 new rows of each sequence over its cache, bottom-right causal.

    Args:
        q: [B, Q, H, D] float32/float16/bfloat16, the new rows' queries (their keys/values are already in the
            cache at positions ``cache_lens[b] - Q .. cache_lens[b] - 1``). Any strides.
        k_cache, v_cache: [B, H_kv, S_max, D], same dtype as q; any strides (e.g. ``buf[l, 0]`` and
            ``buf[l, 1]`` of a [L, 2, B, H_kv, S_max, D] buffer). Rows at or past ``cache_lens[b]`` are never
            read. H must be a multiple of H_kv (GQA).
        cache_lens: [B] int32 on q's device, valid length of each row INCLUDING the Q new rows, in
            [Q, S_max]; rows may differ. Checked on the host only when it lives on the CPU (on a GPU the check
            would cost a device sync; the kernel clamps to S_max so it stays in bounds, and a row that sees
            no key returns zeros).
        scale: softmax scale, default ``D ** -0.5``.
        max_len: optional host-side upper bound of cache_lens, used only to size the KV splits (default
            S_max). Keep it constant across calls whose results must match bit for bit.
        num_splits: optional override of the number of KV splits (tests, tuning).

    Returns:
        [B, Q, H, D] in q's dtype: row i of sequence b is softmax over keys ``0 .. cache_lens[b] - Q + i``.
        Accumulation is float32; float32 inputs use full-precision (not tf32) dots.
    """
    B, Q, H, D, H_kv, S_max, scale = _check_inputs(q, k_cache, v_cache, cache_lens, scale)
    out = torch.empty((B, Q, H, D), dtype=q.dtype, device=q.device)
    if B == 0 or H == 0:
        return out
    S_eff = S_max if max_len is None else max(Q, min(int(max_len), S_max))
    plan = _plan(B, Q, H, H_kv, D, S_eff, q.device, q.dtype, num_splits)
    ns, split_len = plan["num_splits"], plan["split_len"]
    single = ns == 1
    if single:
        part_o = part_m = part_l = out  # unused (SINGLE_SPLIT is a constexpr), any pointer will do
    else:
        part_o = torch.empty((B, Q, H, ns, D), dtype=torch.float32, device=q.device)
        part_m = torch.empty((B, Q, H, ns), dtype=torch.float32, device=q.device)
        part_l = torch.empty((B, Q, H, ns), dtype=torch.float32, device=q.device)
    grid = (ns, B * H_kv, plan["m_tiles"])
    if B * H_kv > 65535:
        raise ValueError(f"B * H_kv = {B} * {H_kv} exceeds the grid limit 65535")
    _verify_attention_split_kernel[grid](
        q, k_cache, v_cache, cache_lens, out, part_o, part_m, part_l,
        Q, ns, split_len, S_max, scale * _LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        H_KV=H_kv, GROUP=plan["G"], HEAD_DIM=D,
        BLOCK_M=plan["block_m"], BLOCK_N=plan["block_n"], BLOCK_D=plan["block_d"],
        SINGLE_SPLIT=single, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    if not single:
        _verify_attention_combine_kernel[(B * Q * H,)](
            part_o, part_m, part_l, cache_lens, out,
            Q, ns, split_len, S_max,
            *out.stride(),
            NUM_HEADS=H, HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(ns), BLOCK_D=plan["block_d"],
            num_warps=4 if plan["block_d"] <= 128 else 8,
        )
    return out


def verify_attention_ref(q, k_cache, v_cache, cache_lens, scale=None, *, max_len=None, num_splits=None):
    """Pure-torch reference of `verify_attention` (same signature; max_len/num_splits are ignored).

    Computed in float32 one sequence at a time with an explicit bottom-right causal mask; output in q's dtype.
    """
    B, Q, H, D, H_kv, _, scale = _check_inputs(q, k_cache, v_cache, cache_lens, scale)
    G = H // H_kv
    out = torch.empty((B, Q, H, D), dtype=torch.float32, device=q.device)
    for b in range(B):
        L = int(cache_lens[b])
        k = k_cache[b, :, :L].float().repeat_interleave(G, dim=0)  # [H, L, D]
        v = v_cache[b, :, :L].float().repeat_interleave(G, dim=0)  # [H, L, D]
        qb = q[b].float().transpose(0, 1)  # [H, Q, D]
        s = (qb @ k.transpose(1, 2)) * scale  # [H, Q, L]
        last_key = L - Q + torch.arange(Q, device=q.device)  # [Q]
        visible = torch.arange(L, device=q.device)[None, :] <= last_key[:, None]  # [Q, L]
        s = s.masked_fill(~visible, float("-inf"))
        out[b] = (torch.softmax(s, dim=-1) @ v).transpose(0, 1)  # [Q, H, D]
    return out.to(q.dtype)
