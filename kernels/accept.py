"""Greedy acceptance: argmax of every verify row, compared to the draft, first mismatch per sequence.

Three parts, as every kernel file here: the Triton kernel, the launcher `accept` (checks shapes, dtypes,
strides, then launches once), and the pure-torch reference `accept_ref` with the same signature.

For sequence b with Q = K+1 verify rows and a draft of ``draft_lens[b] <= K`` tokens::

    argmax[b, i]     = argmax_v logits[b, i, v]              (ties: lowest index, NaN counts as the maximum,
                                                               as torch.argmax)
    num_accepted[b]  = longest n <= draft_lens[b] with argmax[b, i] == draft[b, i] for all i < n
    next_token[b]    = argmax[b, num_accepted[b]]            (the correction, or the bonus token when the whole
                                                               draft was accepted)

Why this grid. The work is a pure read of B*Q*V logits (V up to 151936, Q up to 65): about 20 MB in bf16 for
one sequence of 65 rows, a few microseconds at H100 bandwidth, but only if a few hundred programs are
streaming at once. A grid of (B,) or even (B, Q) gives 1..65 programs, each streaming up to 300 KB alone,
so the kernel would run at a fraction of the bandwidth. So the vocabulary of each row is also split:
grid (B*Q, num_splits) with num_splits chosen to give about 4 programs per SM. Each program keeps a per-lane
running (max, index) over its chunk, reduces it once, and folds the result into one int64 word per row with a
single ``atomic_max`` on an order-preserving packing ``(float_key << 32) | (2**31 - 1 - index)`` (bigger value
wins, then lower index). It then increments a per-sequence counter; the program that arrives last for a
sequence reads the Q packed words back (resetting them with ``atomic_xchg``), writes argmax[b, :], and does the
first-mismatch step. So everything happens in one launch, the workspace leaves each call as it found it (no
memset launch), and the host copies one [2, B] int32 buffer.

The workspace is cached per (device, stream): two launches of this kernel running concurrently on different
streams of one device would need separate workspaces, which that key gives them. Call it once before capturing
a CUDA graph so that the workspace is allocated outside the capture.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .launch import num_sms

__all__ = ["accept", "accept_ref"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DRAFT_DTYPES = (torch.int32, torch.int64)
_KEY_INIT = -(2**63)  # below every packed key: the smallest float key, that of -inf, is -2139095041 > -2**31
_MAX_BLOCK_V = 4096  # 8 KB of bf16 per program per iteration: 16 elements (two 16-byte loads) per thread
_NUM_WARPS = 8
_PROGRAMS_PER_SM = 4  # enough bytes in flight to cover DRAM latency
_MAX_Q = 1024  # the last program of a sequence holds all its Q packed words at once


@triton.jit(do_not_specialize=["num_seqs", "num_q", "num_draft", "chunk_len", "num_splits"])
def _accept_kernel(
    logits_ptr, draft_ptr, draft_lens_ptr, argmax_ptr, result_ptr, ws_key_ptr, ws_count_ptr,
    num_seqs, num_q, num_draft, vocab, chunk_len, num_splits,
    stride_logits_b, stride_logits_q,
    stride_draft_b, stride_draft_k,
    stride_argmax_b, stride_argmax_q,
    BLOCK_V: tl.constexpr,  # vocab elements per iteration (power of two)
    BLOCK_Q: tl.constexpr,  # verify rows per sequence, padded to a power of two (last-program step)
    KEY_INIT: tl.constexpr,  # value the workspace words hold between calls (below any packed key)
):
    pid_row = tl.program_id(0)  # b * num_q + i
    pid_split = tl.program_id(1)
    b = pid_row // num_q
    i = pid_row % num_q

    # 1. argmax over this program's vocabulary chunk, per lane, then across lanes.
    start = pid_split * chunk_len
    end = tl.minimum(start + chunk_len, vocab)
    row_ptr = logits_ptr + b.to(tl.int64) * stride_logits_b + i.to(tl.int64) * stride_logits_q
    offs = tl.arange(0, BLOCK_V)
    best_val = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_idx = start + offs  # a lane that never updates keeps its lowest index (all -inf lane)
    for v0 in range(start, end, BLOCK_V):
        idx = v0 + offs
        x = tl.load(row_ptr + idx, mask=idx < end, other=float("-inf")).to(tl.float32)
        # Strictly greater (so the earliest index of a lane wins ties), or x is NaN; a NaN lane stays NaN.
        upd = (~(x <= best_val)) & (best_val == best_val)  # noqa: PLR0124 (NaN test)
        best_val = tl.where(upd, x, best_val)
        best_idx = tl.where(upd, idx, best_idx)
    is_nan = best_val != best_val  # noqa: PLR0124 (NaN test)
    any_nan = tl.max(is_nan.to(tl.int32), 0) > 0
    best = tl.max(tl.where(is_nan, float("-inf"), best_val), 0)
    winner = tl.where(any_nan, is_nan, best_val == best)
    arg = tl.min(tl.where(winner, best_idx, 2147483647), 0)

    # 2. Fold into the row's word: order-preserving int32 key of the value (-0 as +0, NaN above +inf) in the
    # high half, 2**31 - 1 - index in the low half (lower index = bigger word on equal values).
    best = tl.where(best == 0.0, 0.0, best)
    bits = best.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(any_nan, 0x7FFFFFFF, key)
    packed = (key.to(tl.int64) << 32) | (2147483647 - arg).to(tl.int64)
    tl.atomic_max(ws_key_ptr + pid_row, packed, sem="relaxed")
    # acq_rel: releases the atomic_max above; the last arriver acquires everyone's.
    arrived = tl.atomic_add(ws_count_ptr + b, 1, sem="acq_rel")

    # 3. The last program of sequence b: read back (and reset) the Q words, then the first mismatch.
    if arrived == num_q * num_splits - 1:
        offs_q = tl.arange(0, BLOCK_Q)
        q_valid = offs_q < num_q
        words = tl.atomic_xchg(ws_key_ptr + b * num_q + offs_q, tl.full([BLOCK_Q], KEY_INIT, tl.int64),
                               mask=q_valid, sem="acq_rel")
        tl.atomic_xchg(ws_count_ptr + b, 0, sem="relaxed")
        am = (2147483647 - (words & 0x7FFFFFFF)).to(tl.int32)
        tl.store(argmax_ptr + b.to(tl.int64) * stride_argmax_b + offs_q * stride_argmax_q, am, mask=q_valid)
        n_draft = tl.minimum(tl.maximum(tl.load(draft_lens_ptr + b), 0), num_draft)
        in_draft = offs_q < n_draft
        d = tl.load(draft_ptr + b.to(tl.int64) * stride_draft_b + offs_q * stride_draft_k, mask=in_draft,
                    other=-1)
        match = in_draft & (am.to(tl.int64) == d.to(tl.int64))
        n_acc = tl.min(tl.where(match | ~q_valid, BLOCK_Q, offs_q), 0)  # row n_draft never matches
        nxt = tl.sum(tl.where(offs_q == n_acc, am, 0), 0)
        tl.store(result_ptr + b, n_acc.to(tl.int32))
        tl.store(result_ptr + num_seqs + b, nxt)



_WORKSPACES: dict = {}


def _workspace(device: torch.device, rows: int, seqs: int):
    """Cached (keys [>= rows] int64 = KEY_INIT, counters [>= seqs] int32 = 0); every call leaves them so."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    ws = _WORKSPACES.get(key)
    if ws is None or ws[0].numel() < rows or ws[1].numel() < seqs:
        rows = max(rows, 0 if ws is None else ws[0].numel(), 64)
        seqs = max(seqs, 0 if ws is None else ws[1].numel(), 8)
        ws = (torch.full((rows,), _KEY_INIT, dtype=torch.int64, device=device),
              torch.zeros((seqs,), dtype=torch.int32, device=device))
        _WORKSPACES[key] = ws
    return ws


