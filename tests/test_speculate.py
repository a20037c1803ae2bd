"""The speculative loop is lossless: with any prediction, greedy output equals plain greedy decoding exactly."""

import json
import random

import pytest
import torch

import specedit
from helpers import ARCHS, make_checkpoint, make_text_checkpoint, verify_and_steps
from specedit.cache import KVCache
from specedit.acceptance import sampled_accept
from specedit.draft_policy import ChunkPolicy, CostModel

N = 48


CPU_LIKE = CostModel([1, 2, 8, 33, 65], [1.0, 1.05, 1.3, 3.5, 7.0])  # 32 rows ~ 3.5x one row


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    e = specedit.load(make_checkpoint(tmp_path_factory.mktemp("spec"), "llama"))
    e._cost = CPU_LIKE  # fixed, so forward counts do not depend on this machine's load
    return e


@pytest.fixture(scope="module")
def prompt():
    return random.Random(0).choices(range(128), k=40)


@pytest.fixture(scope="module")
def plain(eng, prompt):
    return eng.generate(prompt, max_new_tokens=N).token_ids


def spec(eng, prompt, prediction, n=N):
    return eng.generate(prompt, max_new_tokens=n, prediction=prediction)


def test_all_accepted(eng, prompt, plain):
    r = spec(eng, prompt, plain)
    assert r.token_ids == plain
    assert r.stats.draft_rejected == 0
    assert r.stats.draft_accepted == N - 1 - r.stats.forwards  # each forward also adds its own token
    assert r.stats.forwards < N // 4


def test_none_accepted(eng, prompt, plain):
    rnd = random.Random(1).choices(range(128), k=N)
    r = spec(eng, prompt, rnd)
    assert r.token_ids == plain


@pytest.mark.parametrize("j", [0, 1, 17, N - 2])
def test_mutated_at_j(eng, prompt, plain, j):
    pred = list(plain)
    pred[j] = (pred[j] + 1) % 128
    r = spec(eng, prompt, pred)
    assert r.token_ids == plain
    # every token but the few decoded plainly between divergence and re-sync came from the prediction or a
    # forward's own next token
    assert r.stats.draft_accepted + r.stats.forwards + 1 == N
    assert r.stats.forwards <= 8


def test_max_new_tokens_inside_accepted_chunk(eng, prompt, plain):
    for n in (1, 2, 10, 23):
        assert spec(eng, prompt, plain, n).token_ids == plain[:n]


def test_empty_prediction(eng, prompt, plain):
    r = spec(eng, prompt, [])
    assert r.token_ids == plain and r.stats.draft_proposed == 0


def test_prediction_longer_than_output(eng, prompt, plain):
    assert spec(eng, prompt, plain + plain).token_ids == plain


def test_prediction_with_eos_inside(tmp_path, prompt):
    path = make_checkpoint(tmp_path, "llama")
    free = specedit.load(path).generate(prompt, max_new_tokens=N).token_ids
    eos = free[20]
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (path / "config.json").write_text(json.dumps(cfg))
    eng = specedit.load(path)
    expect = free[: free.index(eos) + 1]
    assert eng.generate(prompt, max_new_tokens=N).token_ids == expect
    for pred in (free, free[:10] + [eos] + free[10:], [eos] * 5):
        assert eng.generate(prompt, max_new_tokens=N, prediction=pred).token_ids == expect


@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_each_architecture(tmp_path, arch, prompt):
    eng = specedit.load(make_checkpoint(tmp_path, arch, seed=3))
    plain = eng.generate(prompt, max_new_tokens=32).token_ids
    mutated = plain[:12] + [(plain[12] + 5) % 128] + plain[13:]
    for pred in (plain, mutated, plain[5:]):
        assert eng.generate(prompt, max_new_tokens=32, prediction=pred).token_ids == plain


@pytest.mark.parametrize("arch", ARCHS)
def test_verify_rows_equal_single_row_forwards_bit_for_bit(tmp_path, arch, prompt):
    """Row i of a K+1-row forward equals the 1-row forward at that position exactly (CPU kernels), so no
    rounding difference can flip a near-tie between speculative and plain decoding."""
    eng = specedit.load(make_checkpoint(tmp_path, arch), cpu_kernels=True)
    batched, single = verify_and_steps(eng, prompt, eng.generate(prompt, max_new_tokens=17).token_ids)
    assert torch.equal(batched, single)


