"""Property-based tests (issue 24, section 8), bounded for the default run (40 cases each; SPECEDIT_FUZZ=1 runs
1000, see conftest.py).

- The server, in process, against its own OpenAPI schema (hypothesis-jsonschema draws request bodies that the
  schema allows, plus arbitrary JSON and bytes): never a 5xx, every error in OpenAI's shape with a `param` free
  of pydantic's union tags, every 200 a completion (or a stream ending with [DONE]).
- The Python API: generated arguments give a result or a TypeError / ValueError naming an argument.
"""

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

import specedit
from helpers import make_text_checkpoint
from specedit.server import create_app

MODEL = "tiny"
TAGS = (".str", ".int", ".float", ".bool", "list[", "TextPart", "function-")


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    return specedit.load(make_text_checkpoint(tmp_path_factory.mktemp("fuzz")))


@pytest.fixture(scope="module")
def app(eng):
    return create_app(eng, MODEL, max_body=1 << 16)


async def _call(app, method: str, path: str, body: bytes, headers=()) -> tuple[int, bytes]:
    """One request through the ASGI app, in process: (status, whole body)."""
    sent = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if chunks:
            return chunks.pop()
        await asyncio.Event().wait()  # the client stays connected

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
             "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json"),
                         *headers]}
    await asyncio.wait_for(app(scope, receive, send), 20)  # a request never answered fails
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def call(app, method, path, body=b"", headers=()):
    return asyncio.run(_call(app, method, path, body, headers))


