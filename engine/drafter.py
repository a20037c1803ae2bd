"""Drafter: an alignment pointer into the original file, with re-sync after edits.

Pure Python, no torch. The speculative loop calls, once per forward::

    draft = d.propose(k)              # next <= k tokens of the original after the pointer, [] if none
    n, nxt = verify(draft)            # the model accepts draft[:n] and emits its own token nxt
    d.observe(draft[:n] + [nxt])      # every token appended to the output, in order

Everything is compared as bytes, so equal text tokenized differently (``"\\n\\n"`` versus ``"\\n"`` +
``"\\n"``, the first token after a code fence) does not lose the alignment. The prediction's bytes are
``token_bytes[t]`` concatenated over its tokens, with the token boundaries (byte offsets) kept; ``bp`` is a
byte position in them. The state machine, driven token by token by ``observe``::

    FOLLOWING (bp valid: output so far agrees with the prediction up to bp)
      token == prediction[pointer] and bp on a boundary   -> advance one token          (fast path)
      token bytes == pred_bytes[bp : bp + len]            -> advance bp by len          (may land mid-token)
      otherwise                                           -> DIVERGED, search start = bp
      propose(k) returns tokens only when bp is on a token boundary; mid-token it returns [] until a
      later output token brings bp back onto one.

    DIVERGED (plain decoding: propose returns [])
      keep the output bytes since the divergence (bounded); after each token, take the shortest suffix
      of them with >= min_match_bytes bytes and >= min_match_tokens tokens, not all whitespace, and
      look for it with bytes.find at or after the search start (within `window` bytes when given).
      The nearest match wins: the pointer is monotonic, so the text right after the committed
      position is where an unedited tail resumes, even in repetitive code where the same line
      occurs many times (prompt-lookup methods, searching the whole context, often pick the wrong one).
      match ending at e -> FOLLOWING at bp = e, *tentatively*

    A re-sync is tentative until the output after the jump has agreed with the prediction for as much
    as the match itself (min_match_bytes bytes and min_match_tokens tokens). If it diverges before
    that, the jump is dropped: the search start falls back to the committed position from before it,
    and the output since the first divergence, the tokens followed after the jump included, stays the
    text to match. So a false-positive match cannot lose the rest of the file, even one that agrees
    for a token or two (an inserted method whose body looks like the next one's). Proposals come from
    the tentative position at once, so a right jump costs nothing.

`pointer` is the committed position (a token index, never decreasing): it moves with every output token
that agrees with the prediction outside a tentative re-sync, and with the confirmation of one.

Costs: FOLLOWING is O(1) per token (about 0.3 us); DIVERGED is one bytes.find over the rest of the
prediction per token (C speed, 30-80 us for 200 KB, a 50k-token file; bound it with `window`), against
milliseconds for the forward of any model. Nothing proportional to the prediction is rebuilt per step.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence

__all__ = ["Drafter", "NgramLookup", "special_bytes", "token_bytes_table"]


SPECIAL_PREFIX = b"\xff"  # never occurs in UTF-8 text


def special_bytes(token_id: int) -> bytes:
    """Bytes standing for a token with no text (a special token, or an id outside the table).

    ``b"\\xff" + decimal id + b"\\xff"``: 0xFF never occurs in UTF-8 text and the closing 0xFF keeps one
    id from being a prefix of another, so such a token is matched only by the same id.
    """
    return SPECIAL_PREFIX + str(token_id).encode() + SPECIAL_PREFIX


class Drafter:
    """Proposes the original's tokens following the model's output; re-syncs after edits.

    Args:
        prediction: token ids of the original file (the draft), tokenized as the answer will contain it.
        token_bytes: ``token_bytes[t]`` = the bytes token id ``t`` adds to the text (see
            `token_bytes_table`); ids outside it are treated as text-less tokens (`special_bytes`).
        min_match_bytes: a re-sync needs an output suffix of at least this many bytes (default 12,
            about 3-4 code tokens, e.g. ``" = compute(a"``: long enough that its nearest occurrence
            after the committed position is nearly always the right one, short enough that re-sync
            costs only a few plain-decoding steps after an edit ends).
        min_match_tokens: ... and covering at least this many output tokens (default 3), so that one
            long token (an indentation run, a long identifier) is never the only evidence. The same two
            thresholds confirm a re-sync: the output after the jump must agree for that much again
            before the jump is committed (see the module docstring).
        window: when given, a re-sync match must end within this many bytes of the search start
            (bounds the cost per diverged token and the size of a jump); None searches to the end.
        local_window: while the output since a divergence is still too short for that search, a suffix
            of it (>= 3 bytes) found within this many bytes after the committed position re-syncs at
            once (0 disables; see `_local_match`).

    The public state is `pointer` and `aligned`; see the module docstring for the state machine.
    """

    def __init__(
        self,
        prediction: Sequence[int],
        token_bytes: Sequence[bytes],
        *,
        min_match_bytes: int = 12,
        min_match_tokens: int = 3,
        window: int | None = None,
        local_window: int = 64,
    ):
        if min_match_bytes < 1 or min_match_tokens < 1:
            raise ValueError(
                f"min_match_bytes and min_match_tokens must be >= 1, got {min_match_bytes}, {min_match_tokens}"
            )
        if window is not None and window < 1:
            raise ValueError(f"window must be None or >= 1, got {window}")
        self._pred = list(prediction)
        self._table = token_bytes
        self._min_bytes = min_match_bytes
        self._min_tokens = min_match_tokens
        self._window = window
        self._local_window = local_window
        self._context = b""  # bytes of the last output token that agreed with the prediction
        pieces = [self._bytes(t) for t in self._pred]
        self._data = b"".join(pieces)  # prediction bytes
        self._offsets = [0] * (len(pieces) + 1)  # _offsets[i] = byte offset where token i starts
        for i, p in enumerate(pieces):
            self._offsets[i + 1] = self._offsets[i] + len(p)
        self._following = True
        self._bp = 0  # byte position in _data (valid while following)
        self._tok = 0  # first token index starting at or after _bp
        self._commit = 0  # committed byte position: search start, never decreases
        self._tentative = False  # following since a re-sync that is not confirmed yet
        self._confirm_bytes = self._confirm_tokens = 0  # output that agreed since the re-sync
        # Output tokens since the divergence (bytes); each is >= 1 byte except empty tokens, so this
        # many always hold the longest needle needed.
        self._out: deque[bytes] = deque(maxlen=min_match_bytes + min_match_tokens)

    def _bytes(self, t: int) -> bytes:
        return self._table[t] if 0 <= t < len(self._table) else special_bytes(t)

    @property
    def pointer(self) -> int:
        """Index into the prediction of the next token to propose, as far as it is committed.

        Never decreases. While following it is the token at the byte pointer (the first one starting at
        or after it, mid-token); while diverged it is where the re-sync search starts. During a
        tentative re-sync (not yet confirmed) it still holds the position from before the jump, while
        `propose` already returns tokens from after it.
        """
        if self._following and not self._tentative:
            return self._tok
        return bisect_left(self._offsets, self._commit)

    @property
    def aligned(self) -> bool:
        """True when `propose` would return tokens: following, on a token boundary, tokens left."""
        return self._following and self._tok < len(self._pred) and self._offsets[self._tok] == self._bp

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` prediction token ids following the pointer; [] when not aligned or at the end."""
        if k <= 0 or not self.aligned:
            return []
        return self._pred[self._tok : self._tok + k]

    def observe(self, tokens: Sequence[int]) -> None:
        """Record ``tokens``, just appended to the output in order (accepted draft + the model's token)."""
        for t in tokens:
            if self._following and self._follow(t):
                continue
            self._diverged(t)

    def _follow(self, t: int) -> bool:
        """Advance over output token ``t`` if it agrees with the prediction at bp; False if it does not."""
        b = self._bytes(t)
        if (
            self._tok < len(self._pred)
            and self._offsets[self._tok] == self._bp
            and t == self._pred[self._tok]
        ):
            self._tok += 1
            self._bp = self._offsets[self._tok]
        else:
            end = self._bp + len(b)
            if self._data[self._bp : end] != b:  # slice of len(b) bytes at most: O(token)
                return False
            self._bp = end
            while self._offsets[self._tok] < end:
                self._tok += 1
        if self._tentative:
            self._out.append(b)
            self._confirm_bytes += len(b)
            self._confirm_tokens += 1
            if self._confirm_bytes < self._min_bytes or self._confirm_tokens < self._min_tokens:
                return True
            self._tentative = False
            self._out.clear()
        self._context = b  # agreed outside a tentative re-sync: the output since a divergence starts after it
        self._commit = self._bp
        return True

    def _diverged(self, t: int) -> None:
        """Output token ``t`` disagrees with the prediction (or we were already diverged): try re-sync."""
        if self._following:
            if not self._tentative:  # a fresh divergence; a failed tentative jump keeps its history
                self._out.clear()
            self._following = self._tentative = False
        self._out.append(self._bytes(t))
        needle = self._needle()
        if needle is None:
            needle, pos = self._local_match()
        else:
            start = self._commit
            end = len(self._data) if self._window is None else min(len(self._data), start + self._window)
            pos = self._data.find(needle, start, end)
        if pos < 0:
            return
        self._following = self._tentative = True
        self._confirm_bytes = self._confirm_tokens = 0
        self._bp = pos + len(needle)
        self._tok = bisect_left(self._offsets, self._bp)

    def _local_match(self) -> tuple[bytes, int]:
        """Before there is output enough for a file-wide search: the longest suffix of the output since the
        divergence, optionally led by the last token followed before it (>= 3 bytes, not all whitespace),
        found within `local_window` bytes after the committed position, and where; (b"", -1) if none.

        Small edits resume within a few bytes (a changed word, dropped blank lines, a skipped token), so this
        re-syncs one or two tokens after them instead of min_match_tokens. The window is short, a wrong guess
        costs one verify of a short draft, and it is tentative like any re-sync."""
        end = min(len(self._data), self._commit + self._local_window)
        suffix = b""
        found = (b"", -1)
        for b in [*reversed(self._out), self._context]:
            suffix = b + suffix
            if len(suffix) >= 3 and not suffix.isspace():
                pos = self._data.find(suffix, self._commit, end)
                if pos < 0:
                    break
                found = (suffix, pos)
        return found

    def _needle(self) -> bytes | None:
        """Shortest output suffix with enough bytes and tokens, or None (too short or all whitespace)."""
        parts: list[bytes] = []
        size = 0
        for b in reversed(self._out):
            parts.append(b)
            size += len(b)
            if size >= self._min_bytes and len(parts) >= self._min_tokens:
                needle = b"".join(reversed(parts))
                return None if needle.isspace() else needle
        return None


