"""Time of one forward against its rows T, at several cache lengths, per weight format, against the machine's limits.

    python benchmarks/forward_cost.py [--model smollm2-135m-instruct] [--dtype float32,float16,auto,auto:int8]
                                      [--rows 1,2,4,8,16,32,48,64,96,128] [--lengths 128,1024,4096] [--reps 5]
                                      [--out benchmarks/out]

A forward appends T rows after L cached positions and returns the logits of every row (all_logits, as a verify
forward does). Per weight format (float32, float16, auto = the GGUF run as stored, Q4_1 for the default model)
one engine and one cache prefilled to the longest L; before each call the cache's length is set to L. Every
(format, L, T) is timed once per round, all of them interleaved, one warm-up call each; the median of --reps
rounds is reported (min..max in the CSV).

Limits, measured in the same run:
  - bandwidth floor = bytes read per forward / read bandwidth: the weight bytes of a decode step
    (common.weight_bytes_per_token) plus the cached keys and values of the L + T positions, over
    common.read_bandwidth() (the 1 GiB probe decode_speed.py uses), the faster of its measures before and
    after the timings;
  - compute floor = FLOPs per forward / common.fma_peak(): benchmarks/fma_probe.cpp, independent float32 FMAs
    on registers on every thread with the CPU's widest vectors (-march=native), the faster of before and after;
    for compute='int8' the linears' multiply-adds count against common.int8_peak() instead (the same probe's
    vpdpbusd / pmaddubsw loop), the attention's against the float32 peak.
    FLOPs: 2 T x the linear weights (lm_head included) plus 4 x heads x head_dim per layer for every (query,
    key) pair of the causal attention. (torch.mm's float32 rate is printed too: MKL's stays well below this
    peak here, so it would not be a floor.)
The engine's cost model (`Engine.cost_model()`: the rows/seconds the speculative loop plans its drafts with,
measured after 128 cached positions, kept on disk) is drawn over the measurements.
Writes forward_cost.csv and forward_cost.png (one panel per weight format, log-log) into --out.
"""

from __future__ import annotations

import argparse
import csv
from functools import partial
from pathlib import Path

import torch
from common import (OUT, fma_peak, int8_peak, interleaved, load, matmul_rate, med, pyplot, read_bandwidth,
                    run_info, weight_bytes_per_token)



