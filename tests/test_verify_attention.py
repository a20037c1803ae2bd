"""verify_attention vs its reference, and the reference vs PyTorch SDPA with an explicit mask.

Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py). Tolerances: float32 atol=rtol=1e-5, float16
atol=rtol=4e-3 (the kernel rounds the softmax weights to float16 before the PV product, as flash attention
does; the reference stays in float32 throughout).
"""

import pytest
import torch
from specedit.kernels.verify_attention import verify_attention, verify_attention_ref

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 4e-3, "rtol": 4e-3}}


def make_inputs(B, Q, H, H_kv, D, lens, S_max, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Q, H, D, generator=g).to(dtype)
    k = torch.randn(B, H_kv, S_max, D, generator=g).to(dtype)
    v = torch.randn(B, H_kv, S_max, D, generator=g).to(dtype)
    return q, k, v, torch.tensor(lens, dtype=torch.int32)


def assert_close(out, ref, dtype):
    assert out.dtype == ref.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


# (B, Q, (H, H_kv), D, cache_lens, S_max): a covering subset of B {1, 3} x Q {1, 2, 5, 17} x
# (H, H_kv) {(8, 8), (9, 3), (14, 2)} x D {64, 128}, cache lengths off the block size, Q == cache_len rows,
# per-row lengths when B = 3 and capacity beyond the longest row.
CASES = [
    (1, 1, (8, 8), 64, [1], 8),
    (1, 1, (9, 3), 128, [77], 96),
    (1, 2, (14, 2), 64, [2], 40),
    (1, 2, (8, 8), 128, [131], 140),
    (1, 5, (9, 3), 64, [200], 200),
    (1, 17, (14, 2), 128, [17], 33),
    (1, 17, (8, 8), 64, [95], 100),
    (3, 1, (14, 2), 64, [1, 65, 129], 140),
    (3, 2, (8, 8), 64, [2, 63, 100], 100),
    (3, 5, (9, 3), 128, [5, 70, 33], 80),
    (3, 17, (9, 3), 64, [17, 18, 150], 160),
    (3, 17, (14, 2), 128, [40, 17, 97], 100),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("B,Q,heads,D,lens,S_max", CASES,
                         ids=[f"B{c[0]}-Q{c[1]}-H{c[2][0]}x{c[2][1]}-D{c[3]}-L{'_'.join(map(str, c[4]))}"
                              for c in CASES])
def test_matches_ref(B, Q, heads, D, lens, S_max, dtype):
    H, H_kv = heads
    q, k, v, cl = make_inputs(B, Q, H, H_kv, D, lens, S_max, dtype)
    assert_close(verify_attention(q, k, v, cl), verify_attention_ref(q, k, v, cl), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_long_cache_several_splits(dtype):
    # 2 sequences x 3 KV heads: the default plan splits a 1600-slot cache into 13 programs per head.
    B, Q, H, H_kv, D, lens, S_max = 2, 5, 9, 3, 64, [1500, 777], 1600
    q, k, v, cl = make_inputs(B, Q, H, H_kv, D, lens, S_max, dtype, seed=1)
    from specedit.kernels.verify_attention import _plan
    assert _plan(B, Q, H, H_kv, D, S_max, q.device, dtype, None)["num_splits"] > 4
    assert_close(verify_attention(q, k, v, cl), verify_attention_ref(q, k, v, cl), dtype)


def test_split_boundaries_do_not_depend_on_q():
    # The verify pass (Q = K+1) and the 1-row pass must cut the keys at the same absolute positions, or the
    # same key would be reduced in a different order (see the module docstring of verify_attention).
    from specedit.kernels.verify_attention import _plan
    for H, H_kv, D, S in [(9, 3, 64, 2048), (32, 8, 128, 16384), (14, 2, 64, 600)]:
        for dtype in (torch.float16, torch.float32):
            plans = [_plan(1, Q, H, H_kv, D, S, torch.device("cpu"), dtype, None) for Q in (1, 2, 17, 65)]
            assert len({(p["num_splits"], p["split_len"], p["block_n"]) for p in plans}) == 1, plans


def test_split_counts_agree():
    # Forced split counts, including splits that are empty for some rows, all agree with one pass.
    q, k, v, cl = make_inputs(3, 5, 9, 3, 64, [5, 300, 129], 320, torch.float32, seed=2)
    ref = verify_attention_ref(q, k, v, cl)
    for ns in (1, 3, 5):
        assert_close(verify_attention(q, k, v, cl, num_splits=ns), ref, torch.float32)


def test_max_len_hint_too_small_is_still_correct():
    # max_len only sizes the splits; the last split runs to the row's length whatever the hint says.
    q, k, v, cl = make_inputs(2, 2, 8, 8, 64, [300, 41], 320, torch.float32, seed=3)
    assert_close(verify_attention(q, k, v, cl, max_len=64), verify_attention_ref(q, k, v, cl), torch.float32)


def test_strided_views_of_runtime_buffer():
    # The runtime's cache is one [L, 2, B, H_kv, S_max, D] buffer; q comes out of a fused qkv projection.
    L, B, Q, H, H_kv, D, S_max = 3, 2, 5, 9, 3, 64, 96
    g = torch.Generator().manual_seed(4)
    buf = torch.randn(L, 2, B, H_kv, S_max, D, generator=g)
    qkv = torch.randn(B, Q, (H + 2 * H_kv) * D, generator=g)
    q = qkv[:, :, : H * D].view(B, Q, H, D)  # non-contiguous over Q
    cl = torch.tensor([90, 5], dtype=torch.int32)
    k, v = buf[1, 0], buf[1, 1]  # offset views into the buffer
    assert not q.is_contiguous() and k.storage_offset() > 0
    out = verify_attention(q, k, v, cl)
    assert_close(out, verify_attention_ref(q, k.contiguous(), v.contiguous(), cl), torch.float32)
    # A view cropped along the capacity is not contiguous; the kernel follows its strides.
    kc, vc = buf[2, 0, :, :, :91], buf[2, 1, :, :, :91]
    assert not kc.is_contiguous()
    assert_close(verify_attention(q, kc, vc, cl), verify_attention_ref(q, kc.contiguous(), vc.contiguous(), cl),
                 torch.float32)
    # A cache transposed to [B, S_max, H_kv, D] storage works through its strides too.
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    vt = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert_close(verify_attention(q, kt, vt, cl), out, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_rows_past_cache_lens_are_never_read(dtype):
    B, Q, H, H_kv, D, lens, S_max = 3, 5, 14, 2, 64, [5, 77, 130], 160
    q, k, v, cl = make_inputs(B, Q, H, H_kv, D, lens, S_max, dtype, seed=5)
    clean = verify_attention(q, k, v, cl, num_splits=3)
    for b, n in enumerate(lens):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    for ns in (None, 3):
        out = verify_attention(q, k, v, cl, num_splits=ns)
        assert torch.isfinite(out).all()
        assert_close(out, verify_attention_ref(q, k, v, cl), dtype)
    assert torch.equal(verify_attention(q, k, v, cl, num_splits=3), clean)


def test_non_power_of_two_head_dim_and_custom_scale():
    q, k, v, cl = make_inputs(1, 2, 8, 8, 80, [70], 70, torch.float32, seed=6)
    out = verify_attention(q, k, v, cl, scale=0.3)
    assert_close(out, verify_attention_ref(q, k, v, cl, scale=0.3), torch.float32)


def sdpa_bottom_right(q, k, v, cache_lens, scale=None):
    """PyTorch SDPA with an explicit bottom-right causal mask, one sequence at a time."""
    B, Q, H, D = q.shape
    G = H // k.shape[1]
    out = torch.empty(B, Q, H, D)
    for b in range(B):
        n = int(cache_lens[b])
        kb = k[b, :, :n].float().repeat_interleave(G, dim=0)  # [H, n, D]
        vb = v[b, :, :n].float().repeat_interleave(G, dim=0)
        mask = torch.ones(Q, n, dtype=torch.bool).tril(diagonal=n - Q)  # row i sees keys 0 .. n - Q + i
        out[b] = torch.nn.functional.scaled_dot_product_attention(
            q[b].float().transpose(0, 1), kb, vb, attn_mask=mask, scale=scale).transpose(0, 1)
    return out


@pytest.mark.parametrize("B,Q,heads,D,lens,S_max", [(1, 1, (8, 8), 64, [9], 9), (3, 5, (9, 3), 64, [5, 40, 17], 48),
                                                    (2, 17, (14, 2), 128, [17, 60], 64)])
def test_ref_matches_sdpa(B, Q, heads, D, lens, S_max):
    q, k, v, cl = make_inputs(B, Q, *heads, D, lens, S_max, torch.float32, seed=7)
    torch.testing.assert_close(verify_attention_ref(q, k, v, cl), sdpa_bottom_right(q, k, v, cl),
                               atol=1e-5, rtol=1e-5)
    # And SDPA's own is_causal=True is the other (top-left) mask whenever Q < cache_len: not what we want.
    if Q > 1 and min(lens) > Q:
        n = lens[0]
        qb, kb, vb = q[0].transpose(0, 1), k[0, :, :n].repeat_interleave(heads[0] // heads[1], 0), None
        vb = v[0, :, :n].repeat_interleave(heads[0] // heads[1], 0)
        top_left = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True).transpose(0, 1)
        assert not torch.allclose(top_left, verify_attention_ref(q, k, v, cl)[0], atol=1e-3)


def _bad(**over):
    q, k, v, cl = make_inputs(2, 3, 8, 4, 64, [10, 20], 32, torch.float32)
    args = {"q": q, "k_cache": k, "v_cache": v, "cache_lens": cl}
    args.update(over)
    return args


BAD = [
    ("q not a tensor", lambda: _bad(q="q"), r"q must be a torch.Tensor, got str"),
    ("lens not a tensor", lambda: _bad(cache_lens=[10, 20]), r"cache_lens must be a torch.Tensor, got list"),
    ("q rank", lambda: _bad(q=torch.zeros(2, 3, 8)), r"q must be \[B, Q, H, D\], got shape \(2, 3, 8\)"),
    ("batch", lambda: _bad(q=torch.zeros(3, 3, 8, 64)), r"batch mismatch: q has B=3, k_cache has B=2"),
    ("head dim", lambda: _bad(q=torch.zeros(2, 3, 8, 32)), r"head_dim mismatch: q has D=32, k_cache has D=64"),
    ("gqa", lambda: _bad(q=torch.zeros(2, 3, 6, 64)), r"H=6 must be a positive multiple of KV heads H_kv=4"),
    ("v shape", lambda: _bad(v_cache=torch.zeros(2, 4, 16, 64)), r"v_cache shape \(2, 4, 16, 64\) != k_cache"),
    ("head dim too big", lambda: _bad(q=torch.zeros(2, 3, 8, 512), k_cache=torch.zeros(2, 4, 32, 512),
                                      v_cache=torch.zeros(2, 4, 32, 512)), r"head_dim D=512 must be in \[1, 256\]"),
    ("dtype", lambda: _bad(q=torch.zeros(2, 3, 8, 64, dtype=torch.float16)),
     r"dtype mismatch: q torch.float16, k_cache torch.float32"),
    ("float64", lambda: _bad(q=torch.zeros(2, 3, 8, 64, dtype=torch.float64)), r"q dtype torch.float64 not supp"),
    ("lens dtype", lambda: _bad(cache_lens=torch.tensor([10, 20])), r"cache_lens must be int32, got torch.int64"),
    ("lens shape", lambda: _bad(cache_lens=torch.tensor([10, 20, 30], dtype=torch.int32)),
     r"cache_lens must have shape \[B\]=\(2,\), got \(3,\)"),
    ("lens < Q", lambda: _bad(cache_lens=torch.tensor([10, 2], dtype=torch.int32)),
     r"include the Q=3 new rows, got min\(cache_lens\)=2 \(cache_lens=\[10, 2\]\)"),
    ("lens > S_max", lambda: _bad(cache_lens=torch.tensor([10, 33], dtype=torch.int32)),
     r"exceed the capacity S_max=32: max\(cache_lens\)=33"),
    ("Q > S_max", lambda: _bad(q=torch.zeros(2, 40, 8, 64)), r"Q=40 new rows do not fit a cache of capacity S_max=32"),
]


@pytest.mark.parametrize("make,match", [(m, r) for _, m, r in BAD], ids=[n for n, _, _ in BAD])
@pytest.mark.parametrize("fn", [verify_attention, verify_attention_ref], ids=["kernel", "ref"])
def test_bad_inputs_raise(fn, make, match):
    with pytest.raises(ValueError, match=match):
        fn(**make())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_matches_ref(dtype):
    B, Q, H, H_kv, D, lens, S_max = 3, 17, 32, 8, 128, [17, 1000, 4097], 4200
    q, k, v, cl = (t.cuda() for t in make_inputs(B, Q, H, H_kv, D, lens, S_max, dtype))
    tol = {"atol": 1e-2, "rtol": 1e-2} if dtype == torch.bfloat16 else TOL[dtype]
    torch.testing.assert_close(verify_attention(q, k, v, cl).float(), verify_attention_ref(q, k, v, cl).float(),
                               **tol)
