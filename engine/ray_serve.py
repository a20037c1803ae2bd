"""Scale-out on Ray Serve: N replicas of the OpenAI-compatible server, one engine each, and every request about one
file on the same replica (so what that replica keeps of the file, its prefix cache, is reused).

    client -> Ray Serve's HTTP proxy -> Front (the ingress: reads the body, takes its affinity key)
           -> FileAffinityRouter (rendezvous hash of the key over the live replicas)
           -> Replica (num_cpus each: one Engine and the single-process app of server.create_app, run in process
              over ASGI, so every answer, error and stream is the single-process server's byte for byte)

The affinity key is the prediction's text (the file being edited), else the prompt or the messages' text. Rendezvous
hashing sends a key to the same replica while that replica lives, and moves only the keys of a replica that goes
(a restarted replica has a new id); a full replica passes its requests to the next one in the key's order. Each
response names its replica in the `x-specedit-replica` header. A replica that dies mid-request ends that request
with an error in OpenAI's shape (a 503 before the answer starts; an `error` event in a stream, which the openai
client raises); Ray Serve restarts the replica and the next request is served.

    specedit serve --model M --replicas 2 [--cpus-per-replica 1] [--ray-address auto]

`ray[serve]` is the optional `ray` extra.
"""

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .server import MAX_BODY, error_body

REPLICA_HEADER = "x-specedit-replica"
KEY_CHARS = 1 << 16  # the affinity key hashes at most this much text: a file's head names it well enough


def affinity_key(body: bytes) -> str | None:
    """The text a request is about (hashed): the prediction, else the prompt, else the messages' contents.
    None for a body that is not a JSON object (any replica answers its 400)."""
    try:
        req = json.loads(body)
    except ValueError:
        return None
    if not isinstance(req, dict):
        return None
    pred = req.get("prediction")
    text = pred.get("content") if isinstance(pred, dict) else None
    if text is None:
        text = req.get("prompt")
    if text is None and isinstance(req.get("messages"), list):
        text = [m.get("content") for m in req["messages"] if isinstance(m, dict)]
    if text is None:
        return None
    if not isinstance(text, str):
        text = json.dumps(text, sort_keys=True)
    return hashlib.blake2b(text[:KEY_CHARS].encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class FileAffinityRouter(RequestRouter):
    """Ranks replicas by rendezvous hash of the request's `affinity` keyword: one replica per rank, the key's own
    first. A request without a key may go to any replica (Ray Serve then picks the least loaded it probes)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = pending_request.kwargs.get("affinity") if pending_request is not None else None
        if key is None:
            return [candidate_replicas]

        def weight(r: RunningReplica) -> bytes:
            return hashlib.blake2b(f"{key}/{r.replica_id.unique_id}".encode(), digest_size=8).digest()

        return [[r] for r in sorted(candidate_replicas, key=weight)]


class Replica:
    """One engine and the single-process OpenAI app. `__call__` runs one HTTP request through the app and yields
    (status, headers, replica id) and then the body's chunks as the app sends them."""

    def __init__(self, model: str, model_name: str, api_key: str | None = None, load_kwargs: dict | None = None):
        import specedit
        from specedit.cli import resolve_model
        from specedit.server import create_app

        self.engine = specedit.load(resolve_model(model), **(load_kwargs or {}))
        self.app = create_app(self.engine, model_name, api_key=api_key)
        self.id = serve.get_replica_context().replica_id.unique_id

    async def __call__(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                       body: bytes, affinity: str | None = None) -> AsyncIterator:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
                 "root_path": "", "headers": headers, "client": ("ray-serve", 0), "server": ("replica", 0)}
        sent: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()  # set when the caller stops reading: the app sees a disconnect and cancels
        body_read = False

        async def receive() -> dict:
            nonlocal body_read
            if not body_read:
                body_read = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await sent.put(message)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                await sent.put(None)

        task = asyncio.create_task(run())
        try:
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":
                    yield message["status"], list(message.get("headers", [])), self.id
                elif message["type"] == "http.response.body" and message.get("body"):
                    yield message["body"]
        finally:
            gone.set()
            await task