def _check_inputs(logits, draft, draft_lens):
    """Validate the arguments; returns (B, Q, V, K)."""
    for name, t in (("logits", logits), ("draft", draft), ("draft_lens", draft_lens)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, Q, V], got shape {tuple(logits.shape)}")
    B, Q, V = logits.shape
    if logits.dtype not in _DTYPES:
        raise ValueError(f"logits dtype {logits.dtype} not supported; use float32, float16 or bfloat16")
    if V < 1 or V >= 2**31 - 1:
        raise ValueError(f"vocab size V={V} must be in [1, 2**31 - 2]")
    if logits.stride(2) != 1 and V > 1:
        raise ValueError(f"logits must be contiguous over the vocab (stride 1), got strides {logits.stride()}")
    if draft.dim() != 2:
        raise ValueError(f"draft must be [B, K], got shape {tuple(draft.shape)}")
    if draft.dtype not in _DRAFT_DTYPES:
        raise ValueError(f"draft dtype {draft.dtype} not supported; use int32 or int64")
    Bd, K = draft.shape
    if Bd != B:
        raise ValueError(f"batch mismatch: logits has B={B}, draft has B={Bd}")
    if Q != K + 1:
        raise ValueError(f"logits must hold K+1 rows per sequence: draft has K={K}, logits has Q={Q}")
    if Q > _MAX_Q:
        raise ValueError(f"Q={Q} verify rows exceed the supported {_MAX_Q}")
    if draft_lens.dtype != torch.int32:
        raise ValueError(f"draft_lens must be int32, got {draft_lens.dtype}")
    if draft_lens.shape != (B,):
        raise ValueError(f"draft_lens must have shape [B]=({B},), got {tuple(draft_lens.shape)}")
    if len({logits.device, draft.device, draft_lens.device}) != 1:
        raise ValueError(f"all tensors must be on one device, got logits {logits.device}, draft {draft.device}, "
                         f"draft_lens {draft_lens.device}")
    if draft_lens.device.type == "cpu" and B > 0:
        # Free here; on a GPU this would cost a device sync, so there the kernel clamps to [0, K] instead.
        lo, hi = int(draft_lens.min()), int(draft_lens.max())
        if lo < 0 or hi > K:
            raise ValueError(f"draft_lens must be in [0, K={K}], got {draft_lens.tolist()}")
    return B, Q, V, K


