"""The decode loop: `Scheduler.step` advances any set of sequences (1 or N) by one forward; `alone()` runs it
inline for one caller (generate, stream, chat, edit) and `Service` in a thread for many (submit, generate_batch,
the server).

Each step packs every active sequence's `[last] + draft` rows into ONE forward over a batched KV cache (one
cache row per sequence; ragged: a sequence without a draft contributes its one row), accepts every sequence
with one batched `accept`, rolls back per row and hands each sequence its tokens. With row-invariant kernels
(the CPU backend) a row's logits do not depend on the other rows, so every sequence's greedy output is exactly
its batch-1 `generate`'s. (Backends without a decoder that takes ragged rows pad the rows to the longest and
roll the padding back.)

Sequences join at step boundaries: a new one is prefilled in a cache of its own, in chunks between two steps,
then its positions are copied into a free row of the batched cache (`max_batch` rows; its length grows by
doubling when a sequence needs more). A finished or cancelled sequence leaves at the next boundary and frees
its row; a free row sends no rows to the forward, so it costs nothing. The batched cache is released when no
sequence is left.

Each step has a prompt-token budget, as vLLM's chunked prefill has: `prefill_chunk` (64) tokens when no
sequence decodes; while some do, the tokens that cost at most PREFILL_SHARE (2) times their forward, so a
decoding sequence keeps about a third of its alone speed or better beside a long prefill (costs from the cost
model, scaled by how much slower than it the recent decode forwards and each prompt's recent chunks ran: a
chunk deep in a long prompt attends over thousands of positions, which the model, measured after 128, misses).
The budget is shared between the waiting prompts that have a free row to go to: each gets a floor (a quarter of
an equal share), the rest goes shortest first. A short prompt sent behind a long one is in after one step and
decodes while the long one is still being prefilled. (First come, first served, a short request sent 1 s after
an 8,000-token prompt waited 24.6 s for that whole prefill against 0.20 s alone.) Chunking changes no bits: the
CPU kernels give every row the same result whatever its neighbours, so a prompt prefilled in any chunks leaves
the same cache and logits.

One sequence's fault is its own: an exception while working one sequence (its prefill, first token, draft,
accept, stop check, emitting its tokens, joining a row) ends that sequence alone with the error on its handle,
and frees its row; the others go on, unchanged. A fault of the shared forward ends the sequences in that
forward (and restores the rows sitting it out). Every job taken off a queue is finished on every path.

Each sequence drafts what it would draft alone (its own chunk policies over the measured cost model), so a
forward does the work of the N batch-1 forwards it replaces: every sequence advances by the same tokens per
step as alone, and since a forward of R rows costs at most what N forwards of its parts cost (one weight pass
instead of N), N sequences together decide at least as many tokens per second as one at a time.

Fairness: each job keeps what its forwards so far would have cost it alone (the cost model of its own rows)
against the time since it was submitted. A job less than FAIR (0.8) as far behind its alone pace as the
job furthest behind sits out the step, so those behind get a shorter forward. Nobody starves: a job sitting
out falls behind until it goes again; and the time a job waited for a free row counts only up to what
max_batch sequences sharing the machine would have cost it, or after a long queue it would hold everyone
else back until it caught up. Prefill chunks are not held back: by the same rule a newcomer's first chunk
would put it ahead and its next chunk would wait, delaying its first token. Only where rows are ragged
(`fair=True`): a backend that pads every row to the longest computes absent rows anyway. Measured against a
planner that spends rows wherever one forward's tokens per second grow most: docs/results.md, "Scheduler
fairness".
"""

from __future__ import annotations

import asyncio
import atexit
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .cache import KVCache
from .sequence import SequenceState
from .acceptance import AcceptFn, greedy_accept, pick, sampled_accept


