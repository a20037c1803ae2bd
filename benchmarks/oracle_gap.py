"""How far the speculative loop is from its oracle, and where its forwards go.

Per NoFunEval edit, in one run and on the same engine: plain decoding; speculative decoding with the original
file as the prediction; the oracle (the prediction is plain decoding's own output, so every draft can be
accepted); and the prefill-equivalent time (one forward over the whole output after the prompt: what a single
perfect verify would cost). All outputs are checked equal to plain's. Per case and per dataset: tokens/s of
each, speculative as a share of the oracle (wall time, and modeled: the engine's own cost model summed over the
rows of each forward, which the host's noise does not move), forwards, and where the forwards go:

    verify ok    forwards whose prediction draft was accepted whole
    diverge      forwards whose prediction draft was cut (a divergence; its rejected rows are counted)
    plain        forwards with no draft (diverged and not yet re-synced, or mid-token)
    lookup       forwards drafting from the n-gram lookup in the output and the prediction (while diverged)
    resync       plain + lookup forwards between a divergence and the next prediction draft, per divergence

Two request styles (--style, comma-separated):
    edit   the engine's edit prompt (answer fence prefilled, stop at the closing fence), as `Engine.edit`
    chat   a chat request as OpenAI's Predicted Outputs receives one: the chat template, the original inside the
           user message, no prefilled fence and no stop string (the answer may carry prose around the code),
           prediction = the original code
    chat-fence  the same with the answer's opening fence prefilled (still no stop string)

    python benchmarks/oracle_gap.py [--short 4] [--long 2] [--dtype auto] [--style edit] [--reps 1]
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import dataclass, field

import torch
from common import OUT, machine
from edit_speed import LONG, cases, edit_request, instruction

import specedit
from specedit import prompts
from specedit.checks import GenParams
from specedit.results import Stats


@dataclass
class Run:
    tokens: list[int]
    seconds: float  # end to end (prefill included)
    stats: Stats
    steps: list[tuple[int, int, int, int]] = field(default_factory=list)  # per forward: pred k/n, lookup k/n

    def modeled(self, cost) -> float:
        """Decode seconds the engine's cost model gives for these forwards (1 + draft rows each)."""
        return sum(cost(1 + kp + kl) for kp, _, kl, _ in self.steps)


@torch.inference_mode()
def run(eng, prompt: str, max_new: int, prediction, stop: list[str]) -> Run:
    """One generation through the engine's own loop, recording each forward's draft and what was accepted."""
    stats = Stats()
    steps, tokens = [], []
    prev = (0, 0, 0, 0)
    t0 = time.perf_counter()
    for new in eng._steps(prompt, GenParams(max_new, stop=tuple(stop), prediction=prediction), stats):
        tokens += new
        now = (stats.draft_proposed, stats.draft_accepted, stats.lookup_proposed, stats.lookup_accepted)
        if stats.forwards > len(steps):
            steps.append(tuple(a - b for a, b in zip(now, prev)))
        prev = now
    return Run(tokens, time.perf_counter() - t0, stats, steps)


@torch.inference_mode()
def prefill_equivalent(eng, prompt: str, output: list[int]) -> float:
    """Seconds of one forward over `output` after the prompt is in the cache (all logits, as a verify)."""
    ids = eng.encode(prompt)
    cache = eng._cache(len(ids) + len(output))
    device = eng.backend.device
    eng.model(torch.tensor([ids], device=device), cache)
    t0 = time.perf_counter()
    eng.model(torch.tensor([output], device=device), cache, all_logits=True)
    return time.perf_counter() - t0


def where(steps) -> dict:
    """Counts of forwards by kind, rejected rows and re-sync lengths (see the module docstring)."""
    c = {"verify_ok": 0, "diverge": 0, "plain": 0, "lookup": 0, "rejected_rows": 0, "resync": []}
    gap = None  # forwards since the last divergence, while no prediction draft was sent
    for kp, np_, kl, nl in steps:
        if kp:
            if gap is not None:
                c["resync"].append(gap)
            gap = None
            c["rejected_rows"] += kp - np_
            if np_ < kp:
                c["diverge"] += 1
                gap = 0
            else:
                c["verify_ok"] += 1
        else:
            c["lookup" if kl else "plain"] += 1
            c["rejected_rows"] += kl - nl
            if gap is not None:
                gap += 1
    return c


