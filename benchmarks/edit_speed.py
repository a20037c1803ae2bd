"""Speculative vs plain decoding on real NoFunEval edits, in one run, outputs compared token for token.

Per case: tokens, tokens/s of plain and speculative decoding (end to end and decode only), speedup, tokens per
forward, draft acceptance, time to first token, identical or not. Then totals per dataset, and a low-overlap
control (the prediction is an unrelated file). With several --dtype values (default: float32 and auto, i.e. a
GGUF run as stored), every case runs on each engine in turn in the same run, and their tokens are compared.
Writes benchmarks/out/edit_speed.csv.

    python benchmarks/edit_speed.py [--short 4] [--long 2] [--model smollm2-135m-instruct] [--cold-cost]
                                     [--dtype float32,auto,auto:int8]

It starts with the first speculative call of a fresh engine against the same call repeated: the cost model
that call needs is read from $SPECEDIT_CACHE/cost (measured there once per machine, model and weight format);
--cold-cost deletes it first, so the first call pays for measuring it.
"""

from __future__ import annotations

import argparse
import csv

from common import OUT, load, machine, nofuneval

from specedit import prompts

SHORT = ("security", "runtime_efficiency")
LONG = ("latency", "resource_util")


def instruction(name: str, row: dict) -> str:
    if name == "security":
        return f"Rewrite the code to avoid the {row['query']} CodeQL warning."
    if name == "runtime_efficiency":
        return "Rewrite the code to run faster."
    return f"Rewrite the code to improve {row.get('non_functional_requirement', 'it')}: {row.get('commit_message', '')}"


def cases(short: int, long: int, tok, max_long_tokens: int):
    for name in SHORT:
        for i, row in enumerate(nofuneval(name)[:short]):
            yield name, i, row
    for name in LONG:
        picked = 0
        for i, row in enumerate(nofuneval(name)):
            if picked == long:
                break
            if len(tok.encode(row["source_code"])) <= max_long_tokens:
                picked += 1
                yield name, i, row


def edit_request(eng, name: str, row: dict) -> tuple[str, str, int]:
    """(prompt, prediction, max new tokens) of one case: the edit prompt, the original + closing fence, and a
    budget of the prediction's tokens + 128."""
    prompt, pred = prompts.build_edit_prompt(eng.tokenizer, row["source_code"], instruction(name, row), row["pl"])
    return prompt, pred, len(eng.encode(pred)) + 128


def run_case(eng, name: str, row: dict, prediction: str | None = None):
    """Plain then speculative decoding of one edit; prediction defaults to the original."""
    prompt, pred, n = edit_request(eng, name, row)
    if prediction is not None:
        pred = prediction
        n = len(eng.encode(pred)) + 128
    plain = eng.generate(prompt, max_new_tokens=n, stop=[prompts.FENCE])
    spec = eng.generate(prompt, max_new_tokens=n, stop=[prompts.FENCE], prediction=pred)
    return plain, spec


def first_call(eng, case, cold: bool) -> None:
    """Time the first speculative call of a fresh engine (after a plain warm-up) against the same call again:
    the cost model it needs comes from the on-disk cache, or is measured when absent (or with --cold-cost)."""
    import statistics
    import time

    from specedit import costcache

    cached = costcache.path(costcache.key(eng.model, eng.backend.name))
    if cold:
        cached.unlink(missing_ok=True)
    source = "read from the on-disk cache" if cached.exists() else "measured in this call"
    name, i, row = case
    prompt, pred, n = edit_request(eng, name, row)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        r = eng.generate(prompt, max_new_tokens=n, stop=[prompts.FENCE], prediction=pred)
        times.append(time.perf_counter() - t0)
    print(f"first speculative call ({name}[{i}], {r.stats.new_tokens} tokens): {times[0]:.3f} s, cost model "
          f"{source}; the same call again: {statistics.median(times[1:]):.3f} s (median of 2)")


_hf = {}


