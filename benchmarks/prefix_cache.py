"""Time to first token of a second edit of the same file, with and without the prefix cache, for both orders of
the edit prompt (file first, as `build_edit_prompt` writes it by default, or instruction first); then the edits
themselves in both orders, to see what the order costs in quality (answers that end at their closing fence, and
their closeness to NoFunEval's reference after-edit file).

Per file (NoFunEval, 500-1500 tokens): edit A is prefilled, then edit B (another instruction) is timed on an
engine with the cache and on one without, interleaved, `--reps` times; the ratio is cached / uncached TTFT.

    python benchmarks/prefix_cache.py [--files 6] [--reps 3] [--model smollm2-135m-instruct] [--no-quality]
"""

from __future__ import annotations

import argparse
import difflib
import statistics

from common import machine, med, nofuneval, spread
from edit_speed import instruction

import specedit
from specedit import prompts

SECOND = "Add a comment above each function saying what it does."


def files(eng, n: int) -> list[tuple[str, dict]]:
    """Up to n NoFunEval files of 500-1500 tokens, taken from the four datasets in turn."""
    pools = {name: [r for r in nofuneval(name) if 500 <= len(eng.encode(r["source_code"])) <= 1500]
             for name in ("latency", "resource_util", "runtime_efficiency", "security")}
    out = []
    for i in range(n):
        for name, rows in pools.items():
            if len(out) < n and i < len(rows):
                out.append((name, rows[i]))
    return out


def ttft(eng, prompt: str) -> tuple[float, int]:
    """(prefill seconds, cached tokens) of one prompt."""
    r = eng.generate(prompt, max_new_tokens=1)
    return r.stats.prefill_s, r.stats.cached_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-quality", action="store_true", help="skip the full edits in both orders")
    args = ap.parse_args()
    on, off = specedit.load(args.model), specedit.load(args.model, prefix_cache_mb=0)
    print(f"{machine()}; {args.model} ({on.path.name}), prefix cache {on.prefix_cache.budget >> 20} MiB, "
          f"block {on.prefix_cache.block}")
    cases = files(on, args.files)
    ratios: dict[bool, list[float]] = {True: [], False: []}
    print(f"{'file':<26}{'tokens':>7}{'order':>13}{'cached':>8}{'TTFT cached s':>15}{'uncached s':>12}{'ratio':>7}")
    for name, row in cases:
        tokens = len(on.encode(row["source_code"]))
        for file_first in (True, False):
            a, _ = prompts.build_edit_prompt(on.tokenizer, row["source_code"], instruction(name, row), row["pl"],
                                             file_first)
            b, _ = prompts.build_edit_prompt(on.tokenizer, row["source_code"], SECOND, row["pl"], file_first)
            ttft(off, b)  # warm both engines on this length
            cached, plain, n = [], [], 0
            for _ in range(args.reps):
                on.prefix_cache.clear()
                ttft(on, a)
                s, n = ttft(on, b)
                cached.append(s)
                plain.append(ttft(off, b)[0])
            ratio = med(cached) / med(plain)
            ratios[file_first].append(ratio)
            print(f"{name:<26}{tokens:>7}"
                  f"{'file first' if file_first else 'instr first':>13}{n:>8}{med(cached):>15.3f}"
                  f"{med(plain):>12.3f}{ratio:>7.2f}")
    for file_first, rs in ratios.items():
        print(f"{'file first' if file_first else 'instruction first'}: cached / uncached TTFT of the second edit "
              f"{med(rs):.2f} {spread(rs)} over {len(rs)} files")
    if args.no_quality:
        return
    print("\nthe edits in both orders (speculative, greedy; reference: NoFunEval's target_code):")
    for file_first in (True, False):
        complete, close = 0, []
        for name, row in cases:
            pr, pred = prompts.build_edit_prompt(on.tokenizer, row["source_code"], instruction(name, row),
                                                 row["pl"], file_first)
            r = on.generate(pr, len(on.encode(pred)) + 128, prediction=pred, stop=[prompts.FENCE])
            complete += r.stats.finish_reason == "stop"
            edited = prompts.extract_code(r.text, row["source_code"])
            close.append(difflib.SequenceMatcher(None, edited, row.get("target_code", "")).ratio())
        unchanged = statistics.mean(difflib.SequenceMatcher(None, r["source_code"], r.get("target_code", "")).ratio()
                                    for _, r in cases)
        print(f"  {'file first' if file_first else 'instruction first':<18} complete {complete}/{len(cases)}, "
              f"similarity to the reference {statistics.mean(close):.3f} (mean; the unchanged file's {unchanged:.3f})")

if __name__ == "__main__":
    main()
