"""PrefixCache: the KV rows of earlier prompts, reused by a later prompt that starts with the same tokens.

Rows are kept in blocks of `block` tokens. A block's key hashes every token from the prompt's start to the block's
end (a chain: key_i = H(key_{i-1}, tokens of block i)), so a key names a whole prefix and two prompts share a
block only if they agree up to its end. `load` copies the longest run of known blocks into a sequence's cache row
and returns how many positions it filled; the prefill then computes only the rest. `store` copies a prefilled
prompt's full blocks out. Blocks are evicted least recently used first once their bytes exceed the budget.

Exactness: a cached row equals the row a fresh prefill computes only where prefill rows are row-invariant (each
position's K/V the same whichever chunk computed it: the CPU kernels). The engine enables the cache only there,
so output with the cache is bit for bit the output without it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from .cache import KVCache


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = 16):
        """budget_bytes: most bytes of K/V kept (>= 0; 0 keeps nothing); block: tokens per block (>= 1)."""
        if budget_bytes < 0 or block < 1:
            raise ValueError(f"PrefixCache needs budget_bytes >= 0 and block >= 1, got {budget_bytes}, {block}")
        self.budget, self.block = budget_bytes, block
        self.bytes = 0
        self.hits = self.lookups = 0
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # key -> [L, 2, H_kv, block, D], LRU first
        self._lock = threading.Lock()  # the scheduler thread and callers of generate may share one engine

    def _keys(self, ids: Sequence[int], n_blocks: int) -> list[bytes]:
        arr = np.asarray(ids[: n_blocks * self.block], dtype=np.int64)
        keys, h = [], b""
        for i in range(n_blocks):
            h = hashlib.blake2b(h + arr[i * self.block:(i + 1) * self.block].tobytes(), digest_size=16).digest()
            keys.append(h)
        return keys

    def load(self, ids: Sequence[int], cache: KVCache, row: int = 0) -> int:
        """Fill row `row` of `cache` (empty) with the longest cached prefix of `ids`, leaving at least one token
        for the prefill to compute (its logits start decoding). Returns the positions filled (a multiple of
        `block`, 0 when nothing is cached)."""
        if cache.lengths[row] != 0:
            raise ValueError(f"PrefixCache.load: row {row} already holds {cache.lengths[row]} positions")
        with self._lock:
            self.lookups += 1
            keys = []
            for key in self._keys(ids, (len(ids) - 1) // self.block):
                if key not in self._blocks:
                    break
                keys.append(key)
            self._touch(keys)
            found = [self._blocks[k] for k in keys]
            self.hits += bool(found)
        if found:
            cache.fill(row, torch.cat(found, dim=3))
        return len(found) * self.block

    def store(self, ids: Sequence[int], cache: KVCache, row: int = 0) -> None:
        """Keep the full blocks of `ids` that row `row` of `cache` holds (its first positions are those of
        `ids`), evicting the least recently used blocks beyond the budget."""
        n_blocks = min(len(ids), cache.lengths[row]) // self.block
        if self.budget == 0 or n_blocks == 0:
            return
        keys = self._keys(ids, n_blocks)
        with self._lock:
            for i, key in enumerate(keys):
                if key not in self._blocks:
                    kv = cache.buf[:, :, row, :, i * self.block:(i + 1) * self.block].clone()
                    self._blocks[key] = kv
                    self.bytes += kv.numel() * kv.element_size()
            self._touch(keys)
            while self.bytes > self.budget and self._blocks:
                _, kv = self._blocks.popitem(last=False)
                self.bytes -= kv.numel() * kv.element_size()

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a prefix's blocks used, its first block last: eviction then takes a prefix's deepest blocks
        before the ones they extend (a block is of use only while every block before it is kept)."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.bytes = 0
