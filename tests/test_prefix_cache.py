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
