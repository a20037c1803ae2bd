"""specedit.kernels.cpu.attention: the row-invariant CPU attention over the KV cache.

Floats are compared with the float64 reference attention_ref at atol = rtol = 1e-5 (the kernel's error is
float32 rounding of D-term dot products, ~256-key sums and a ~2 ulp exp2: ~1e-6 on these inputs). Row
invariance is checked bit for bit: row i of a T-row call must equal the 1-row call at that position, for
every T, with 1 and 2 threads, on AVX2 and AVX-512, so that a verify pass cannot flip a near-tie that plain
decoding would not (the lossless invariant in DESIGN.md). The first test in a fresh cache compiles the
extension shared with the packed linear (~15 s on 2 cores).
"""

import threading

import pytest
import torch

from helpers import NEEDS_CPU_KERNELS, isas
from specedit.kernels.cpu.attention import attention, attention_ref

pytestmark = NEEDS_CPU_KERNELS

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)



def cache(B, H_kv, S_max, D, lengths, seed=0, layers=3, layer=1, fill=float("nan")):
    """k, v: views [B, H_kv, S_max, D] of a KVCache-like buffer [L, 2, B, H_kv, S_max, D]; slots past
    each row's length hold `fill` (NaN: must never be read)."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(layers, 2, B, H_kv, S_max, D, generator=g)
    for b, n in enumerate(lengths):
        buf[:, :, b, :, n:] = fill
    return buf, buf[layer, 0], buf[layer, 1]


def queries(B, T, H, D, seed=1):
    # scaled so that softmaxes are peaked enough for the reduction order to matter in the last bits
    return torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(seed)) * 2.0


@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,H_kv", [(9, 3), (8, 8), (14, 2)])
@pytest.mark.parametrize("T", [1, 2, 5, 17, 65])
@pytest.mark.parametrize("B", [1, 3])
def test_matches_reference(B, T, H, H_kv, D, window):
    lengths = [T + 300] if B == 1 else [T, T + 257, T + 530]  # ragged, across key blocks of 256
    S_max = max(lengths) + 5
    _, k, v = cache(B, H_kv, S_max, D, lengths)
    q = queries(B, T, H, D)
    scale = D**-0.5
    ref = attention_ref(q, k, v, lengths, scale, window)
    outs = [attention(q, k, v, lengths, scale, window, isa=isa) for isa in isas()]
    for out in outs:
        assert out.shape == (B, T, H, D) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, **TOL)
    assert all(torch.equal(o, outs[0]) for o in outs), "AVX2 and AVX-512 differ"


def singles(q_all, k, v, lengths_all, scale, window, isa=None):
    """The 1-row call at every position: out[b, p] = attention(q_all[b, p], prefix 0..p)."""
    B, N, H, D = q_all.shape
    out = torch.full((B, N, H, D), float("nan"))
    for b in range(B):
        for p in range(lengths_all[b]):
            out[b, p] = attention(
                q_all[b : b + 1, p : p + 1], k[b : b + 1], v[b : b + 1], [p + 1], scale, window, isa=isa
            )[0, 0]
    return out


@pytest.mark.parametrize("window", [None, 200])
@pytest.mark.parametrize("H,H_kv,D", [(9, 3, 64), (8, 8, 64), (14, 2, 128)])
def test_row_invariance_bitwise(H, H_kv, D, window):
    """Every row of every T-row call (T = 1..65, ending just before, at and after key-block boundaries,
    two ragged sequences) equals the 1-row call at its position, bit for bit; on every ISA (which must
    also agree with each other) and with 1 and 2 threads."""
    ends = [[70, 255, 256, 257, 300, 513, 700], [66, 256, 400, 512, 514, 640, 700]]  # lengths after the call
    N = 700
    _, k, v = cache(2, H_kv, N + 3, D, [N, N], seed=2)
    q_all = queries(2, N, H, D, seed=3)
    scale = D**-0.5
    ref = None
    for isa in isas():
        one = singles(q_all, k, v, [N, N], scale, window, isa=isa)
        if ref is None:
            ref = one
        assert torch.equal(one, ref), f"1-row calls differ between ISAs ({isa})"
        for nthreads in (2, 1):
            torch.set_num_threads(nthreads)
            try:
                for T in (1, 2, 5, 17, 33, 65):
                    for i in range(len(ends[0])):
                        lengths = [max(T, ends[0][i]), max(T, ends[1][i])]
                        q = torch.stack([q_all[b, n - T : n] for b, n in enumerate(lengths)])
                        out = attention(q, k, v, lengths, scale, window, isa=isa)
                        for b, n in enumerate(lengths):
                            bad = (out[b] != ref[b, n - T : n]).flatten(1).any(1).nonzero().flatten().tolist()
                            assert not bad, f"{isa}, {nthreads} threads, T={T}, length {n}: rows {bad} differ"
            finally:
                torch.set_num_threads(2)


def test_threads_bitwise_long_context():
    """A long decode step and a verify pass (many work items, so 2 threads really split them) give the same
    bits with 1 and 2 threads, and the verify rows equal the decode steps."""
    lengths = [3000, 1800]
    _, k, v = cache(2, 3, 3008, 64, lengths, seed=4)
    q = queries(2, 33, 9, 64, seed=5)
    outs = []
    for nthreads in (2, 1):
        torch.set_num_threads(nthreads)
        try:
            outs.append(attention(q, k, v, lengths, 0.125))
        finally:
            torch.set_num_threads(2)
    assert torch.equal(outs[0], outs[1])
    # off the main thread the work goes to the extension's own workers (csrc/pool.h), not libgomp's team
    assert torch.equal(outs[0], on_thread(lambda: attention(q, k, v, lengths, 0.125)))
    for b, n in enumerate(lengths):
        for i in (0, 16, 32):
            one = attention(q[b : b + 1, i : i + 1], k[b : b + 1], v[b : b + 1], [n - 33 + i + 1], 0.125)
            assert torch.equal(one[0, 0], outs[0][b, i])
    torch.testing.assert_close(outs[0], attention_ref(q, k, v, lengths, 0.125), **TOL)


def on_thread(fn):
    """fn() run on a new thread (as the server's scheduler thread runs forwards)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_strided_cache_views_ignore_slots_past_lengths():
    """k/v are views of the [L, 2, B, H_kv, S_max, D] buffer (not copied); what sits past the lengths (NaN
    here, zeros there) changes nothing, and other layers are not read."""
    lengths = [40, 300, 17]
    T = 17
    buf, k, v = cache(3, 3, 320, 64, lengths, fill=float("nan"))
    assert k.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    q = queries(3, T, 9, 64)
    out = attention(q, k, v, lengths, 0.125)
    assert not out.isnan().any()
    # rows of the cache padded (stride 80 for D = 64) and a batch row skipped: any strides but d's
    padded = torch.full((2, 6, 3, 320, 80), float("nan"))
    padded[:, ::2, :, :, :64] = torch.stack([k, v])
    kp, vp = padded[0, ::2, :, :, :64], padded[1, ::2, :, :, :64]
    assert not kp.is_contiguous() and kp.stride() == (2 * 3 * 320 * 80, 320 * 80, 80, 1)
    assert torch.equal(attention(q, kp, vp, lengths, 0.125), out)
    clean = buf.clone()
    for b, n in enumerate(lengths):
        clean[:, :, b, :, n:] = 0.0
    clean[0] = float("nan")  # another layer
    clean[2] = float("inf")
    assert torch.equal(attention(q, clean[1, 0], clean[1, 1], lengths, 0.125), out)
    torch.testing.assert_close(out, attention_ref(q, k, v, lengths, 0.125), **TOL)


def test_noncontiguous_q():
    _, k, v = cache(2, 3, 100, 64, [90, 50])
    q = queries(2, 9, 5, 64).permute(0, 2, 1, 3)  # [2, 5, 9, 64] viewed as [B=2, T=5, H=9, D=64]
    assert not q.is_contiguous()
    ref = attention(q.contiguous(), k, v, [90, 50], 0.125)
    assert torch.equal(attention(q, k, v, [90, 50], 0.125), ref)
    qd = torch.randn(2, 5, 9, 128)[..., ::2]  # D not contiguous: copied
    ref = attention_ref(qd, k, v, [90, 50], 0.125)
    torch.testing.assert_close(attention(qd, k, v, [90, 50], 0.125), ref, **TOL)


def test_flush_denormal_setting_does_not_matter():
    """The kernel fixes its own floating-point mode: a caller's torch.set_flush_denormal(True) applies to
    one thread only and must not change bits (values here make subnormal products)."""
    _, k, v = cache(1, 3, 600, 64, [600])
    v = v * 1e-37
    q = queries(1, 3, 9, 64)
    out = attention(q, k, v, [600], 0.125)
    if not torch.set_flush_denormal(True):
        pytest.skip("flush-denormal not supported here")
    try:
        assert torch.equal(attention(q, k, v, [600], 0.125), out)
    finally:
        torch.set_flush_denormal(False)


def test_window_larger_than_context_is_plain_causal():
    _, k, v = cache(1, 3, 300, 64, [300])
    q = queries(1, 5, 9, 64)
    assert torch.equal(
        attention(q, k, v, [300], 0.125, window=300), attention(q, k, v, [300], 0.125)
    )


def test_bad_inputs_raise_value_error():
    _, k, v = cache(2, 3, 64, 64, [64, 64])
    q = queries(2, 4, 9, 64)
    ok = dict(q=q, k_cache=k, v_cache=v, lengths=[10, 64], scale=0.125)
    attention(**ok)
    cases = [
        (dict(q=q.double()), "float32"),
        (dict(q=q.to("meta")), "CPU"),
        (dict(q=q[..., :48]), "do not match"),
        (dict(q=q[:1]), "do not match"),
        (dict(q=queries(2, 4, 8, 64)), "not a multiple"),
        (dict(k_cache=k[..., :40], v_cache=v[..., :40], q=q[..., :40].contiguous()), "multiple of 16"),
        (dict(k_cache=k.transpose(2, 3)), "contiguous in D"),
        (dict(k_cache=k.transpose(2, 3), v_cache=v.transpose(2, 3)), "contiguous in D"),
        (dict(q=q.transpose(0, 1)), "do not match"),
        (dict(v_cache=v[:, :2]), "v_cache"),
        (dict(lengths=[10]), "2 ints"),
        (dict(lengths=[10, 65]), "S_max=64"),
        (dict(lengths=[3, 10]), "T=4"),
        (dict(lengths=[10, 12.5]), "int"),
        (dict(lengths=torch.tensor([10, 12])), "lengths"),
        (dict(scale=0.0), "scale"),
        (dict(scale=float("nan")), "scale"),
        (dict(window=0), "window"),
        (dict(window=2.5), "window"),
        (dict(isa="sse"), "isa"),
        (dict(q="q"), "tensor"),
    ]
    for change, words in cases:
        with pytest.raises(ValueError, match=words):
            attention(**{**ok, **change})


def test_empty_rows():
    _, k, v = cache(1, 3, 16, 64, [16])
    out = attention(torch.empty(1, 0, 9, 64), k, v, [16], 0.125)
    assert out.shape == (1, 0, 9, 64)


def test_long_call_in_row_chunks_is_row_invariant():
    """A prefill-sized call (partials over 32 MB: done in chunks of rows) gives the bits of smaller calls."""
    n, T = 2048, 2048
    _, k, v = cache(1, 3, n, 64, [n], seed=6)
    q = queries(1, T, 9, 64, seed=7)
    out = attention(q, k, v, [n], 0.125)
    assert torch.equal(out[:, :700], attention(q[:, :700], k, v, [700], 0.125))
    assert torch.equal(out[:, 1900:], attention(q[:, 1900:], k, v, [n], 0.125))
    for p in (0, 1765, 2047):
        assert torch.equal(out[0, p], attention(q[:, p : p + 1], k, v, [p + 1], 0.125)[0, 0])
    ref = attention_ref(q[:, 1700:1800], k, v, [1800], 0.125)
    torch.testing.assert_close(out[:, 1700:1800], ref, **TOL)
