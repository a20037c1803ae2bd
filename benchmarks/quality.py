"""What compute='int8' costs in quality against compute='exact', on the same weights (a GGUF as stored).

    python benchmarks/quality.py [--model smollm2-135m-instruct] [--files 5] [--max-tokens 512] [--edits 4]

Text set (fixed): the first --files source files of each NoFunEval dataset (security, runtime_efficiency,
latency, resource_util), each cut to its first --max-tokens tokens. For both engines, one prefill per file
(eng.logits, every row teacher-forced on the file's own tokens):
  - perplexity = exp(mean negative log-likelihood of each next token), over all files' tokens, and its
    relative change int8 vs exact;
  - top-1 agreement: the share of positions where both engines' argmax is the same token.
Then greedy agreement on the first --edits NoFunEval edits of each dataset (the edit prompt, the original as
the prediction, as edit_speed.py runs them; speculative output equals plain output in each mode, so this is
each mode's greedy answer): identical answers, and where one differs the first differing token.
Prints a table and writes benchmarks/out/quality.csv.
"""

from __future__ import annotations

import argparse
import csv
import math

import torch
from common import OUT, load, machine, nofuneval
from edit_speed import LONG, SHORT, edit_request

from specedit import prompts

MODES = ("auto:exact", "auto:int8")


def nll(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Negative log-likelihood [T - 1] of ids[1:] under logits [T, V] (row t predicts token t + 1), float64."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return -logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--files", type=int, default=5, help="source files per NoFunEval dataset for perplexity")
    ap.add_argument("--max-tokens", type=int, default=512, help="tokens kept from the start of each file")
    ap.add_argument("--edits", type=int, default=4, help="edits per NoFunEval dataset for greedy agreement (0: none)")
    args = ap.parse_args()
    engines = {m: load(args.model, m) for m in MODES}
    exact, int8 = engines.values()
    assert (exact.compute, int8.compute) == ("exact", "int8")
    print(f"machine: {machine()}\nmodel: {args.model} as stored ({exact.model.layers[0].mlp.w2.weight_dtype} "
          f"linears), compute exact vs int8")

    total = {m: 0.0 for m in MODES}
    n_tokens = agree = 0
    rows = []
    for name in SHORT + LONG:
        for i, row in enumerate(nofuneval(name)[: args.files]):
            ids = [exact.tokenizer.bos_token_id or 0] + exact.encode(row["source_code"])[: args.max_tokens - 1]
            logits = {m: e.logits(ids) for m, e in engines.items()}
            for m in MODES:
                total[m] += nll(logits[m], ids).sum().item()
            top1 = (logits[MODES[0]][:-1].argmax(-1) == logits[MODES[1]][:-1].argmax(-1)).sum().item()
            n_tokens += len(ids) - 1
            agree += top1
            ppl = {m: math.exp(nll(logits[m], ids).mean().item()) for m in MODES}
            rows.append(("ppl", f"{name}[{i}]", len(ids) - 1, ppl[MODES[0]], ppl[MODES[1]], top1 / (len(ids) - 1)))
    ppl = {m: math.exp(total[m] / n_tokens) for m in MODES}
    change = ppl[MODES[1]] / ppl[MODES[0]] - 1
    print(f"\nperplexity over {n_tokens} tokens of {len(rows)} files: exact {ppl[MODES[0]]:.4f}, int8 "
          f"{ppl[MODES[1]]:.4f} ({change * 100:+.3f}%); top-1 agreement {agree / n_tokens * 100:.2f}% "
          f"({n_tokens - agree} of {n_tokens} positions differ)")

    if args.edits:
        print(f"\n{'edit':<24}{'tokens exact':>13}{'tokens int8':>12}  same answer (else first differing token)")
        same = count = 0
        for name in SHORT + LONG:
            for i, row in enumerate(nofuneval(name)[: args.edits]):
                prompt, pred, n = edit_request(exact, name, row)
                out = {m: e.generate(prompt, max_new_tokens=n, stop=[prompts.FENCE], prediction=pred).token_ids
                       for m, e in engines.items()}
                a, b = out[MODES[0]], out[MODES[1]]
                first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                ok = a == b
                same += ok
                count += 1
                print(f"{f'{name}[{i}]':<24}{len(a):>13}{len(b):>12}  {'yes' if ok else f'no (token {first})'}")
                rows.append(("edit", f"{name}[{i}]", len(a), len(b), first, ok))
        print(f"greedy answers identical in {same} of {count} edits")

    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "quality.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "case", "a", "b", "c", "d"])
        w.writerow(["total_ppl", "all", n_tokens, ppl[MODES[0]], ppl[MODES[1]], agree / n_tokens])
        w.writerows(rows)
    print(f"wrote {OUT / 'quality.csv'}")


if __name__ == "__main__":
    main()