@dataclass(eq=False)  # jobs compare by identity
class Job:
    """A sequence in the scheduler. `emit(tokens)` receives the tokens decided at each step, `finish()` is
    called once when it ends (seq.stopper.reason says why; "" if cancelled or failed, with `error` set)."""

    seq: SequenceState
    cache: KVCache  # its own batch-1 cache while it is prefilled; then the batched cache holds it
    emit: Callable[[list[int]], None]
    finish: Callable[[], None]
    prefilled: int = 0
    last: int = -1  # the last decided token: the first row of its next verify step
    cancelled: bool = False
    error: BaseException | None = None
    t_first: float = 0.0
    t_add: float = 0.0  # when the scheduler got it
    alone_s: float = 0.0  # what its forwards so far would have cost it alone (cost model)
    done: bool = False  # finish() has been called
    slow: float | None = None  # its prefill chunks' wall time over their cost model's (recent average)


FAIR = 0.8
PREFILL_SHARE = 2.0  # while sequences decode, a step's prefill costs at most this times their forward


def ema(old: float | None, new: float) -> float:
    """A recent average: half the last value, half the one before."""
    return new if old is None else 0.5 * old + 0.5 * new


def end(job: Job, error: BaseException | None = None) -> None:
    """Finish `job` once (with `error`, if it failed). A finish that raises (its caller's event loop has closed)
    is the job's own affair: the scheduler goes on."""
    if job.done:
        return
    job.done = True
    if error is not None:
        job.error = error
    try:
        job.finish()
    except Exception:  # noqa: BLE001 - nobody is left to tell; the other jobs must not pay for it
        pass