def test_verify_rows_with_stock_torch_kernels_are_close(tmp_path, prompt):
    """With F.linear and SDPA (cpu_kernels=False) rows differ in the last bits; report-level closeness."""
    eng = specedit.load(make_checkpoint(tmp_path, "llama"), cpu_kernels=False)
    batched, single = verify_and_steps(eng, prompt, eng.generate(prompt, max_new_tokens=17).token_ids)
    assert torch.equal(batched.argmax(-1), single.argmax(-1))
    assert (batched - single).abs().max().item() < 1e-4


def test_ragged_batch_forward_matches_rows(eng, prompt):
    """B=2 with different cache lengths (batched verification) equals each row run alone."""
    m = eng.model
    with torch.inference_mode():
        c = KVCache(eng.cfg, 2, 96, torch.float32, "cpu")
        for row, n in ((0, 30), (1, 21)):
            one = KVCache(eng.cfg, 1, 96, torch.float32, "cpu")
            m(torch.tensor([prompt[:n]]), one)
            c.copy_row(row, one)
        both = m(torch.tensor([prompt[30:35], prompt[21:26]]), c, all_logits=True)
        for row, n in ((0, 30), (1, 21)):
            one = KVCache(eng.cfg, 1, 96, torch.float32, "cpu")
            m(torch.tensor([prompt[:n]]), one)
            alone = m(torch.tensor([prompt[n : n + 5]]), one, all_logits=True)[0]
            assert (both[row] - alone).abs().max().item() < 1e-5


def test_stream_equals_generate_text(tmp_path):
    path = make_text_checkpoint(tmp_path)
    eng = specedit.load(path)
    src = "def add(a, b):\n    return a + b\n"
    r = eng.generate(src, max_new_tokens=40, prediction=src)
    deltas = list(eng.stream(src, max_new_tokens=40, prediction=src))
    assert "".join(deltas) == r.text == "".join(list(eng.stream(src, max_new_tokens=40)))
    assert eng.generate(src, max_new_tokens=40).token_ids == r.token_ids
    cut = eng.generate(src, max_new_tokens=40, stop=[r.text[5:7]])
    assert cut.text == r.text[: r.text.index(r.text[5:7])]


def test_chunk_policy_shrinks_and_grows():
    p = ChunkPolicy(CPU_LIKE, k_max=64)
    k0 = p.choose(1000)
    assert k0 > 4
    for _ in range(6):
        p.update(k0, 0)
    assert p.choose(1000) < k0
    low = p.choose(1000)
    for _ in range(20):
        p.update(16, 16)
    assert p.choose(1000) > low
    assert p.choose(3) <= 3


def test_chunk_policy_falls_back_to_plain_when_verify_is_costly():
    p = ChunkPolicy(CostModel([1, 65], [1.0, 65.0]), k_max=64)  # compute-bound: K rows cost K forwards
    for _ in range(10):
        p.update(8, 1)
    assert p.choose(100) == 0


def test_sampled_accept_keeps_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]])
    probs = torch.softmax(logits[0], -1)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        acc, nxt = sampled_accept(logits, [1], 1.0, g)
        counts[1 if acc == 1 else nxt] += 1
    assert (counts / n - probs).abs().max().item() < 0.015


def test_sampling_is_seeded(eng, prompt, plain):
    a = eng.generate(prompt, max_new_tokens=20, temperature=0.8, seed=5).token_ids
    b = eng.generate(prompt, max_new_tokens=20, temperature=0.8, seed=5).token_ids
    c = eng.generate(prompt, max_new_tokens=20, temperature=0.8, seed=5, prediction=plain).token_ids
    assert a == b and len(c) == 20


@pytest.mark.parametrize("t", [1e-300, 1e-45, 1e-38, 1e-7])
def test_a_temperature_too_small_to_divide_by_is_greedy(t):
    """Below MIN_TEMPERATURE (1e-6) pick and sampled_accept are argmax: float32 logits / 1e-300 would be inf and
    the softmax NaN, which torch.multinomial refuses."""
    from specedit.acceptance import MIN_TEMPERATURE, pick

    assert t < MIN_TEMPERATURE
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 3.0, -1.0], [0.5, 4.0, 0.0, 0.0], [9.0, 9.0, 1.0, 0.0]])
    assert pick(logits[0], t, g) == 2
    assert sampled_accept(logits, [2, 1], t, g) == (2, 0)  # both accepted, then the argmax (ties: lowest)
    assert sampled_accept(logits, [2, 3], t, g) == (1, 1)  # rejected at 1: the argmax there
    assert sampled_accept(logits, [0], t, g) == (0, 2)
    assert sampled_accept(logits[:1], [], t, g) == (0, 2)


