"""specedit.kernels.cpu.decoder: every decoder layer in one C++ call, against the same layers run from Python.

Both paths use the same packed matmul and attention kernels; they differ in how the norms, RoPE, SiLU and
residuals are computed (C++ loops vs torch ops), so floats agree to ~1e-6 relative and greedy tokens exactly.
Against transformers, test_runtime covers every architecture (load() sets the decoder by default).
"""

import os
import subprocess
import sys
import threading

import pytest
import torch

import specedit
from helpers import NEEDS_CPU_KERNELS, hf_model, make_checkpoint, verify_and_steps
from specedit.kernels.cpu import build
from specedit.cache import KVCache

pytestmark = NEEDS_CPU_KERNELS

VARIANTS = {
    "llama": ("llama", {}),
    "llama-bias": ("llama", dict(attention_bias=True)),
    "mistral-window": ("mistral", dict(sliding_window=16)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}
IDS = torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(4)).tolist()


@pytest.fixture(scope="module", params=list(VARIANTS))
def path(request, tmp_path_factory):
    arch, kw = VARIANTS[request.param]
    return make_checkpoint(tmp_path_factory.mktemp(request.param), arch, **kw)


def test_load_sets_the_decoder(path):
    assert specedit.load(path).model.decoder is not None
    assert specedit.load(path, cpu_kernels=False).model.decoder is None


def test_decoder_equals_python_layers(path):
    eng = specedit.load(path, cpu_kernels=True)
    decoder_logits = eng.logits(IDS)
    decoder, eng.model.decoder = eng.model.decoder, None  # the same packed layers, run one torch op at a time
    layered = eng.logits(IDS)
    eng.model.decoder = decoder
    assert (decoder_logits - layered).abs().max().item() < 1e-5 * layered.abs().max().item()


@pytest.mark.parametrize("dtype,compute", [("float16", "auto"), ("int8", "exact"), ("int8", "int8")])
def test_verify_rows_equal_single_rows_with_compact_weights(tmp_path, dtype, compute):
    eng = specedit.load(make_checkpoint(tmp_path, "qwen3"), dtype=dtype, compute=compute)
    batched, single = verify_and_steps(eng, IDS[:40], IDS[40:57])
    assert torch.equal(batched, single)


def test_decoder_matches_transformers_past_the_sliding_window(tmp_path):
    path = make_checkpoint(tmp_path, "mistral", sliding_window=16)
    ours = specedit.load(path).logits(IDS)
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor([IDS])).logits[0]
    assert (ours - ref).abs().max().item() < 1e-4


