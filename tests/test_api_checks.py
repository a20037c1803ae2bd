"""Public API misuse gets a TypeError / ValueError naming the argument; chat(); __version__, py.typed; edit()'s
`complete`; the cost model cached on disk."""

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

import specedit
from helpers import make_text_checkpoint
from specedit import costcache
from specedit.results import GenerateResult, Stats
from specedit.draft_policy import CostModel

CODE = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_text_checkpoint(tmp_path_factory.mktemp("checks"))


@pytest.fixture(scope="module")
def eng(ckpt):
    return specedit.load(ckpt)


@pytest.mark.parametrize("call, exc, words", [
    (lambda e: e.generate(123), TypeError, ["ids_or_text", "int"]),
    (lambda e: e.generate(None), TypeError, ["ids_or_text", "NoneType"]),
    (lambda e: e.generate([1, "a"]), TypeError, ["ids_or_text", "sequence of int"]),
    (lambda e: e.generate("x", prediction=123), TypeError, ["prediction", "str", "sequence of int", "None"]),
    (lambda e: e.generate("x", max_new_tokens=0), ValueError, ["max_new_tokens", ">= 1", "0"]),
    (lambda e: e.generate("x", max_new_tokens="5"), TypeError, ["max_new_tokens", "str"]),
    (lambda e: e.generate("x", max_new_tokens=True), TypeError, ["max_new_tokens", "bool"]),
    (lambda e: e.generate("x", temperature=-1), ValueError, ["temperature", ">= 0", "-1"]),
    (lambda e: e.generate("x", temperature=float("nan")), ValueError, ["temperature", "finite"]),
    (lambda e: e.generate("x", temperature="hot"), TypeError, ["temperature"]),
    (lambda e: e.generate("x", stop=5), TypeError, ["stop", "str"]),
    (lambda e: e.generate("x", seed=1.5), TypeError, ["seed", "int"]),
    (lambda e: e.stream("x", prediction=123), TypeError, ["prediction"]),  # at call time, not on iteration
    (lambda e: e.stream("x", stats={}), TypeError, ["stats", "Stats"]),
    (lambda e: e.logits(3.5), TypeError, ["ids"]),
    (lambda e: e.encode({"a": 1}), TypeError, ["ids_or_text"]),
    (lambda e: e.edit(None, "x"), TypeError, ["original", "str", "NoneType"]),
    (lambda e: e.edit(CODE, None), TypeError, ["instruction", "str"]),
    (lambda e: e.edit(CODE, "  \n"), ValueError, ["instruction", "empty or blank"]),
    (lambda e: e.edit(CODE, "x", language=3), TypeError, ["language", "str"]),
    (lambda e: e.edit(CODE, "x", max_new_tokens=-2), ValueError, ["max_new_tokens", ">= 1"]),
    (lambda e: e.edit(CODE, "x", speculate="no"), TypeError, ["speculate", "True or False"]),
    (lambda e: e.chat("hello"), TypeError, ["messages", "list"]),
    (lambda e: e.chat([]), TypeError, ["messages", "non-empty"]),
    (lambda e: e.chat([{"role": "user"}]), TypeError, ["messages[0]", "'content'"]),
    (lambda e: e.chat([{"role": "user", "content": 5}]), TypeError, ["messages[0]['content']", "int"]),
    (lambda e: e.chat([{"role": "user", "content": "x"}], temperature=-0.5), ValueError, ["temperature"]),
])
def test_bad_arguments_name_the_argument(eng, call, exc, words):
    with pytest.raises(exc) as e:
        call(eng)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("kw, exc, words", [
    (dict(path=123), TypeError, ["path", "int"]),
    (dict(dtype="float64"), ValueError, ["dtype", "'float32'", "'int8'", "float64"]),
    (dict(backend="cuda"), ValueError, ["backend", "'auto'", "'torch'", "'triton'"]),
    (dict(device="tpu"), ValueError, ["device", "'tpu'", "cpu"]),
    (dict(cpu_kernels="yes"), TypeError, ["cpu_kernels", "None, True or False"]),
    (dict(device=7.0), TypeError, ["device", "float"]),
])
def test_load_checks_arguments_before_reading(tmp_path, kw, exc, words):
    kw = {"path": tmp_path / "does-not-exist", **kw}  # nothing is read: the argument error comes first
    with pytest.raises(exc) as e:
        specedit.load(**kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_load_cuda_without_cuda_names_usable_devices(ckpt):
    with pytest.raises(ValueError) as e:
        specedit.load(ckpt, device="cuda")
    msg = str(e.value)
    assert "'cuda' is not available" in msg and "usable here: cpu" in msg and torch.__version__ in msg


def test_ids_as_tensor_and_numpy_ints_are_accepted(eng):
    import numpy as np

    ids = eng.encode(CODE)
    a = eng.generate(torch.tensor(ids), max_new_tokens=4).token_ids
    b = eng.generate([np.int64(t) for t in ids], max_new_tokens=4, stop="zz").token_ids
    assert a == b == eng.generate(ids, max_new_tokens=4).token_ids


def test_chat_applies_the_template_and_is_lossless(eng):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Add type hints:\n"},
                                         {"type": "text", "text": CODE}]}]
    prompt = eng.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add type hints:\n" + CODE}],
        tokenize=False, add_generation_prompt=True)
    ref = eng.generate(prompt, max_new_tokens=24)
    plain = eng.chat(msgs, max_new_tokens=24)
    spec = eng.chat(msgs, max_new_tokens=24, prediction=ref.text[:-4] + "zz")
    assert plain.token_ids == ref.token_ids == spec.token_ids
    assert spec.stats.draft_accepted > 0 and spec.stats.finish_reason in ("stop", "length")