def accept(logits, draft, draft_lens, *, block_v=None, num_splits=None):
    """Fused greedy acceptance for one verify step (one kernel launch).

    Args:
        logits: [B, Q, V] float32/float16/bfloat16, Q = K+1 verify rows per sequence; any strides over B and
            Q, stride 1 over V.
        draft: [B, K] int32 or int64, the proposed tokens (row i of logits predicts the token at draft[:, i]).
        draft_lens: [B] int32, valid draft length of each sequence, in [0, K] (entries past it are ignored).
        block_v: optional vocab block size override (power of two; tests, tuning).
        num_splits: optional number of vocab chunks per row (tests, tuning).

    Returns:
        (num_accepted [B] int32, next_token [B] int32, argmax [B, Q] int32), all on logits' device.
        num_accepted and next_token are rows 0 and 1 of one contiguous [2, B] int32 buffer, so one host copy
        fetches both: ``torch.as_strided(num_accepted, (2, B), (B, 1)).cpu()``.
        argmax ties go to the lowest index and NaN counts as the maximum, as in torch.argmax.
    """
    B, Q, V, K = _check_inputs(logits, draft, draft_lens)
    device = logits.device
    result = torch.empty((2, B), dtype=torch.int32, device=device)
    argmax = torch.empty((B, Q), dtype=torch.int32, device=device)
    if B == 0:
        return result[0], result[1], argmax
    if block_v is None:
        block_v = min(_MAX_BLOCK_V, max(128, triton.next_power_of_2(V)))
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v={block_v} must be a power of two >= 16")
    n_blocks = triton.cdiv(V, block_v)
    if num_splits is None:
        num_splits = triton.cdiv(_PROGRAMS_PER_SM * num_sms(device), B * Q)
    num_splits = max(1, min(int(num_splits), n_blocks))
    chunk_len = triton.cdiv(n_blocks, num_splits) * block_v
    num_splits = triton.cdiv(V, chunk_len)
    if num_splits > 65535:
        raise ValueError(f"num_splits={num_splits} exceeds the grid limit 65535; raise block_v")
    ws_key, ws_count = _workspace(device, B * Q, B)
    draft_arg = draft if K > 0 else draft_lens  # an empty tensor may have no valid pointer; never read
    _accept_kernel[(B * Q, num_splits)](
        logits, draft_arg, draft_lens, argmax, result, ws_key, ws_count,
        B, Q, K, V, chunk_len, num_splits,
        logits.stride(0), logits.stride(1),
        draft.stride(0), draft.stride(1) if K > 0 else 1,
        argmax.stride(0), argmax.stride(1),
        BLOCK_V=block_v, BLOCK_Q=max(2, triton.next_power_of_2(Q)), KEY_INIT=_KEY_INIT,
        num_warps=_NUM_WARPS if block_v >= 1024 else 4,
    )
    return result[0], result[1], argmax


def accept_ref(logits, draft, draft_lens, *, block_v=None, num_splits=None):
    """Pure-torch reference of `accept` (same signature; block_v/num_splits are ignored)."""
    _, _, _, K = _check_inputs(logits, draft, draft_lens)
    argmax = logits.argmax(dim=-1).to(torch.int32)  # [B, Q]
    in_draft = torch.arange(K, device=logits.device)[None, :] < draft_lens[:, None]  # [B, K]
    match = (argmax[:, :K].long() == draft.long()) & in_draft  # [B, K]
    num_accepted = match.int().cumprod(dim=1).sum(dim=1).to(torch.int32)  # length of the all-match prefix
    next_token = argmax.gather(1, num_accepted[:, None].long())[:, 0]
    return num_accepted, next_token, argmax