class Scheduler:
    """The batched loop over Jobs; single-threaded (see Service for many callers). `cost(rows)`: seconds of a
    forward of that many rows (the engine's cost model), for each job's alone pace and the prefill budget;
    `fair`: jobs ahead of it sit out steps (see the module's docstring); `prefill_chunk`: the most prompt tokens
    one step prefills; `timed`: the prefill budget scales the cost model by the forwards' measured times (False:
    the cost model alone, for tests that count steps)."""

    def __init__(self, model, accept: AcceptFn, cost: Callable[[int], float] | None,
                 make_cache: Callable[[int, int], KVCache], limit: int, k_max: int = 64, max_batch: int = 8,
                 prefill_chunk: int = 64, fair: bool = True, timed: bool = True):
        self.model, self.accept, self.make_cache, self.limit = model, accept, make_cache, limit
        self.cost = cost if cost is not None else (lambda rows: 1.0)  # None: one sequence alone, nothing to pace
        self.k_max, self.max_batch, self.prefill_chunk, self.fair = k_max, max_batch, prefill_chunk, fair
        self.timed = timed
        self._slow: float | None = None  # the decode forwards' wall time over their cost model's (recent average)
        self.joining: deque[Job] = deque()
        self.slots: list[Job | None] = [None] * max_batch  # row b of self.cache holds slots[b]
        self.cache: KVCache | None = None

    def add(self, job: Job) -> None:
        job.t_add = time.perf_counter()
        self.joining.append(job)

    @property
    def active(self) -> list[Job]:
        return [j for j in self.slots if j is not None]

    @property
    def busy(self) -> bool:
        return bool(self.joining) or any(j is not None for j in self.slots)

    def step(self) -> None:
        """One boundary: drop cancelled jobs, choose the active jobs furthest behind their alone pace and their
        drafts, prefill waiting prompts under the step's token budget, then decode the chosen jobs in one
        batched forward. A fault while working one job ends that job alone (`drop`); a fault of the shared
        forward ends the jobs in it."""
        for job in [j for j in self.joining if j.cancelled]:
            self.drop(job)
        self._leave([j for j in self.active if j.cancelled])
        go = self._behind(self.active)
        decoding = [(b, j) for b, j in enumerate(self.slots) if j in go]
        drafts = self._propose(decoding)
        decoding = [(b, j) for b, j in decoding if b in drafts]
        if self.joining:
            self._prefill(self._prefill_budget(sum(len(d[0]) + 1 for d in drafts.values())))
        if decoding:
            self._decode_step(decoding, drafts)

    def drop(self, job: Job, error: BaseException | None = None) -> None:
        """End `job` wherever it is (waiting, or in a row, which is freed), with `error` if it failed."""
        if job in self.joining:
            self.joining.remove(job)
        if job in self.slots:
            self._free(job)
        end(job, error)

    def _free(self, job: Job) -> None:
        """Free `job`'s cache row; the batched cache goes when no row is left."""
        b = self.slots.index(job)
        self.slots[b] = None
        self.cache.rollback(b, 0)
        if all(j is None for j in self.slots):
            self.cache = None

    def _behind(self, jobs: list[Job]) -> list[Job]:
        """The jobs at least FAIR as far behind their alone pace (time since submitted / alone cost) as the
        one furthest behind."""
        if not self.fair or not jobs:
            return jobs
        now, floor = time.perf_counter(), self.cost(1)
        slow = [(now - j.t_add) / (j.alone_s + floor) for j in jobs]
        return [j for j, s in zip(jobs, slow) if s >= FAIR * max(slow)]

    # ---- joining ----------------------------------------------------------------------------------------------
    def _waiting(self) -> list[Job]:
        """The waiting prompts that have a free row to join (the first ones in arrival order), shortest rest
        first."""
        free = sum(j is None for j in self.slots)
        return sorted(list(self.joining)[:free], key=lambda j: len(j.seq.prompt) - j.prefilled)

    def _prefill_budget(self, rows: int) -> int:
        """Prompt tokens this step may prefill: `prefill_chunk` when nothing decodes; while `rows` rows decode, as
        many as cost at most PREFILL_SHARE times their forward, so a decoding sequence keeps a third of its alone
        speed or better while a long prompt is prefilled beside it (at least 1 token). Costs are the cost
        model's, and with `timed` each scaled by how much slower than the model such forwards have lately run:
        a deep prompt's chunks attend over thousands of positions, which the model (measured after 128) misses,
        and a busy host slows everything."""
        if rows == 0:
            return self.prefill_chunk
        cap = PREFILL_SHARE * self.cost(rows)
        if self.timed:
            decode_slow = self._slow or 1.0
            cap *= decode_slow / max((j.slow for j in self._waiting() if j.slow), default=decode_slow)
        lo, hi = 1, self.prefill_chunk  # the largest t <= hi with cost(t) <= cap (cost is non-decreasing)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.cost(mid) <= cap else (lo, mid - 1)
        return lo

    def _prefill(self, budget: int) -> None:
        """Share `budget` prompt tokens between the waiting prompts: each gets a floor of a quarter of an equal
        share (no prompt starves), and the rest goes shortest first. So a short prompt sent behind a long one
        is in after one step, and no prompt waits for another's whole prefill."""
        waiting = self._waiting()
        if not waiting:
            return
        rest = {j: len(j.seq.prompt) - j.prefilled for j in waiting}
        floor = max(1, budget // (4 * len(waiting)))
        take = {j: min(rest[j], floor) for j in waiting}
        left = budget - sum(take.values())
        for job in waiting:
            more = max(0, min(rest[job] - take[job], left))
            take[job] += more
            left -= more
        for job in waiting:
            try:
                self._prefill_chunk(job, take[job])
            except Exception as e:  # noqa: BLE001 - its own fault: it ends alone
                self.drop(job, e)

    def _prefill_chunk(self, job: Job, n: int | None = None) -> None:
        """Prefill the next `n` (default prefill_chunk) prompt tokens of a waiting job; once its prompt is in, pick
        its first token and join it into a free row (or end it, if that token ends it)."""
        seq, t0 = job.seq, time.perf_counter()
        if job.prefilled == 0:
            job.prefilled = seq.load_prefix(job.cache)
        chunk = seq.prompt[job.prefilled : job.prefilled + (n or self.prefill_chunk)]
        t1 = time.perf_counter()
        logits = self.model(torch.tensor([chunk], device=job.cache.buf.device), job.cache)  # [1, V]
        wall = time.perf_counter() - t1
        job.alone_s += self.cost(len(chunk))
        job.slow = ema(job.slow, wall / self.cost(len(chunk)))
        job.prefilled += len(chunk)
        if job.prefilled < len(seq.prompt):
            seq.stats.prefill_s += time.perf_counter() - t0
            return
        seq.store_prefix(job.cache)
        seq.stats.prompt_tokens = len(seq.prompt)
        first = pick(logits[0], seq.temperature, seq.generator)
        job.t_first = time.perf_counter()
        seq.stats.prefill_s += job.t_first - t0  # time to first token, the prefix cache's work included
        if self._push(job, [first]):
            self._join(job)
        else:
            self.drop(job)

    def _join(self, job: Job) -> None:
        """Move a prefilled job from `joining` into a free row: copy its positions there, growing the batched
        cache first if it needs more room (nothing changes if that fails). A batch of one row takes the job's
        own cache as it is when it has room for the whole generation (no copy)."""
        need = min(self.limit, len(job.seq.prompt) + job.seq.stopper.max_new + self.k_max + 1)
        b = self.slots.index(None)
        if self.cache is None and self.max_batch == 1 and job.cache.max_len >= need:
            self.cache = job.cache
        elif self.cache is None or self.cache.max_len < need:
            size = need if self.cache is None else min(self.limit, max(need, 2 * self.cache.max_len))
            grown = self.make_cache(self.max_batch, size)
            for r, other in enumerate(self.slots):
                if other is not None:
                    grown.copy_row(r, self.cache, r)
            grown.copy_row(b, job.cache, 0)
            for other in self.slots:
                if other is not None:
                    other.cache = grown
            self.cache = grown
        else:
            self.cache.copy_row(b, job.cache, 0)
        # A long wait for a free row would make it the furthest behind by far and stall everyone else until it
        # caught up: its claim is capped at what max_batch sequences sharing the machine would have cost it.
        now = time.perf_counter()
        job.t_add = max(job.t_add, now - self.max_batch * (job.alone_s + self.cost(1)))
        self.joining.remove(job)
        job.cache, job.seq.row, self.slots[b] = self.cache, b, job

    def _leave(self, jobs: list[Job]) -> None:
        """Free the rows of `jobs` (finished or cancelled) and tell their callers."""
        for job in jobs:
            self._free(job)
        for job in jobs:  # after the rows are free, so a caller woken by finish() sees them free
            end(job)

    # ---- decoding ---------------------------------------------------------------------------------------------
    def _push(self, job: Job, new: list[int]) -> bool:
        """Give `new` tokens to the job (cut at its stop); False when it has ended."""
        seq = job.seq
        for i, tok in enumerate(new):
            if seq.stopper.push(tok):
                seq.stats.new_tokens += i + 1
                seq.stats.finish_reason = seq.stopper.reason
                job.emit(new[: i + 1])
                return False
        seq.stats.new_tokens += len(new)
        if seq.source is not None:
            seq.source.observe(new)
        job.emit(new)
        job.last = new[-1]
        return True

    def _propose(self, jobs: list[tuple[int, Job]]) -> dict[int, tuple[list[int], bool]]:
        """Each job's draft for this step, by cache row (a job whose drafting fails ends alone)."""
        cache, drafts = self.cache, {}
        for b, job in jobs:
            seq = job.seq
            try:
                room = min(seq.stopper.max_new - seq.stopper.count - 1, cache.max_len - cache.lengths[b] - 1,
                           self.k_max)
                drafts[b] = seq.source.propose(room) if seq.source is not None else ([], True)
            except Exception as e:  # noqa: BLE001
                self.drop(job, e)
        return drafts

    def _decode_step(self, jobs: list[tuple[int, Job]], drafts: dict[int, tuple[list[int], bool]]) -> None:
        """One forward of `jobs` ((cache row, job) pairs) with their `drafts`; the other rows send nothing."""
        cache = self.cache
        rows = [[self.slots[b].last] + drafts[b][0] if b in drafts else [] for b in range(self.max_batch)]
        for b, job in jobs:
            job.alone_s += self.cost(len(rows[b]))
        before = cache.lengths
        t0 = time.perf_counter()
        try:
            logits = self.model.forward_rows(rows, cache)  # [M, V], row after row (rows sitting out send none)
        except Exception as e:  # noqa: BLE001 - the forward is shared: it ends the jobs in it, no others
            for b, n in enumerate(before):
                if cache.lengths[b] > n:
                    cache.rollback(b, n)
            for _, job in jobs:
                self.drop(job, e)
            return
        self._slow = ema(self._slow, (time.perf_counter() - t0) / self.cost(len(logits)))
        first = [0]
        for r in rows:
            first.append(first[-1] + len(r))
        try:
            decided = self._accept_greedy(jobs, rows, first, logits)
        except Exception:  # noqa: BLE001 - then each greedy job accepts alone below, so a fault is its own
            decided = {}
        leaving = []
        for b, job in jobs:
            try:
                if not self._decided(job, b, drafts[b], decided, logits[first[b] : first[b + 1]]):
                    leaving.append(job)
            except Exception as e:  # noqa: BLE001 - its own fault: it ends alone
                self.drop(job, e)
        self._leave(leaving)

    def _decided(self, job: Job, b: int, draft_from: tuple[list[int], bool], decided: dict, mine) -> bool:
        """Accept job's draft against its logits rows `mine` [K+1, V], roll its row back and hand it its tokens;
        False when it has ended."""
        seq, cache, (draft, from_prediction) = job.seq, self.cache, draft_from
        if b in decided:
            n, nxt = decided[b]
        elif seq.source is None:
            n, nxt = 0, pick(mine[0], seq.temperature, seq.generator)
        elif seq.temperature <= 0:
            n, nxt = greedy_accept(self.accept, mine, draft)
        else:
            n, nxt = sampled_accept(mine, draft, seq.temperature, seq.generator)
        cache.rollback(b, cache.lengths[b] - (len(draft) - n))
        seq.stats.forwards += 1
        if seq.source is not None:
            seq.source.update(len(draft), n, from_prediction, seq.stats)
        alive = self._push(job, draft[:n] + [nxt])
        seq.stats.decode_s = time.perf_counter() - job.t_first
        return alive

    def _accept_greedy(self, jobs, rows, first, logits) -> dict[int, tuple[int, int]]:
        """(accepted count, next token) of every greedy sequence, in one batched accept: the ragged logits are
        gathered into [G, T, V] (a short sequence repeats its last row, past its draft length)."""
        greedy = [b for b, job in jobs if job.seq.temperature <= 0]
        if not greedy:
            return {}
        T = max(len(rows[b]) for b in greedy)
        device = logits.device
        if T == 1 and len(logits) == len(greedy):  # no drafts, only greedy rows: each row's argmax
            return {b: (0, tok) for b, tok in zip(greedy, logits.argmax(dim=-1).tolist())}
        if len(logits) == len(greedy) * T:  # only greedy rows, all T long (one sequence alone): a view, no copy
            gathered = logits.view(len(greedy), T, -1)
        else:
            idx = torch.tensor([[first[b] + min(t, len(rows[b]) - 1) for t in range(T)] for b in greedy],
                               device=device)
            gathered = logits[idx]  # [G, T, V]
        draft = torch.tensor([rows[b][1:] + [0] * (T - len(rows[b])) for b in greedy], dtype=torch.int32,
                             device=device).view(len(greedy), T - 1)
        lens = torch.tensor([len(rows[b]) - 1 for b in greedy], dtype=torch.int32, device=device)
        n, nxt, _ = self.accept(gathered, draft, lens)
        return {b: (nb, tb) for b, nb, tb in zip(greedy, n.tolist(), nxt.tolist())}


def alone(scheduler: Scheduler, seq: SequenceState, cache: KVCache) -> Iterator[list[int]]:
    """The loop with one sequence, inline in the caller's thread (generate, stream, chat, edit): add `seq`,
    prefilled into `cache` (one row; room for the whole generation lets a `max_batch=1` scheduler decode in it
    without a copy), step until it ends and yield the tokens each step decided. Raises the sequence's error,
    if it failed."""
    steps: list[list[int]] = []
    job = Job(seq, cache, steps.append, lambda: None)
    scheduler.add(job)
    while scheduler.busy:
        scheduler.step()
        yield from steps
        steps.clear()
    if job.error is not None:
        raise job.error


class Handle:
    """A submitted generation: iterate `tokens()` (or `async for` over `atokens()`) for each step's tokens as
    they are decided, or `wait()`; `cancel()` from any thread drops it at the next step boundary and frees its
    row."""

    def __init__(self, job_factory: Callable[[Handle], Job]):
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: asyncio.Queue | None = None
        self.job = job_factory(self)

    def _put(self, item: list[int] | None) -> None:
        """From the scheduler thread: one step's tokens, or None at the end."""
        with self._lock:
            if self._aqueue is None:
                self._queue.put(item)
            elif not self._loop.is_closed():  # a closed loop has nobody left to read it
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, item)

    @property
    def stats(self):
        return self.job.seq.stats

    def cancel(self) -> None:
        self.job.cancelled = True

    def _end(self) -> None:
        if self.job.error is not None:
            raise self.job.error

    def tokens(self, timeout: float | None = None) -> Iterator[list[int]]:
        """Each step's tokens until the sequence ends; raises the scheduler's error if it failed."""
        while (item := self._queue.get(timeout=timeout)) is not None:
            yield item
        self._end()

    async def atokens(self):
        """`tokens()` for asyncio code: awaits each step without holding a thread."""
        with self._lock:
            self._loop, self._aqueue = asyncio.get_running_loop(), asyncio.Queue()
            while not self._queue.empty():
                self._aqueue.put_nowait(self._queue.get_nowait())
        while (item := await self._aqueue.get()) is not None:
            yield item
        self._end()

    def wait(self, timeout: float | None = None) -> list[int]:
        """Every token of the output, once it has ended."""
        return [t for step in self.tokens(timeout) for t in step]


