"""KVCache: one contiguous preallocated buffer for every layer, with a length per batch row.

Layout `[L, 2, B, H_kv, S_max, D]`: `k(l)` and `v(l)` are `[B, H_kv, S_max, D]` views, the shape the
verification-attention kernel reads through strides. Slot `s` of row `b` holds the token at absolute position
`s`. Rollback is free: lowering a row's length makes the rejected slots invisible, and the next forward
overwrites them.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        """Allocate room for `max_len` positions of `batch` rows (zeroed, so unused slots are finite)."""
        if max_len < 1 or batch < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        self.buf = torch.zeros(
            cfg.n_layers, 2, batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype=dtype, device=device
        )
        self.max_len = max_len
        self._views = [(self.buf[i, 0], self.buf[i, 1]) for i in range(cfg.n_layers)]  # no per-step indexing
        self.sliding_window = cfg.sliding_window  # Mistral: keys older than this are masked out
        self.lengths = [0] * batch  # host ints: valid positions per row

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def k(self, layer: int) -> torch.Tensor:
        return self._views[layer][0]  # [B, H_kv, S_max, D]

    def v(self, layer: int) -> torch.Tensor:
        return self._views[layer][1]  # [B, H_kv, S_max, D]

    def check_room(self, t: int) -> None:
        """Raise ValueError if appending `t` positions to every row would overflow the buffer."""
        need = max(self.lengths) + t
        if need > self.max_len:
            raise ValueError(
                f"sequence of {need} tokens exceeds the KV cache capacity of {self.max_len} positions"
            )

    def rollback(self, row: int, length: int) -> None:
        """Truncate row `row` to its first `length` positions (never grows it)."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"rollback of row {row} to {length} outside 0..{self.lengths[row]}")
        self.lengths[row] = length