def test_chat_without_template_says_so(tmp_path):
    path = make_text_checkpoint(tmp_path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    e = specedit.load(path)
    with pytest.raises(ValueError, match="no chat template"):
        e.chat([{"role": "user", "content": "hi"}])


def test_version_and_py_typed():
    assert specedit.__version__ == importlib.metadata.version("specedit")
    assert (Path(specedit.__file__).parent / "py.typed").is_file()
    assert "__version__" in specedit.__all__


def fake_generate(result):
    return lambda self, *a, **k: result


@pytest.mark.parametrize("tokens, reason, complete", [
    ([5, 6], "stop", True),  # the closing fence (a stop string) ended the answer
    ([5, None], "stop", False),  # EOS before any fence
    ([5, 6], "length", False),  # cut by max_new_tokens
])
def test_edit_complete_only_at_the_closing_fence(eng, monkeypatch, tokens, reason, complete):
    tokens = [eng.eos_ids[0] if t is None else t for t in tokens]
    r = GenerateResult(tokens, CODE, Stats(finish_reason=reason, new_tokens=2))
    monkeypatch.setattr(specedit.Engine, "generate", fake_generate(r))
    e = eng.edit(CODE, "Add type hints.")
    assert e.complete is complete and e.finish_reason == reason and e.text == CODE


def test_cost_model_round_trips():
    c = CostModel([1, 2, 4], [0.010, 0.012, 0.011])
    d = CostModel.from_dict(json.loads(json.dumps(c.to_dict())))
    assert d.rows == c.rows and d.seconds == c.seconds == [0.010, 0.011, 0.011]
    for bad in ({}, {"rows": [1], "seconds": [0.1]}, {"rows": [2, 1], "seconds": [0.1, 0.2]},
                {"rows": [1, 2], "seconds": [0.1, "x"]}, {"rows": [1, 2], "seconds": [0.1, -1]}):
        with pytest.raises(ValueError):
            CostModel.from_dict(bad)


def test_cost_model_is_measured_once_and_cached_on_disk(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECEDIT_CACHE", str(tmp_path))
    calls = []
    measure = CostModel.measure.__func__

    def counting(cls, *a, **k):
        calls.append(1)
        c = measure(cls, *a, **k)
        c.steady = True  # the tiny model's microsecond timings may disagree on a busy machine
        return c

    monkeypatch.setattr(CostModel, "measure", classmethod(counting))
    first = specedit.load(ckpt)
    c1 = first.cost_model()
    files = list((tmp_path / "cost").glob("*.json"))
    assert len(calls) == 1 and len(files) == 1
    again = specedit.load(ckpt)  # a fresh engine, as in a new process: read from disk, not measured
    r = again.generate(CODE, max_new_tokens=8, prediction=CODE)
    assert len(calls) == 1 and again.cost_model().seconds == c1.seconds and r.stats.forwards > 0
    other_format = specedit.load(ckpt, dtype="float16")  # another weight format: its own measurement
    other_format.cost_model()
    assert len(calls) == 2 and len(list((tmp_path / "cost").glob("*.json"))) == 2
    files[0].write_text("{not json")  # a damaged cache entry is measured again and rewritten
    specedit.load(ckpt).cost_model()
    assert len(calls) == 3 and CostModel.from_dict(json.loads(files[0].read_text())).rows == c1.rows


def test_unsteady_cost_model_is_used_but_not_kept(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECEDIT_CACHE", str(tmp_path))
    busy = CostModel([1, 2, 4], [0.01, 0.03, 0.02], steady=False)
    monkeypatch.setattr(CostModel, "measure", classmethod(lambda cls, *a, **k: busy))
    eng = specedit.load(ckpt)
    assert eng.cost_model() is busy and not list(tmp_path.glob("cost/*.json"))
    assert specedit.load(ckpt).cost_model() is busy  # the next engine measures again


def test_cost_cache_key_covers_machine_model_and_format(eng, ckpt, monkeypatch):
    k = costcache.key(eng.model, eng.backend.name)
    assert k == costcache.key(specedit.load(ckpt).model, eng.backend.name)
    assert k != costcache.key(eng.model, "triton")
    assert k == costcache.key(eng.model, eng.backend)  # a Backend counts by its name, not its per-process repr
    monkeypatch.setattr(costcache, "_cpu_name", lambda: "another CPU")
    assert k != costcache.key(eng.model, eng.backend.name)


def test_stale_or_future_cost_entries_are_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECEDIT_CACHE", str(tmp_path))
    c = CostModel([1, 2], [0.01, 0.012])
    costcache.save("k", c)
    assert costcache.load("k").seconds == c.seconds
    d = json.loads(costcache.path("k").read_text())
    for when in (d["measured_at"] - costcache.MAX_AGE_S - 1, d["measured_at"] + 3600):
        costcache.path("k").write_text(json.dumps({**d, "measured_at": when}))
        assert costcache.load("k") is None


BAD_GENERATION_ARGS = [  # (kwargs, exception, words its message must hold)
    (dict(temperature=-1), ValueError, ["temperature", ">= 0", "-1"]),
    (dict(temperature=float("nan")), ValueError, ["temperature", "finite"]),
    (dict(temperature=float("inf")), ValueError, ["temperature", "finite"]),
    (dict(max_new_tokens="4"), TypeError, ["max_new_tokens", "str"]),
    (dict(max_new_tokens=0), ValueError, ["max_new_tokens", ">= 1"]),
    (dict(stop=5), TypeError, ["stop", "int"]),
    (dict(stop=b"x"), TypeError, ["stop", "bytes"]),
    (dict(seed=1.5), TypeError, ["seed", "float"]),
    (dict(seed=2**70), ValueError, ["seed", "2**64 - 1", str(2**70)]),
    (dict(seed=-(2**63) - 1), ValueError, ["seed", "-2**63"]),
    (dict(prediction=123), TypeError, ["prediction"]),
    (dict(prediction="ok \ud800"), ValueError, ["prediction", "surrogate", "character 3"]),
    (dict(stop="\udfff"), ValueError, ["stop", "surrogate"]),
    (dict(stop=["ok", "a\ud800"]), ValueError, ["stop[1]", "surrogate"]),
    (dict(prompt="x\ud800"), ValueError, ["surrogate"]),
]


def _call(eng, entry, prompt="x", **kw):
    if entry == "generate":
        return eng.generate(prompt, **kw)
    if entry == "stream":
        return eng.stream(prompt, **kw)
    if entry == "chat":
        return eng.chat([{"role": "user", "content": prompt}], **kw)
    if entry == "submit":
        return eng.submit(prompt, **kw).wait(timeout=60)
    pred = kw.pop("prediction", None)
    return eng.generate_batch(["y", prompt], prediction=None if pred is None else [None, pred], **kw)


@pytest.mark.parametrize("entry", ["generate", "stream", "chat", "submit", "generate_batch"])
@pytest.mark.parametrize("kw, exc, words", BAD_GENERATION_ARGS)
def test_every_entry_point_checks_arguments_alike(eng, entry, kw, exc, words):
    """submit and generate_batch check exactly as generate does: the same exception, naming the argument, before
    anything is queued (nothing fails deep inside the scheduler thread)."""
    with pytest.raises(exc) as e:
        _call(eng, entry, **kw)
    msg = str(e.value)
    for w in words:
        assert w in msg, (entry, w, msg)
    if "prompt" in kw:  # the name of the text argument of each entry point
        name = {"chat": "messages[0]['content']", "generate_batch": "prompts[1]"}.get(entry, "ids_or_text")
        assert msg.startswith(name), msg
    if entry == "generate_batch" and "prediction" in kw and exc is ValueError:
        assert msg.startswith("prediction[1]"), msg
    svc = eng._service
    if svc is not None:  # nothing was queued
        assert not svc._incoming and not svc.scheduler.busy


def test_surrogates_in_messages_and_edit_name_the_argument(eng):
    with pytest.raises(ValueError, match=r"messages\[1\]\['content'\] is not valid text"):
        eng.chat([{"role": "system", "content": "hi"},
                  {"role": "user", "content": [{"type": "text", "text": "\ud800"}]}])
    with pytest.raises(ValueError, match=r"original is not valid text"):
        eng.edit("a\udc00", "fix it")
    with pytest.raises(ValueError, match=r"instruction is not valid text"):
        eng.edit(CODE, "fix \ud83d")
    with pytest.raises(ValueError, match=r"ids_or_text is not valid text"):
        eng.encode("\ud800")


def test_seed_range_is_torchs(eng):
    """The ends of the range torch takes work (and a negative seed is torch's own two's-complement seed)."""
    a = eng.generate(CODE, max_new_tokens=6, temperature=1.0, seed=2**64 - 1).token_ids
    b = eng.submit(CODE, max_new_tokens=6, temperature=1.0, seed=-1).wait(timeout=60)
    assert a == b
    assert len(eng.generate(CODE, max_new_tokens=6, temperature=1.0, seed=-(2**63)).token_ids) == 6


def test_generate_batch_checks_every_prompt_before_queueing_any(eng):
    with pytest.raises(TypeError, match=r"prompts\[2\] must be text"):
        eng.generate_batch(["a", [1, 2], 3.5])
    with pytest.raises(TypeError, match="prediction must be None or a list"):
        eng.generate_batch(["a", "b"], prediction="ab")
    with pytest.raises(ValueError, match="does not fit the context"):
        eng.generate_batch(["a", [1] * 600])
    svc = eng._service
    assert svc is None or (not svc._incoming and not svc.scheduler.busy)


def test_generation_checks_once_into_one_options_object():
    from specedit.checks import GenParams, generation

    assert generation("x", 5, [1, 2], 0.5, ["a", "b"], 3) == GenParams(5, 0.5, 3, ("a", "b"), [1, 2])
    assert generation([1], 7, None, 0.0, (), 0) == GenParams(7)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation("x", 0, None, 0.0, (), 0)
