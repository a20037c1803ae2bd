"""Time the two kernels against their torch references and a PyTorch peer; report GB/s of the bytes each reads.

    python benchmarks/bench_kernels.py [--csv out.csv] [--quick]

On CUDA: every shape is first checked against its reference, then timed with triton.testing.do_bench
(median and the 20th..80th percentile spread). verify_attention is compared with verify_attention_ref and with
torch SDPA given the explicit bottom-right causal mask; accept with accept_ref. GB/s counts the bytes a kernel
must read (the valid K/V rows plus q and out for attention; the logits for accept), and the last column puts
that against the device-to-device copy bandwidth measured in the same run (the physical limit).

On CPU the Triton kernels cannot be timed (the interpreter is for tests), so only the torch references are
timed (median of several runs, with min..max), in float32.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys

import torch
from common import machine, timed

# Shapes of real models: attention heads (H, H_kv, D) and vocabularies.
ATTN_MODELS = {"SmolLM2-135M": (9, 3, 64), "Llama-3-8B": (32, 8, 128)}
ACCEPT_MODELS = {"SmolLM2-135M": 49152, "Llama-3-8B": 128256, "Qwen2.5": 151936}
CACHE_LENS = (512, 4096, 16384)
Q_ROWS = (1, 17, 33)


def attn_bytes(B, Q, H, H_kv, L, D, elem):
    return elem * (2 * B * H_kv * L * D + 2 * B * Q * H * D)  # K and V rows read, q read, out written


def sdpa_peer(q, k_cache, v_cache, L):
    """What plain PyTorch would do: SDPA over the valid cache slice with an explicit bottom-right mask."""
    _, Q, H, _ = q.shape
    G = H // k_cache.shape[1]
    mask = torch.ones(Q, L, dtype=torch.bool, device=q.device).tril(diagonal=L - Q)
    k = k_cache[:, :, :L].repeat_interleave(G, dim=1)  # [B, H, L, D]
    v = v_cache[:, :, :L].repeat_interleave(G, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask).transpose(1, 2)


def cpu_time(fn, runs):
    ts = timed(fn, reps=runs)
    return statistics.median(ts) * 1e6, min(ts) * 1e6, max(ts) * 1e6


def gpu_time(fn):
    import triton.testing

    p20, p50, p80 = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.2, 0.5, 0.8])
    return p50 * 1e3, p20 * 1e3, p80 * 1e3


def copy_bandwidth(device):
    """Measured device-to-device copy bandwidth in GB/s (bytes read + written)."""
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    us, _, _ = gpu_time(lambda: y.copy_(x))
    return 2 * x.numel() / (us * 1e-6) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--runs", type=int, default=5, help="CPU: timed runs per row")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    elem = torch.finfo(dtype).bits // 8
    cache_lens = (512, 4096) if args.quick else CACHE_LENS
    q_rows = (1, 17) if args.quick else Q_ROWS

    from specedit.kernels.accept import accept, accept_ref
    from specedit.kernels.verify_attention import verify_attention, verify_attention_ref

    print(f"machine: {machine(device)}; dtype {str(dtype)[6:]}; batch 1 unless stated")
    peak = None
    if cuda:
        peak = copy_bandwidth(device)
        print(f"measured copy bandwidth: {peak:.0f} GB/s (the physical limit for these memory-bound kernels)")
        timer = gpu_time
    else:
        print("no CUDA device: the Triton kernels need a GPU to be timed (the interpreter is for tests only);"
              f" timing the torch references only, median of {args.runs} runs (min..max)")

        def timer(fn):
            return cpu_time(fn, args.runs)

    rows = []

    def report(kernel, model, shape, impl, nbytes, t):
        med, lo, hi = t
        gbs = nbytes / (med * 1e-6) / 1e9
        pct = f"{100 * gbs / peak:5.1f}%" if peak else "   - "
        print(f"  {impl:<22} {med:10.1f} us  [{lo:9.1f} .. {hi:9.1f}]  {gbs:8.1f} GB/s  {pct}")
        rows.append({"kernel": kernel, "model": model, "shape": shape, "impl": impl, "dtype": str(dtype)[6:],
                     "device": machine(device), "median_us": round(med, 2), "lo_us": round(lo, 2),
                     "hi_us": round(hi, 2), "bytes": nbytes, "GB_per_s": round(gbs, 1)})

    print("\nverify_attention (K+1 new rows over the cache, bottom-right causal)")
    for model, (H, H_kv, D) in ATTN_MODELS.items():
        for L in cache_lens:
            for Q in q_rows:
                B = 1
                g = torch.Generator(device=device).manual_seed(0)
                q = torch.randn(B, Q, H, D, generator=g, device=device, dtype=dtype)
                k = torch.randn(B, H_kv, L + 64, D, generator=g, device=device, dtype=dtype)  # spare capacity
                v = torch.randn(B, H_kv, L + 64, D, generator=g, device=device, dtype=dtype)
                cl = torch.full((B,), L, dtype=torch.int32, device=device)
                nbytes = attn_bytes(B, Q, H, H_kv, L, D, elem)
                shape = f"Q={Q} L={L}"
                print(f"{model} H={H} H_kv={H_kv} D={D} {shape}: reads {nbytes / 1e6:.2f} MB")
                ref = verify_attention_ref(q, k, v, cl)
                peer = sdpa_peer(q, k, v, L)
                torch.testing.assert_close(peer.float(), ref.float(), atol=2e-2, rtol=2e-2)
                if cuda:
                    out = verify_attention(q, k, v, cl)
                    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
                    report("verify_attention", model, shape, "triton", nbytes,
                           timer(lambda q=q, k=k, v=v, cl=cl, L=L: verify_attention(q, k, v, cl, max_len=L)))
                report("verify_attention", model, shape, "verify_attention_ref", nbytes,
                       timer(lambda q=q, k=k, v=v, cl=cl: verify_attention_ref(q, k, v, cl)))
                report("verify_attention", model, shape, "sdpa+mask", nbytes,
                       timer(lambda q=q, k=k, v=v, L=L: sdpa_peer(q, k, v, L)))

    print("\naccept (argmax over the vocabulary, compare with the draft, first mismatch)")
    shapes = [(1, Q) for Q in (1, 17, 33, 65)] + [(8, 17)]
    if args.quick:
        shapes = [(1, 1), (1, 17)]
    for model, V in ACCEPT_MODELS.items():
        for B, Q in shapes:
            g = torch.Generator(device=device).manual_seed(0)
            logits = torch.randn(B, Q, V, generator=g, device=device, dtype=dtype)
            draft = logits.argmax(-1)[:, : Q - 1].clone()
            draft[:, (Q - 1) // 2 :] += 1  # a mismatch half way
            dl = torch.full((B,), Q - 1, dtype=torch.int32, device=device)
            nbytes = B * Q * V * elem
            shape = f"B={B} Q={Q} V={V}"
            print(f"{model} {shape}: reads {nbytes / 1e6:.2f} MB")
            want = accept_ref(logits, draft, dl)
            if cuda:
                got = accept(logits, draft, dl)
                assert all(torch.equal(a, b) for a, b in zip(got, want)), (got, want)
                report("accept", model, shape, "triton", nbytes,
                       timer(lambda lg=logits, d=draft, n=dl: accept(lg, d, n)))
            report("accept", model, shape, "accept_ref", nbytes,
                   timer(lambda lg=logits, d=draft, n=dl: accept_ref(lg, d, n)))

    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"\nwrote {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
