"""One request's fault is its own, through the server: the failing request gets a 500 in OpenAI's shape (a
stream: an error event and [DONE]), while requests running beside it get their usual answers (issue #24)."""

import http.client
import json
import threading

import pytest

import specedit
from helpers import make_text_checkpoint, start_server
from specedit.server import create_app

MODEL = "tiny"


class Injected(RuntimeError):
    pass


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    eng = specedit.load(make_text_checkpoint(tmp_path_factory.mktemp("iso")))
    sequence = eng._sequence

    def planted(ids_or_text, *a, **k):  # a prompt holding FAULT gets a stop check that raises at its 3rd token
        seq = sequence(ids_or_text, *a, **k)
        text = ids_or_text if isinstance(ids_or_text, str) else eng.detokenize(ids_or_text)
        if "FAULT" in text:
            push = seq.stopper.push

            def faulty(tok):
                if seq.stopper.count >= 2:
                    raise Injected("stop check fault")
                return push(tok)

            seq.stopper.push = faulty
        return seq

    eng._sequence = planted
    server, port = start_server(create_app(eng, MODEL))
    yield eng, port
    server.should_exit = True


def post(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, **body}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read().decode()


def test_a_failing_request_gets_a_500_and_the_others_their_answers(srv):
    eng, port = srv
    good = ["def add(a, b):", "print(", "# hello\n"]
    want = [eng.generate(p, max_new_tokens=24).text for p in good]
    out = {}

    def run(key, body):
        out[key] = post(port, body)

    bodies = {"fault": {"prompt": "FAULT def", "max_tokens": 24},
              "fault-stream": {"prompt": "FAULT print(", "max_tokens": 24, "stream": True}}
    for i, p in enumerate(good):
        bodies[i] = {"prompt": p, "max_tokens": 24, "stream": i == 1}
    threads = [threading.Thread(target=run, args=kv) for kv in bodies.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    status, body = out["fault"]
    assert status == 500
    err = json.loads(body)["error"]
    assert err["type"] == "server_error" and "stop check fault" in err["message"]
    status, body = out["fault-stream"]
    events = [line[6:] for line in body.split("\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["type"] == "server_error" and "Injected" in err["message"]  # a stream names the error's type
    for i, w in enumerate(want):
        status, body = out[i]
        assert status == 200, body
        if i == 1:
            events = [json.loads(line[6:]) for line in body.split("\n") if line.startswith("data: {")]
            assert "".join(e["choices"][0]["text"] for e in events) == w
            assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            assert json.loads(body)["choices"][0]["text"] == w


def test_the_reported_tiny_temperature_is_greedy_beside_other_requests(srv):
    """"temperature": 1e-300 (it passes ge=0) would divide the logits by zero in the scheduler thread: it decodes
    greedily, and a stream beside it gets its answer."""
    eng, port = srv
    want = eng.generate("def add(a, b):", max_new_tokens=24).text
    out = {}

    def run(key, body):
        out[key] = post(port, body)

    threads = [threading.Thread(target=run, args=("tiny", {"prompt": "def add(a, b):", "max_tokens": 24,
                                                              "temperature": 1e-300})),
               threading.Thread(target=run, args=("beside", {"prompt": "def add(a, b):", "max_tokens": 24,
                                                             "stream": True}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    status, body = out["tiny"]
    assert status == 200 and json.loads(body)["choices"][0]["text"] == want
    status, body = out["beside"]
    events = [json.loads(line[6:]) for line in body.split("\n") if line.startswith("data: {")]
    assert status == 200 and body.rstrip().endswith("data: [DONE]")
    assert "".join(e["choices"][0]["text"] for e in events) == want
