"""Plain decoding speed: specedit vs transformers on the same checkpoint and prompt, in one run.

Prints (and writes benchmarks/out/decode_speed.csv):
  - greedy decode tokens/s (median [min..max] over runs) of specedit and transformers `generate`, outputs compared;
  - the memory-bandwidth limit: weight bytes per token x tokens/s over the read bandwidth measured in this run;
  - forward time vs rows T (1..64) after a 150-token context, as a multiple of the 1-row forward;
  - prefill tokens/s of a ~1.5k-token prompt, specedit and transformers.

  - per other weight storage (--also; 'auto' runs a GGUF as stored, e.g. Q4_1): load seconds, resident memory
    added by the load, decode tokens/s in the same run, tokens compared with the main dtype's.

    python benchmarks/decode_speed.py [--model smollm2-135m-instruct] [--dtype float32] [--runs 5]
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import time

import torch
from common import OUT, machine, med, nofuneval, read_bandwidth, spread, timed, weight_bytes_per_token

import specedit


def rss() -> int:
    """Resident bytes of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def plain_runs(eng, prompt, n, runs):
    """Greedy decode of n tokens, `runs` times after a warmup. The host's bandwidth drifts over minutes, so it
    is measured right before and after each run, and the faster of the two is that run's limit (the
    conservative choice). Returns (decode tok/s, end-to-end tok/s, % of the bandwidth limit, bandwidths in
    bytes/s: one list entry per run; and the last GenerateResult)."""
    wbytes = weight_bytes_per_token(eng.model)
    dec, e2e, pct, bws, result = [], [], [], [], None
    eng.generate(prompt, max_new_tokens=n)  # warmup
    for _ in range(runs):
        before = read_bandwidth(reps=3)
        result = eng.generate(prompt, max_new_tokens=n)
        bw = max(before, read_bandwidth(reps=3))
        dec.append(result.stats.decode_tokens_per_s)
        e2e.append(result.stats.tokens_per_s)
        pct.append(100 * dec[-1] * wbytes / bw)
        bws.append(bw)
    return dec, e2e, pct, bws, result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers peer")
    ap.add_argument("--also", default="auto,float16,int8",
                    help="other weight dtypes to time plain decode with ('auto': a GGUF as stored)")
    args = ap.parse_args()

    eng = specedit.load(args.model, dtype=args.dtype)
    tok = eng.tokenizer
    code = nofuneval("security")[0]["source_code"]
    prompt = tok.encode(code, add_special_tokens=False)  # a raw code prefix: the model continues it, no EOS soon
    long_prompt = []  # 1,500 tokens of real code: NoFunEval sources back to back
    for row in nofuneval("latency"):
        long_prompt += tok.encode(row["source_code"], add_special_tokens=False)
        if len(long_prompt) >= 1500:
            break
    long_prompt = long_prompt[:1500]
    n = args.new_tokens
    rows = []
    print(f"machine: {machine()}\nmodel: {args.model} ({eng.path}), dtype {args.dtype}, batch 1, greedy")
    print(f"prompt {len(prompt)} tokens, {n} new tokens, {args.runs} runs\n")

    # --- plain decode
    dec, e2e, pct, bws, result = plain_runs(eng, prompt, n, args.runs)
    print(f"{'engine':<14}{'decode tok/s':>26}{'end-to-end tok/s':>28}")
    print(f"{'specedit':<14}{spread(dec):>26}{spread(e2e):>28}")
    rows.append(("specedit", "decode_tok_s", med(dec)))

    hf = None
    if not args.no_transformers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(eng.path, dtype=getattr(torch, args.dtype)).eval()
        ids = torch.tensor([prompt])
        out = None

        def run_hf():
            nonlocal out
            with torch.inference_mode():
                out = hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)

        hf_times = timed(run_hf, reps=args.runs)
        hf_tokens = out[0, len(prompt):].tolist()
        hf_e2e = [len(hf_tokens) / t for t in hf_times]
        same = hf_tokens == result.token_ids
        print(f"{'transformers':<14}{'':>26}{spread(hf_e2e):>28}   same tokens: {same}")
        print(f"end-to-end speedup over transformers: {med(e2e) / med(hf_e2e):.2f}x")
        rows.append(("transformers", "e2e_tok_s", med(hf_e2e)))

    # --- bandwidth limit
    wbytes = weight_bytes_per_token(eng.model)
    print(f"\nread bandwidth {spread([b / 1e9 for b in bws])} GB/s around the runs (1 GiB in huge pages, best of "
          f"torch sum and a prefetching probe); weights per token {wbytes / 1e6:.0f} MB")
    print(f"specedit decode at {spread(pct)}% of the bandwidth limit (per run: tok/s x bytes / bandwidth)")
    rows += [("machine", "read_GBps", med(bws) / 1e9), ("specedit", "pct_of_bw_limit", med(pct))]

    # --- compact weight storage (activations stay float32): fewer bytes per token
    for dtype in filter(None, args.also.split(",")):
        specedit.load(args.model, dtype=dtype)  # once, so a first-use conversion or tokenizer is not timed
        gc.collect()
        rss0, t0 = rss(), time.perf_counter()
        other = specedit.load(args.model, dtype=dtype)
        load_s, grown = time.perf_counter() - t0, rss() - rss0
        d2, _, p2, b2, r2 = plain_runs(other, prompt, n, args.runs)
        wb = weight_bytes_per_token(other.model)
        same = next((i for i, (a, b) in enumerate(zip(r2.token_ids, result.token_ids)) if a != b), None)
        name = f"{dtype} ({other.model.layers[0].mlp.w2.weight_dtype} as stored)" if dtype == "auto" else dtype
        print(f"{name} weights: decode {spread(d2)} tok/s ({med(d2) / med(dec):.2f}x {args.dtype}), "
              f"{wb / 1e6:.0f} MB per token, {spread(p2)}% of the limit ({med(b2) / 1e9:.1f} GB/s); tokens "
              f"{'identical to' if same is None else f'first differ at {same} from'} {args.dtype}'s; "
              f"load {load_s:.2f} s, resident memory +{grown / 1e6:.0f} MB")
        rows += [(dtype, "decode_tok_s", med(d2)), (dtype, "pct_of_bw_limit", med(p2)), (dtype, "load_s", load_s),
                 (dtype, "rss_added_MB", grown / 1e6)]
        del other

    # --- forward cost vs rows
    cache = eng._cache(len(prompt) + 80)
    with torch.inference_mode():
        eng.model(torch.tensor([prompt]), cache)
        base = len(prompt)
        print(f"\n{'rows T':>8}{'forward ms':>26}{'x T=1':>8}")
        t1 = None
        for t in (1, 2, 4, 8, 16, 32, 64):
            x = torch.zeros(1, t, dtype=torch.long)

            def fwd(x=x):
                cache.rollback(0, base)
                eng.model(x, cache, all_logits=True)

            ts = [s * 1e3 for s in timed(fwd, reps=max(5, args.runs))]
            t1 = t1 or med(ts)
            print(f"{t:>8}{spread(ts):>26}{med(ts) / t1:>8.2f}")
            rows.append((f"forward_T{t}", "ms", med(ts)))

    # --- verify rows vs single-row forwards (the lossless guarantee rests on these agreeing)
    with torch.inference_mode():
        follow = result.token_ids[:32]
        cache.rollback(0, base)
        batched = eng.model(torch.tensor([follow]), cache, all_logits=True)[0]
        cache.rollback(0, base)
        single = torch.stack([eng.model(torch.tensor([[t]]), cache)[0] for t in follow])
    top2 = single.topk(2, dim=-1).values
    flips = int((batched.argmax(-1) != single.argmax(-1)).sum())
    print(f"\nverify rows vs 1-row forwards ({len(follow)} positions): bitwise equal {torch.equal(batched, single)}, "
          f"max |diff| {(batched - single).abs().max().item():.2e}, argmax flips {flips}, "
          f"smallest top-1/top-2 gap {(top2[:, 0] - top2[:, 1]).min().item():.3f}")
    rows.append(("specedit", "verify_row_max_abs_diff", (batched - single).abs().max().item()))

    # --- prefill
    def pre_ours():
        c = eng._cache(len(long_prompt) + 1)
        with torch.inference_mode():
            eng.model(torch.tensor([long_prompt]), c)

    pt = timed(pre_ours, reps=3)
    print(f"\nprefill {len(long_prompt)} tokens: specedit {spread([len(long_prompt) / t for t in pt])} tok/s", end="")
    rows.append(("specedit", "prefill_tok_s", len(long_prompt) / med(pt)))
    if hf is not None:
        def pre_hf():
            with torch.inference_mode():
                hf(torch.tensor([long_prompt]))

        ht = timed(pre_hf, reps=3)
        print(f", transformers {spread([len(long_prompt) / t for t in ht])} tok/s", end="")
        rows.append(("transformers", "prefill_tok_s", len(long_prompt) / med(ht)))
    print()

    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "decode_speed.csv", "w", newline="") as f:
        csv.writer(f).writerows([("engine", "metric", "value"), *rows])
    print(f"wrote {OUT / 'decode_speed.csv'} at {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
