"""specedit.kernels.cpu.linear: the packed small-M CPU matmul.

Floats are compared with the float64 product of the same stored weights (rounded to the dtype): the kernel's
only error is float32 accumulation over K, bounded by
~K * 2^-24 * sum_k |x_k w_k| (tolerance: that bound x 4, per element). Against the original float32
weight the tolerance adds the storage rounding (2^-8 for bfloat16, 2^-11 for float16). Row invariance is
checked bit for bit: row i of an M-row call must equal the 1-row call on that row, whatever M, so a verify
pass cannot flip a near-tie that plain decoding would not. (int8 weights are GGUF Q8_0 blocks with their own
tests: test_cpu_int8.py.) The first test in a fresh cache compiles the extension (~20-40 s on 2 cores).
"""

import threading

import pytest
import torch

from helpers import NEEDS_CPU_KERNELS, isas
from specedit.kernels.cpu import build
from specedit.kernels.cpu.linear import PackedLinear, linear_ref, pack_weight, stored_weight

pytestmark = NEEDS_CPU_KERNELS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STORAGE_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # relative per weight
SMOL = {  # SmolLM2-135M: fused qkv, o_proj, fused gate_up, down, tied lm_head
    "qkv": (960, 576),
    "o_proj": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
    "lm_head": (49152, 576),
}


@pytest.fixture(scope="module", autouse=True)
def threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)



def data(n, k, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / k**0.5, torch.randn(m, k, generator=g)


def assert_close_to_ref(y, x, w, dtype, bias=None):
    k = x.shape[-1]
    ref = linear_ref(x, w, dtype, bias).double()
    bound = (x.double().abs() @ stored_weight(w, dtype).abs().T) * k * 2.0**-24 * 4 + 1e-30
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, worst ratio {(err / bound).max().item():.2f}"
    # and against the original float32 weight, with the storage rounding added
    accumulation = (x.double().abs() @ w.double().abs().T) * k * 2.0**-24 * 4
    scale = (x.double().abs() @ w.double().abs().T) * STORAGE_EPS[dtype] * 4 + accumulation
    full = x.double() @ w.double().T + (0 if bias is None else bias.double())
    assert ((y.double() - full).abs() <= scale + 1e-30).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 5, 17, 33, 64])
@pytest.mark.parametrize("n,k", [(111, 72), (32, 64), (1, 8), (40, 5), (576, 1536)])
def test_matches_reference(n, k, m, dtype):
    w, x = data(n, k, m)
    p = PackedLinear(w, None, dtype)
    for isa in isas():
        y = p(x, isa=isa)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert_close_to_ref(y, x, w, dtype)


def fma_chain(x, w, dtype):
    """What the kernel promises to compute: acc = fma(x[:, k], w[:, k], acc) for k = 0..K-1 in float32.
    Emulated in float64 (the product of two
    float32 is exact there; the sum is rounded twice, which can differ from one fma in ~2^-29 of cases: none
    for these seeds)."""
    wq, xd = w.to(dtype).double(), x.double()
    acc = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32)
    for k in range(x.shape[1]):
        acc = (xd[:, k : k + 1] * wq[:, k] + acc.double()).float()
    return acc


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 13, 40])
def test_is_exactly_the_fma_chain(m, dtype):
    """Bit for bit the sequential fp32 FMA chain over k: this pins the summation order, so every tiling,
    thread split and instruction set must agree with it and with each other."""
    w, x = data(111, 72, m, seed=3)
    p = PackedLinear(w, None, dtype)
    ref = fma_chain(x, w, dtype)
    for isa in isas():
        assert torch.equal(p(x, isa=isa), ref), isa


@pytest.mark.parametrize("dtype", DTYPES)
def test_smollm2_shapes(dtype):
    for n, k in SMOL.values():
        w, x = data(n, k, 33)
        assert_close_to_ref(PackedLinear(w, None, dtype)(x), x, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SMOL))
