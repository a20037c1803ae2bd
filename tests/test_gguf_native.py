"""GGUF files run as stored on the CPU kernels (specedit.load of a .gguf, dtype 'auto').

Tiny GGUFs written with gguf's writer, every supported type (gguf quantizes Q8_0 and Q4_0..Q5_1 itself; the
K-quants, which it cannot quantize, are random blocks with sane scales: its dequantizer is the reference), and
mixed files like llama.cpp's Q4_K_M, for llama (permuted Q/K rows), qwen2 (qkv bias) and qwen3 (q/k norms).
The native engine's logits must equal, bit for bit, those of the float32 engine on the same file dequantized
by gguf (specedit.gguf.convert), and its verify rows must equal its 1-row decode steps.
"""

import gguf
import numpy as np
import pytest
import torch

import specedit
from helpers import NEEDS_CPU_KERNELS, verify_and_steps
from specedit.kernels.cpu import build
from test_cpu_quant import gguf_blocks
from test_gguf import tiny_model, tiny_tokens, write_gguf

pytestmark = NEEDS_CPU_KERNELS
Q = gguf.GGMLQuantizationType
IDS = [1, 40, 75, 80, 259, 5, 100, 200, 262, 3, 7, 9, 11, 13]
K_QUANTS = ("q4_k", "q5_k", "q6_k")


def model_for(arch, fmts, tied):
    """A tiny model whose every K is a multiple of the largest block (256 when a K-quant is used)."""
    if not any(f in K_QUANTS for f in fmts):
        return tiny_model(arch, tied)
    kw = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    if arch == "qwen3":
        kw.update(num_attention_heads=8, num_key_value_heads=4, head_dim=32)  # o_proj K = 8 x 32 = 256
    return tiny_model(arch, tied, **kw)


def blocks_by(pick):
    """write_gguf's blocks(): the GGUF type `pick(name)` for each 2-D tensor."""
    def blocks(name, a):
        fmt = pick(name)
        qtype = Q[fmt.upper()]
        if fmt in K_QUANTS:  # random blocks; small scales keep activations tame
            seed = sum(map(ord, name))
            raw = gguf_blocks(fmt, a.shape[0], a.shape[1], seed=seed, scale_exp=-16)
            return raw, qtype
        if fmt == "f16":
            return a.astype(np.float16), Q.F16
        return gguf.quants.quantize(a.astype(np.float32), qtype), qtype
    return blocks


def write(tmp_path, arch, pick, tied=True, fmts=()):
    model = model_for(arch, fmts, tied)
    return write_gguf(tmp_path / f"{arch}.gguf", model, arch, blocks=blocks_by(pick), add_bos=arch == "llama")


def assert_native_exact(path):
    native = specedit.load(path)
    assert native.model.decoder is not None and native.path == path
    ref = specedit.load(path, dtype="float32")  # gguf's dequantize -> float32 HF dir -> float32 engine
    a, b = native.logits(IDS), ref.logits(IDS)
    assert torch.isfinite(b).all() and b.abs().max() > 0
    assert torch.equal(a, b), f"max |diff| {(a - b).abs().max().item():.3g}"
    batched, single = verify_and_steps(native, IDS[:5], IDS[5:])
    assert torch.equal(batched, single)
    assert native.generate(IDS, max_new_tokens=8).token_ids == ref.generate(IDS, max_new_tokens=8).token_ids
    return native


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    build.load()  # from the real cache, before $SPECEDIT_CACHE moves
    monkeypatch.setenv("SPECEDIT_CACHE", str(tmp_path / "cache"))


TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "f16", "bf16"]
ARCH_OF = {t: ("llama", "qwen2", "qwen3")[i % 3] for i, t in enumerate(TYPES)}


@pytest.mark.parametrize("fmt", TYPES)
def test_every_type_exact(tmp_path, fmt):
    arch = ARCH_OF[fmt]
    assert_native_exact(write(tmp_path, arch, lambda name: fmt, tied=fmt != "q4_1", fmts=(fmt,)))


