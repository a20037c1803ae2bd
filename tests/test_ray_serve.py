"""specedit on Ray Serve (a local Ray cluster): 2 replicas answer exactly what the single-process server
answers, requests about one file land on one replica, and a replica killed mid-stream gives its client a clean
error while the next request is served."""

import socket
import threading
import time

import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

import specedit  # noqa: E402
from helpers import make_text_checkpoint, start_server  # noqa: E402
from specedit import ray_serve  # noqa: E402
from specedit.server import create_app  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "tiny"
FILES = [f"def f{i}(x):\n    return x + {i}\n" for i in range(4)]


def request(code: str, max_tokens: int = 24) -> dict:
    return dict(model=MODEL, messages=[{"role": "user", "content": "Add type hints:\n" + code}],
                prediction={"type": "content", "content": code}, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_text_checkpoint(tmp_path_factory.mktemp("ray"), max_position_embeddings=4096)  # room for a long stream


@pytest.fixture(scope="module")
def single(checkpoint):
    server, port = start_server(create_app(specedit.load(checkpoint), MODEL))
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    server.should_exit = True


@pytest.fixture(scope="module")
def cluster(checkpoint):
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_serve.build(str(checkpoint), MODEL, replicas=2, cpus_per_replica=1), name="specedit",
                  route_prefix="/")
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        serve.shutdown()
        ray.shutdown()


def ask(client, body: dict) -> tuple[str, str, str]:
    """(content, finish_reason, replica header) of one non-streamed chat completion."""
    raw = client.chat.completions.with_raw_response.create(**body)
    r = raw.parse()
    return r.choices[0].message.content, r.choices[0].finish_reason, raw.headers.get(ray_serve.REPLICA_HEADER)


def test_affinity_key_is_the_file():
    a, b = request(FILES[0]), request(FILES[0])
    b["messages"][0]["content"] = "Rename f0:\n" + FILES[0]
    key = ray_serve.affinity_key
    import json

    assert key(json.dumps(a).encode()) == key(json.dumps(b).encode()) != key(json.dumps(request(FILES[1])).encode())
    assert key(b"not json") is None and key(b"[1]") is None


def test_router_ranks_each_key_over_replicas_stably():
    import asyncio
    from types import SimpleNamespace as NS

    router = object.__new__(ray_serve.FileAffinityRouter)  # choose_replicas needs none of the router's state
    reps = [NS(replica_id=NS(unique_id=f"r{i}")) for i in range(3)]

    def first(key, candidates):
        ranks = asyncio.run(router.choose_replicas(candidates, NS(kwargs={"affinity": key})))
        assert [len(r) for r in ranks] == [1] * len(candidates)
        return ranks[0][0].replica_id.unique_id

    owners = [first(f"k{i}", reps) for i in range(60)]
    assert owners == [first(f"k{i}", reps[::-1]) for i in range(60)]  # the order replicas come in is no matter
    assert {o: owners.count(o) for o in set(owners)}.keys() == {"r0", "r1", "r2"}  # keys spread over replicas
    moved = [i for i in range(60) if owners[i] != first(f"k{i}", reps[1:])]  # r0 goes: only its keys move
    assert moved == [i for i in range(60) if owners[i] == "r0"]
    assert asyncio.run(router.choose_replicas(reps, NS(kwargs={}))) == [reps]  # no key: any replica


def test_two_replicas_answer_as_one_process_and_keep_a_file_on_one_replica(cluster, single):
    bodies = [request(code) for code in FILES for _ in range(2)]  # 8 requests, each file twice
    expected = [ask(single, b)[:2] for b in bodies]
    got = [None] * len(bodies)

    def run(i):
        got[i] = ask(cluster, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [g[:2] for g in got] == expected
    replicas = [g[2] for g in got]
    assert all(replicas)
    for i in range(0, len(bodies), 2):  # both requests about one file went to one replica
        assert replicas[i] == replicas[i + 1], replicas


def test_a_replica_killed_mid_stream_gives_a_clean_error_and_the_next_request_is_served(cluster):
    from ray import serve  # noqa: F401

    body = request(FILES[2], max_tokens=3000)
    raw = cluster.chat.completions.with_raw_response.create(**body, stream=True)
    replica = raw.headers.get(ray_serve.REPLICA_HEADER)
    stream = raw.parse()
    next(iter(stream))  # the answer has begun
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + replica)]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=False)
    t0 = time.monotonic()
    with pytest.raises(openai.APIError, match="replica"):
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 30
    for _ in range(60):  # Ray Serve restarts the replica; meanwhile the other one takes its files
        try:
            content, finish, _ = ask(cluster, request(FILES[2]))
            break
        except openai.APIError:
            time.sleep(1)
    assert finish in ("stop", "length") and content


def test_app_builder_takes_the_documented_args():
    import yaml
    from pathlib import Path
    from ray.serve import Application

    manifest = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "rayservice.yaml").read_text())
    app = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "specedit.ray_serve:app_builder"
    assert isinstance(ray_serve.app_builder(app["args"]), Application)
    with pytest.raises(ValueError, match="model"):
        ray_serve.app_builder({"replicas": 2})
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        ray_serve.app_builder({"model": "m", "replicas": 0})