def test_row_invariance_bitwise(name, dtype):
    """Row i of linear(x[:M]) == linear(x[i:i+1]) bit for bit, for every M in 1..65, and the same bits
    from the AVX2 and AVX-512 paths and from 1 and 2 threads."""
    n, k = SMOL[name]
    if name == "lm_head":
        n = 4099  # the full 49152 adds nothing but time: same K, same code, one more partial group
    w, x = data(n, k, 65, seed=1)
    p = PackedLinear(w, None, dtype)
    singles = torch.cat([p(x[i : i + 1]) for i in range(65)])
    for isa in isas():
        assert torch.equal(torch.cat([p(x[i : i + 1], isa=isa) for i in range(65)]), singles), isa
        for m in range(1, 66):
            y = p(x[:m], isa=isa)
            bad = (y != singles[:m]).any(1).nonzero().flatten().tolist()
            assert not bad, f"{isa} M={m}: rows {bad} differ from the 1-row calls"
    torch.set_num_threads(1)
    try:
        assert torch.equal(p(x), singles), "1 thread"
    finally:
        torch.set_num_threads(2)
    off_main = []  # another thread: the extension's own workers (csrc/pool.h) instead of libgomp's team
    t = threading.Thread(target=lambda: off_main.append(p(x)))
    t.start()
    t.join()
    assert torch.equal(off_main[0], singles), "off the main thread"


def test_row_invariance_full_lm_head():
    w, x = data(49152, 576, 33, seed=2)
    p = PackedLinear(w, None, torch.float16)
    y = p(x)
    for i in (0, 1, 16, 32):
        assert torch.equal(y[i], p(x[i : i + 1])[0])


def test_leading_dims_bias_and_noncontiguous():
    w, x = data(111, 72, 30)
    b = torch.randn(111)
    p = PackedLinear(w, b, torch.bfloat16)
    y = p(x.view(2, 3, 5, 72))
    assert y.shape == (2, 3, 5, 111)
    assert torch.equal(y.view(30, 111), p(x))
    assert_close_to_ref(p(x), x, w, torch.bfloat16, b)
    xt = torch.randn(72, 30).T  # non-contiguous rows
    assert torch.equal(p(xt), p(xt.contiguous()))
    lin = torch.nn.Linear(72, 111)
    q = PackedLinear(lin.weight, lin.bias, torch.float32)
    assert_close_to_ref(q(x), x, lin.weight.detach(), torch.float32, lin.bias.detach())


def test_int8_weights_are_q8_0_blocks():
    """A float weight in int8 is gguf's Q8_0 quantization of it, multiplied by the int8 kernel."""
    import gguf
    import numpy as np

    from specedit.kernels.cpu.linear import linear_int8_ref, quantize_q8_0

    w, x = data(40, 64, 5)
    raw = quantize_q8_0(w)
    assert torch.equal(raw, torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)))
    p = PackedLinear.from_parts([("q8_0", raw)], 64, compute="int8")
    assert p.weight_bytes == 40 * 2 * 34 and p.compute == "int8"
    assert np.array_equal(p(x).numpy(), linear_int8_ref(x.numpy(), raw.numpy(), "q8_0"))
    with pytest.raises(ValueError, match="32 input features, but the weight has 72"):
        quantize_q8_0(torch.randn(4, 72))
    with pytest.raises(ValueError, match="finite"):
        quantize_q8_0(torch.full((4, 32), float("nan")))


def test_empty_and_zero_k():
    w, x = data(111, 72, 1)
    p = PackedLinear(w, None, torch.float16)
    assert p(x[:0]).shape == (0, 111)
    z = PackedLinear(torch.zeros(7, 0), None, torch.float32)
    assert torch.equal(z(torch.zeros(3, 0)), torch.zeros(3, 7))


def test_errors_name_the_problem():
    w, x = data(111, 72, 2)
    p = PackedLinear(w, None, torch.float16)
    with pytest.raises(ValueError, match=r"\[\.\.\., 72\]"):
        p(torch.randn(2, 3, 71))
    with pytest.raises(ValueError, match="float32"):
        p(x.double())
    with pytest.raises(ValueError, match=r"\[M, 72\]"):
        p(torch.randn(2, 71))
    with pytest.raises(ValueError, match="float32, float16, bfloat16, q8_0"):
        PackedLinear(w, None, torch.int32)
    with pytest.raises(ValueError, match="float32, float16, bfloat16, q8_0"):
        pack_weight(w, torch.int8)
    with pytest.raises(ValueError, match="isa"):
        p(x, isa="sse")
    with pytest.raises(ValueError, match=r"weight must be a \[N, K\] tensor, got list"):
        PackedLinear(w.tolist())
    with pytest.raises(ValueError, match=r"x must be a \[\.\.\., 72\] tensor, got list"):
        p(x.tolist())
    with pytest.raises(ValueError, match="overflows float16"):
        PackedLinear(torch.full((4, 4), 70000.0), None, torch.float16)


def test_available_never_raises(monkeypatch):
    monkeypatch.setattr(build, "_cpu_flags", lambda: (_ for _ in ()).throw(OSError("no /proc")))
    assert build.available() is False
