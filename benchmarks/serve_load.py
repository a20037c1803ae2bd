"""The server under concurrent load: NoFunEval edits with predictions through the official `openai` client.

One run, one server (in this process, on 127.0.0.1), the default model: the same requests are sent one at a
time (each request's "alone" latency), then by 1, 2, 4 and 8 concurrent clients. Per level: aggregate
completion tokens/s, p50/p95 latency, p50 time to first token, the worst latency relative to that request's
alone latency, and whether every answer equals its alone answer. Writes benchmarks/out/serve_load.csv.

    python benchmarks/serve_load.py [--dtype auto] [--requests 8] [--levels 1,2,4,8] [--model smollm2-135m-instruct]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto",
                    help="as specedit.load takes it (auto: the GGUF as stored), or DTYPE:COMPUTE (auto:int8)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--per-request", action="store_true", help="print each request's latency against its alone one")
    args = ap.parse_args()

    eng = load(args.model, args.dtype)
    eng.cost_model()
    server = uvicorn.Server(uvicorn.Config(create_app(eng, NAME), host="127.0.0.1", port=0, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    bodies = requests_from_nofuneval(args.requests)
    one(client, bodies[0])  # warm up

    print(f"machine: {machine()}; model {args.model}, dtype {args.dtype} ({eng.backend.name} backend); "
          f"{len(bodies)} NoFunEval edits with the original as the prediction, streamed")
    alone = [one(client, b) for b in bodies]
    alone_wall = sum(r[2] for r in alone)
    base_rate = sum(r[1] for r in alone) / alone_wall
    print(f"one at a time: {base_rate:.1f} tok/s aggregate, latency p50 {statistics.median(r[2] for r in alone):.2f} s")
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
        rows.append({"clients": c, "agg_tok_s": round(rate, 1), "x_alone": round(rate / base_rate, 3),
                     "p50_latency_s": round(statistics.median(lat), 3), "p95_latency_s": round(p95, 3),
                     "p50_ttft_s": round(ttft, 3), "worst_latency_ratio": round(worst, 3), "identical": same,
                     "machine": machine(), "model": args.model, "dtype": args.dtype})
    server.should_exit = True
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "serve_load.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