def run_peer(eng, name: str, row: dict, plain) -> tuple[int, float, bool]:
    """transformers generate with its prompt lookup on the same prompt: (tokens, end-to-end tok/s, same tokens)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    if "model" not in _hf:
        from specedit.gguf import resolve

        path = eng.path if eng.path.is_dir() else resolve(eng.path)  # a GGUF run as stored: its float32 dir
        _hf["model"] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt, _, _ = edit_request(eng, name, row)
    ids = torch.tensor([eng.encode(prompt)])
    n = len(plain.token_ids)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = _hf["model"].generate(ids, max_new_tokens=n, do_sample=False, prompt_lookup_num_tokens=10,
                                    pad_token_id=eng.tokenizer.eos_token_id)
    dt = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    return len(new), len(new) / dt, new == plain.token_ids


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32,auto",
                    help="comma-separated weight dtypes, one engine each ('auto': a GGUF as stored; 'auto:int8': "
                         "as stored with compute='int8'), same run")
    ap.add_argument("--short", type=int, default=4, help="cases from each short dataset")
    ap.add_argument("--long", type=int, default=2, help="cases from each long-file dataset")
    ap.add_argument("--max-long-tokens", type=int, default=2000)
    ap.add_argument("--cold-cost", action="store_true",
                    help="delete this machine's cached cost model first: the first speculative call measures it")
    ap.add_argument("--peer", action="store_true",
                    help="also run transformers generate with prompt lookup (prompt_lookup_num_tokens=10) in this run")
    args = ap.parse_args()

    dtypes = args.dtype.split(",")
    engines = {}
    for d in dtypes:
        engines[d] = load(args.model, d)
        engines[d].generate("warm up", max_new_tokens=4)
    eng = engines[dtypes[0]]
    print(f"machine: {machine()}\nmodel: {args.model}, {', '.join(dtypes)}, greedy, batch 1")
    all_cases = list(cases(args.short, args.long, eng.tokenizer, args.max_long_tokens))
    first_call(eng, all_cases[0], args.cold_cost)
    for d, e in engines.items():
        c = e.cost_model()
        print(f"{d}: forward cost vs rows: " + ", ".join(f"T={r}: {s * 1e3:.0f} ms" for r, s in zip(c.rows, c.seconds)))
    head = (f"{'case':<22}{'dtype':>8}{'tokens':>7}{'plain t/s':>10}{'spec t/s':>9}{'speedup':>8}{'dec x':>7}"
            f"{'tok/fwd':>8}{'accept':>7}{'ttft s':>7}  same")
    print(head)
    rows, totals = [], {}
    first_tokens = {}

    def report(label, group, plain, spec, dtype):
        ps, ss = plain.stats, spec.stats
        # lossless: speculative == plain in this engine; and, unless it computes in int8 (lossy by design), the
        # same tokens as the first engine
        same = plain.token_ids == spec.token_ids
        if not dtype.endswith(":int8"):
            same &= first_tokens.setdefault(label, plain.token_ids) == plain.token_ids
        acc = ss.draft_accepted / ss.draft_proposed if ss.draft_proposed else 0.0
        print(f"{label:<22}{dtype:>8}{ss.new_tokens:>7}{ps.tokens_per_s:>10.1f}{ss.tokens_per_s:>9.1f}"
              f"{ss.tokens_per_s / ps.tokens_per_s:>8.2f}{ss.decode_tokens_per_s / ps.decode_tokens_per_s:>7.2f}"
              f"{ss.tokens_per_forward:>8.2f}{acc:>7.2f}{ss.ttft_s:>7.2f}  {same}", flush=True)
        rows.append((label, group, dtype, ss.new_tokens, ps.tokens_per_s, ss.tokens_per_s, ps.decode_tokens_per_s,
                     ss.decode_tokens_per_s, ss.tokens_per_forward, acc, ss.ttft_s, same))
        t = totals.setdefault((group, dtype), [0, 0.0, 0.0, 0.0, 0.0, True])
        t[0] += ss.new_tokens
        t[1] += ps.prefill_s + ps.decode_s
        t[2] += ss.prefill_s + ss.decode_s
        t[3] += ps.decode_s
        t[4] += ss.decode_s
        t[5] &= same

    peer_rows = []
    for name, i, row in all_cases:
        for d, e in engines.items():  # interleaved: the host's speed drifts over minutes
            plain, spec = run_case(e, name, row)
            report(f"{name[:15]}[{i}]", "long" if name in LONG else "short", plain, spec, d)
        if args.peer:
            peer_rows.append((f"{name[:15]}[{i}]", *run_peer(eng, name, row, plain)))

    # low-overlap control: the prediction is another file, so nearly nothing matches
    name, i, row = all_cases[0]
    other = all_cases[-1][2]["source_code"]
    for d, e in engines.items():
        plain, spec = run_case(e, name, row, prediction=other)
        report(f"control:{name[:7]}[{i}]", "control", plain, spec, d)

    print(f"\n{'group':<10}{'dtype':>8}{'tokens':>8}{'plain tok/s':>13}{'spec tok/s':>12}{'speedup':>9}"
          f"{'decode x':>10}  all same")
    for (group, d), (n, tp, ts, dp, ds, same) in totals.items():
        print(f"{group:<10}{d:>8}{n:>8}{n / tp:>13.1f}{n / ts:>12.1f}{tp / ts:>9.2f}{dp / ds:>10.2f}  {same}")

    if peer_rows:
        print(f"\npeer: transformers generate, float32, prompt_lookup_num_tokens=10, same prompts, same run; "
              f"specedit {dtypes[-1]}")
        print(f"{'case':<22}{'tokens':>7}{'hf lookup tok/s':>16}{'specedit tok/s':>16}  same tokens")
        ours = {r[0]: r[5] for r in rows if r[2] == dtypes[-1]}
        for label, n, hf_tps, same in peer_rows:
            print(f"{label:<22}{n:>7}{hf_tps:>16.1f}{ours[label]:>16.1f}  {same}")
        n = sum(r[1] for r in peer_rows)
        t_hf = sum(r[1] / r[2] for r in peer_rows)
        t_ours = sum(r[1] / ours[r[0]] for r in peer_rows)
        print(f"{'total':<22}{n:>7}{n / t_hf:>16.1f}{n / t_ours:>16.1f}  {all(r[3] for r in peer_rows)}")

    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "edit_speed.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "group", "dtype", "tokens", "plain_tok_s", "spec_tok_s", "plain_decode_tok_s",
                    "spec_decode_tok_s", "tokens_per_forward", "acceptance", "ttft_s", "identical"])
        w.writerows(rows)
    print(f"wrote {OUT / 'edit_speed.csv'}")


if __name__ == "__main__":
    main()