def requests(eng, style: str, row: dict, name: str):
    """(prompt text, prediction text, stop strings, max new tokens) of one case in one style."""
    if style == "edit":
        prompt, pred, n = edit_request(eng, name, row)
        return prompt, pred, [prompts.FENCE], n
    user = f"{instruction(name, row)}\n\n```{row['pl']}\n{row['source_code']}\n```"
    prompt = eng.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
    if style == "chat-fence":
        prompt += f"```{row['pl']}\n"
    return prompt, row["source_code"], [], len(eng.encode(row["source_code"])) + 256


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto", help="weights: auto (a GGUF as stored), float32, float16")
    ap.add_argument("--style", default="edit", help="comma-separated: edit, chat, chat-fence")
    ap.add_argument("--short", type=int, default=4, help="cases from each short dataset")
    ap.add_argument("--long", type=int, default=2, help="cases from each long-file dataset")
    ap.add_argument("--max-long-tokens", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=1, help="timed repetitions per case (the best is kept)")
    args = ap.parse_args()

    eng = specedit.load(args.model, dtype=args.dtype)
    eng.generate("warm up", max_new_tokens=4, prediction="warm up")
    cost = eng.cost_model()
    print(f"machine: {machine()}\nmodel: {args.model} ({args.dtype}, {eng.backend.name} backend), greedy, batch 1")
    print("cost model: " + ", ".join(f"{r}:{s * 1e3:.1f}ms" for r, s in zip(cost.rows, cost.seconds)))
    head = (f"{'case':<24}{'tok':>5}{'plain':>7}{'spec':>7}{'oracle':>7}{'prefill':>8}{'s/o':>6}{'s/o mod':>8}"
            f"{'fwd s/o':>9}{'ok':>4}{'div':>4}{'pln':>4}{'lkp':>4}{'rej':>5}  resync   same")
    rows, totals = [], {}
    for style in args.style.split(","):
        print(f"\nstyle {style}: tokens/s end to end (prefill included); s/o = speculative / oracle")
        print(head)
        for name, i, row in cases(args.short, args.long, eng.tokenizer, args.max_long_tokens):
            prompt, pred, stop, n = requests(eng, style, row, name)
            best = {}
            for _ in range(args.reps):  # interleaved, best of reps: the host's speed drifts
                plain = run(eng, prompt, n, None, stop)
                for key, prediction in (("plain", None), ("spec", pred), ("oracle", plain.tokens)):
                    r = plain if key == "plain" else run(eng, prompt, n, prediction, stop)
                    if key not in best or r.seconds < best[key].seconds:
                        best[key] = r
            plain, spec, oracle = best["plain"], best["spec"], best["oracle"]
            pre = prefill_equivalent(eng, prompt, plain.tokens) + plain.stats.prefill_s
            same = spec.tokens == plain.tokens and oracle.tokens == plain.tokens
            n_tok = len(plain.tokens)
            w = where(spec.steps)
            mod_s = spec.stats.prefill_s + spec.modeled(cost)
            mod_o = oracle.stats.prefill_s + oracle.modeled(cost)
            resync = f"{sum(w['resync']) / len(w['resync']):.1f}" if w["resync"] else "-"
            label = f"{style}:{name[:12]}[{i}]"
            print(f"{label:<24}{n_tok:>5}{n_tok / plain.seconds:>7.0f}{n_tok / spec.seconds:>7.0f}"
                  f"{n_tok / oracle.seconds:>7.0f}{n_tok / pre:>8.0f}{oracle.seconds / spec.seconds:>6.2f}"
                  f"{mod_o / mod_s:>8.2f}{spec.stats.forwards:>5}/{oracle.stats.forwards:<3}{w['verify_ok']:>4}"
                  f"{w['diverge']:>4}{w['plain']:>4}{w['lookup']:>4}{w['rejected_rows']:>5}  {resync:<8} {same}",
                  flush=True)
            group = f"{style}:{'long' if name in LONG else 'short'}"
            t = totals.setdefault(group, [0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, True])
            for j, x in enumerate((n_tok, plain.seconds, spec.seconds, oracle.seconds, pre, mod_s, mod_o)):
                t[j] += x
            t[7] &= same
            rows.append((label, group, n_tok, plain.seconds, spec.seconds, oracle.seconds, pre, mod_s, mod_o,
                         spec.stats.forwards, oracle.stats.forwards, w["verify_ok"], w["diverge"], w["plain"],
                         w["lookup"], w["rejected_rows"], resync, same))

    print(f"\n{'group':<12}{'tokens':>7}{'plain':>7}{'spec':>7}{'oracle':>7}{'prefill':>8}{'spec/plain':>11}"
          f"{'s/o':>6}{'s/o modeled':>12}  all same")
    for group, (n, tp, ts, to, tpre, ms, mo, same) in totals.items():
        print(f"{group:<12}{n:>7}{n / tp:>7.0f}{n / ts:>7.0f}{n / to:>7.0f}{n / tpre:>8.0f}{tp / ts:>11.2f}"
              f"{to / ts:>6.2f}{mo / ms:>12.2f}  {same}")
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "oracle_gap.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "group", "tokens", "plain_s", "spec_s", "oracle_s", "prefill_equiv_s", "spec_modeled_s",
                    "oracle_modeled_s", "spec_forwards", "oracle_forwards", "verify_ok", "diverge", "plain_steps",
                    "lookup_steps", "rejected_rows", "mean_resync", "identical"])
        w.writerows(rows)
    print(f"wrote {OUT / 'oracle_gap.csv'}")


if __name__ == "__main__":
    main()
