"""Engine.detokenize / Engine.detokenizer: the one way token ids become text."""

from __future__ import annotations

import random

import pytest
from helpers import make_text_checkpoint

import specedit
from specedit.detokenize import Detokenizer, text_bytes
from specedit.drafter import special_bytes

TABLE = text_bytes([b"h", b"\xc3", b"\xa9", special_bytes(3), b"``", b"`", b"x", b"\xe9"])
H, C3, A9, SPECIAL, TICKS2, TICK, X, BAD = range(8)


def test_a_character_split_across_tokens_is_emitted_whole():
    d = Detokenizer(TABLE)
    assert d.feed([H, C3]) == "h"  # the first byte of é alone is not text yet
    assert d.feed([A9]) == "é"
    assert d.finish() == ""


def test_special_tokens_give_no_text_and_invalid_bytes_give_a_replacement_character():
    assert Detokenizer(TABLE).feed([H, SPECIAL, X]) == "hx"
    d = Detokenizer(TABLE)
    assert d.feed([BAD, X]) + d.finish() == "\ufffdx"
    d = Detokenizer(TABLE)
    assert d.feed([H, C3]) + d.finish() == "h\ufffd"  # a character cut by the end of the answer


def test_a_stop_string_split_across_steps_cuts_the_text_before_it():
    d = Detokenizer(TABLE, stop=["```"])
    assert d.feed([H, TICKS2]) == "h"  # "``" could start the stop string: held back
    assert d.feed([TICK, X]) == ""  # it did: nothing after it, ever
    assert d.feed([H]) == "" and d.finish() == ""
    d = Detokenizer(TABLE, stop=["```"])
    assert d.feed([H, TICKS2]) + d.feed([X]) + d.finish() == "h``x"  # it did not: released


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    return specedit.load(make_text_checkpoint(tmp_path_factory.mktemp("detok")))


def test_detokenize_is_the_tokenizers_text_and_any_cut_of_the_ids_streams_the_same_text(eng):
    rng = random.Random(0)
    ids = [rng.randrange(len(eng.tokenizer)) for _ in range(200)]
    whole = eng.detokenize(ids)
    assert whole == eng.tokenizer.decode(ids, skip_special_tokens=True)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(ids)), 8))
        d = eng.detokenizer()
        parts = [d.feed(ids[a:b]) for a, b in zip([0] + cuts, cuts + [len(ids)])]
        assert "".join(parts) + d.finish() == whole


def test_generate_stream_and_detokenize_give_the_same_text(eng):
    r = eng.generate("def add(a, b):", max_new_tokens=40, stop=["\n\n"])
    assert eng.detokenize(r.token_ids, stop=["\n\n"]) == r.text
    assert "".join(eng.stream("def add(a, b):", max_new_tokens=40, stop=["\n\n"])) == r.text