def test_isas_agree_bit_for_bit(path):
    if build.best_isa() != "avx512":
        pytest.skip("only AVX2 on this CPU")
    eng = specedit.load(path)
    m = eng.model
    x = m.embed(torch.tensor([IDS]))
    outs = []
    for isa in ("avx2", "avx512"):
        c = eng._cache(len(IDS))
        outs.append((m.decoder(x, c.buf, [0], isa=isa), c.buf.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_ragged_rows_write_their_own_cache_slots(path):
    """B=2 at different lengths: each row's hidden states and K/V slots equal running it alone."""
    eng = specedit.load(path)
    m = eng.model
    both = KVCache(eng.cfg, 2, 64, torch.float32, "cpu")
    starts = [9, 4]
    for b, s in enumerate(starts):
        one = KVCache(eng.cfg, 1, 64, torch.float32, "cpu")
        m.decoder(m.embed(torch.tensor([IDS[:s]])), one.buf, [0])
        both.buf[:, :, b] = one.buf[:, :, 0]
    x = m.embed(torch.tensor([IDS[20:25], IDS[30:35]]))
    out = m.decoder(x, both.buf, starts)
    for b, s in enumerate(starts):
        one = KVCache(eng.cfg, 1, 64, torch.float32, "cpu")
        m.decoder(m.embed(torch.tensor([IDS[:s]])), one.buf, [0])
        alone = m.decoder(x[b : b + 1], one.buf, [s])
        assert torch.equal(out[b], alone[0])
        assert torch.equal(both.buf[:, :, b, :, : s + 5], one.buf[:, :, 0, :, : s + 5])


@pytest.mark.parametrize(
    "case, match",
    [
        ("x_dim", r"x must be float32 \[rows, 64\]"),
        ("x_dtype", "x must be float32"),
        ("rows", "5 rows for 2 sequences"),
        ("cache_shape", r"cache must be contiguous float32 \[2, 2, 1, 2, S, 16\]"),
        ("overflow", r"start 60 \+ 5 rows exceeds the cache \(64\)"),
        ("x_list", r"x must be a \[B, T, dim\] tensor, got list"),
        ("cache_list", r"cache must be a \[L, 2, B, H_kv, S_max, D\] tensor, got list"),
        ("starts_tuple", r"starts must be a list of ints"),
    ],
)
def test_bad_input_names_the_problem(tmp_path, case, match):
    eng = specedit.load(make_checkpoint(tmp_path, "llama"))
    m = eng.model
    x, c, starts = torch.zeros(1, 5, 64), eng._cache(64), [0]
    if case == "x_dim":
        x = torch.zeros(1, 5, 32)
    elif case == "x_dtype":
        x = x.double()
    elif case == "rows":
        starts = [0, 0]
    elif case == "cache_shape":
        c.buf = torch.zeros(2, 2, 1, 2, 64, 8)
    elif case == "overflow":
        starts = [60]
    elif case == "x_list":
        x = x.tolist()
    elif case == "cache_list":
        c.buf = [c.buf]
    elif case == "starts_tuple":
        starts = (0,)
    with pytest.raises(ValueError, match=match):
        m.decoder(x, c.buf, starts)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_ragged_rows_equal_each_sequence_alone(path, isa):
    """Sequences sending 1, 5, 0, 19 and 3 rows in one call (ragged: one attention problem per layer), one
    of them past the first key block and over two row tiles: each equals its own call, bit for bit."""
    if isa == "avx512" and build.best_isa() != "avx512":
        pytest.skip("only AVX2 on this CPU")
    eng = specedit.load(path)
    m = eng.model
    ids = torch.randint(0, 128, (330,), generator=torch.Generator().manual_seed(5)).tolist()
    starts, counts = [9, 4, 7, 300, 12], [1, 5, 0, 19, 3]
    both = KVCache(eng.cfg, len(starts), 512, torch.float32, "cpu")
    for b, s in enumerate(starts):
        one = KVCache(eng.cfg, 1, 512, torch.float32, "cpu")
        m.decoder(m.embed(torch.tensor([ids[:s]])), one.buf, [0], isa=isa)
        both.buf[:, :, b] = one.buf[:, :, 0]
    rows = [ids[s : s + c] for s, c in zip(starts, counts)]
    x = m.embed(torch.tensor([t for r in rows for t in r]))
    before = both.buf.clone()
    out = m.decoder(x, both.buf, starts, counts, isa=isa)
    at = 0
    for b, (s, c) in enumerate(zip(starts, counts)):
        one = KVCache(eng.cfg, 1, 512, torch.float32, "cpu")
        m.decoder(m.embed(torch.tensor([ids[:s]])), one.buf, [0], isa=isa)
        alone = m.decoder(m.embed(torch.tensor([rows[b]], dtype=torch.long)), one.buf, [s], isa=isa)[0]
        assert torch.equal(out[at : at + c], alone)
        assert torch.equal(both.buf[:, :, b, :, : s + c], one.buf[:, :, 0, :, : s + c])
        at += c
    # off the main thread the loops run on the extension's own workers (csrc/pool.h): the same bits
    again = KVCache(eng.cfg, len(starts), 512, torch.float32, "cpu")
    again.buf.copy_(before)
    res = []
    t = threading.Thread(target=lambda: res.append(m.decoder(x, again.buf, starts, counts, isa=isa)))
    t.start()
    t.join()
    assert torch.equal(res[0], out) and torch.equal(again.buf, both.buf)
    with pytest.raises(ValueError, match="row counts add up to 28 but x has 27 rows"):
        m.decoder(torch.zeros(27, eng.cfg.dim), both.buf, starts, counts)


def test_forward_rows_pads_without_the_decoder(path):
    """The per-layer path pads ragged rows and rolls the padding back: same logits as each row alone."""
    eng = specedit.load(path)
    m = eng.model
    rows = [IDS[:3], IDS[10:17], IDS[20:21]]
    ragged = m.forward_rows(rows, eng._cache(32, rows=3))
    m.decoder, saved = None, m.decoder
    try:
        cache = eng._cache(32, rows=3)
        layered = m.forward_rows(rows, cache)
        assert cache.lengths == (3, 7, 1)
    finally:
        m.decoder = saved
    assert ragged.shape == layered.shape == (11, eng.cfg.vocab_size)
    assert (ragged - layered).abs().max().item() < 1e-5 * layered.abs().max().item()


ENGINE_RUN = """
import sys, torch, specedit
from specedit.kernels.cpu import build
eng = specedit.load(sys.argv[1])
r = eng.generate([1, 5, 9, 2], max_new_tokens=12, prediction=[7, 7, 7])
torch.save({"isa": build.best_isa(), "logits": eng.logits([1, 5, 9, 2, 11, 3]), "tokens": r.token_ids}, sys.argv[2])
"""


def test_specedit_isa_avx2_runs_the_whole_engine_on_avx2_with_the_same_bits(path, tmp_path):
    """SPECEDIT_ISA=avx2 makes every kernel take the AVX2 path (as on an AVX2-only machine); on an AVX-512 CPU
    the logits and tokens must equal the AVX-512 run's bit for bit."""
    runs = {}
    for isa in ("avx2", "auto"):
        out = tmp_path / f"{isa}.pt"
        env = {**os.environ, "SPECEDIT_ISA": isa}
        r = subprocess.run([sys.executable, "-c", ENGINE_RUN, str(path), str(out)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[isa] = torch.load(out)
    assert runs["avx2"]["isa"] == "avx2" and runs["auto"]["isa"] == build.best_isa()
    assert torch.equal(runs["avx2"]["logits"], runs["auto"]["logits"])
    assert runs["avx2"]["tokens"] == runs["auto"]["tokens"]


def test_specedit_isa_rejects_what_it_cannot_run():
    r = subprocess.run([sys.executable, "-c", "from specedit.kernels.cpu import build; build.load()"],
                       env={**os.environ, "SPECEDIT_ISA": "sse"}, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "SPECEDIT_ISA='sse': use avx2, avx512 or auto" in r.stderr
