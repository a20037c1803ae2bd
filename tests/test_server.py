"""The OpenAI-compatible server on loopback: chat and text completions, predicted outputs, streaming, errors."""

import json
import threading
import urllib.error
import urllib.request

import pytest

import specedit
from helpers import make_text_checkpoint
from specedit.server import make_server


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    eng = specedit.load(make_text_checkpoint(tmp_path_factory.mktemp("srv")))
    srv = make_server(eng, "127.0.0.1", 0, "tiny")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", eng
    srv.shutdown()


def post(url, body, raw=False):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read().decode() if raw else json.loads(r.read())


def error_of(url, body):
    with pytest.raises(urllib.error.HTTPError) as e:
        post(url, body)
    assert e.value.code == 400
    return json.loads(e.value.read())["error"]["message"]


MSGS = [{"role": "user", "content": "Add type hints:\ndef add(a, b):\n    return a + b\n"}]
CODE = "def add(a, b):\n    return a + b\n"


def test_models(base):
    url, _ = base
    with urllib.request.urlopen(url + "/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny"


def test_chat_with_prediction_is_lossless_and_reports_usage(base):
    url, eng = base
    plain = post(url + "/chat/completions", {"messages": MSGS, "max_tokens": 30})
    expected = plain["choices"][0]["message"]["content"]  # a random model: predict its own answer
    pred = post(url + "/chat/completions", {"messages": MSGS, "max_tokens": 30,
                                            "prediction": {"type": "content", "content": expected[:-3] + "zz"}})
    assert pred["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert pred["object"] == "chat.completion" and pred["choices"][0]["finish_reason"] in ("stop", "length")
    u, pu = pred["usage"], plain["usage"]
    assert u["completion_tokens"] == pu["completion_tokens"] and u["prompt_tokens"] == pu["prompt_tokens"]
    d = u["completion_tokens_details"]
    assert d["accepted_prediction_tokens"] > 5
    assert pu["completion_tokens_details"] == {"accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}


def test_text_completion_matches_engine(base):
    url, eng = base
    out = post(url + "/completions", {"prompt": CODE, "max_tokens": 20,
                                      "prediction": {"type": "content", "content": [{"type": "text", "text": CODE}]}})
    assert out["choices"][0]["text"] == eng.generate(CODE, max_new_tokens=20).text


def test_streaming_chunks_add_up(base):
    url, _ = base
    body = {"messages": MSGS, "max_tokens": 30, "prediction": {"type": "content", "content": CODE}}
    full = post(url + "/chat/completions", body)["choices"][0]["message"]["content"]
    raw = post(url + "/chat/completions", {**body, "stream": True}, raw=True)
    events = [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in chunks[-1]


@pytest.mark.parametrize("body, message", [
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "needs 'role' and 'content'"),
    ({"messages": MSGS, "max_tokens": 0}, "max_tokens must be a positive integer"),
    ({"messages": MSGS, "temperature": -1}, "temperature must be a number >= 0"),
    ({"messages": MSGS, "prediction": {"type": "file"}}, "prediction must be"),
    ({"messages": [{"role": "user", "content": "x " * 600}]}, "does not fit the context"),
])
def test_bad_requests_get_400(base, body, message):
    url, _ = base
    assert message in error_of(url + "/chat/completions", body)
