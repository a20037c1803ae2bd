"""OpenAI-compatible HTTP server with predicted outputs (`specedit serve`), standard library only.

    POST /v1/chat/completions   {"messages": [...], "prediction": {"type": "content", "content": "..."},
                                 "max_tokens" | "max_completion_tokens", "temperature", "seed", "stop", "stream"}
    POST /v1/completions        {"prompt": "...", same options}
    GET  /v1/models

`usage.completion_tokens_details` reports accepted_prediction_tokens and rejected_prediction_tokens, as
OpenAI's API names them. One engine serves one request at a time (a lock); requests queue.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .results import Stats

MAX_BODY = 16 * 2**20


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 and this message."""


def prediction_text(body: dict) -> str | None:
    """The predicted output of a request (`prediction.content`, a string or a list of text parts)."""
    p = body.get("prediction")
    if p is None:
        return None
    if not isinstance(p, dict) or p.get("type") != "content":
        raise RequestError("prediction must be {'type': 'content', 'content': ...}")
    c = p.get("content")
    if isinstance(c, list):
        c = "".join(part.get("text", "") for part in c if isinstance(part, dict))
    if not isinstance(c, str):
        raise RequestError("prediction.content must be a string or a list of text parts")
    return c


def message_text(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str):
        raise RequestError("message content must be a string or a list of text parts")
    return content


class Server:
    """Holds the engine and turns request bodies into generations."""

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.lock = threading.Lock()

    def prompt(self, kind: str, body: dict) -> str:
        tok = self.engine.tokenizer
        if kind == "chat":
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise RequestError("messages must be a non-empty list")
            try:
                msgs = [{"role": m["role"], "content": message_text(m["content"])} for m in msgs]
            except (KeyError, TypeError):
                raise RequestError("each message needs 'role' and 'content'") from None
            if not getattr(tok, "chat_template", None):
                raise RequestError("this model has no chat template; use /v1/completions")
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt must be a non-empty string")
        return prompt

    def options(self, body: dict) -> dict:
        n = body.get("max_completion_tokens", body.get("max_tokens", 256))
        temperature = body.get("temperature", 0.0)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(n, int) or n < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {n!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise RequestError(f"temperature must be a number >= 0, got {temperature!r}")
        if not all(isinstance(s, str) for s in stop):
            raise RequestError("stop must be a string or a list of strings")
        return dict(max_new_tokens=n, temperature=float(temperature), stop=stop, seed=int(body.get("seed") or 0),
                    prediction=prediction_text(body))

    def usage(self, s: Stats) -> dict:
        return {
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.new_tokens,
            "total_tokens": s.prompt_tokens + s.new_tokens,
            "completion_tokens_details": {
                "accepted_prediction_tokens": s.accepted_prediction_tokens,
                "rejected_prediction_tokens": s.rejected_prediction_tokens,
            },
        }

    def envelope(self, kind: str, rid: str, stream: bool) -> dict:
        obj = {"chat": "chat.completion", "text": "text_completion"}[kind] + (".chunk" if stream else "")
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name}

    def choice(self, kind: str, text: str, finish: str | None, stream: bool) -> dict:
        if kind == "text":
            return {"index": 0, "text": text, "finish_reason": finish}
        key = "delta" if stream else "message"
        msg = {"role": "assistant", "content": text} if not stream or text else {}
        return {"index": 0, key: msg, "finish_reason": finish}


class Handler(BaseHTTPRequestHandler):
    server_version = "specedit"
    app: Server  # bound by make_server()

    def log_message(self, fmt, *args):  # quiet by default; errors still reach the client
        pass

    def send_json(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, code: int, message: str) -> None:
        self.send_json(code, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": self.app.model_name, "object": "model"}]})
        else:
            self.error(404, f"no route GET {self.path}")

    def do_POST(self):
        kind = {"/v1/chat/completions": "chat", "/v1/completions": "text"}.get(self.path.rstrip("/"))
        if kind is None:
            return self.error(404, f"no route POST {self.path}")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise RequestError(f"request body of {length} bytes exceeds the limit of {MAX_BODY}")
            body = json.loads(self.rfile.read(length) or b"null")
            if not isinstance(body, dict):
                raise RequestError("request body must be a JSON object")
            app = self.app
            prompt, opts = app.prompt(kind, body), app.options(body)
            app.engine.encode(prompt)  # tokenizer errors surface before any streaming starts
        except (RequestError, ValueError, json.JSONDecodeError) as e:
            return self.error(400, str(e))
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        with app.lock:
            try:
                if body.get("stream"):
                    self.stream(kind, rid, prompt, opts, body)
                else:
                    r = app.engine.generate(prompt, **opts)
                    out = app.envelope(kind, rid, False)
                    out["choices"] = [app.choice(kind, r.text, r.stats.finish_reason, False)]
                    out["usage"] = app.usage(r.stats)
                    self.send_json(200, out)
            except ValueError as e:  # e.g. the prompt does not fit the context
                self.error(400, str(e))

    def stream(self, kind: str, rid: str, prompt: str, opts: dict, body: dict) -> None:
        app = self.app
        stats = Stats()
        deltas = app.engine.stream(prompt, stats=stats, **opts)
        first = next(deltas, "")  # raises before the headers are sent if the request is bad

        def event(obj) -> None:
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        for text in itertools.chain([first] if first else [], deltas):
            event({**app.envelope(kind, rid, True), "choices": [app.choice(kind, text, None, True)]})
        last = {**app.envelope(kind, rid, True), "choices": [app.choice(kind, "", stats.finish_reason, True)]}
        if (body.get("stream_options") or {}).get("include_usage", True):
            last["usage"] = app.usage(stats)
        event(last)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "specedit") -> ThreadingHTTPServer:
    """An HTTP server bound to host:port (port 0 picks a free one); call serve_forever() on it."""
    handler = type("BoundHandler", (Handler,), {"app": Server(engine, model_name)})
    return ThreadingHTTPServer((host, port), handler)