class Service:
    """A Scheduler running in a daemon thread: `submit()` is safe from any thread and any number of callers.

    The thread starts with a submission and ends after IDLE_S seconds with nothing to do (the next submission
    starts another), so an engine nobody holds any more can be freed with its weights. It is stopped at
    interpreter exit: a daemon thread still running when the interpreter finalizes is killed where it next
    takes the GIL, and inside torch (a tensor freed on the way) that aborts the whole process."""

    IDLE_S = 5.0

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self._incoming: deque[Job] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        me = weakref.ref(self)  # not self.stop: atexit would keep the engine alive
        atexit.register(lambda: (svc := me()) is not None and svc.stop())

    def submit(self, make_job: Callable[[Callable[[list[int]], None], Callable[[], None]], Job]) -> Handle:
        """make_job(emit, finish) -> Job; returns its Handle."""

        def factory(handle: Handle) -> Job:
            return make_job(handle._put, lambda: handle._put(None))

        handle = Handle(factory)
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine's scheduler has stopped")
            self._incoming.append(handle.job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="specedit-scheduler", daemon=True)
                self._thread.start()
            self._wake.notify()
        return handle

    def stop(self, timeout: float = 60.0) -> None:
        """End the thread after its current step; sequences still running end with an error."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    @torch.inference_mode()
    def _loop(self) -> None:
        s = self.scheduler
        while True:
            with self._wake:
                while not self._incoming and not s.busy and not self._stopping:
                    if not self._wake.wait(self.IDLE_S) and not self._incoming and not s.busy:
                        self._thread = None
                        return
                while self._incoming:
                    s.add(self._incoming.popleft())
                if self._stopping:
                    self._fail(RuntimeError("the engine's scheduler has stopped"))
                    return
            try:
                s.step()  # a fault of one sequence ends that sequence alone, inside the step
            except BaseException as e:  # noqa: BLE001 - a fault of the step itself: every waiting caller hears of it
                self._fail(e)

    def _fail(self, e: BaseException) -> None:
        """End every queued and running sequence with error `e` and free the batch."""
        s = self.scheduler
        jobs = list(s.joining) + s.active
        s.joining.clear()
        s.slots, s.cache = [None] * s.max_batch, None
        for job in jobs:
            end(job, e)