# llama.cpp's Q4_K_M: mostly Q4_K, attn_v and ffn_down in Q6_K; here also Q5_K, Q8_0 and F16 parts in one file
MIXED = {"attn_v": "q6_k", "ffn_down": "q6_k", "attn_output": "q5_k", "ffn_up": "q8_0", "token_embd": "q8_0",
         "output": "q6_k", "attn_k": "f16"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_mixed_types_exact(tmp_path, arch):
    def pick(name):
        return next((f for key, f in MIXED.items() if f".{key}." in f".{name}"), "q4_k")

    eng = assert_native_exact(write(tmp_path, arch, pick, tied=False, fmts=("q4_k",)))
    vocab = tiny_tokens()  # the tokenizer comes from the GGUF's metadata
    assert eng.tokenizer is not None and eng.encode(" the cat") == [vocab.index("Ġthe"), vocab.index("Ġcat")]
    assert eng.model.layers[0].attn.wqkv.weight_dtype == "float16+q4_k+q6_k"


def test_tokenizer_cached_by_size_and_mtime(tmp_path):
    path = write(tmp_path, "llama", lambda name: "q8_0")
    specedit.load(path)
    cached = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("llama-")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tokenizers"]  # no converted model
    specedit.load(path)
    assert list((tmp_path / "cache" / "tokenizers").iterdir()) == cached


def test_unsupported_type_names_tensor(tmp_path):
    def blocks(name, a):
        if name == "blk.1.ffn_up.weight":
            return np.zeros((a.shape[0], a.shape[1] // 256 * 84), np.uint8), Q.Q2_K
        return None

    model = model_for("llama", ("q4_k",), True)
    path = write_gguf(tmp_path / "q2.gguf", model, "llama", blocks=blocks)
    with pytest.raises(ValueError, match=r"q2\.gguf: tensor blk\.1\.ffn_up\.weight has type Q2_K.*dtype='float32'"):
        specedit.load(path)
    assert specedit.load(path, dtype="float32").logits(IDS).shape == (len(IDS), 268)


def test_other_backends_dequantize(tmp_path):
    path = write(tmp_path, "qwen2", lambda name: "q4_0")
    with pytest.warns(UserWarning, match="backend 'torch'"):
        eng = specedit.load(path, cpu_kernels=False)
    assert eng.model.decoder is None and eng.path.is_dir()  # the converted float32 directory


def write_mixed(tmp_path, arch="qwen2"):
    return write(tmp_path, arch, lambda n: next((f for k, f in MIXED.items() if f".{k}." in f".{n}"), "q4_k"),
                 tied=False, fmts=("q4_k",))


@pytest.mark.skipif(build.available() and build.best_isa() != "avx512", reason="no AVX-512 here to compare AVX2 with")
@pytest.mark.parametrize("compute", ["exact", "int8"])
@pytest.mark.parametrize("fmt", ["mixed", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_avx2_and_avx512_agree_on_the_whole_model(tmp_path, fmt, compute):
    """Every layer, the K/V written and the logits of a quantized model, bit for bit, whichever ISA runs."""
    if fmt == "mixed":
        path = write_mixed(tmp_path)
    else:
        path = write(tmp_path, "llama", lambda name: fmt, fmts=(fmt,))  # tied: the Q-format embedding is lm_head
    eng = specedit.load(path, compute=compute)
    assert eng.compute == compute
    m = eng.model
    x = m.embed(torch.tensor([IDS]))  # [1, T, dim]
    outs = []
    for isa in ("avx2", "avx512"):
        c = eng._cache(len(IDS))
        h = m.decoder(x, c.buf, [0], isa=isa)  # [1, T, dim]
        outs.append((m.lm_head(m.norm(h), isa=isa), c.buf.clone()))
    (a, ka), (b, kb) = outs
    assert torch.isfinite(a).all() and a.abs().max() > 0
    assert torch.equal(a, b) and torch.equal(ka, kb)


@pytest.mark.parametrize("fmt", ["mixed", "q4_1", "q5_0", "q8_0"])
def test_int8_compute_is_lossless_speculation(tmp_path, fmt):
    """compute='int8': not the exact logits (close to them), but verify rows equal 1-row steps bit for bit, so
    speculative output equals plain output for drafts fully accepted, mutated, rejected, and in a batch."""
    if fmt == "mixed":
        path = write_mixed(tmp_path, "llama")
    else:
        path = write(tmp_path, "qwen3", lambda name: fmt, fmts=(fmt,))  # tied: lm_head in the int8 layout
    eng, exact = specedit.load(path, compute="int8"), specedit.load(path, compute="exact")
    assert (eng.compute, exact.compute, specedit.load(path).compute) == ("int8", "exact", "exact")
    a, b = eng.logits(IDS), exact.logits(IDS)
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.1 * b.abs().max()
    batched, single = verify_and_steps(eng, IDS[:5], IDS[5:])
    assert torch.equal(batched, single)
    plain = eng.generate(IDS, max_new_tokens=24).token_ids
    for prediction in (plain, plain[:6] + [7] + plain[7:], [3] * 30, plain[:10]):
        assert eng.generate(IDS, max_new_tokens=24, prediction=prediction).token_ids == plain
    together = eng.generate_batch([IDS, IDS[:7]], max_new_tokens=24, prediction=[plain, None])
    assert together[0].token_ids == plain
    assert together[1].token_ids == eng.generate(IDS[:7], max_new_tokens=24).token_ids


INT8_RUN = """
import sys, torch, specedit
from specedit.kernels.cpu import build
eng = specedit.load(sys.argv[1], compute="int8")
ids = [1, 40, 75, 80, 259, 5, 100, 200]
plain = eng.generate(ids, max_new_tokens=16).token_ids
spec = eng.generate(ids, max_new_tokens=16, prediction=plain[:9] + [3] * 9).token_ids
torch.save({"isa": build.best_isa(), "logits": eng.logits(ids), "plain": plain, "spec": spec}, sys.argv[2])
"""


@pytest.mark.skipif(build.available() and build.best_isa() != "avx512", reason="no AVX-512 here to compare AVX2 with")
def test_int8_specedit_isa_avx2_gives_the_same_bits(tmp_path):
    """A whole int8 run with SPECEDIT_ISA=avx2 (the AVX2-only machine's path, pmaddubsw) equals the AVX-512
    VNNI run's logits and tokens bit for bit."""
    import os
    import subprocess
    import sys

    path = write_mixed(tmp_path, "qwen3")
    runs = {}
    for isa in ("avx2", "auto"):
        out = tmp_path / f"{isa}.pt"
        r = subprocess.run([sys.executable, "-c", INT8_RUN, str(path), str(out)],
                           env={**os.environ, "SPECEDIT_ISA": isa}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[isa] = torch.load(out)
    assert (runs["avx2"]["isa"], runs["auto"]["isa"]) == ("avx2", "avx512")
    assert torch.equal(runs["avx2"]["logits"], runs["auto"]["logits"])
    assert runs["avx2"]["plain"] == runs["auto"]["plain"] == runs["auto"]["spec"] == runs["avx2"]["spec"]
