"""Draft policy: where a sequence's draft comes from (DraftSource: the prediction's Drafter, else an n-gram
lookup) and how long a draft to send (ChunkPolicy, from the forward cost vs rows of this machine: CostModel).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache
from .drafter import Drafter, NgramLookup
from .results import Stats


class CostModel:
    """Forward time as a function of rows T, measured on the running machine, interpolated linearly."""

    def __init__(self, rows: Sequence[int], seconds: Sequence[float], steady: bool = True):
        self.rows, self.seconds = list(rows), list(seconds)
        self.steady = steady  # False: the timings disagreed (a busy machine); use it, but don't keep it on disk
        # A noisy timing can't claim that more rows cost less, or that T rows cost more than T 1-row forwards.
        for i in range(len(self.seconds) - 2, -1, -1):
            self.seconds[i] = min(self.seconds[i], self.seconds[i + 1])
        for i in range(1, len(self.seconds)):
            self.seconds[i] = min(self.seconds[i], self.seconds[0] * self.rows[i] / self.rows[0])

    def __call__(self, t: int) -> float:
        r, s = self.rows, self.seconds
        if t <= r[0]:
            return s[0]
        for i in range(1, len(r)):
            if t <= r[i]:
                w = (t - r[i - 1]) / (r[i] - r[i - 1])
                return s[i - 1] + w * (s[i] - s[i - 1])
        return s[-1] + (t - r[-1]) * (s[-1] - s[-2]) / (r[-1] - r[-2])

    def to_dict(self) -> dict:
        return {"rows": self.rows, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        """Inverse of to_dict; ValueError when `d` is not a cost model (rows increasing, seconds > 0)."""
        rows, seconds = d.get("rows"), d.get("seconds")
        ok = (isinstance(rows, list) and isinstance(seconds, list) and len(rows) == len(seconds) >= 2
              and all(isinstance(r, int) and r > 0 for r in rows) and rows == sorted(set(rows))
              and all(isinstance(x, (int, float)) and 0 < x < 1e3 for x in seconds))
        if not ok:
            raise ValueError(f"not a cost model: {d!r:.200}")
        return cls(rows, [float(x) for x in seconds])

    @classmethod
    def measure(cls, model, make_cache: Callable[[int], KVCache], rows=(1, 2, 4, 8, 16, 32, 64), prefix=128,
                reps=5) -> CostModel:
        """Time forwards of T rows after a `prefix`-token context: one warmup per T, then `reps` rounds that
        each time every T once (a burst of load from elsewhere hits all T alike), min per T. Not `steady` when
        some T's two best rounds differ by more than a quarter. Five rounds because the model is cached for a
        week: a cost 10% high at 8 rows shortens drafts by a token and costs a server ~10% throughput."""
        device = model.rope_cos.device
        cache = make_cache(prefix + max(rows))
        model(torch.zeros(1, prefix, dtype=torch.long, device=device), cache)
        xs = [torch.zeros(1, t, dtype=torch.long, device=device) for t in rows]
        times: list[list[float]] = [[] for _ in rows]
        for rep in range(reps + 1):
            for i, x in enumerate(xs):
                cache.rollback(0, prefix)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(x, cache, all_logits=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if rep:  # the first call of a shape may build kernels or caches
                    times[i].append(time.perf_counter() - t0)
        best = [sorted(ts)[:2] for ts in times]
        return cls(rows, [b[0] for b in best], steady=all(b[-1] <= 1.25 * b[0] for b in best))


class ChunkPolicy:
    """Chooses the draft length K that maximizes expected tokens per second.

    With per-token acceptance probability a, a K-token draft yields (1 - a^(K+1)) / (1 - a) tokens for the cost
    of a (K+1)-row forward. `a` is a decayed count of accepted vs rejected draft tokens, so K shrinks after
    rejections and grows after full acceptance; when no K > 0 beats a plain 1-row step, K = 0.
    """

    def __init__(self, cost: CostModel, k_max: int = 64, prior: float = 0.9, prior_weight: float = 4.0,
                 decay: float = 0.8):
        self.cost, self.k_max, self.decay = cost, k_max, decay
        self.prior, self.prior_weight = prior, prior_weight
        self.hits = 0.0
        self.misses = 0.0

    @property
    def acceptance(self) -> float:
        return (self.hits + self.prior * self.prior_weight) / (self.hits + self.misses + self.prior_weight)

    def choose(self, limit: int) -> int:
        """Best K in 0..min(k_max, limit)."""
        a = min(self.acceptance, 0.999)
        best_k, best_rate = 0, 1.0 / self.cost(1)
        for k in range(1, min(self.k_max, limit) + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / self.cost(k + 1)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def update(self, proposed: int, accepted: int) -> None:
        if proposed:
            self.hits = self.hits * self.decay + accepted
            self.misses = self.misses * self.decay + (accepted < proposed)


@dataclass
class DraftSource:
    """Where a sequence's drafts come from: the prediction (drafter, with its chunk policy) and, while the
    drafter is diverged, an n-gram lookup in the output and the prediction (lookup, with a policy of its own:
    its acceptance is tracked apart from the drafter's)."""

    drafter: Drafter
    policy: ChunkPolicy
    lookup: NgramLookup | None = None
    lookup_policy: ChunkPolicy | None = None

    def observe(self, new: list[int]) -> None:
        """Tokens just decided (accepted draft + the model's next)."""
        self.drafter.observe(new)
        if self.lookup is not None:
            self.lookup.observe(new)

    def propose(self, room: int) -> tuple[list[int], bool]:
        """(draft of at most `room` tokens, whether it comes from the prediction), its length chosen by the
        chunk policy of the source in use."""
        if room > 0 and self.drafter.aligned:
            return self.drafter.propose(self.policy.choose(room)), True
        if room > 0 and self.lookup is not None:
            return self.lookup.propose(self.lookup_policy.choose(room), self.drafter.pointer), False
        return [], True

    def update(self, proposed: int, accepted: int, from_prediction: bool, stats: Stats) -> None:
        """Feed a verify step's outcome to the policy that chose its size, and count it."""
        if from_prediction:
            self.policy.update(proposed, accepted)
            stats.draft_proposed += proposed
            stats.draft_accepted += accepted
            stats.draft_rejected += proposed - accepted
        else:
            self.lookup_policy.update(proposed, accepted)
            stats.lookup_proposed += proposed
            stats.lookup_accepted += accepted
