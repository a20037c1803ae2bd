"""One sequence's state as the decode loop (specedit.scheduler) sees it: its prompt, cache row, stop rule
(Stopper), temperature, draft source, prefix cache and stats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .prefix_cache import PrefixCache
from .results import Stats
from .draft_policy import DraftSource


class Stopper:
    """Decides when generation ends: EOS ids, stop strings (matched on bytes), or max_new_tokens.

    `push(token)` returns True when `token` ends the output (that token is kept).
    """

    def __init__(self, eos_ids: Sequence[int], max_new_tokens: int, stop: Sequence[str] = (),
                 token_bytes: Sequence[bytes] | None = None):
        self.eos = set(eos_ids)
        self.max_new = max_new_tokens
        self.stop = [s.encode() for s in stop if s]
        if self.stop and token_bytes is None:
            raise ValueError("stop strings need the tokenizer's byte table")
        self.token_bytes = token_bytes
        self.keep = max((len(s) for s in self.stop), default=0)
        self.tail = b""
        self.count = 0
        self.reason = ""  # why generation ended, in OpenAI's words: "stop" (EOS or stop string) or "length"

    def push(self, token: int) -> bool:
        self.count += 1
        if token in self.eos:
            self.reason = "stop"
        elif self.stop:
            self.tail = (self.tail + self.token_bytes[token])[-(self.keep + 64):]
            if any(s in self.tail for s in self.stop):
                self.reason = "stop"
        if not self.reason and self.count >= self.max_new:
            self.reason = "length"
        return bool(self.reason)


@dataclass
class SequenceState:
    """One generation as the decoding loops see it: what a batched scheduler holds per row.

    prompt: token ids to prefill; row: the sequence's row in the KV cache; stopper: when it ends; temperature
    and generator: how tokens are picked (0: greedy); source: where drafts come from (None: plain decoding);
    prefix: the engine's prefix cache (None: prefill the whole prompt); stats: counters and timings, filled as it
    runs."""

    prompt: list[int]
    stopper: Stopper
    temperature: float = 0.0
    generator: torch.Generator | None = None
    source: DraftSource | None = None
    row: int = 0
    prefix: PrefixCache | None = None
    stats: Stats = field(default_factory=Stats)

    def load_prefix(self, cache: KVCache) -> int:
        """Fill this sequence's empty cache row with the longest prefix of its prompt the prefix cache holds;
        returns the positions filled (recorded as stats.cached_tokens)."""
        self.stats.cached_tokens = self.prefix.load(self.prompt, cache, self.row) if self.prefix else 0
        return self.stats.cached_tokens

    def store_prefix(self, cache: KVCache) -> None:
        """Offer the prefilled prompt's K/V rows to the prefix cache."""
        if self.prefix is not None:
            self.prefix.store(self.prompt, cache, self.row)
