"""Token ids -> text: incremental, whole UTF-8 characters only, cut before the first stop string.

Every piece of text the engine returns (generate, stream, edit, the server's answers and SSE deltas) is made
here, from the bytes each token adds (`Engine.token_bytes`), so a character split across tokens is never
emitted in halves and a stop string split across steps is still found.

    d = Detokenizer(text_bytes(engine.token_bytes), stop=["```"])
    for step in steps:          # lists of token ids
        print(d.feed(step), end="")
    print(d.finish())
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from .drafter import SPECIAL_PREFIX


def text_bytes(token_bytes: Sequence[bytes]) -> list[bytes]:
    """`token_bytes` with the text-less (special) tokens mapped to b"": what answer text is made of."""
    return [b"" if b.startswith(SPECIAL_PREFIX) else b for b in token_bytes]


class Detokenizer:
    """Turns token ids into text deltas of whole UTF-8 characters (invalid bytes become U+FFFD), cut before the
    first stop string.

    `feed(ids)` returns the text now decided; text that could still be the start of a stop string is held back
    until it is not; `finish()` returns the rest. After a stop string, both return "".
    """

    def __init__(self, table: Sequence[bytes], stop: Sequence[str] = ()):
        self.table = table
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.stopped = False

    def _emit(self, final: bool) -> str:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        cut = len(self.pending) if final else max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def feed(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"".join(self.table[t] for t in ids))
        return self._emit(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        return self._emit(final=True)