def flops(cfg, t: int, length: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of a forward of t rows after `length` cached positions (every row's logits)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    linear = cfg.n_layers * (cfg.dim * (q + 2 * kv) + q * cfg.dim + 3 * cfg.dim * cfg.intermediate_size)
    linear += cfg.dim * cfg.vocab_size
    pairs = t * length + t * (t + 1) // 2  # row i sees length + i + 1 keys
    return 2 * t * linear, 4 * cfg.n_layers * q * pairs


def cache_bytes(cfg, cache, t: int, length: int) -> int:
    """Bytes of keys and values one forward reads from the cache."""
    return cfg.n_layers * 2 * (length + t) * cfg.n_kv_heads * cfg.head_dim * cache.buf.element_size()


def forward(model, cache, length: int, t: int) -> None:
    """One forward of t rows after `length` cached positions (the slots the prefill filled), every row's logits."""
    cache.rollback(0, 0)
    cache.advance(length)
    with torch.inference_mode():
        model(torch.zeros(1, t, dtype=torch.long), cache, all_logits=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32,float16,auto,auto:int8",
                    help="weight formats ('auto': a GGUF as stored; 'auto:int8': as stored, compute='int8')")
    ap.add_argument("--rows", default="1,2,4,8,16,32,48,64,96,128")
    ap.add_argument("--lengths", default="128,1024,4096", help="cached positions before the forward")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT, help="directory for the CSV and PNG")
    args = ap.parse_args()
    rows = [int(x) for x in args.rows.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    info = run_info()

    engines, calls = {}, {}
    for d in args.dtype.split(","):
        eng = engines[d] = load(args.model, d)
        if max(lengths) + max(rows) > eng.cfg.max_position:
            raise SystemExit(f"--lengths/--rows reach {max(lengths) + max(rows)} positions, over the model's "
                             f"{eng.cfg.max_position}")
        cache = eng._cache(max(lengths) + max(rows))
        with torch.inference_mode():
            eng.model(torch.zeros(1, max(lengths), dtype=torch.long), cache)
        eng.cost_model()  # measured now (or read from disk), not in the middle of the timings
        for length in lengths:
            for t in rows:
                calls[d, length, t] = (partial(forward, eng.model, cache, length, t), cache)

    bw, peak, ipeak = read_bandwidth(), fma_peak(), int8_peak()
    times = interleaved({k: [fn] for k, (fn, _) in calls.items()}, reps=args.reps)
    bw, peak, mm = max(bw, read_bandwidth()), max(peak, fma_peak()), matmul_rate()
    ipeak = max(ipeak, int8_peak()) if ipeak else None

    print(f"machine: {info['machine']}; git {info['git_sha']}; {info['date']}")
    print(f"model {args.model}; read bandwidth {bw / 1e9:.1f} GB/s, float32 FMA peak {peak / 1e9:.0f} GFLOP/s "
          f"(best of before and after; torch.mm 2048: {mm / 1e9:.0f} GFLOP/s); int8 dot-product peak "
          f"{(ipeak or 0) / 1e9:.0f} Gop/s (compute='int8' linears); median of {args.reps} interleaved rounds")
    results = []
    for d, eng in engines.items():
        wbytes = weight_bytes_per_token(eng.model)
        cost = eng.cost_model()
        name = f"{d} ({eng.model.layers[0].mlp.w2.weight_dtype}, {eng.compute})" if d.startswith("auto") else d
        print(f"\n{name}: {wbytes / 1e6:.0f} MB of weights per forward; ms per forward (x its floor)")
        print(f"{'rows T':>8}" + "".join(f"{f'L={n}':>18}" for n in lengths) + f"{'cost model':>12}")
        for t in rows:
            line = f"{t:>8}"
            for length in lengths:
                fn, cache = calls[d, length, t]
                ts = times[d, length, t]
                mem = (wbytes + cache_bytes(eng.cfg, cache, t, length)) / bw
                lin, att = flops(eng.cfg, t, length)
                comp = lin / (ipeak if eng.compute == "int8" and ipeak else peak) + att / peak
                line += f"{med(ts) * 1e3:>11.1f} ({med(ts) / max(mem, comp):.1f}x)"
                results.append({"dtype": name, "L": length, "T": t, "ms": [s * 1e3 for s in ts], "mem": mem * 1e3,
                                "comp": comp * 1e3, "cost": cost(t) * 1e3})
            print(line + f"{cost(t) * 1e3:>12.1f}")

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "forward_cost.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["machine", "model", "git_sha", "date", "dtype", "cache_len", "rows", "median_ms", "min_ms",
                    "max_ms", "bandwidth_floor_ms", "compute_floor_ms", "cost_model_ms", "read_GBps", "fma_peak_GFLOPs",
                    "torch_mm_GFLOPs"])
        for r in results:
            w.writerow([info["machine"], args.model, info["git_sha"], info["date"], r["dtype"], r["L"], r["T"],
                        f"{med(r['ms']):.3f}", f"{min(r['ms']):.3f}", f"{max(r['ms']):.3f}", f"{r['mem']:.3f}",
                        f"{r['comp']:.3f}", f"{r['cost']:.3f}", f"{bw / 1e9:.2f}", f"{peak / 1e9:.1f}",
                        f"{mm / 1e9:.1f}"])

    plt = pyplot()
    names = list(dict.fromkeys(r["dtype"] for r in results))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), sharey=True, squeeze=False)
    colors = dict(zip(lengths, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"] * 4))
    for ax, name in zip(axes[0], names):
        for length in lengths:
            rs = [r for r in results if r["dtype"] == name and r["L"] == length]
            c = colors[length]
            ax.plot(rows, [med(r["ms"]) for r in rs], "o-", color=c, label=f"measured, L={length}")
            ax.plot(rows, [r["mem"] for r in rs], "--", color=c, lw=1, label=f"bandwidth floor, L={length}")
            ax.plot(rows, [r["comp"] for r in rs], ":", color=c, lw=1, label=f"compute floor, L={length}")
        cost = engines[args.dtype.split(",")[names.index(name)]].cost_model()
        ax.plot(cost.rows, [s * 1e3 for s in cost.seconds], "kx", ms=8, label="cost model (L=128, cached)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(rows, [str(t) for t in rows], fontsize=7)
        ax.set_xlabel("rows T in the forward")
        ax.set_title(f"{name} weights", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("ms per forward")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{args.model}, one forward after L cached positions; {info['machine']}; read {bw / 1e9:.1f} GB/s, "
                 f"FMA peak {peak / 1e9:.0f} GFLOP/s; git {info['git_sha']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "forward_cost.png", dpi=120)
    print(f"\nwrote {args.out / 'forward_cost.csv'}, {args.out / 'forward_cost.png'}")


if __name__ == "__main__":
    main()