@pytest.mark.parametrize("t", [1e-6, 1e-4, 0.01, 0.5, 1.0, 2.0])
def test_every_finite_temperature_up_to_2_samples_without_nan(t):
    from specedit.acceptance import pick

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1000, generator=g) * 30  # wide logits: at small t most of the mass is on one token
    for _ in range(20):
        assert 0 <= pick(logits[0], t, g) < 1000
        n, nxt = sampled_accept(logits, [5, 6], t, g)
        assert 0 <= n <= 2 and 0 <= nxt < 1000


def test_tiny_temperatures_decode_greedily_end_to_end(eng, prompt, plain):
    for t in (1e-300, 1e-39, 5e-7):
        assert eng.generate(prompt, max_new_tokens=N, temperature=t).token_ids == plain
        assert eng.generate(prompt, max_new_tokens=N, temperature=t, prediction=plain[:20]).token_ids == plain
    assert eng.generate(prompt, max_new_tokens=8, temperature=2.0, seed=3).stats.new_tokens == 8


def test_cost_model_is_monotone_despite_noise():
    c = CostModel([1, 2, 4, 8, 16], [0.030, 0.070, 0.032, 0.033, 0.040])  # T=2 timed during a hiccup
    assert c.seconds == [0.030, 0.032, 0.032, 0.033, 0.040]
    assert c(3) == pytest.approx(0.032) and c(32) > c(16)
    c = CostModel([1, 2, 4], [0.010, 0.5, 0.9])  # a hiccup on every T > 1
    assert c.seconds == [0.010, 0.020, 0.040]


def test_cost_model_measured_on_this_machine(eng):
    c = CostModel.measure(eng.model, eng._cache, rows=(1, 4, 16), prefix=32, reps=2)
    assert c.rows == [1, 4, 16] and all(s > 0 for s in c.seconds)
    assert c.seconds == sorted(c.seconds)


def test_finish_reason(eng, prompt, plain):
    assert eng.generate(prompt, max_new_tokens=5).stats.finish_reason == "length"
    assert eng.generate(prompt, max_new_tokens=5, prediction=plain).stats.finish_reason == "length"


def test_output_lookup_drafts_a_repetitive_output_losslessly(tmp_path):
    """A model that loops: the prediction is useless, the output's own repeats are not."""
    eng = specedit.load(make_checkpoint(tmp_path, "llama", seed=0))
    eng._cost = CPU_LIKE
    prompt = [3] * 30
    plain = eng.generate(prompt, max_new_tokens=60)
    r = eng.generate(prompt, max_new_tokens=60, prediction=[1, 2, 3])
    assert r.token_ids == plain.token_ids
    assert r.stats.draft_accepted == 0 and r.stats.lookup_proposed > 0


def test_one_sequence_runs_the_loop_inline_one_step_per_forward(eng, prompt, plain, monkeypatch):
    """generate/stream step the scheduler's loop in the caller's thread (no scheduler thread), and each step
    hands out the tokens of one forward: the prefill's first token, then one batch per decode forward."""
    import threading

    from specedit import Stats
    from specedit.checks import GenParams

    forward_rows, threads = eng.model.forward_rows, set()

    def recording(rows, cache):
        threads.add(threading.current_thread())
        return forward_rows(rows, cache)

    monkeypatch.setattr(eng.model, "forward_rows", recording)
    stats = Stats()
    steps = list(eng._steps(prompt, GenParams(N, prediction=plain), stats))
    assert [t for s in steps for t in s] == plain and len(steps) == stats.forwards + 1 < N
    assert stats.finish_reason == "length" and stats.draft_accepted > 0 and stats.prompt_tokens == len(prompt)
    assert "".join(eng.stream(prompt, max_new_tokens=N)) == eng.generate(prompt, max_new_tokens=N).text
    assert threads == {threading.current_thread()} and eng._service is None


def test_a_fault_in_the_inline_loop_is_raised_to_the_caller(eng, prompt, plain, monkeypatch):
    forward_rows = eng.model.forward_rows

    def faulty(rows, cache):
        if len(rows[0]) > 1:  # the first verify step
            raise RuntimeError("planted verify fault")
        return forward_rows(rows, cache)

    monkeypatch.setattr(eng.model, "forward_rows", faulty)
    with pytest.raises(RuntimeError, match="planted verify fault"):
        spec(eng, prompt, plain)
    monkeypatch.undo()
    assert spec(eng, prompt, plain).token_ids == plain