class NgramLookup:
    """Drafts while the drafter has diverged: what followed the longest recent n-gram of the output, looked up
    in the output so far and in the prediction.

    Candidates are the latest `candidates` earlier occurrences of the output's last token in the output (a
    rewrite repeats itself: a loop of similar lines, a renamed identifier used again) and its `candidates`
    occurrences in the prediction nearest at or after `near`, the drafter's committed position (new code
    reuses the original's phrases, and an edit's end resumes the original before the drafter has evidence
    enough to re-sync), else the last ones before it. The candidate whose preceding tokens agree longest with
    the output's (up to `n_max` tokens, at least `n_min`) wins, the output's first on a tie; the tokens that
    followed it are proposed.

    Costs: one list append per observed token; the prediction is indexed once (one append per token); a
    proposal compares at most 2 * candidates * n_max tokens.
    """

    def __init__(self, prediction: Sequence[int] = (), n_max: int = 8, n_min: int = 1, candidates: int = 16):
        if not 1 <= n_min <= n_max or candidates < 1:
            raise ValueError(f"need 1 <= n_min <= n_max and candidates >= 1, got n_min={n_min}, n_max={n_max}, "
                             f"candidates={candidates}")
        self._n_max, self._n_min, self._c = n_max, n_min, candidates
        self._toks: list[int] = []
        self._out_at: dict[int, list[int]] = {}  # token -> its indices in the output
        self._pred = list(prediction)
        self._pred_at: dict[int, list[int]] = {}  # token -> its indices in the prediction
        for i, t in enumerate(self._pred):
            self._pred_at.setdefault(t, []).append(i)

    def observe(self, tokens: Sequence[int]) -> None:
        """Append output tokens (the same calls as Drafter.observe)."""
        for t in tokens:
            self._out_at.setdefault(t, []).append(len(self._toks))
            self._toks.append(t)

    def _agree(self, seq: list[int], i: int) -> int:
        """How many tokens ending at seq[i] equal the output's last ones (at most n_max)."""
        out, n = self._toks, 0
        while n < self._n_max and n <= i and n < len(out) and seq[i - n] == out[-1 - n]:
            n += 1
        return n

    def propose(self, k: int, near: int = 0) -> list[int]:
        """Up to k tokens that followed the best-agreeing earlier occurrence of the output's end; [] if none."""
        if k <= 0 or not self._toks:
            return []
        last, c = self._toks[-1], self._c
        best, best_n = [], self._n_min - 1
        for i in reversed(self._out_at[last][-1 - c : -1]):  # not the last token itself
            n = self._agree(self._toks, i)
            if n > best_n and i + 1 < len(self._toks):
                best, best_n = self._toks[i + 1 : i + 1 + k], n
        at = self._pred_at.get(last, [])
        j = bisect_left(at, near)
        for i in [*at[j : j + c], *reversed(at[max(0, j - c) : j])]:
            n = self._agree(self._pred, i)
            if n > best_n and i + 1 < len(self._pred):
                best, best_n = self._pred[i + 1 : i + 1 + k], n
        return best


