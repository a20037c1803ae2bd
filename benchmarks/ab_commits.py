"""Two commits of specedit, interleaved process by process: real edits and forwards, outputs compared.

Each revision's `engine/` and `kernels/` are exported (git archive) into benchmarks/out/ab/<rev>/specedit and
run by this script's worker in a fresh process with that copy first on PYTHONPATH (each builds its own C++
extension). Rounds alternate which revision goes first. Every worker uses one cost model, measured once by the
first revision and handed to the others, so the draft lengths differ only if the code chose them differently.
Per round and mode (compute exact and int8, the default model as stored): mean tokens/s of speculative and plain
edits on NoFunEval cases (outputs must be equal), and the best of 7 forwards of 1 and 32 rows after 128 cached
positions. Prints medians, spreads and B/A ratios, and whether every token of B equals A's.

    python benchmarks/ab_commits.py A_REV [B_REV=HEAD] [--rounds 6] [--cases 3] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common import OUT, ROOT, med, nofuneval, spread

COMPUTES = ("exact", "int8")
METRICS = ("spec_tok_s", "plain_tok_s", "fwd1_ms", "fwd32_ms")


def export(rev: str) -> Path:
    """benchmarks/out/ab/<commit>, holding that commit's package as `specedit` (its kernels inside)."""
    sha = subprocess.check_output(["git", "rev-parse", "--short", rev], cwd=ROOT, text=True).strip()
    dest = OUT / "ab" / sha
    if not (dest / "specedit" / "__init__.py").exists():
        with tempfile.TemporaryDirectory() as tmp:
            tar = Path(tmp) / "src.tar"
            subprocess.check_call(["git", "archive", "-o", str(tar), sha, "engine", "kernels"], cwd=ROOT)
            with tarfile.open(tar) as t:
                t.extractall(tmp, filter="data")
            dest.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tmp) / "engine", dest / "specedit")
            os.replace(Path(tmp) / "kernels", dest / "specedit" / "kernels")
    return dest


def worker(model: str, cases: int, cost_file: Path) -> dict:
    """One process's measurements (it imports whichever specedit comes first on PYTHONPATH)."""
    import torch

    import specedit
    from specedit import costcache

    rows = [(n, r) for n in ("security", "runtime_efficiency") for r in nofuneval(n)[:cases]]
    out, digest = {"package": specedit.__file__}, hashlib.sha256()
    for compute in COMPUTES:
        eng = specedit.load(model, compute=compute)
        costs = json.loads(cost_file.read_text()) if cost_file.exists() else {}
        if compute in costs:  # on disk under this revision's key, where the engine's cost_model() reads it
            costcache.save(costcache.key(eng.model, eng.backend.name), costcache.CostModel.from_dict(costs[compute]))
            assert eng.cost_model().to_dict() == costs[compute]
        else:
            costs[compute] = eng.cost_model().to_dict()
            cost_file.write_text(json.dumps(costs))
        spec, plain = [], []
        for name, r in rows:
            instr = ("Rewrite the code to run faster." if name == "runtime_efficiency"
                     else f"Rewrite the code to avoid the {r['query']} CodeQL warning.")
            e = eng.edit(r["source_code"], instr, r["pl"], max_new_tokens=400)
            p = eng.edit(r["source_code"], instr, r["pl"], max_new_tokens=400, speculate=False)
            if e.token_ids != p.token_ids:
                raise SystemExit(f"{compute}: speculative output differs from plain on a {name} case")
            digest.update(json.dumps([compute, e.token_ids]).encode())
            spec.append(e.stats.tokens_per_s)
            plain.append(p.stats.tokens_per_s)
        fwd = {}
        with torch.inference_mode():
            for t in (1, 32):
                best = float("inf")
                for _ in range(7):
                    cache = eng._cache(160)
                    eng.model(torch.zeros(1, 128, dtype=torch.long), cache)
                    t0 = time.perf_counter()
                    eng.model(torch.zeros(1, t, dtype=torch.long), cache, all_logits=True)
                    best = min(best, time.perf_counter() - t0)
                fwd[t] = best * 1e3
        out[compute] = {"spec_tok_s": sum(spec) / len(spec), "plain_tok_s": sum(plain) / len(plain),
                        "fwd1_ms": fwd[1], "fwd32_ms": fwd[32]}
    out["tokens"] = digest.hexdigest()
    return out


def run(pkg: Path, args, cost_file: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{pkg}{os.pathsep}{Path(__file__).parent}"}
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--cases", str(args.cases),
           "--cost-file", str(cost_file)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"worker for {pkg} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", nargs="?")
    ap.add_argument("b", nargs="?", default="HEAD")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--cases", type=int, default=3, help="cases from each of two short NoFunEval sets")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cost-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.cases, args.cost_file)))
        return
    if not args.a:
        ap.error("name the revision to compare against, e.g. HEAD~3")
    pkgs = {"A": export(args.a), "B": export(args.b)}
    cost_file = OUT / "ab" / "cost.json"
    cost_file.unlink(missing_ok=True)
    for tag in ("B", "A"):  # warm: build both extensions; B measures the cost model both use
        run(pkgs[tag], args, cost_file)
    results = {"A": [], "B": []}
    for r in range(args.rounds):
        for tag in ("A", "B") if r % 2 == 0 else ("B", "A"):
            results[tag].append(run(pkgs[tag], args, cost_file))
            print(f"round {r + 1} {tag}: " + ", ".join(
                f"{c} {m} {results[tag][-1][c][m]:.1f}" for c in COMPUTES for m in METRICS), flush=True)
    same = {x["tokens"] for x in results["A"] + results["B"]}
    print(f"\nA = {args.a} ({pkgs['A'].name}), B = {args.b} ({pkgs['B'].name}); {args.rounds} rounds; "
          f"every token equal: {'yes' if len(same) == 1 else 'NO'}")
    print("| mode | metric | A median [spread] | B median [spread] | B/A |\n| --- | --- | --- | --- | --- |")
    for c in COMPUTES:
        for m in METRICS:
            a, b = ([x[c][m] for x in results[t]] for t in ("A", "B"))
            print(f"| {c} | {m} | {spread(a)} | {spread(b)} | {med(b) / med(a):.3f} |")


if __name__ == "__main__":
    main()
