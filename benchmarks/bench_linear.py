"""Small-M linear on CPU: specedit.kernels.cpu.linear vs torch F.linear, on SmolLM2-135M's shapes.

Decoding at batch 1 reads every weight once per forward, and a speculative verify pass of K+1 rows should
cost about the same as one row. For each linear of SmolLM2-135M (hidden 576, 30 layers) and each M, this
prints the median (min-max) milliseconds of one call, and the weight bytes read per second, next to the
machine's measured read bandwidth (the physical limit at M = 1). Then the sum over one forward's linears
(30 x [qkv, o, gate_up, down] + lm_head), timed as a real pass over distinct weights (so the 32 MB L3 does
not hold them), and as the sum of the per-shape medians.

Per-shape calls rotate over enough copies of the weight to exceed the last-level cache, so the numbers are
DRAM-bound like a real forward. The methods are interleaved call by call, and in the forward table a 1 GiB
read probe is interleaved with them: on a shared host the memory bandwidth drifts over minutes, and this
keeps the comparisons (and the "% of read bandwidth") within one time window. Before each series the script
waits (up to --quiet-wait s) for other processes to go idle, and counts the series timed while they were not.

    python benchmarks/bench_linear.py [--threads 2] [--reps 30] [--m 1,2,8,17,33,65] [--forward-only]
                                      [--isa avx2|avx512] [--methods ...] [--csv PATH]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch
import torch.nn.functional as F
from common import interleaved, machine, read_probe
from specedit.kernels.cpu import build
from specedit.kernels.cpu.linear import PackedLinear, linear_int8_ref, linear_ref

HIDDEN, INTER, LAYERS, VOCAB = 576, 1536, 30, 49152
SHAPES = {  # name: (N, K, count per forward)
    "qkv": (960, HIDDEN, LAYERS),
    "o_proj": (HIDDEN, HIDDEN, LAYERS),
    "gate_up": (2 * INTER, HIDDEN, LAYERS),
    "down": (HIDDEN, INTER, LAYERS),
    "lm_head": (VOCAB, HIDDEN, 1),
}
METHODS = ["torch_f32", "torch_bf16", "ours_f32", "ours_f16", "ours_bf16", "ours_q4_1", "ours_q4_1_int8"]
GGUF_METHODS = {"ours_q4_1": ("q4_1", "exact"), "ours_q4_1_int8": ("q4_1", "int8"),  # W as Q4_1 blocks
                "ours_q8_0": ("q8_0", "exact"), "ours_q8_0_int8": ("q8_0", "int8")}
LLC_BYTES = 256 << 20  # rotate over copies until this many bytes: well past the 32 MB L3 (and more)
_busy_series = 0
ISA = None  # --isa: force the kernel's instruction set


def _cpu_busy(dt: float = 0.25) -> float:
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)

    b0, t0 = snap()
    time.sleep(dt)
    b1, t1 = snap()
    return (b1 - b0) / max(1, t1 - t0)


def wait_quiet(max_wait: float) -> None:
    """Wait until other processes use < 10% of the CPUs; count the series where they never did."""
    global _busy_series
    end = time.time() + max_wait
    try:
        while _cpu_busy() > 0.10:
            if time.time() > end:
                _busy_series += 1
                return
    except OSError:
        return


def _in_order(calls):
    def forward():
        for f in calls:
            f()

    return forward


def prepare(method: str, w: torch.Tensor):
    """(bind, weight bytes read per call): bind(x) gives the zero-argument call timed for that method."""
    if method == "torch_f32":
        return (lambda x: lambda: F.linear(x, w)), w.numel() * 4
    if method == "torch_bf16":  # activations already in bf16, as in a bf16 model
        wb = w.bfloat16()

        def bind(x):
            xb = x.bfloat16()
            return lambda: F.linear(xb, wb)

        return bind, w.numel() * 2
    if method in GGUF_METHODS:  # gguf's quantizer, then exact (dequantized in registers) or int8 compute
        fmt, compute = GGUF_METHODS[method]
        p = PackedLinear.from_parts([(fmt, gguf_blocks(w, fmt))], w.shape[1], compute=compute)
        if ISA:
            return (lambda x: lambda: p(x, isa=ISA)), p.weight_bytes
        return (lambda x: lambda: p(x)), p.weight_bytes
    dtype = {"ours_f32": torch.float32, "ours_f16": torch.float16, "ours_bf16": torch.bfloat16}[method]
    p = PackedLinear(w, None, dtype)
    if ISA:
        return (lambda x: lambda: p(x, isa=ISA)), p.weight_bytes
    return (lambda x: lambda: p(x)), p.weight_bytes


def gguf_blocks(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w [N, K] quantized by gguf into `fmt` blocks, uint8 [N, row bytes]."""
    import gguf

    return torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[fmt.upper()]))