async def read_bounded(request: Request) -> bytes | None:
    """The body, or None once it is over MAX_BODY (by its Content-Length before reading, or while reading)."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BODY:
        return None
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY:
            return None
    return bytes(body)


def lost_body(e: Exception) -> dict:
    """OpenAI's error shape for a request whose replica failed under it."""
    return error_body(f"the replica serving this request failed ({type(e).__name__}); retry the request",
                      "server_error", None, "replica_unavailable")


app = FastAPI(title="specedit on Ray Serve")  # no `from __future__ import annotations` here: Ray Serve's class
# views read the method's annotations as objects (a string `Request` became a required query parameter)


@serve.ingress(app)
class Front:
    """The ingress: every route of the single-process app, forwarded whole to the replica the body's key picks."""

    def __init__(self, replicas):
        self.replicas = replicas.options(stream=True)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
    async def forward(self, request: Request):
        body = await read_bounded(request)
        if body is None:
            return JSONResponse(error_body(f"the request body is over the {MAX_BODY}-byte limit",
                                           "invalid_request_error", None, "request_too_large"), 413)
        gen = self.replicas.remote(request.method, request.url.path, request.url.query.encode(),
                                   list(request.headers.raw), body, affinity=affinity_key(body))
        try:
            status, headers, replica = await gen.__anext__()
        except Exception as e:  # the replica died or could not be reached before the answer began
            gen.cancel()
            return JSONResponse(lost_body(e), 503)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers
                   if k.lower() not in (b"content-length", b"transfer-encoding")]
        stream = any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers)

        async def chunks():
            try:
                async for chunk in gen:
                    yield chunk
            except Exception as e:  # mid-answer: a stream gets an error event, which the openai client raises
                if not stream:
                    raise
                yield b"data: " + json.dumps(lost_body(e)).encode() + b"\n\n"
            finally:
                gen.cancel()  # a client gone mid-answer: the replica's app sees a disconnect and frees the row

        resp = StreamingResponse(chunks(), status_code=status)
        del resp.headers["content-type"]
        for k, v in headers:
            resp.headers.append(k, v)
        resp.headers[REPLICA_HEADER] = replica
        return resp


def build(model: str, model_name: str, replicas: int = 2, cpus_per_replica: float = 1.0,
          api_key: str | None = None, load_kwargs: dict | None = None, max_ongoing_requests: int = 16):
    """The Ray Serve application: Front (ingress) bound to `replicas` Replica actors of `cpus_per_replica` CPUs,
    each loading `model` (a path or a registered name) with `load_kwargs` and serving it as `model_name`."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if not cpus_per_replica > 0:
        raise ValueError(f"cpus_per_replica must be > 0, got {cpus_per_replica}")
    replica = serve.deployment(
        Replica, name="Replica", num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": cpus_per_replica},
        request_router_config=RequestRouterConfig(request_router_class="specedit.ray_serve:FileAffinityRouter"),
    ).bind(model, model_name, api_key, load_kwargs)
    return serve.deployment(Front, name="Front", ray_actor_options={"num_cpus": 0}).bind(replica)


def app_builder(args: dict):
    """Ray Serve's application builder, for `serve run specedit.ray_serve:app_builder model=M replicas=2` and a
    RayService's `import_path` (docs/rayservice.yaml): args model (required), model_name (default: model),
    replicas (2), cpus_per_replica (1); the API key comes from $SPECEDIT_API_KEY where the app is built."""
    import os

    unknown = set(args) - {"model", "model_name", "replicas", "cpus_per_replica"}
    if unknown or "model" not in args:
        raise ValueError(f"app_builder takes model (required), model_name, replicas, cpus_per_replica; got "
                         f"{sorted(args)}")
    return build(args["model"], args.get("model_name", args["model"]), int(args.get("replicas", 2)),
                 float(args.get("cpus_per_replica", 1)), os.environ.get("SPECEDIT_API_KEY") or None)


def run(model: str, model_name: str, host: str = "127.0.0.1", port: int = 8000, replicas: int = 2,
        cpus_per_replica: float = 1.0, api_key: str | None = None, load_kwargs: dict | None = None,
        address: str | None = None, blocking: bool = True) -> None:
    """Start (or join, with `address`) a Ray cluster and serve `build(...)` at http://host:port/v1."""
    import ray

    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(model, model_name, replicas, cpus_per_replica, api_key, load_kwargs), name="specedit",
              route_prefix="/", blocking=blocking)
