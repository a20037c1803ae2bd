"""OpenAI-compatible HTTP server with predicted outputs (`specedit serve`), on FastAPI + uvicorn.

    POST /v1/chat/completions   messages, prediction {"type": "content", "content": ...}, max_tokens |
                                max_completion_tokens, temperature, seed, stop, stream, stream_options, n (1)
    POST /v1/completions        prompt (a string) and the same options
    GET  /v1/models             the model served, with created and owned_by
    GET  /health                {"status": "ok"}

Every request is submitted to the engine's batched scheduler (Engine.submit), so concurrent requests share
each forward; a client that disconnects cancels its sequence and frees its row. Errors have OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`: 400 for a bad request (never a dropped connection), 401
for a missing or wrong API key, 404 `model_not_found`, 413 for a body over the limit (checked before it is
read). `usage.completion_tokens_details` reports accepted_prediction_tokens and rejected_prediction_tokens.
One log line per request: method, path, status, milliseconds, completion tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool

from . import prompts
from .backends import engine_limit
from .results import Stats

MAX_BODY = 16 * 2**20
log = logging.getLogger("specedit.server")


# ---- request bodies -------------------------------------------------------------------------------------------
class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


Content = StrictStr | list[TextPart]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None


class Prediction(BaseModel):
    type: Literal["content"]
    content: Content


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields this server does not use (user, top_p, ...)
    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | StrictInt | None = Field(None, ge=0, le=2)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = Field(None, max_length=4)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    prediction: Prediction | None = None
    n: StrictInt | None = Field(None, ge=1)


class ChatRequest(Options):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Options):
    prompt: StrictStr = Field(min_length=1)


def text_of(content: Content | None) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content or [])


# ---- errors -----------------------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


# ---- the app ----------------------------------------------------------------------------------------------------
def create_app(engine, model_name: str = "specedit", api_key: str | None = None, max_body: int = MAX_BODY) -> FastAPI:
    """The ASGI app serving `engine` under `model_name` (run it with uvicorn, or `specedit serve`)."""
    app = FastAPI(title="specedit", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    created = int(time.time())
    limit = engine_limit(engine.backend, engine.cfg)
    max_chars = limit * max(len(b) for b in engine.token_bytes)  # more characters than this cannot fit

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return error_response(400, f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}", param)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "specedit"}]}

    def check(body: Options) -> dict:
        if body.model != model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{model_name}'",
                           "model", "model_not_found")
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n} is not supported: one choice per request", "n")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        n = body.max_completion_tokens or body.max_tokens or 256
        return dict(max_new_tokens=n, temperature=float(body.temperature or 0.0), stop=stop, seed=body.seed or 0,
                    prediction=None if body.prediction is None else text_of(body.prediction.content))

    def check_length(text: str, what: str) -> None:
        if len(text) > max_chars:
            raise APIError(400, f"{what} of {len(text)} characters cannot fit the context of {limit} tokens",
                           what)

    async def run(request: Request, kind: str, body: Options, prompt: str):
        opts = check(body)
        check_length(prompt, "messages" if kind == "chat" else "prompt")
        if opts["prediction"] is not None:
            check_length(opts["prediction"], "prediction")
        try:
            handle = await run_in_threadpool(engine.submit, prompt, **opts)
        except ValueError as e:  # e.g. the prompt does not fit the context
            raise APIError(400, str(e)) from None
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(request, kind, rid, handle, opts["stop"], include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(cancel_on_disconnect(request, handle))
        try:
            tokens = [t async for step in handle.atokens() for t in step]
        except Exception as e:  # its sequence failed (the others go on): a 500 in OpenAI's shape
            raise APIError(500, f"generation failed: {e}", kind="server_error") from e
        finally:
            watcher.cancel()
        text = prompts.TextStream(engine._text_bytes(), opts["stop"])
        out = text.feed(tokens) + text.finish()
        s = handle.stats
        request.state.tokens = s.new_tokens
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": out, "refusal": None},
                      "logprobs": None, "finish_reason": s.finish_reason or "stop"}
        else:
            choice = {"index": 0, "text": out, "logprobs": None, "finish_reason": s.finish_reason or "stop"}
        return {**envelope(kind, rid, False), "choices": [choice], "usage": usage(s)}

    async def stream(request: Request, kind: str, rid: str, handle, stop: list[str], include_usage: bool):
        text = prompts.TextStream(engine._text_bytes(), stop)

        def event(choice_text: str | None, finish: str | None, first: bool = False) -> str:
            if kind == "chat":
                delta = {} if choice_text is None else {"content": choice_text}
                if first:
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": choice_text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**envelope(kind, rid, True), 'choices': [choice]})}\n\n"

        try:
            if kind == "chat":
                yield event(None, None, first=True)
            async for step in handle.atokens():
                delta = text.feed(step)
                if delta:
                    yield event(delta, None)
            rest = text.finish()
            if rest:
                yield event(rest, None)
            s = handle.stats
            request.state.tokens = s.new_tokens
            yield event(None, s.finish_reason or "stop")
            if include_usage:
                yield f"data: {json.dumps({**envelope(kind, rid, True), 'choices': [], 'usage': usage(s)})}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as e:  # its sequence failed (the others go on): an error event, then the stream's end
            yield f"data: {json.dumps(error_body(f'generation failed: {e}', 'server_error', None, None))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()  # a client that went away frees its row (a no-op once the sequence has ended)

    def envelope(kind: str, rid: str, streaming: bool) -> dict:
        obj = {"chat": "chat.completion", "text": "text_completion"}[kind] + (".chunk" if streaming else "")
        return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                "system_fingerprint": None}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        tok = engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        msgs = [{"role": m.role, "content": text_of(m.content)} for m in body.messages]
        check_length("".join(m["content"] for m in msgs), "messages")
        prompt = await run_in_threadpool(tok.apply_chat_template, msgs, tokenize=False, add_generation_prompt=True)
        return await run(request, "chat", body, prompt)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await run(request, "text", body, body.prompt)

    return app


class Guard:
    """ASGI middleware: the API key, the body size (from Content-Length, before the body is read) and one log
    line per request, written when its response has been sent (streams included)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    def refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"] != "/health":
            if headers.get("authorization") != f"Bearer {self.api_key}":
                return error_response(401, "missing or incorrect API key (Authorization: Bearer ...)",
                                      code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return error_response(400, f"invalid Content-Length {length!r}")
        if length is not None and int(length) > self.max_body:
            return error_response(413, f"request body of {length} bytes exceeds the limit of {self.max_body}")
        if length is None and scope["method"] == "POST":
            return error_response(411, "a Content-Length header is required")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        state["tokens"] = 0
        status, logged = [0], [False]

        def log_line():
            if not logged[0]:
                logged[0] = True
                log.info("%s %s %d %.0f ms %d tokens", scope["method"], scope["path"], status[0],
                         (time.perf_counter() - t0) * 1e3, state.get("tokens", 0))

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log_line()

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            log_line()


async def cancel_on_disconnect(request: Request, handle) -> None:
    """Cancel `handle` when the client of a non-streaming request goes away."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)
    handle.cancel()


def usage(s: Stats) -> dict:
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.new_tokens,
        "total_tokens": s.prompt_tokens + s.new_tokens,
        "completion_tokens_details": {
            "accepted_prediction_tokens": s.accepted_prediction_tokens,
            "rejected_prediction_tokens": s.rejected_prediction_tokens,
        },
    }


def serve(engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "specedit",
          api_key: str | None = None) -> None:
    """Run the server until interrupted, logging one line per request to stderr."""
    import uvicorn

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    uvicorn.run(create_app(engine, model_name, api_key), host=host, port=port, log_level="warning")