def _row(shape, n, k, m, method, ts, nbytes) -> dict:
    med = statistics.median(ts)
    return {
        "shape": shape,
        "n": n,
        "k": k,
        "m": m,
        "method": method,
        "median_ms": med * 1e3,
        "min_ms": min(ts) * 1e3,
        "max_ms": max(ts) * 1e3,
        "weight_gbps": nbytes / med / 1e9,
    }


def check(name: str, n: int, k: int) -> None:
    """Against the float64 reference, and row i of M rows == the 1-row call bit for bit."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) / k**0.5
    x = torch.randn(17, k, generator=g)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-4), (torch.bfloat16, 1e-4)):
        p = PackedLinear(w, None, dtype)
        y = p(x)
        ref = linear_ref(x, w, dtype)
        err = (y - ref).abs().max().item()
        assert err < tol, f"{name} {dtype}: max error {err} vs reference"
        for i in (0, 5, 16):
            assert torch.equal(y[i], p(x[i : i + 1])[0]), f"{name} {dtype}: row {i} differs from 1-row call"
    for fmt in ("q4_1", "q8_0"):  # compute='int8': bit for bit its numpy reference (rows are independent there)
        raw = gguf_blocks(w, fmt)
        y = PackedLinear.from_parts([(fmt, raw)], k, compute="int8")(x)
        assert torch.equal(y, torch.from_numpy(linear_int8_ref(x.numpy(), raw.numpy(), fmt))), f"{name} {fmt} int8"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--m", default="1,2,8,17,33,65")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--quiet-wait", type=float, default=20.0)
    ap.add_argument("--forward-only", action="store_true", help="skip the per-shape table")
    ap.add_argument("--isa", choices=["avx2", "avx512"], help="force the kernel's instruction set")
    ap.add_argument("--csv", default="benchmarks/out/bench_linear.csv")
    args = ap.parse_args()
    global ISA
    ISA = args.isa
    torch.set_num_threads(args.threads)
    ms = [int(v) for v in args.m.split(",")]
    methods = args.methods.split(",")

    if not build.available():
        raise SystemExit(f"the CPU kernels cannot run here: {build.unavailable_reason()}")
    t = time.perf_counter()
    isa = args.isa or build.best_isa()
    build_s = time.perf_counter() - t
    print(
        f"machine: {machine()}, {os.cpu_count()} cpus, capability {torch.backends.cpu.get_cpu_capability()}; "
        f"kernel isa {isa}; extension load {build_s:.1f} s (a first build includes compiling)"
    )
    print(
        "x float32; torch_bf16 casts x and W to bfloat16 (F.linear); ours_f32/f16/bf16 store W in that dtype, "
        "accumulate in float32; ours_q4_1 / ours_q8_0: W as gguf-quantized blocks, dequantized in registers "
        "(exact); *_int8: the same blocks, compute='int8' (x quantized per row, integer dot products)"
    )
    for name, (n, k, _) in SHAPES.items():
        check(name, n, k)
    print("checked: all shapes and weight dtypes match the float64 reference; rows equal 1-row calls bitwise; "
          "int8 compute equals its numpy reference bitwise")

    wait_quiet(args.quiet_wait)
    probe, probe_bytes = read_probe()
    bw_ts = interleaved({"bw": [probe]}, 15)["bw"]
    bw = probe_bytes / statistics.median(bw_ts)
    print(
        f"read bandwidth (1 GiB in huge pages, prefetching read probe): median {bw / 1e9:.1f} GB/s, best "
        f"{probe_bytes / min(bw_ts) / 1e9:.1f}. This host's bandwidth drifts (40-75 GB/s seen); the forward "
        f"table re-measures it interleaved with the forwards.\n"
    )

    rows = []
    med = {}  # (method, shape, M) -> median seconds
    print("ms per call: median (min-max) and weight GB/s; methods interleaved call by call")
    print(f"{'shape':<8} {'N x K':>11} {'M':>3} " + " ".join(f"{m:>22}" for m in methods))
    for name, (n, k, _) in ({} if args.forward_only else SHAPES).items():
        copies = [torch.randn(n, k) / k**0.5 for _ in range(max(2, -(-LLC_BYTES // (n * k * 2))))]
        prepared = {m: [prepare(m, w) for w in copies] for m in methods}
        for M in ms:
            x = torch.randn(M, k)
            wait_quiet(args.quiet_wait)
            ts = interleaved({m: [bind(x) for bind, _ in prepared[m]] for m in methods}, args.reps)
            cells = []
            for m in methods:
                m_, nbytes = statistics.median(ts[m]), prepared[m][0][1]
                med[(m, name, M)] = m_
                rows.append(_row(name, n, k, M, m, ts[m], nbytes))
                cells.append(
                    f"{m_ * 1e3:7.3f} ({min(ts[m]) * 1e3:.2f}-{max(ts[m]) * 1e3:.2f}) {nbytes / m_ / 1e9:4.0f}"
                )
            print(f"{name:<8} {f'{n}x{k}':>11} {M:>3} " + " ".join(f"{c:>22}" for c in cells), flush=True)
        del copies, prepared

    # One forward's linears over distinct weights, in order: the real memory traffic of a decode step.
    print(
        "\nwhole forward's linears (30 layers x 4 + lm_head) over distinct weights, ms per forward, "
        "methods and a 1 GiB read probe interleaved:"
    )
    print(
        "real pass median (min-max) | sum of per-shape medians x counts | vs M=1 | weight GB/s and % of "
        "the probe's read bandwidth"
    )
    weights = [
        w for _ in range(LAYERS) for (n, k, c) in SHAPES.values() if c == LAYERS for w in [torch.randn(n, k) / k**0.5]
    ]
    weights.append(torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5)
    prepared = {m: [prepare(m, w) for w in weights] for m in methods}
    nbytes = {m: sum(b for _, b in prepared[m]) for m in methods}
    lines: dict[str, list[str]] = {m: [] for m in methods}
    base: dict[str, float] = {}
    for M in ms:
        xs = {HIDDEN: torch.randn(M, HIDDEN), INTER: torch.randn(M, INTER)}
        series = {}
        for m in methods:
            calls = [bind(xs[w.shape[1]]) for (bind, _), w in zip(prepared[m], weights)]
            series[m] = [_in_order(calls)]
        series["probe"] = [probe]
        wait_quiet(args.quiet_wait)
        ts = interleaved(series, max(5, args.reps // 3))
        bw_m = probe_bytes / statistics.median(ts["probe"])
        for m in methods:
            m_ = statistics.median(ts[m])
            base.setdefault(m, m_)
            summed = sum(med.get((m, s_, M), float("nan")) * c for s_, (_, _, c) in SHAPES.items())
            rows.append(_row("forward", 0, 0, M, m, ts[m], nbytes[m]))
            lines[m].append(
                f"M={M:<3} {m_ * 1e3:6.1f} ({min(ts[m]) * 1e3:.1f}-{max(ts[m]) * 1e3:.1f}) | "
                f"{summed * 1e3:6.1f} | x{m_ / base[m]:.2f} | {nbytes[m] / m_ / 1e9:3.0f} GB/s "
                f"= {100 * nbytes[m] / m_ / bw_m:3.0f}% of {bw_m / 1e9:.0f}"
            )
    for m in methods:
        print(f"{m:<11} " + "\n            ".join(lines[m]), flush=True)
    if _busy_series:
        print(f"\nnote: {_busy_series} series were timed while other processes kept the CPUs busy")
    if args.csv:
        os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
