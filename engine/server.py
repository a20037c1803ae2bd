"""OpenAI-compatible HTTP server with predicted outputs (`specedit serve`), on FastAPI + uvicorn.

    POST /v1/chat/completions   messages, prediction {"type": "content", "content": ...}, max_tokens |
                                max_completion_tokens, temperature, seed, stop, stream, stream_options, n (1)
    POST /v1/completions        prompt (a string) and the same options
    GET  /v1/models             the model served, with created and owned_by
    GET  /health                {"status": "ok"}

Every request is submitted to the engine's batched scheduler (Engine.submit), so concurrent requests share
each forward; a client that disconnects cancels its sequence and frees its row. Every error, whatever caused
it, has OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request (`param` names
the field as OpenAI does, e.g. `messages.0.content`; null for a body that is not JSON), 400
`context_length_exceeded` for a prompt longer than the context, 401 for a missing or wrong API key, 404 for an
unknown model (`model_not_found`) or route, 405 for a wrong method, 413 for a body over the limit (checked
before it is read), 500 `server_error` for anything unexpected (logged with its traceback), 503 while shutting
down. `usage.completion_tokens_details` reports accepted_prediction_tokens and rejected_prediction_tokens.
One log line per request: method, path, status, milliseconds, completion tokens.

Chat messages and predictions are user text: a special token's string in them (`<|im_end|>`) is tokenized as
text, never as the control token; only the chat template's own markers are special. A raw /v1/completions
prompt is tokenized as it is, special tokens included (it is the whole prompt, template and all).

On SIGTERM or Ctrl-C (`serve`), every sequence in flight is cancelled: a stream ends with a last chunk whose
finish_reason is "length" and `data: [DONE]`, a non-streaming request gets a 503, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
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
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch's generator takes
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


SERVER_ERROR = "The server had an error while processing your request"
HTTP_CODES = {404: ("not_found", "no such route"), 405: ("method_not_allowed", "method not allowed for this route")}


def openai_param(loc) -> str | None:
    """A pydantic error location as OpenAI names the field: ('body', 'messages', 0, 'content', 'str') ->
    'messages.0.content'. Union member tags ('str', 'float', 'list[str]', 'function-after[...]') are left out;
    None for the body itself."""
    names = []
    for x in loc:
        if x == "body" and not names:
            continue
        if isinstance(x, str) and (x in ("str", "int", "float", "bool", "none", "TextPart") or "[" in x or "-" in x):
            continue  # a union member's tag, not a field
        names.append(str(x))
    return ".".join(names) or None


def validation_error(errors: list) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors: the first failing field, with every union member's complaint."""
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":  # the body is not JSON: no field to name (loc holds a byte offset)
        where = first.get("loc", ("body", None))[-1]
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')} " \
               f"(at byte {where})", None
    param = openai_param(first.get("loc", ()))
    msgs = []
    for e in errors:
        if openai_param(e.get("loc", ())) == param and e.get("msg") not in msgs:
            msgs.append(e.get("msg", "invalid"))
    text = " or ".join(msgs) if msgs else "invalid value"
    return (f"{param}: {text}" if param else f"the request body: {text}"), param


