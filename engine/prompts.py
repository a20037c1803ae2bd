"""Edit prompts (the model's chat template), user text kept out of control tokens, extraction of the edited code,
diffs."""

from __future__ import annotations

import copy
import difflib
import re
import threading
import uuid
import weakref
from collections.abc import Sequence

FENCE = "```"


# ---- user text never becomes control tokens ------------------------------------------------------------------
def check_encodable(name: str, text: str) -> None:
    """ValueError naming `name` when `text` cannot be written as UTF-8 (a lone surrogate such as the valid JSON
    escape "\\ud800"): no tokenizer can take it. The one such check (checks.py's argument checks call it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid text: {text[e.start]!r} at character {e.start} is a lone UTF-16 "
                         f"surrogate, which has no UTF-8 encoding") from None


def special_strings(tokenizer) -> list[str]:
    """The texts `tokenizer` turns into special (control) tokens when they occur in a string, longest first."""
    out = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(t, "special", False):
            out.add(str(getattr(t, "content", t)))
    return sorted((s for s in out if s), key=len, reverse=True)


_TEXT_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TEXT_LOCK = threading.Lock()


def _text_backend(tokenizer):
    """A copy of a fast tokenizer's backend that splits special-token strings like any text (the shared one is
    never switched: another thread may be encoding a chat template with it)."""
    with _TEXT_LOCK:
        backend = _TEXT_BACKENDS.get(tokenizer)
        if backend is None:
            backend = copy.deepcopy(tokenizer._tokenizer)
            backend.encode_special_tokens = True
            _TEXT_BACKENDS[tokenizer] = backend
        return backend


def encode_text(tokenizer, text: str, name: str = "text") -> list[int]:
    """Token ids of user text (a message, a prediction, a file): a special token's string in it, such as
    "<|im_end|>", is tokenized as the characters it is made of, never as the control token. Text free of them
    tokenizes exactly as `tokenizer.encode(text, add_special_tokens=False)`. ValueError naming `name` for text
    that is not valid Unicode (a lone surrogate)."""
    check_encodable(name, text)
    if not any(s in text for s in special_strings(tokenizer)):
        return tokenizer.encode(text, add_special_tokens=False)
    if getattr(tokenizer, "_tokenizer", None) is not None:  # a fast (Rust) tokenizer
        return _text_backend(tokenizer).encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def encode_segments(tokenizer, segments: Sequence[tuple[str, bool]]) -> list[int]:
    """Token ids of a prompt made of (text, is_user_text) segments: the template's segments keep their special
    tokens, the user's never become any. Without a special token's string in the user's segments this is the
    whole text tokenized in one piece, exactly as before; with one, each segment is tokenized on its own."""
    specials = special_strings(tokenizer)
    if not any(user and any(s in text for s in specials) for text, user in segments):
        return tokenizer.encode("".join(text for text, _ in segments), add_special_tokens=False)
    ids: list[int] = []
    for text, user in segments:
        if text:
            ids += encode_text(tokenizer, text) if user else tokenizer.encode(text, add_special_tokens=False)
    return ids


def chat_segments(tokenizer, messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """`messages` through the model's chat template (the assistant's turn opened), as
    (text, is_user_text) segments: each message's content is user text, the template around it is not."""
    _check_messages(tokenizer, messages)
    tag = uuid.uuid4().hex  # unguessable: no content can contain it
    marked = [{**m, "content": f"\x00{tag}:{i}\x00"} for i, m in enumerate(messages)]
    text = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
    parts = re.split(f"\x00{tag}:(\\d+)\x00", text)
    segments = []
    for j, part in enumerate(parts):
        segments.append((messages[int(part)]["content"], True) if j % 2 else (part, False))
    return segments


def _check_messages(tokenizer, messages: Sequence[dict]) -> None:
    specials = special_strings(tokenizer)
    for i, m in enumerate(messages):
        check_encodable(f"messages[{i}]['content']", m["content"])
        check_encodable(f"messages[{i}]['role']", m["role"])
        if any(s in m["role"] for s in specials):  # a role is rendered as it is: it must not forge a marker
            raise ValueError(f"messages[{i}]['role'] {m['role']!r:.80} contains a special token of the model")


def _has_special(tokenizer, texts: Sequence[str]) -> bool:
    specials = special_strings(tokenizer)
    return any(s in t for t in texts for s in specials)


def chat_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of OpenAI-style messages ({'role', 'content': str}) through the chat template, the assistant's
    turn opened: the template's own markers are control tokens, the messages' text never is. Messages free of
    special tokens' strings give exactly the ids of the rendered template text."""
    _check_messages(tokenizer, messages)
    if not _has_special(tokenizer, [m["content"] for m in messages]):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return encode_segments(tokenizer, chat_segments(tokenizer, messages))


def build_edit_ids(tokenizer, original: str, instruction: str, language: str | None = None,
                   file_first: bool = True) -> tuple[list[int], list[int]]:
    """`build_edit_prompt` as token ids: (prompt ids, prediction ids). The file, the instruction and the
    language are user text: a special token's string in them stays text (without one, the ids are exactly
    those of `build_edit_prompt`'s texts)."""
    for name, value in (("original", original), ("instruction", instruction), ("language", language or "")):
        check_encodable(name, value)
    prompt, prediction = build_edit_prompt(tokenizer, original, instruction, language, file_first)
    pred_ids = encode_text(tokenizer, prediction, "original")
    user, head = _edit_user(original, instruction, language, file_first), f"{FENCE}{language or ''}\n"
    if not _has_special(tokenizer, [user, head]):
        return tokenizer.encode(prompt, add_special_tokens=False), pred_ids
    if getattr(tokenizer, "chat_template", None):
        segments = chat_segments(tokenizer, [{"role": "user", "content": user}]) + [(head, True)]
    else:
        segments = [("### Instruction:\n", False), (user, True), ("\n\n### Response:\n", False), (head, True)]
    return encode_segments(tokenizer, segments), pred_ids


def _edit_user(original: str, instruction: str, language: str | None, file_first: bool) -> str:
    code = original if original.endswith("\n") else original + "\n"
    block, ask = f"{FENCE}{language or ''}\n{code}{FENCE}", instruction.strip()
    return (f"{block}\n\n{ask}" if file_first else f"{ask}\n\n{block}") + \
        "\n\nWrite the entire rewritten code and no other text."


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
    user = _edit_user(original, instruction, language, file_first)
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
