"""Edit prompts (the model's chat template), text streaming on bytes, extraction of the edited code, diffs."""

from __future__ import annotations

import codecs
import difflib
from collections.abc import Sequence

FENCE = "```"


def build_edit_prompt(tokenizer, original: str, instruction: str, language: str | None = None,
                      file_first: bool = True) -> tuple[str, str]:
    """Chat prompt for rewriting `original`, and the prediction of the answer.

    The prompt ends with the assistant's opening code fence, so the model starts copying code at once; the
    prediction is the original followed by the closing fence, which is where generation stops. file_first puts
    the file before the instruction, so every edit of one file shares the prompt up to the file's end and the
    prefix cache reuses it (False: the instruction first).
    Returns (prompt_text, prediction_text).
    """
    lang = language or ""
    code = original if original.endswith("\n") else original + "\n"
    block, ask = f"{FENCE}{lang}\n{code}{FENCE}", instruction.strip()
    user = (f"{block}\n\n{ask}" if file_first else f"{ask}\n\n{block}") + \
        "\n\nWrite the entire rewritten code and no other text."
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    else:
        head = f"### Instruction:\n{user}\n\n### Response:\n"
    return head + f"{FENCE}{lang}\n", code + FENCE


def extract_code(answer: str, original: str) -> str:
    """The edited file from the answer text (already cut before the closing fence); keeps the original's
    trailing-newline convention."""
    if not original.endswith("\n") and answer.endswith("\n"):
        answer = answer[:-1]
    return answer


def unified_diff(original: str, edited: str, name: str = "file") -> str:
    """Unified diff original -> edited (empty string when equal)."""
    return "".join(
        difflib.unified_diff(
            original.splitlines(keepends=True), edited.splitlines(keepends=True), f"a/{name}", f"b/{name}"
        )
    )


class TextStream:
    """Turns token ids into text deltas of whole UTF-8 characters, cut before the first stop string.

    `feed(tokens)` returns the text now decided; text that could still be the start of a stop string is held
    back until it is not; `finish()` returns the rest.
    """

    def __init__(self, token_bytes: Sequence[bytes], stop: Sequence[str] = ()):
        self.token_bytes = token_bytes
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

    def feed(self, tokens: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"".join(self.token_bytes[t] for t in tokens))
        return self._emit(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        return self._emit(final=True)
