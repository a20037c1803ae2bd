"""KVCache: one contiguous preallocated buffer for every layer, with a length per batch row.

Layout `[L, 2, B, H_kv, S_max, D]`: `k(l)` and `v(l)` are `[B, H_kv, S_max, D]` views, the shape the
verification-attention kernel reads through strides. Slot `s` of row `b` holds the token at absolute position
`s`. Rollback is free: lowering a row's length makes the rejected slots invisible, and the next forward
overwrites them.

The lengths belong to the cache: `advance(t)` (called by the model once per forward) appends t positions to
every row and refreshes the device-side tensors the layers read (`positions`, `lengths_dev`) in one host to
device copy; `rollback(row, n)` lowers one row. Cache writes and RoPE read positions by tensor indexing, so
nothing in a forward loops over host integers.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str,
                 zeroed: bool = True):
        """Allocate room for `max_len` positions of `batch` rows. zeroed: unused slots hold +0 (finite), for
        attention that reads slots past a row's length and masks them (SDPA); kernels that never read them
        (the CPU kernels) can skip the zeroing, which costs ~10 ms per 100 MB."""
        if max_len < 1 or batch < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        self.buf = (torch.zeros if zeroed else torch.empty)(
            cfg.n_layers, 2, batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype=dtype, device=device
        )
        self.max_len = max_len
        self._views = [(self.buf[i, 0], self.buf[i, 1]) for i in range(cfg.n_layers)]  # no per-step indexing
        self.sliding_window = cfg.sliding_window  # Mistral: keys older than this are masked out
        self._lengths = [0] * batch  # host ints: valid positions per row
        device = self.buf.device
        self._rows = torch.arange(batch, device=device)[:, None]  # [B, 1]
        self._offsets = torch.arange(max_len, device=device)  # [S_max]
        self.starts_dev = torch.zeros(batch, dtype=torch.int64, device=device)  # lengths before this forward
        self.lengths_dev = torch.zeros(batch, dtype=torch.int32, device=device)  # lengths after it
        self.positions = self.starts_dev[:, None]  # [B, T] absolute positions of the rows being appended

    @property
    def lengths(self) -> tuple[int, ...]:
        """Valid positions per row (host ints), including the rows of a forward in flight."""
        return tuple(self._lengths)

    def k(self, layer: int) -> torch.Tensor:
        return self._views[layer][0]  # [B, H_kv, S_max, D]

    def v(self, layer: int) -> torch.Tensor:
        return self._views[layer][1]  # [B, H_kv, S_max, D]

    def advance(self, t: int | list[int]) -> list[int]:
        """Append `t` positions to every row (or t[b] to row b), for the forward about to write them; returns
        each row's start.

        Raises ValueError if a row would overflow the buffer. Refreshes `positions` [B, max t] (int64; columns
        past a row's own count are not its positions) and `lengths_dev` [B] (int32) on the cache's device with
        one host-to-device copy."""
        counts = [t] * len(self._lengths) if isinstance(t, int) else t
        starts = self._lengths
        need = max(s + c for s, c in zip(starts, counts))
        if need > self.max_len:
            raise ValueError(f"sequence of {need} tokens exceeds the KV cache capacity of {self.max_len} positions")
        self._lengths = [s + c for s, c in zip(starts, counts)]
        self.starts_dev.copy_(torch.tensor(starts), non_blocking=True)
        self.lengths_dev.copy_(torch.tensor(self._lengths), non_blocking=True)
        self.positions = self.starts_dev[:, None] + self._offsets[: max(counts)]
        return starts

    def rollback(self, row: int, length: int) -> None:
        """Truncate row `row` to its first `length` positions (never grows it)."""
        if not 0 <= length <= self._lengths[row]:
            raise ValueError(f"rollback of row {row} to {length} outside 0..{self._lengths[row]}")
        self._lengths[row] = length

    def fill(self, row: int, kv: torch.Tensor) -> None:
        """Make row `row` hold the K/V rows kv [L, 2, H_kv, n, D] at positions 0..n-1 (rows computed earlier,
        e.g. a cached prompt prefix), as if a forward had appended them."""
        n, (layers, two, _, heads, _, dim) = kv.shape[3], self.buf.shape
        if n > self.max_len or kv.shape[:3] + kv.shape[4:] != (layers, two, heads, dim):
            raise ValueError(f"K/V rows of shape {tuple(kv.shape)} do not fit a row of this cache "
                             f"{tuple(self.buf.shape)}")
        self.buf[:, :, row, :, :n] = kv
        self._lengths[row] = n

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new rows' keys and values k, v [B, T, H_kv, D] at `positions` (set by advance)."""
        kc, vc = self._views[layer]
        kc[self._rows, :, self.positions] = k
        vc[self._rows, :, self.positions] = v

    def copy_row(self, row: int, src: KVCache, src_row: int = 0) -> None:
        """Make row `row` a copy of `src`'s row `src_row`: its K/V slots and its length (e.g. a sequence
        prefilled in a cache of its own joining a batch). Both caches must have the same layers and heads."""
        self.fill(row, src.buf[:, :, src_row, :, : src._lengths[src_row]])
