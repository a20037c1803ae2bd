"""compute="int8": GGUF blocks times activation rows quantized to int8, integer sums, fixed-order float steps.

Not an approximation to check with a tolerance: the kernels must give, bit for bit, `linear_int8_ref` (the same
integer and float32 arithmetic in numpy) for every format, odd N, K of one or several blocks, every row count
M = 1..65 and both instruction sets; so a row's bits never depend on M or the ISA. The reference's own unpacking
of GGUF blocks is checked against gguf's dequantizer, and the int8 layout against it through embedding rows.
"""

import numpy as np
import pytest
import torch

from helpers import NEEDS_CPU_KERNELS, isas
from specedit.kernels.cpu.linear import (GGUF_FORMATS, GGUFEmbedding, PackedLinear, gguf_unpack, linear_int8_ref,
                                         quantize_rows_ref)

from test_cpu_quant import dequantized, gguf_blocks

pytestmark = NEEDS_CPU_KERNELS

SHAPES = {32: [(45, 96), (1, 32), (33, 64)], 256: [(45, 256), (7, 512)]}  # (N, K) per block size


def block(fmt):
    return 256 if fmt.endswith("_k") else 32


def activations(m, k, seed):
    """[m, k] float32 with awkward rows: all zeros, one nonzero, a large outlier, exact rounding ties."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[1 % m] = 0
    if m > 2:
        x[2] = 0
        x[2, 5] = -3.0
    if m > 3:
        x[3, 7] *= 1000
    if m > 4:  # block max 127: x * (1 / 1) is exact, so .5 values are ties (to even)
        x[4, :32] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5] + [0.25] * 25)
    return x


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_reference_unpacks_like_gguf(fmt):
    """s * q (+ m, - o) with gguf's roundings is gguf's dequantized weight: the reference reads the blocks right."""
    n, k = 45, 512
    raw = gguf_blocks(fmt, n, k, seed=5)
    q, s, o, sub = gguf_unpack(raw, fmt, k)
    qf = q.reshape(n, k // sub, sub).astype(np.float32)
    w = (s[..., None] * qf).astype(np.float32)
    if o is not None:
        w = w + o[..., None] if fmt in ("q4_1", "q5_1") else w - o[..., None]
    assert np.array_equal(w.reshape(n, k), dequantized(raw, fmt).numpy())


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_int8_layout_rows_equal_gguf_dequantize(fmt):
    n, k = 45, 2 * block(fmt)
    raw = gguf_blocks(fmt, n, k, seed=6)
    emb = GGUFEmbedding(torch.from_numpy(raw), fmt, k, compute="int8")
    assert torch.equal(emb(torch.arange(n)), dequantized(raw, fmt))


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_int8_linear_equals_reference_bit_for_bit(fmt):
    for i, (n, k) in enumerate(SHAPES[block(fmt)]):
        raw = gguf_blocks(fmt, n, k, seed=10 + i)
        lin = PackedLinear.from_parts([(fmt, torch.from_numpy(raw))], k, compute="int8")
        x = activations(65, k, seed=i)
        ref = torch.from_numpy(linear_int8_ref(x.numpy(), raw, fmt))
        for isa in isas():
            for m in range(1, 66):  # every row count: tiles of 1..IRMAX rows, remainders
                y = lin(x[:m], isa=isa)
                assert torch.equal(y, ref[:m]), (fmt, n, k, isa, m, (y - ref[:m]).abs().max().item())


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_int8_is_close_to_exact(fmt):
    """Sanity, not the contract: int8 activations move outputs by about 1% of their scale."""
    n, k = 40, 2 * block(fmt)
    raw = gguf_blocks(fmt, n, k, seed=7)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(8))
    exact = x.double() @ dequantized(raw, fmt).double().T
    y = PackedLinear.from_parts([(fmt, torch.from_numpy(raw))], k, compute="int8")(x)
    assert (y.double() - exact).abs().max() < 0.03 * exact.abs().max()


def test_mixed_parts_and_bias():
    """A fused linear (Q4_1, Q6_K and float16 parts, like a Q4_K_M file's q/k/v): the GGUF parts are the int8
    reference, the float part the float kernel's float32 math; the bias is added after."""
    k = 256
    raws = {"q4_1": gguf_blocks("q4_1", 40, k, seed=1), "q6_k": gguf_blocks("q6_k", 9, k, seed=2)}
    wf = torch.randn(5, k, generator=torch.Generator().manual_seed(3)) / 16
    bias = torch.randn(54, generator=torch.Generator().manual_seed(4))
    parts = [("q4_1", torch.from_numpy(raws["q4_1"])), ("float16", wf), ("q6_k", torch.from_numpy(raws["q6_k"]))]
    lin = PackedLinear.from_parts(parts, k, bias, compute="int8")
    x = activations(11, k, seed=5)
    want = torch.cat([
        torch.from_numpy(linear_int8_ref(x.numpy(), raws["q4_1"], "q4_1")),
        PackedLinear(wf, None, torch.float16)(x),
        torch.from_numpy(linear_int8_ref(x.numpy(), raws["q6_k"], "q6_k")),
    ], 1) + bias
    for isa in isas():
        assert torch.equal(lin(x, isa=isa), want), isa


def test_row_quantization():
    x = activations(6, 64, seed=9).numpy()
    q, d = quantize_rows_ref(x)
    assert q.dtype == np.int8 and d.shape == (6, 2) and np.abs(q).max() == 127
    assert (d[1] == 0).all() and (q[1] == 0).all()  # an all-zero row
    assert list(q[4, :7]) == [127, 0, 2, 2, 0, -2, -2]  # ties to even
    back = q.reshape(6, 2, 32) * d[..., None]
    assert np.abs(back.reshape(6, 64) - x).max() <= d.max() / 2 * 1.0001


def test_bad_compute():
    raw = torch.from_numpy(gguf_blocks("q4_0", 4, 32))
    with pytest.raises(ValueError, match="compute must be one of 'exact', 'int8', got 'int4'"):
        PackedLinear.from_parts([("q4_0", raw)], 32, compute="int4")