def body_error(cause: BaseException | None) -> str:
    """Why a body could not be parsed (FastAPI wraps it in a 400 'There was an error parsing the body')."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 (byte {cause.start}); JSON bodies must be UTF-8"
    if isinstance(cause, RecursionError):
        return "the request body is nested too deeply to parse"
    return "the request body could not be parsed as JSON" + (f" ({type(cause).__name__})" if cause else "")


# ---- the app ----------------------------------------------------------------------------------------------------
def create_app(engine, model_name: str = "specedit", api_key: str | None = None, max_body: int = MAX_BODY) -> FastAPI:
    """The ASGI app serving `engine` under `model_name` (run it with uvicorn, or `specedit serve`)."""
    app = FastAPI(title="specedit", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    created = int(time.time())
    limit = engine_limit(engine.backend, engine.cfg)
    max_chars = limit * max(len(b) for b in engine.token_bytes)  # more characters than this cannot fit
    flight = InFlight()
    app.state.in_flight = flight  # serve() ends every sequence through it on SIGTERM / Ctrl-C

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        message, param = validation_error(list(e.errors()))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 400:  # FastAPI: "There was an error parsing the body"
            return error_response(400, body_error(e.__cause__))
        code, message = HTTP_CODES.get(e.status_code, (None, str(e.detail)))
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /v1/chat/completions, /v1/completions"
        elif e.status_code == 405:
            message = f"method {request.method} is not allowed for {request.url.path}"
        response = error_response(e.status_code, message, None, code,
                                  "server_error" if e.status_code >= 500 else "invalid_request_error")
        for k, v in (e.headers or {}).items():
            response.headers[k] = v
        return response

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
        """A cheap bound before tokenizing: no token is longer than the longest token's bytes."""
        if len(text) > max_chars:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; {what} of {len(text):,} "
                                "characters cannot fit it", what, "context_length_exceeded")

    def check_text(value: str, param: str) -> None:
        try:
            prompts.check_encodable(param, value)
        except ValueError as e:
            raise APIError(400, str(e), param) from None

    def check_tokens(ids: list[int], what: str) -> None:
        if len(ids) >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your {what} "
                                f"resulted in {len(ids)} tokens (at least one new token must fit).", what,
                           "context_length_exceeded")

    def encode_prompt(text: str) -> list[int]:
        """A raw completion prompt: tokenized as it is, special tokens included (documented)."""
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; it cannot take text", "prompt")
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise APIError(400, "prompt: the text gives no tokens; at least one is needed", "prompt")
        return ids

    async def run(request: Request, kind: str, body: Options, prompt: list[int]):
        opts = check(body)
        check_tokens(prompt, "messages" if kind == "chat" else "prompt")
        for i, s in enumerate(opts["stop"]):
            check_text(s, "stop" if isinstance(body.stop, str) else f"stop.{i}")
        if opts["prediction"] is not None:
            check_length(opts["prediction"], "prediction.content")
            check_text(opts["prediction"], "prediction.content")
            opts["prediction"] = await run_in_threadpool(prompts.encode_text, engine.tokenizer, opts["prediction"],
                                                         "prediction.content")
        if flight.closing:
            raise APIError(503, "the server is shutting down", None, "server_shutting_down", "server_error")
        try:
            handle = await run_in_threadpool(engine.submit, prompt, **opts)
        except ValueError as e:  # a value the engine refuses (e.g. a seed out of range)
            raise APIError(400, str(e)) from None
        flight.add(handle)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(request, kind, rid, handle, opts["stop"], include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(cancel_on_disconnect(request, handle))
        try:
            tokens = [t async for step in handle.atokens() for t in step]
        except ValueError as e:  # its input caused it
            raise APIError(400, str(e)) from None
        except Exception as e:  # its sequence failed (the others go on): a 500 in OpenAI's shape
            raise APIError(500, f"generation failed: {e}", kind="server_error") from e
        finally:
            watcher.cancel()
            flight.discard(handle)
        if flight.closing and not handle.stats.finish_reason:
            raise APIError(503, "the server is shutting down; the request was cancelled", None,
                           "server_shutting_down", "server_error")
        out = engine.detokenize(tokens, opts["stop"])
        s = handle.stats
        request.state.tokens = s.new_tokens
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": out, "refusal": None},
                      "logprobs": None, "finish_reason": s.finish_reason or "length"}
        else:
            choice = {"index": 0, "text": out, "logprobs": None, "finish_reason": s.finish_reason or "length"}
        return {**envelope(kind, rid, False), "choices": [choice], "usage": usage(s)}

    async def stream(request: Request, kind: str, rid: str, handle, stop: list[str], include_usage: bool):
        text = engine.detokenizer(stop)

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
            try:
                async for step in handle.atokens():
                    delta = text.feed(step)
                    if delta:
                        yield event(delta, None)
            except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
                log.error("stream %s failed", rid, exc_info=e)
                kind_, message = (("invalid_request_error", str(e)) if isinstance(e, ValueError)
                                  else ("server_error", f"{SERVER_ERROR} ({type(e).__name__})"))
                yield f"data: {json.dumps(error_body(message, kind_, None, None))}\n\n"
                yield "data: [DONE]\n\n"
                return
            rest = text.finish()
            if rest:
                yield event(rest, None)
            s = handle.stats
            request.state.tokens = s.new_tokens
            # cancelled (the server is shutting down): cut off, like a length limit
            yield event(None, s.finish_reason or "length")
            if include_usage:
                yield f"data: {json.dumps({**envelope(kind, rid, True), 'choices': [], 'usage': usage(s)})}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as e:  # its sequence failed (the others go on): an error event, then the stream's end
            yield f"data: {json.dumps(error_body(f'generation failed: {e}', 'server_error', None, None))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()  # a client that went away frees its row (a no-op once the sequence has ended)
            flight.discard(handle)

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
        for i, m in enumerate(msgs):
            check_text(m["content"], f"messages.{i}.content")
        check_length("".join(m["content"] for m in msgs), "messages")
        prompt = await run_in_threadpool(prompts.chat_ids, tok, msgs)  # message text never becomes control tokens
        return await run(request, "chat", body, prompt)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        check_text(body.prompt, "prompt")
        check_length(body.prompt, "prompt")
        return await run(request, "text", body, await run_in_threadpool(encode_prompt, body.prompt))

    return app


class Guard:
    """ASGI middleware: the API key, the body size (from Content-Length, before the body is read) and one log
    line per request, written when its response has been sent (streams included)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    def refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"] != "/health":
            scheme, _, key = headers.get("authorization", "").strip().partition(" ")
            # the scheme is case-insensitive (RFC 7235); the key compared in constant time
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
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
        except Exception as e:  # noqa: BLE001 - anything unexpected: a 500 in OpenAI's shape, the trace in the log
            log.error("%s %s failed", scope["method"], scope["path"], exc_info=e)
            if status[0] == 0:  # nothing sent yet
                response = error_response(500, f"{SERVER_ERROR} ({type(e).__name__}); it is logged",
                                          code=None, kind="server_error")
                with contextlib.suppress(Exception):  # the client may be gone
                    await response(scope, receive, sending)
        finally:
            log_line()


class InFlight:
    """The handles of the requests being served; `close()` (on SIGTERM / Ctrl-C) cancels them all, so every
    stream ends with a finish_reason and [DONE] within a step, and refuses new requests."""

    def __init__(self):
        self.handles: set = set()
        self.closing = False

    def add(self, handle) -> None:
        self.handles.add(handle)
        if self.closing:
            handle.cancel()

    def discard(self, handle) -> None:
        self.handles.discard(handle)

    def close(self) -> None:
        self.closing = True
        for handle in list(self.handles):
            handle.cancel()


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
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},  # from the prefix cache
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
    app = create_app(engine, model_name, api_key)

    class Server(uvicorn.Server):
        """uvicorn's server, but the first SIGTERM / Ctrl-C also ends every sequence in flight (so the streams
        finish at once instead of holding the shutdown), and a graceful stop exits 0 rather than re-raising
        the signal."""

        def handle_exit(self, sig, frame) -> None:
            app.state.in_flight.close()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    Server(config).run()