def check_answer(status: int, body: bytes, streaming: bool) -> None:
    assert status < 500, body[:500]
    if status >= 400 or not streaming:
        doc = json.loads(body)
    if status >= 400:
        assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}, doc
        err = doc["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        assert err["param"] is None or (isinstance(err["param"], str) and not any(t in err["param"] for t in TAGS))
    elif streaming:
        events = [e for e in body.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events), events[-3:]
        last = json.loads(events[-2].removeprefix("data: "))
        assert "error" in last or last["choices"] == [] or last["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert doc["choices"][0]["finish_reason"] in ("stop", "length") and doc["usage"]["total_tokens"] >= 1


def body_strategy(app, path: str):
    schema = app.openapi()
    ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return from_schema({**ref, "components": schema["components"]})


def _tame(body, model_ok: bool = False):
    """Keep a drawn body quick to answer: a few new tokens at most (only where the value is valid anyway), and
    the served model's name most of the time, so the request gets past the model check."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > 4:
                body[key] = 4
        if model_ok:
            body["model"] = MODEL
        body.setdefault("max_tokens", 4)
    return body


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=9), inner, max_size=4),
                    max_leaves=12)
PATHS = ["/v1/chat/completions", "/v1/completions"]


@pytest.mark.parametrize("path", PATHS)
def test_schema_bodies_never_get_a_5xx_and_errors_have_openai_shape(app, path):
    @settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.data_too_large])
    @given(body=body_strategy(app, path), model_ok=st.sampled_from([True, True, True, False]))
    def run(body, model_ok):
        body = _tame(body, model_ok)
        status, answer = call(app, "POST", path, json.dumps(body).encode())
        check_answer(status, answer, bool(body.get("stream")) and status == 200)

    run()


@given(path=st.sampled_from(PATHS), body=JSON | st.fixed_dictionaries({"model": st.just(MODEL)}, optional={
    "messages": JSON, "prompt": JSON, "temperature": JSON, "stop": JSON, "prediction": JSON, "seed": JSON,
    "max_tokens": st.integers(-5, 4) | JSON, "stream": JSON, "n": JSON}))
def test_arbitrary_json_never_gets_a_5xx(app, path, body):
    body = _tame(body)
    status, answer = call(app, "POST", path, json.dumps(body).encode())
    check_answer(status, answer, status == 200 and isinstance(body, dict) and body.get("stream") is True)


@given(path=st.sampled_from(PATHS + ["/v1/models", "/health", "/nope", "/v1"]),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]), body=st.binary(max_size=64))
def test_any_bytes_any_route_any_method_never_gets_a_5xx(app, path, method, body):
    status, answer = call(app, method, path, body)
    assert status < 500, answer
    doc = json.loads(answer)
    assert status == 200 or set(doc["error"]) == {"message", "type", "param", "code"}


# ---- the Python API ---------------------------------------------------------------------------------------------
# Values each argument may take: valid ones and wrong ones (tiny temperatures, seeds past torch's range and lone
# surrogates included: each gives a result or an error naming its argument).
TEXT = st.text(max_size=12)
WRONG = st.none() | st.booleans() | st.floats(allow_nan=True) | st.binary(max_size=4) | st.just(object())
ARGS = {
    "ids_or_text": TEXT.filter(str.strip) | st.lists(st.integers(0, 299), min_size=1, max_size=6)
    | st.lists(st.integers(-3, 10**6), max_size=3) | WRONG,
    "max_new_tokens": st.integers(-2, 4) | WRONG | st.just("4"),
    "prediction": st.none() | TEXT | st.lists(st.integers(0, 299), max_size=6) | st.integers(),
    "temperature": st.just(0.0) | st.floats(0.0, 2.0) | st.just(1e-300) | st.floats(-2, -1e-9) | st.just(float("nan"))
    | st.just(float("inf")) | st.text(max_size=3),
    "stop": st.lists(TEXT, max_size=3) | TEXT | st.integers() | st.lists(st.integers(), min_size=1, max_size=2),
    "seed": st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=3),
}


@given(kwargs=st.fixed_dictionaries({}, optional=ARGS))
def test_generate_gives_a_result_or_an_error_naming_the_argument(eng, kwargs):
    kwargs.setdefault("ids_or_text", "def f(")
    if isinstance(kwargs.get("max_new_tokens"), int) and not isinstance(kwargs["max_new_tokens"], bool):
        kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], 4)
    else:
        kwargs.setdefault("max_new_tokens", 3)
    try:
        r = eng.generate(**kwargs)
    except (TypeError, ValueError) as e:
        names = set(kwargs) | {"prompt", "token ids", "stop"}
        assert any(n in str(e) for n in names), f"{type(e).__name__}: {e}"
        return
    assert 1 <= len(r.token_ids) <= kwargs["max_new_tokens"]
    assert r.stats.finish_reason in ("stop", "length")


@given(messages=st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                "content": TEXT}), min_size=1, max_size=3)
       | st.lists(JSON, max_size=2) | JSON)
def test_chat_gives_a_result_or_an_error_naming_messages(eng, messages):
    try:
        r = eng.chat(messages, max_new_tokens=2)
    except (TypeError, ValueError) as e:
        assert "messages" in str(e) or "prompt" in str(e), f"{type(e).__name__}: {e}"
        return
    assert 1 <= len(r.token_ids) <= 2


@given(original=TEXT | WRONG, instruction=TEXT | WRONG, language=st.none() | TEXT | WRONG)
def test_edit_gives_a_result_or_an_error_naming_the_argument(eng, original, instruction, language):
    assume(not isinstance(original, str) or len(original) < 40)
    try:
        e = eng.edit(original, instruction, language, max_new_tokens=2)
    except (TypeError, ValueError) as err:
        assert any(n in str(err) for n in ("original", "instruction", "language")), str(err)
        return
    assert isinstance(e.text, str) and not e.complete or e.stats.finish_reason == "stop"


def test_the_schema_is_the_servers_own(app):
    """The fuzz draws from the app's live OpenAPI document: both POST routes are in it, with their fields."""
    schema = app.openapi()
    chat = schema["components"]["schemas"]["ChatRequest"]["properties"]
    assert {"messages", "temperature", "stop", "prediction", "max_tokens"} <= set(chat)
    assert Path(__file__).name == "test_fuzz.py" and set(PATHS) <= set(schema["paths"])
