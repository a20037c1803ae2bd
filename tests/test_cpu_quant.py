"""GGUF block formats on the CPU kernels: exact, not approximate.

For every supported type, a weight made of GGUF blocks (quantized by gguf itself for Q8_0 and Q4_0..Q5_1; for
the K-quants, which gguf cannot quantize, random bytes with sane float16 scales: its dequantizer is the
reference) must give, bit for bit:
  - embedding rows (dequant_cols) equal to gguf.quants.dequantize;
  - y = x @ W^T equal to the float32 kernel on gguf's dequantized W, for any row count, AVX2 and AVX-512 alike;
  - row i of an M-row call equal to the 1-row call (row invariance).
"""

import gguf
import numpy as np
import pytest
import torch

from helpers import NEEDS_CPU_KERNELS, isas
from specedit.kernels.cpu.linear import GGUF_FORMATS, GGUFEmbedding, PackedLinear

pytestmark = NEEDS_CPU_KERNELS

Q = gguf.GGMLQuantizationType
F16_AT = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q4_k": (0, 2),
          "q5_k": (0, 2), "q6_k": (208,)}  # byte offsets of the float16 scales / mins in a block



def gguf_blocks(fmt: str, n: int, k: int, seed: int = 0, scale_exp: int = -12) -> np.ndarray:
    """uint8 [n, row bytes]: a GGUF weight [n, k] in `fmt` (K-quants: float16 scales in [1, 64) x 2^scale_exp)."""
    qtype = Q[fmt.upper()]
    rng = np.random.default_rng(seed)
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        w = (rng.standard_normal((n, k)) / k**0.5).astype(np.float32)
        w[:, :32] += 0.3  # a block with an offset, so mins are not ~0
        return gguf.quants.quantize(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for at in F16_AT[fmt]:  # scales in [2^-12, 2^-6): finite, normal, varied
        scale = (rng.uniform(1, 64, (n, k // block)) * 2.0**scale_exp).astype(np.float16)
        raw[:, :, at : at + 2] = scale.view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


def dequantized(raw: np.ndarray, fmt: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, Q[fmt.upper()]).copy())


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_rows_equal_gguf_dequantize(fmt):
    n, k = 45, 512  # a partial group of columns; two K-quant super-blocks
    raw = gguf_blocks(fmt, n, k)
    emb = GGUFEmbedding(torch.from_numpy(raw), fmt, k)
    ids = torch.tensor([[0, 44, 31, 32], [7, 7, 40, 1]])
    got = emb(ids)
    want = dequantized(raw, fmt)[ids]
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_linear_equals_float32_kernel_on_dequantized(fmt):
    n, k = 77, 768
    raw = gguf_blocks(fmt, n, k, seed=1)
    w = dequantized(raw, fmt)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2))
    q = PackedLinear.from_parts([(fmt, torch.from_numpy(raw))], k, bias)
    ref = PackedLinear(w, bias, torch.float32)
    x = torch.randn(65, k, generator=torch.Generator().manual_seed(3))
    one = [q(x[i : i + 1], isa="avx2") for i in range(3)]
    for isa in isas():
        for m in (1, 2, 5, 13, 65):
            y = q(x[:m], isa=isa)
            assert torch.equal(y, ref(x[:m], isa=isa)), (isa, m)
            for i in range(min(m, 3)):
                assert torch.equal(y[i : i + 1], one[i]), (isa, m, i)  # row invariant, and AVX2 == AVX-512
    y64 = (x.double() @ w.double().T + bias.double()).float()  # sanity: it is the product at all
    torch.testing.assert_close(q(x), y64, rtol=1e-3, atol=1e-3)


def test_mixed_parts_and_float_parts():
    """A fused q/k/v whose GGUF tensors differ in type: one part each, columns in order."""
    k = 256
    parts = [("q4_k", gguf_blocks("q4_k", 40, k)), ("q6_k", gguf_blocks("q6_k", 24, k, 1)),
             ("q8_0", gguf_blocks("q8_0", 33, k, 2))]
    w = torch.cat([dequantized(raw, fmt) for fmt, raw in parts])
    f16 = torch.randn(8, k).half()
    q = PackedLinear.from_parts([(f, torch.from_numpy(r)) for f, r in parts], k)
    x = torch.randn(9, k)
    for isa in isas():
        assert torch.equal(q(x, isa=isa), PackedLinear(w, None, torch.float32)(x, isa=isa))
    both = PackedLinear.from_parts([("q8_0", torch.from_numpy(parts[2][1])), ("float16", f16)], k)
    ref = PackedLinear(torch.cat([dequantized(parts[2][1], "q8_0"), f16.float()]), None, torch.float32)
    assert torch.equal(both(x), ref(x))
    assert q.out_features == 97 and both.out_features == 41


def test_bad_parts():
    with pytest.raises(ValueError, match="block size 256"):
        PackedLinear.from_parts([("q4_k", torch.zeros(4, 144, dtype=torch.uint8))], 128)
    with pytest.raises(ValueError, match="format"):
        PackedLinear.from_parts([("q2_k", torch.zeros(4, 84, dtype=torch.uint8))], 256)
