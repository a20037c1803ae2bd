"""PrefixCache on its own: the longest cached prefix by whole blocks, at least one token left to prefill, LRU
under the byte budget with a prefix's deepest blocks evicted first."""

from types import SimpleNamespace

import pytest
import torch

from specedit.cache import KVCache
from specedit.prefix_cache import PrefixCache

CFG = SimpleNamespace(n_layers=2, n_kv_heads=1, head_dim=2, sliding_window=None)
BLOCK_BYTES = 2 * 2 * 1 * 4 * 2 * 4  # layers x (k, v) x heads x block 4 x dim 2 x float32


def filled(ids, rows=1, row=0):
    """A cache whose row `row` holds K/V values that encode each position's token id."""
    c = KVCache(CFG, rows, 64, torch.float32, "cpu")
    n = len(ids)
    c.fill(row, torch.tensor(ids, dtype=torch.float32).view(1, 1, 1, n, 1).expand(2, 2, 1, n, 2).clone())
    return c


def test_load_gives_the_longest_block_prefix_and_leaves_a_token_to_prefill():
    pc = PrefixCache(1 << 20, block=4)
    a = list(range(10, 23))  # 13 tokens: 3 full blocks
    pc.store(a, filled(a))
    for ids, want in [(a, 12), (a[:12], 8), (a[:9], 8), (a[:8], 4), (a[:4], 0), (a[:6] + [99] * 7, 4),
                      ([99] + a[1:], 0)]:
        c = KVCache(CFG, 2, 64, torch.float32, "cpu")
        assert pc.load(ids, c, row=1) == want, (ids, want)
        assert c.lengths == (0, want)
        assert torch.equal(c.buf[0, 0, 1, 0, :want, 0], torch.tensor(a[:want], dtype=torch.float32))
    assert (pc.hits, pc.lookups) == (5, 7)


def test_a_block_is_keyed_by_its_whole_prefix():
    pc = PrefixCache(1 << 20, block=4)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    pc.store(a, filled(a))
    b = [0, 2, 3, 4, 5, 6, 7, 8, 9]  # the second block's tokens equal, the first's not: nothing is shared
    assert pc.load(b, KVCache(CFG, 1, 64, torch.float32, "cpu")) == 0


def test_budget_evicts_least_recently_used_deepest_first():
    pc = PrefixCache(3 * BLOCK_BYTES, block=4)
    a, b = list(range(100, 109)), list(range(200, 209))  # 2 blocks each
    pc.store(a, filled(a))
    pc.store(b, filled(b))  # 4 blocks > budget: a's deepest block goes
    assert pc.bytes == 3 * BLOCK_BYTES
    assert pc.load(a, KVCache(CFG, 1, 64, torch.float32, "cpu")) == 4
    assert pc.load(b, KVCache(CFG, 1, 64, torch.float32, "cpu")) == 8
    assert pc.load(a, KVCache(CFG, 1, 64, torch.float32, "cpu")) == 4  # a touched: b's deepest goes next time
    pc.store(list(range(300, 305)), filled(list(range(300, 305))))
    assert pc.load(b, KVCache(CFG, 1, 64, torch.float32, "cpu")) == 4
    assert pc.load(a, KVCache(CFG, 1, 64, torch.float32, "cpu")) == 4


def test_store_keeps_only_what_the_row_holds_and_a_zero_budget_keeps_nothing():
    pc = PrefixCache(1 << 20, block=4)
    a = list(range(12))
    pc.store(a, filled(a[:5]))  # the row holds 5 of the 12 positions: one block
    assert pc.bytes == BLOCK_BYTES
    off = PrefixCache(0, block=4)
    off.store(a, filled(a))
    assert off.bytes == 0 and off.load(a, KVCache(CFG, 1, 64, torch.float32, "cpu")) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="budget_bytes"):
        PrefixCache(-1)
    pc = PrefixCache(1 << 20, block=4)
    with pytest.raises(ValueError, match="already holds"):
        pc.load([1, 2, 3, 4, 5], filled([1]))


# ---- in the engine: a reused prefix changes no bits -------------------------------------------------------


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    import specedit
    from helpers import make_text_checkpoint

    path = make_text_checkpoint(tmp_path_factory.mktemp("prefix"))
    on, off = specedit.load(path), specedit.load(path, prefix_cache_mb=0)
    assert on.row_invariant and on.prefix_cache is not None and off.prefix_cache is None
    return on, off


def test_prefill_rows_are_row_invariant(engines):
    """What makes a cached prefix exact: the K/V rows of positions 0..n-1 and the logits after them are the
    same bits whether the prompt went in whole or as a cached prefix plus the rest."""
    eng, _ = engines
    ids = eng.encode("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n" * 3)
    whole = eng._cache(len(ids))
    want = eng.model(torch.tensor([ids]), whole)
    for cut in (1, 5, 16, len(ids) - 1):
        part = eng._cache(len(ids))
        eng.model(torch.tensor([ids[:cut]]), part)
        got = eng.model(torch.tensor([ids[cut:]]), part)
        assert torch.equal(got, want)
        assert torch.equal(part.buf[:, :, 0, :, : len(ids)], whole.buf[:, :, 0, :, : len(ids)])


def test_second_edit_of_a_file_reuses_its_prefix_and_gives_the_same_tokens(engines):
    on, off = engines
    code = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n\n" for i in range(12))
    prompt = "```python\n" + code + "```\n"
    on.prefix_cache.clear()
    for instr, pred in [("Add type hints.", code), ("Add docstrings.", code), ("Rename x to value.", None)]:
        a = on.generate(prompt + instr, max_new_tokens=40, prediction=pred)
        b = off.generate(prompt + instr, max_new_tokens=40, prediction=pred)
        assert a.token_ids == b.token_ids
        assert b.stats.cached_tokens == 0
    assert a.stats.cached_tokens >= len(on.encode(prompt)) - on.prefix_cache.block
    assert a.stats.cached_tokens < a.stats.prompt_tokens
    # the batched scheduler reuses it too, with the same tokens as alone
    h = on.submit(prompt + "Add a module docstring.", max_new_tokens=30, prediction=code)
    assert h.wait() == off.generate(prompt + "Add a module docstring.", max_new_tokens=30, prediction=code).token_ids
    assert h.stats.cached_tokens == a.stats.cached_tokens


def test_prefix_cache_mb_is_checked(tmp_path):
    import specedit

    for bad in (-1, float("nan"), "64", True):
        with pytest.raises(ValueError, match="prefix_cache_mb"):
            specedit.load(tmp_path, prefix_cache_mb=bad)