# ----------------------------------------------------------------------------------------------------
# Token id -> bytes


def _unicode_to_bytes() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes_table(tokenizer) -> list[bytes]:
    """``table[id]`` = the bytes token ``id`` adds to the decoded text, for every id of ``tokenizer``.

    ``tokenizer`` is duck-typed (a transformers tokenizer): ``get_vocab()``, ``all_special_ids``,
    ``len()`` and, when present, ``get_added_vocab()``. Two vocabulary styles, told apart by which
    space marker is more common in the vocabulary:

    - byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): each character stands for one byte through GPT-2's
      bytes_to_unicode (``"Ġ"`` = space, ``"Ċ"`` = newline), so a token may hold part of a UTF-8
      character;
    - SentencePiece (Llama 2, Mistral, Gemma): ``"▁"`` = space, ``"<0x0A>"`` = the byte 0x0A (byte
      fallback), other characters as UTF-8. A leading ``"▁"`` counts as the space it stands for: the
      table is for tokens in the middle of the text.

    Added tokens that are not special hold their text as is (UTF-8). Special tokens, and ids with no
    token, map to `special_bytes` (never equal to any text), so an EOS in a prediction is matched only
    by EOS. For a token sequence ``ids`` of text (no special tokens, no SentencePiece dummy prefix),
    ``b"".join(table[i] for i in ids) == text.encode()``.
    """
    vocab: dict[str, int] = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    special = set(tokenizer.all_special_ids)
    added = set(getattr(tokenizer, "get_added_vocab", dict)().values())
    byte_level = sum("Ġ" in s or "Ċ" in s for s in vocab) > sum("▁" in s for s in vocab)
    u2b = _unicode_to_bytes()
    table = [special_bytes(i) for i in range(size)]
    for s, i in vocab.items():
        if i in special:
            continue
        if i in added:
            table[i] = s.encode()
        elif byte_level:
            table[i] = bytes(u2b[c] for c in s) if all(c in u2b for c in s) else s.encode()
        elif m := _SP_BYTE.fullmatch(s):
            table[i] = bytes([int(m.group(1), 16)])
        else:
            table[i] = s.replace("▁", " ").encode()
    return table
