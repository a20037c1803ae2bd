"""The server under concurrent load: NoFunEval edits with predictions through the official `openai` client.

One run, one server (in this process, on 127.0.0.1), the default model: the same requests are sent one at a
time (each request's "alone" latency), then by 1, 2, 4 and 8 concurrent clients. Per level: aggregate
completion tokens/s, p50/p95 latency, p50 time to first token, the worst latency relative to that request's
alone latency, and whether every answer equals its alone answer. Writes benchmarks/out/serve_load.csv.

`--scenario long-prompt` measures head-of-line blocking instead: a request with a long prompt (`--long-tokens`,
6,000 by default; SmolLM2's context is 8,192) is sent, and 1 s later short requests are sent one after another
(`--shorts`), each while that prompt is still being prefilled. Reports each short request's latency against its
alone latency (p50, p99 = the worst of them), when the long prompt's prefill ended (its first token), and whether
every answer equals its alone answer. Writes benchmarks/out/serve_load_long_prompt.csv.

    python benchmarks/serve_load.py [--dtype auto] [--requests 8] [--levels 1,2,4,8] [--model smollm2-135m-instruct]
    python benchmarks/serve_load.py --scenario long-prompt [--long-tokens 6000] [--shorts 6] [--long-alone]
    python benchmarks/serve_load.py --replicas 1,2 [--cpus-per-replica 1] [--levels 1,4,8]

`--replicas 1,2` runs the load scenario against Ray Serve (specedit.ray_serve) instead: a deployment of 1
replica, then one of 2, each replica one engine on `--cpus-per-replica` CPUs. Writes
benchmarks/out/serve_load_replicas.csv.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import uvicorn
from common import OUT, load, machine, nofuneval

from specedit.server import create_app

NAME = "specedit"


def requests_from_nofuneval(n: int) -> list[dict]:
    rows = [("security", r) for r in nofuneval("security")] + [("runtime", r) for r in nofuneval("runtime_efficiency")]
    out = []
    for kind, row in rows[: n // 2] + rows[len(rows) // 2 : len(rows) // 2 + n - n // 2]:
        ask = (f"Rewrite the code to avoid the {row['query']} CodeQL warning." if kind == "security"
               else "Rewrite the code to run faster.")
        code = row["source_code"]
        out.append({"messages": [{"role": "user", "content": f"{ask}\n\n```\n{code}```\n\nWrite the entire rewritten "
                                                              "code and no other text."}],
                    "prediction": {"type": "content", "content": code}, "max_tokens": 512})
    return out


def one(client, body) -> tuple[str, int, float, float]:
    """(text, completion tokens, latency s, time to first content s) of one streamed request."""
    t0 = time.perf_counter()
    ttft, parts, tokens = None, [], 0
    stream = client.chat.completions.create(model=NAME, stream=True, stream_options={"include_usage": True}, **body)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return "".join(parts), tokens, time.perf_counter() - t0, ttft or 0.0


def level(client, bodies, clients: int) -> tuple[list, float]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda b: one(client, b), bodies))
    return results, time.perf_counter() - t0


SHORT_ASKS = ["Write a Python function that adds two numbers.", "What is a list comprehension? One sentence.",
              "Name three sorting algorithms.", "Write a haiku about compilers.",
              "Give a regular expression for a US zip code.", "What does `git rebase` do? One sentence.",
              "Write a SQL query counting rows in a table named users.", "Explain recursion in one sentence."]


def long_prompt_body(eng, tokens: int) -> dict:
    """A chat request whose prompt is about `tokens` tokens: NoFunEval source files, cut to length."""
    def count(content: str) -> int:
        text = eng.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
        return len(eng.encode(text))

    code = "\n\n".join(r["source_code"] for name in ("latency", "resource_util") for r in nofuneval(name))
    ask = "Summarize what the following code does, in one sentence.\n\n"
    ids = eng.encode(code[: 5 * tokens])[: tokens - count(ask)]
    content = ask + eng.detokenize(ids)
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "_prompt_tokens": count(content)}


def long_prompt(client, eng, args) -> None:
    long_body = long_prompt_body(eng, args.long_tokens)
    n_long = long_body.pop("_prompt_tokens")
    shorts = [{"messages": [{"role": "user", "content": a}], "max_tokens": args.short_tokens}
              for a in (SHORT_ASKS * args.shorts)[: args.shorts]]
    one(client, shorts[0])  # warm up
    print(f"machine: {machine()}; model {args.model}, dtype {args.dtype} ({eng.backend.name} backend); "
          f"context {eng.cfg.max_position} tokens; a {n_long}-token prompt, then {len(shorts)} short requests "
          f"(max_tokens {args.short_tokens}) one after another from 1 s after it; streamed, greedy")
    alone = [one(client, b) for b in shorts]
    print(f"short requests alone: latency p50 {statistics.median(r[2] for r in alone):.2f} s, "
          f"max {max(r[2] for r in alone):.2f} s")
    long_alone = None
    if args.long_alone:
        long_alone = one(client, long_body)
        print(f"long prompt alone: first token (its prefill done) at {long_alone[3]:.2f} s, "
              f"done at {long_alone[2]:.2f} s")
    t0 = time.perf_counter()
    long_result = {}

    def run_long():
        text, tokens, lat, ttft = one(client, long_body)
        long_result.update(text=text, latency=lat, ttft=ttft)

    thread = threading.Thread(target=run_long)
    thread.start()
    time.sleep(1.0)
    beside = []
    for b in shorts:
        sent = time.perf_counter() - t0
        r = one(client, b)
        beside.append((sent, r))
    thread.join()
    ratios = sorted(r[2] / a[2] for (_, r), a in zip(beside, alone))
    lat = sorted(r[2] for _, r in beside)
    same = all(r[0] == a[0] for (_, r), a in zip(beside, alone))
    last_done = max(sent + r[2] for sent, r in beside)
    prefill_end = long_result["ttft"]
    p99 = ratios[min(len(ratios) - 1, round(0.99 * (len(ratios) - 1)))]
    print(f"long prompt: first token (its prefill done) at {prefill_end:.2f} s, done at {long_result['latency']:.2f} s"
          + ("" if long_alone is None else f"; same answer as alone: {long_result['text'] == long_alone[0]}"))
    print(f"short requests beside it: latency p50 {statistics.median(lat):.2f} s, worst {lat[-1]:.2f} s; "
          f"latency / alone p50 {statistics.median(ratios):.2f}x, p99 (worst of {len(ratios)}) {p99:.2f}x; "
          f"the last one done at {last_done:.2f} s; identical to alone: {same}")
    for i, ((sent, r), a) in enumerate(zip(beside, alone)):
        print(f"  short {i}: sent at {sent:5.2f} s, {r[1]:>3} tokens, alone {a[2]:.2f} s, here {r[2]:.2f} s "
              f"(first token {r[3]:.2f} s): {r[2] / a[2]:.2f}x")
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "serve_load_long_prompt.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["short", "sent_s", "tokens", "alone_s", "latency_s", "ratio", "identical",
                                          "long_prompt_tokens", "long_first_token_s", "machine", "model", "dtype"])
        w.writeheader()
        for i, ((sent, r), a) in enumerate(zip(beside, alone)):
            w.writerow({"short": i, "sent_s": round(sent, 3), "tokens": r[1], "alone_s": round(a[2], 3),
                        "latency_s": round(r[2], 3), "ratio": round(r[2] / a[2], 3), "identical": r[0] == a[0],
                        "long_prompt_tokens": n_long, "long_first_token_s": round(prefill_end, 3),
                        "machine": machine(), "model": args.model, "dtype": args.dtype})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto",
                    help="as specedit.load takes it (auto: the GGUF as stored), or DTYPE:COMPUTE (auto:int8)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--per-request", action="store_true", help="print each request's latency against its alone one")
    ap.add_argument("--scenario", choices=["load", "long-prompt"], default="load")
    ap.add_argument("--long-tokens", type=int, default=6000, help="long-prompt: the long prompt's tokens")
    ap.add_argument("--shorts", type=int, default=6, help="long-prompt: short requests sent beside it")
    ap.add_argument("--short-tokens", type=int, default=32, help="long-prompt: max_tokens of a short request")
    ap.add_argument("--long-alone", action="store_true", help="long-prompt: time the long request alone too")
    ap.add_argument("--replicas", metavar="N,M", help="Ray Serve deployments of N, then M replicas instead of the "
                                                       "in-process server (e.g. 1,2); levels as --levels")
    ap.add_argument("--cpus-per-replica", type=float, default=1.0)
    args = ap.parse_args()
    if args.replicas:
        return replicas(args)

    eng = load(args.model, args.dtype)
    eng.cost_model()
    server = uvicorn.Server(uvicorn.Config(create_app(eng, NAME), host="127.0.0.1", port=0, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    if args.scenario == "long-prompt":
        if args.long_tokens >= eng.cfg.max_position:
            raise SystemExit(f"--long-tokens {args.long_tokens} does not fit the context of {eng.cfg.max_position}")
        long_prompt(client, eng, args)
        server.should_exit = True
        return
    bodies = requests_from_nofuneval(args.requests)
    print(f"machine: {machine()}; model {args.model}, dtype {args.dtype} ({eng.backend.name} backend); "
          f"{len(bodies)} NoFunEval edits with the original as the prediction, streamed")
    rows = levels(client, bodies, args, "in process")
    server.should_exit = True
    write_csv("serve_load.csv", rows)


def levels(client, bodies, args, label: str) -> list[dict]:
    """Send `bodies` one at a time, then at each of args.levels concurrent clients; print a table, return rows."""
    for b in bodies:  # warm up: every level then finds the same prefix cache (each prompt's prefix is kept)
        one(client, b)
    alone = [one(client, b) for b in bodies]
    alone_wall = sum(r[2] for r in alone)
    base_rate = sum(r[1] for r in alone) / alone_wall
    print(f"{label}: one at a time {base_rate:.1f} tok/s aggregate, latency p50 "
          f"{statistics.median(r[2] for r in alone):.2f} s")
    print(f"\n{'clients':>8}{'agg tok/s':>11}{'x alone':>9}{'p50 lat s':>11}{'p95 lat s':>11}{'p50 ttft s':>12}"
          f"{'worst lat/alone':>17}{'identical':>11}")
    rows = []
    for c in (int(x) for x in args.levels.split(",")):
        results, wall = level(client, bodies, c)
        lat = sorted(r[2] for r in results)
        rate = sum(r[1] for r in results) / wall
        worst = max(r[2] / a[2] for r, a in zip(results, alone))
        same = all(r[0] == a[0] for r, a in zip(results, alone))
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
        ttft = statistics.median(r[3] for r in results)
        print(f"{c:>8}{rate:>11.1f}{rate / base_rate:>9.2f}{statistics.median(lat):>11.2f}{p95:>11.2f}{ttft:>12.2f}"
              f"{worst:>17.2f}{str(same):>11}")
        if args.per_request:
            for i, (r, a) in enumerate(zip(results, alone)):
                print(f"{'':>8}request {i}: {a[1]:>4} tokens, alone {a[2]:5.2f} s (first token {a[3]:.2f} s), "
                      f"here {r[2]:5.2f} s (first token {r[3]:.2f} s): {r[2] / a[2]:.2f}x")
        rows.append({"setup": label, "clients": c, "agg_tok_s": round(rate, 1), "x_alone": round(rate / base_rate, 3),
                     "p50_latency_s": round(statistics.median(lat), 3), "p95_latency_s": round(p95, 3),
                     "p50_ttft_s": round(ttft, 3), "worst_latency_ratio": round(worst, 3), "identical": same,
                     "machine": machine(), "model": args.model, "dtype": args.dtype})
    return rows


def write_csv(name: str, rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / name, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def replicas(args) -> None:
    """The same load against Ray Serve deployments of 1, 2, ... replicas of `--cpus-per-replica` CPUs each, one
    after another on a local Ray cluster, each answer compared with the first deployment's alone answer."""
    import socket

    import ray
    from ray import serve

    from specedit import ray_serve

    counts = [int(x) for x in args.replicas.split(",")]
    dtype, _, compute = args.dtype.partition(":")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=max(counts) * args.cpus_per_replica, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    bodies = requests_from_nofuneval(args.requests)
    print(f"machine: {machine()}; model {args.model}, dtype {args.dtype}; Ray Serve, {args.cpus_per_replica} CPU per "
          f"replica; {len(bodies)} NoFunEval edits with the original as the prediction, streamed")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    rows = []
    for n in counts:
        serve.run(ray_serve.build(args.model, NAME, n, args.cpus_per_replica,
                                  load_kwargs={"dtype": dtype, "compute": compute or "auto"}),
                  name="specedit", route_prefix="/")
        rows += levels(client, bodies, args, f"{n} replica{'s' * (n > 1)}")
        serve.delete("specedit")
    serve.shutdown()
    ray.shutdown()
    write_csv("serve_load_replicas.csv", rows)


if __name__ == "__main__":
    main()
