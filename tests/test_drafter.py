"""Drafter: following, re-sync after edits, re-tokenization, tentative jumps, special tokens, byte tables.

Pure Python plus tokenizers built here (a byte-level BPE trained on a code snippet, and a SentencePiece-style
Unigram vocabulary with byte fallback): no model files.
"""

import time
from dataclasses import dataclass

import pytest
from specedit.drafter import Drafter, NgramLookup, special_bytes, token_bytes_table
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CODE = '''import os


def résumé(path: str) -> list[str]:
    """Read → lines. 日本語 🚀"""
    with open(path) as f:
        return [line.rstrip("\\n") for line in f]


class Counter:
    """Counts values; the total is kept."""

    def __init__(self, start=0):
        self.total = start
        self.count = 0

    def add(self, value):
        self.total += value
        self.count += 1
        return self.total

    def mean(self):
        if self.count == 0:
            raise ValueError("no values")
        return self.total / self.count


def main():
    counter = Counter()
    for value in range(10):
        counter.add(value * 2)
    print(counter.mean())
'''

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE (GPT-2 style) trained on CODE, with an EOS special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CODE] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


@pytest.fixture(scope="module")
def sp():
    """A SentencePiece-style Unigram vocabulary: '▁' = space, '<0xNN>' byte fallback (newline, CJK, emoji)."""
    words = {w for w in CODE.replace("\n", " ").split(" ") if w and all(c.isascii() or c == "é" for c in w)}
    chars = {c for c in CODE if c.isascii() and c not in "\n "} | {"▁", "é"}
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    vocab += [(p, -1.0) for w in sorted(words) for p in (w, "▁" + w)]
    vocab += [(c, -5.0) for c in sorted(chars)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def table(bpe):
    return token_bytes_table(bpe)


def text_of(table, ids):
    return b"".join(table[i] for i in ids)


@dataclass
class Step:
    consumed: int  # output tokens consumed after this step
    consumed_bytes: int  # output bytes consumed after this step
    drafted: int
    accepted: int
    aligned: bool
    pointer: int
    resumed: bool  # aligned, and the proposals (up to the end) are byte for byte the rest of the output


def simulate(d, prediction, target, table, k=8, check=True):
    """Run the speculative loop against a 'model' whose output is `target`: propose, verify, observe.

    Checks on the way that the pointer never decreases.
    """
    out = text_of(table, target)
    steps, i, nbytes = [], 0, 0
    last = d.pointer
    while i < len(target):
        draft = d.propose(k)
        assert len(draft) <= k
        n = 0
        while n < len(draft) and i + n < len(target) and draft[n] == target[i + n]:
            n += 1
        emitted = target[i : i + n + 1]
        d.observe(emitted)
        i += len(emitted)
        nbytes += len(text_of(table, emitted))
        assert d.pointer >= last, "pointer moved backwards"
        last = d.pointer
        resumed = check and d.aligned and text_of(table, d.propose(len(prediction))) == out[nbytes:]
        steps.append(Step(i, nbytes, len(draft), n, d.aligned, d.pointer, resumed))
    return steps


def first_resumed_after(steps, out_byte):
    """Output bytes consumed at the first step past `out_byte` where the drafter is right again."""
    return next(s.consumed_bytes for s in steps if s.consumed_bytes >= out_byte and s.resumed)


def assert_resyncs(bpe, table, original, edited, edit_end=None, slack=40):
    """Edit the original into `edited`; the drafter must resume at the right place soon after the edit.

    The edit ends at output byte `edit_end`, by default where the texts' common suffix begins. The drafter
    must be proposing the rest of the output within `slack` bytes (about 10 tokens) after it, and from
    then on every draft is fully accepted.
    """
    pred, target = bpe.encode(original), bpe.encode(edited)
    if edit_end is None:
        suffix = 0
        while suffix < min(len(original), len(edited)) and original[-1 - suffix] == edited[-1 - suffix]:
            suffix += 1
        edit_end = len(edited.encode()) - len(edited[len(edited) - suffix :].encode())
    d = Drafter(pred, table)
    steps = simulate(d, pred, target, table)
    at = first_resumed_after(steps, edit_end)
    assert at <= edit_end + slack, (at, edit_end)
    after = [s for s in steps if s.consumed_bytes > at]
    assert all(s.accepted == s.drafted for s in after[:-1]), "a draft was rejected after re-sync"
    assert d.pointer == len(pred)
    return steps


# ------------------------------------------------------------------------------------------------
# following


@pytest.mark.parametrize("k", [1, 5, 16])
def test_following_proposes_the_next_k_tokens(bpe, table, k):
    pred = bpe.encode(CODE)
    d = Drafter(pred, table)
    i = 0
    while i < len(pred):
        assert d.aligned and d.pointer == i
        draft = d.propose(k)
        assert draft == pred[i : i + k]
        d.observe(pred[i : i + len(draft) + 1])  # all accepted + the model's own (equal) next token
        i = min(i + len(draft) + 1, len(pred))
    assert d.pointer == len(pred)
    assert d.propose(k) == [] and not d.aligned


def test_propose_edge_cases(table):
    assert Drafter([], table).propose(4) == []
    d = Drafter([5, 6], table)
    assert d.propose(0) == [] and d.propose(-1) == []
    assert d.propose(10) == [5, 6]
    with pytest.raises(ValueError):
        Drafter([1], table, min_match_bytes=0)
    with pytest.raises(ValueError):
        Drafter([1], table, window=0)


# ------------------------------------------------------------------------------------------------
# edits


@pytest.mark.parametrize("where", [0, 1, 37, 0.5, -20])
def test_mutation_at_j_resyncs(bpe, table, where):
    pred = bpe.encode(CODE)
    j = int(where * len(pred)) if isinstance(where, float) else where % len(pred)
    other = bpe.encode("~")[0]  # not in CODE
    assert table[other] != table[pred[j]]
    target = pred[:j] + [other] + pred[j + 1 :]
    d = Drafter(pred, table)
    steps = simulate(d, pred, target, table)
    edit_end = len(text_of(table, target[: j + 1]))
    at = first_resumed_after(steps, edit_end)
    assert at <= edit_end + 40
    # plain decoding only between the mutation and the re-sync: almost everything else was drafted
    assert sum(s.accepted for s in steps) >= len(pred) - 20 - len(steps)
    assert d.pointer == len(pred)


def test_model_starts_elsewhere(bpe, table):
    """The output does not begin at prediction[0] (a preamble): re-sync from the start finds the code."""
    steps = assert_resyncs(bpe, table, CODE, "Sure, here it is:\n```python\n" + CODE)
    assert steps[0].drafted > 0 and steps[0].accepted == 0


def test_insertion(bpe, table):
    """New method resembling its neighbours: its last line equals the line before it, and its body looks
    like the next method's, so near matches that are wrong come first; they must not be committed."""
    at = CODE.index("    def add")
    inserted = "    def reset(self):\n        self.total = 0\n        self.count = 0\n\n"
    edited = CODE[:at] + inserted + CODE[at:]
    assert_resyncs(bpe, table, CODE, edited, edit_end=len((CODE[:at] + inserted).encode()))


def test_deletion(bpe, table):
    start, end = CODE.index("    def add"), CODE.index("    def mean")
    assert_resyncs(bpe, table, CODE, CODE[:start] + CODE[end:])


def test_line_replacement(bpe, table):
    line = "        self.count += 1\n"
    assert_resyncs(bpe, table, CODE, CODE.replace(line, "        self.count = self.count + 1  # one more\n"))


def test_several_edits(bpe, table):
    edited = (
        CODE.replace("Counts values", "Counts numbers")
        .replace("        self.count += 1\n", "")
        .replace("range(10)", "range(20)")
    )
    pred, target = bpe.encode(CODE), bpe.encode(edited)
    d = Drafter(pred, table)
    steps = simulate(d, pred, target, table)
    assert d.pointer == len(pred) and d.propose(8) == []
    assert sum(s.accepted for s in steps) >= 0.75 * len(target)


def test_repetitive_code_resyncs_at_the_next_line(bpe, table):
    """20 equal lines, line 10 edited: the nearest match after the pointer is line 11, not line 1 or 20."""
    line = "    total += values[0] * scale\n"
    head = "def f(values, scale):\n    total = 0\n"
    lines = [line] * 20
    original = head + "".join(lines) + "    return total\n"
    lines[9] = "    total += values[0] * 2\n"
    edited = head + "".join(lines) + "    return total\n"
    assert original.count("values[0] * scale\n    total") == 19  # a needle found on every line
    pred, target = bpe.encode(original), bpe.encode(edited)
    d = Drafter(pred, table)
    steps = simulate(d, pred, target, table)
    edit_end = len(head) + 9 * len(line) + len(lines[9])
    # the first proposals after the edit start inside line 11 and are the rest of the output
    step = next(s for s in steps if s.consumed_bytes >= edit_end - 2 and s.aligned)
    assert step.resumed
    line11 = len(head) + 10 * len(line)  # byte offset of line 11 in the original (ASCII)
    proposals_start = len(original) - (len(edited) - step.consumed_bytes)
    assert line11 <= proposals_start < line11 + len(line)
    assert d.pointer == len(pred)
    assert sum(s.accepted for s in steps) >= len(pred) - 25 - len(steps)


# ------------------------------------------------------------------------------------------------
# equal text, different tokens


WORDS = [b"a", b"\n\n", b"\n", b"b", b"    ", b"   ", b" def", b"def", b" x", b"=", b" 1", b" 2", b"c"]


def test_split_token_is_followed_to_the_next_boundary():
    pred = [0, 1, 3]  # "a" "\n\n" "b"
    d = Drafter(pred, WORDS)
    d.observe([0, 2])  # "a" "\n": inside the prediction's "\n\n"
    assert not d.aligned and d.propose(4) == [] and d.pointer == 2
    d.observe([2])  # second "\n": back on a boundary
    assert d.aligned and d.propose(4) == [3] and d.pointer == 2


def test_merged_tokens_are_followed():
    pred = [0, 2, 2, 3]  # "a" "\n" "\n" "b"
    d = Drafter(pred, WORDS)
    d.observe([0, 1])  # "a" "\n\n"
    assert d.aligned and d.pointer == 3 and d.propose(4) == [3]


def test_first_token_after_code_fence_tokenized_differently():
    pred = [5, 6, 9, 10]  # "   " " def" "=" " 1"
    d = Drafter(pred, WORDS)
    assert d.propose(2) == [5, 6]
    d.observe([4])  # the model emits "    " (4 spaces): the draft's first token is rejected, bytes agree
    assert not d.aligned and d.propose(2) == []
    d.observe([7])  # "def"
    assert d.aligned and d.pointer == 2 and d.propose(2) == [9, 10]


@pytest.mark.parametrize("cut", ["\n\n\ndef", "\n\n\nclass", "\n\n    def add"])
def test_retokenized_text_keeps_alignment(bpe, table, cut):
    """Prediction and output tokenize equal text differently at a cut: no divergence, no re-sync needed."""
    at = CODE.index(cut) + 1  # between the first newline and the rest
    pred = bpe.encode(CODE)
    target = bpe.encode(CODE[:at]) + bpe.encode(CODE[at:])
    assert target != pred and text_of(table, target) == text_of(table, pred)
    d = Drafter(pred, table, min_match_bytes=10_000)  # re-sync impossible: only byte-following can help
    steps = simulate(d, pred, target, table)
    assert d.pointer == len(pred)
    assert sum(s.drafted == 0 for s in steps) <= 3  # only the few steps until the next common boundary
    assert all(s.resumed for s in steps[:-1] if s.aligned)


def test_code_fence_first_token(bpe, table):
    """The model's answer starts with a fence; the code's first token merges with the fence's newline."""
    code = CODE[CODE.index("    def add") :]
    pred = bpe.encode(code)
    answer = bpe.encode("```python\n" + code)
    skip = 0
    while len(text_of(table, answer[: skip + 1])) <= len("```python"):
        skip += 1
    target = answer[skip:]  # what the model emits after "```python": "\n    def add..." tokenized in context
    assert table[target[0]].startswith(b"\n ")  # the newline merged with the indentation
    d = Drafter(pred, table)
    steps = simulate(d, pred, target, table)
    assert first_resumed_after(steps, 0) <= 40
    assert d.pointer == len(pred)


# ------------------------------------------------------------------------------------------------
# tentative re-sync


FP = [b"A;", b"B;", b"C;", b"D;", b"E;", b"foo", b"(x", b")", b"Z", b"Y"]


def test_false_positive_resync_falls_back():
    pred = [0, 1, 2, 3, 4, 5, 6, 7, 8]  # A B C D E foo(x) Z
    d = Drafter(pred, FP, min_match_bytes=6, min_match_tokens=3)
    d.observe([5, 6, 7])  # the model first writes "foo(x)" (a line copied from further down)
    assert d.aligned and d.propose(1) == [8]  # tentative jump to the copy further down
    assert d.pointer == 0  # not committed
    d.observe([9])  # ... but goes on with "Y": the jump was wrong
    assert not d.aligned and d.pointer == 0
    d.observe([0, 1, 2])  # then it writes the original from the start
    assert d.aligned and d.propose(2) == [3, 4]  # found, because the search fell back to 0


def test_confirmed_resync_commits():
    pred = [0, 1, 2, 3, 4, 5, 6, 7, 8]
    d = Drafter(pred, FP, min_match_bytes=6, min_match_tokens=3)
    d.observe([9, 1, 2, 3])  # "Y" then B C D: re-sync after D, tentative
    assert d.aligned and d.propose(1) == [4] and d.pointer == 0
    d.observe([4, 5, 6])  # E foo (x agree: as much evidence as the match itself, committed
    assert d.pointer == 7
    d.observe([9, 0, 1, 2])  # diverge; A B C only exist before the committed pointer: never go back
    assert not d.aligned and d.pointer == 7


def test_resync_that_agrees_briefly_still_falls_back():
    """An inserted line resembling later code: the jump agrees for a token, then diverges: fall back."""
    table = FP + [b"W"]
    pred = [0, 1, 2, 3, 5, 6, 7, 8, 4]  # A B C D foo(x) Z E
    d = Drafter(pred, table, min_match_bytes=6, min_match_tokens=3)
    d.observe([9, 1, 2])  # "Y" B C: matches B C only with "Y", no re-sync
    d.observe([10, 5, 6, 7])  # "W" foo(x): tentative jump behind foo(x) ... (the original's "foo(x)Z")
    assert d.propose(1) == [8]
    d.observe([8, 9])  # ... "Z" agrees, then "Y": not enough agreement to commit -> back
    assert not d.aligned and d.pointer == 0
    d.observe([1, 2, 3])  # the output goes on with the original's B C D
    assert d.aligned and d.propose(2) == [5, 6]


def test_whitespace_only_suffix_never_resyncs():
    table = [b"x", b"    ", b"\n", b"y"]
    pred = [0, 2, 1, 1, 1, 0]
    d = Drafter(pred, table, min_match_bytes=4, min_match_tokens=2)
    d.observe([3, 2, 1, 1])  # "y" "\n" + 8 spaces: matches, but only whitespace
    assert not d.aligned and d.pointer == 0


def test_window_limits_the_search():
    pred = [0] * 50 + [5, 6, 7, 8]  # 100 bytes of "A;" then "foo(x)Z"
    d = Drafter(pred, FP, min_match_bytes=6, min_match_tokens=3, window=50)
    d.observe([9, 5, 6, 7])
    assert not d.aligned
    d = Drafter(pred, FP, min_match_bytes=6, min_match_tokens=3, window=None)
    d.observe([9, 5, 6, 7])
    assert d.aligned and d.propose(3) == [8]


# ------------------------------------------------------------------------------------------------
# special tokens


def test_eos_in_prediction(bpe, table):
    eos = bpe.eos_token_id
    assert table[eos] == special_bytes(eos) and table[eos].startswith(b"\xff")
    head, tail = CODE[: CODE.index("class")], CODE[CODE.index("class") :]
    pred = bpe.encode(head) + [eos] + bpe.encode(tail)

    # followed by id
    d = Drafter(pred, table)
    simulate(d, pred, pred, table)
    assert d.pointer == len(pred)

    # the literal text "<|endoftext|>" is not EOS
    d = Drafter(pred, table)
    literal = bpe.encode(EOS, split_special_tokens=True)
    assert eos not in literal
    n = len(bpe.encode(head))
    d.observe(pred[:n] + literal[:1])
    assert not d.aligned and d.pointer == n

    # the model skips the EOS: re-sync after it
    d = Drafter(pred, table)
    steps = simulate(d, pred, bpe.encode(head) + bpe.encode(tail), table)
    assert first_resumed_after(steps, len(head.encode())) <= len(head.encode()) + 40
    assert d.pointer == len(pred)


def test_ids_outside_the_table_never_match():
    d = Drafter([0, 1], [b"a", b"b"])
    d.observe([0, 10**6])
    assert not d.aligned and d.pointer == 1


# ------------------------------------------------------------------------------------------------
# token_bytes_table


ROUND_TRIP = [
    CODE,
    "x = 'naïve café' → ∑ 日本語 🚀\n\tindented\r\n",
    "    \n\n\n  trailing   spaces   \n",
    "emoji only 🚀🚀🚀 and a zero-width joiner 👩\u200d💻",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_table_round_trips_byte_level(bpe, table, text):
    ids = bpe.encode(text)
    assert text_of(table, ids) == text.encode()


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_table_round_trips_sentencepiece(sp, text):
    t = token_bytes_table(sp)
    ids = sp.encode(text)
    assert any(sp.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte fallback in use
    assert text_of(t, ids) == text.encode()


def test_table_markers_and_specials(bpe, sp, table):
    assert len(table) == len(bpe)
    assert table[bpe.convert_tokens_to_ids("Ġ")] == b" " and table[bpe.convert_tokens_to_ids("Ċ")] == b"\n"
    t = token_bytes_table(sp)
    assert len(t) == len(sp)
    assert t[sp.convert_tokens_to_ids("<0x0A>")] == b"\n" and t[sp.convert_tokens_to_ids("▁")] == b" "
    assert t[sp.convert_tokens_to_ids("▁return")] == b" return"
    specials = [t[i] for i in sp.all_special_ids]
    assert len(set(specials)) == len(specials) and all(s.startswith(b"\xff") for s in specials)


# ------------------------------------------------------------------------------------------------
# performance: no quadratic behaviour


def test_50k_token_prediction_is_fast(bpe, table):
    parts, n = [], 0
    while n < 50_000:
        block = CODE.replace("Counter", f"Counter{len(parts)}").replace("range(10)", f"range({len(parts)})")
        parts.append(block)
        n += len(bpe.encode(block))
    original = "".join(parts)
    edits = {i for i in range(len(parts)) if i % 7 == 3}
    edited = "".join(
        p.replace("self.count += 1", "self.count += 2") if i in edits else p for i, p in enumerate(parts)
    )
    pred, target = bpe.encode(original), bpe.encode(edited)
    assert len(pred) >= 50_000

    t0 = time.perf_counter()
    d = Drafter(pred, table)
    steps = simulate(d, pred, target, table, k=8, check=False)
    following = time.perf_counter() - t0
    assert d.pointer == len(pred)
    # a forward verifies k=8 tokens + its own: about len/9 forwards, plus a few plain steps per edit
    assert len(steps) <= len(target) / 9 + 10 * len(edits)
    assert sum(s.drafted == 0 for s in steps) <= 10 * len(edits)

    # fully diverged: every output token runs one search over the rest of the prediction
    junk = [bpe.convert_tokens_to_ids(c) for c in "QWXZ"] * 500
    t0 = time.perf_counter()
    d = Drafter(pred, table)
    d.observe(junk)
    diverged = time.perf_counter() - t0
    assert d.pointer == 0 and not d.aligned
    assert following < 5 and diverged < 5, (following, diverged)


# ------------------------------------------------------------------------------------------------
# local re-sync: small edits resume at once


LOCAL = [b"x=0;", b"\n", b"    ", b"if", b"(a)", b"{", b"}", b"while"]


def test_dropped_blank_lines_resync_on_the_next_token():
    pred = [0, 1, 2, 1, 2, 1, 2, 3, 4, 5, 1, 6]  # "x=0;\n    \n    \n    if(a){\n}"
    d = Drafter(pred, LOCAL)
    d.observe([0, 1, 2, 3])  # the model drops the whitespace-only lines: "x=0;\n    if"
    assert d.aligned and d.propose(3) == [4, 5, 1]
    d = Drafter(pred, LOCAL, local_window=0)  # without it, re-sync waits for 12 bytes of evidence
    d.observe([0, 1, 2, 3])
    assert not d.aligned


def test_local_resync_is_tentative_and_only_looks_nearby():
    pred = [0, 1, 2, 3, 4, 5, 1, 6]  # "x=0;\n    if(a){\n}"
    d = Drafter(pred, LOCAL)
    d.observe([0, 1, 7, 4])  # "while(a)" replaces "if(a)": "(a)" is found just ahead
    assert d.aligned and d.propose(2) == [5, 1] and d.pointer == 2  # tentative: not committed
    far = [0] + [1] * 80 + [3, 4]  # "(a)" only 80 bytes ahead: too far for a local guess
    d = Drafter(far, LOCAL)
    d.observe([0, 7, 4])
    assert not d.aligned


# ------------------------------------------------------------------------------------------------
# NgramLookup: drafts from the output's own repeats and from the prediction, while diverged


def test_lookup_proposes_what_followed_the_last_occurrence():
    lk = NgramLookup(n_max=2, n_min=2)
    lk.observe([1, 2, 3, 4, 9, 1, 2])
    assert lk.propose(3) == [3, 4, 9]
    lk.observe([7, 1, 2])  # the latest occurrence wins
    assert lk.propose(2) == [7, 1]
    assert lk.propose(0) == []


def test_lookup_follows_a_loop():
    lk = NgramLookup(n_max=3, n_min=3)
    line = [10, 11, 12, 13]
    lk.observe(line * 2 + line[:3])
    assert lk.propose(8) == [13] + line[:3]  # up to the end of the output
    assert NgramLookup().propose(4) == []  # nothing yet
    with pytest.raises(ValueError, match="n_min <= n_max"):
        NgramLookup(n_min=0)
    with pytest.raises(ValueError, match="n_min <= n_max"):
        NgramLookup(n_max=2, n_min=3)


def test_lookup_prefers_the_longest_context():
    lk = NgramLookup(n_max=3, n_min=1)
    lk.observe([5, 1, 2, 8, 9, 7, 2, 6])  # "2" was last followed by 6, but "1 2" by 8
    lk.observe([1, 2])
    assert lk.propose(2) == [8, 9]


def test_lookup_drafts_from_the_prediction_nearest_the_pointer():
    pred = [1, 2, 3, 50, 60, 1, 2, 3, 70, 80]
    lk = NgramLookup(pred, n_max=3, n_min=2)
    lk.observe([9, 2, 3])  # not in the output before: the prediction's occurrences
    assert lk.propose(2, near=0) == [50, 60]
    assert lk.propose(2, near=4) == [70, 80]  # the first one at or after the drafter's position
    assert lk.propose(2, near=9) == [70, 80]  # none after it: the last one
    lk.observe([4, 2, 3])  # now the output has "2 3" followed by 4: the output wins
    assert lk.propose(2, near=0) == [4, 2]
