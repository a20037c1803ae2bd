"""specedit against transformers and llama.cpp on the same NoFunEval edits, in one interleaved run.

    python benchmarks/compare_peers.py [--limit N] [--short 4] [--long 2] [--reps 1]
                                       [--model smollm2-135m-instruct] [--out benchmarks/out]

Engines, every one greedy, on the same prompt token ids (edit_speed's cases, instructions and
prompts.build_edit_prompt), with edit_speed's budget (tokens of the prediction + 128 new tokens):
  - specedit plain and speculative (prediction = the original file) on F32 and F16 weights (the GGUF
    dequantized, dtype="float32" / "float16") and on the GGUF as stored (dtype="auto", Q4_1 for the default model);
  - transformers `generate` on the float32 model directory, plain and with prompt_lookup_num_tokens=10;
  - llama.cpp (llama-cpp-python), plain and with LlamaPromptLookupDecoding(num_pred_tokens=10) as draft model
    (logits_all=True, which it needs for drafts), on the GGUF as stored and on F32 / F16 GGUFs written once from
    it into specedit.kernels.cpu.build.cache_root()/peers: every tensor dequantized by gguf.quants to F32, or its
    2-D tensors (the embedding too, as llama.cpp's converter does) rounded to F16; metadata and tokenizer copied.
    Written files are read back by specedit and their logits compared with the source's (F32: bit for bit).
    llama-cpp-python is optional: without it these rows are skipped.
Cases run one by one; within a case every engine runs in turn (plain before its speculative twin), so drift of
the shared host hits all engines alike; with --reps R that round runs R times and each engine's median seconds and
TTFT are kept (its tokens must be the same every time).

Stopping at the closing fence, the same for all: specedit stops at the token that completes "```" (stop=);
llama.cpp's tokens come one by one from Llama.generate and the loop stops at the token whose text completes the
fence, or at EOS or the budget. transformers stops on stop_strings, which it checks only at the end of each step,
so its lookup could run past a fence inside an accepted chunk: its lookup run is capped at the token count of its
own plain run (which ended at the fence). Tokens are compared as ids, up to and including the fence token.

Measured per engine and case: new tokens, tokens/s end to end (wall time of the call, prompt ids in, tokens
out), time to first token (specedit: stats.ttft_s, its prefill; peers: from the call to the end of their first
forward, timed by a forward hook on the transformers model and by wrapping Llama.eval), tokens per forward
after the first token (specedit: stats.forwards; transformers: forward hook calls; llama.cpp: Llama.eval calls,
the prompt counting as one), and whether the tokens equal the engine's own plain output and specedit F32's.
Aggregated per dataset group (short: security, runtime_efficiency; long: latency, resource_util): total tokens /
total seconds, speedup over transformers plain, median TTFT, tokens per forward, cases identical to plain.
Writes compare_peers.csv (one row per case and engine), compare_peers.md (aggregate and per-case tables) and
compare_peers.png (speedup over transformers plain per group) into --out.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch
from common import OUT, nofuneval, pyplot, run_info, stopwatch
from edit_speed import LONG, SHORT, cases, edit_request
from tqdm import tqdm

import specedit
from specedit import prompts
from specedit.gguf import gguf_file, resolve

LOOKUP = 10  # draft tokens per step of both peers' prompt lookup
REF = "specedit F32 plain"  # every output is also compared with this one


@dataclasses.dataclass
class Case:
    label: str
    group: str  # "short" | "long"
    ids: list[int]  # prompt token ids, the same for every engine
    prediction: str  # the original file and the closing fence
    budget: int  # max new tokens


@dataclasses.dataclass
class Run:
    tokens: list[int]  # new tokens, up to the fence token, EOS or the budget
    seconds: float  # the call, end to end
    ttft: float  # seconds to the first token
    forwards: int  # forwards after the one that gave the first token


@dataclasses.dataclass
class Engine:
    family: str  # specedit | transformers | llama.cpp
    weights: str  # F32 | F16 | the GGUF's own type
    mode: str  # plain | spec | lookup
    run: Callable[[Case], Run]

    @property
    def name(self) -> str:
        return f"{self.family} {self.weights} {self.mode}"

    @property
    def plain(self) -> str:
        return f"{self.family} {self.weights} plain"


def run_specedit(eng, speculative: bool, case: Case) -> Run:
    r, dt = stopwatch(lambda: eng.generate(case.ids, max_new_tokens=case.budget, stop=[prompts.FENCE],
                                           prediction=case.prediction if speculative else None))
    return Run(r.token_ids, dt, r.stats.ttft_s, r.stats.forwards)


class Forwards:
    """Counts calls of a model's forward and notes when the first one returned."""

    def reset(self) -> float:
        self.count, self.first = 0, None
        return time.perf_counter()

    def __call__(self, *_):
        self.count += 1
        if self.first is None:
            self.first = time.perf_counter()

    def run(self, t0: float, tokens: list[int], seconds: float) -> Run:
        return Run(tokens, seconds, self.first - t0, self.count - 1)


class Transformers:
    """transformers generate on the float32 model directory; a forward hook counts forwards."""

    def __init__(self, path: Path, tokenizer):
        import transformers

        transformers.logging.set_verbosity_error()  # the checkpoint's sampling defaults vs do_sample=False
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.forwards = Forwards()
        self.model.register_forward_hook(self.forwards)
        self.tokenizer, self.plain_tokens = tokenizer, {}

    def run(self, lookup: bool, case: Case) -> Run:
        budget = len(self.plain_tokens[case.label]) if lookup else case.budget  # see the module docstring
        extra = {"prompt_lookup_num_tokens": LOOKUP} if lookup else {}
        x = torch.tensor([case.ids])
        t0 = self.forwards.reset()
        with torch.inference_mode():
            out, dt = stopwatch(lambda: self.model.generate(
                x, max_new_tokens=budget, do_sample=False, stop_strings=[prompts.FENCE], tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.eos_token_id, **extra))
        tokens = out[0, len(case.ids):].tolist()
        if not lookup:
            self.plain_tokens[case.label] = tokens
        return self.forwards.run(t0, tokens, dt)


class LlamaCpp:
    """llama-cpp-python on one GGUF file; Llama.eval is wrapped to count forwards."""

    def __init__(self, path: Path, n_ctx: int, lookup: bool, eos: list[int]):
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        # a draft model needs logits of every row; without logits_all, prompts past one batch (512) fail
        extra = {"draft_model": LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP), "logits_all": True} if lookup else {}
        threads = torch.get_num_threads()
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         verbose=False, **extra)
        self.forwards, self.eos = Forwards(), set(eos)
        evaluate = self.llm.eval

        def counted(tokens):
            evaluate(tokens)
            self.forwards()

        self.llm.eval = counted

    def _generate(self, case: Case) -> list[int]:
        self.llm.reset()  # no reuse of the previous call's prompt in the cache
        fence, text, tokens = prompts.FENCE.encode(), b"", []
        steps = self.llm.generate(case.ids, temp=0.0, repeat_penalty=1.0)  # temp 0: llama.cpp's greedy sampler
        for t in steps:
            tokens.append(t)
            text += self.llm.detokenize([t])
            if t in self.eos or fence in text or len(tokens) == case.budget:
                break
        steps.close()
        return tokens

    def run(self, case: Case) -> Run:
        t0 = self.forwards.reset()
        tokens, dt = stopwatch(lambda: self._generate(case))
        return self.forwards.run(t0, tokens, dt)


def file_type(path: Path) -> str:
    """The GGUF's weight type as llama.cpp names it: Q4_1, F16, ..."""
    return gguf.LlamaFileType(gguf.GGUFReader(path).fields["general.file_type"].contents()).name.removeprefix(
        "MOSTLY_").removeprefix("ALL_")


def dequantized(src: Path, kind: str) -> Path:
    """`src` with its tensors as F32 (every tensor dequantized) or F16 (2-D tensors rounded to float16, 1-D ones
    F32), metadata and tokenizer copied: written once into cache_root()/peers under the source's sha256 and
    reused. A new file is read back by specedit as stored and its logits compared with the source's."""
    from specedit.kernels.cpu.build import cache_root

    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    out = cache_root() / "peers" / f"{src.stem}-{digest}-{kind}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(src)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, reader.fields["general.architecture"].contents())
    file_type = gguf.LlamaFileType.ALL_F32 if kind == "F32" else gguf.LlamaFileType.MOSTLY_F16
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):  # written by GGUFWriter itself
            continue
        value = int(file_type) if f.name == "general.file_type" else f.contents()
        writer.add_key_value(f.name, value, f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)  # [rows, cols] in row-major order
        writer.add_tensor(t.name, x.astype(np.float16) if kind == "F16" and x.ndim == 2 else x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    ids = list(range(100, 164))
    a, b = specedit.load(src).logits(ids), specedit.load(out).logits(ids)
    print(f"wrote {out}; specedit reads it back as stored: logits {'equal to' if torch.equal(a, b) else 'differ from'}"
          f" {src.name}'s (max |diff| {(a - b).abs().max().item():.2g}) on {len(ids)} tokens")
    return out


def aggregate(engines: list[Engine], case_list: list[Case], runs: dict) -> list[dict]:
    """Per group and engine: tokens, tok/s, speedup over transformers plain, median TTFT, tok/forward, same."""
    rows = []
    for group in ("short", "long"):
        labels = [c.label for c in case_list if c.group == group]
        if not labels:
            continue
        base = None
        for e in engines:
            rs = [runs[e.name, c] for c in labels]
            n = sum(len(r.tokens) for r in rs)
            tps = n / sum(r.seconds for r in rs)
            if e.name == "transformers F32 plain":
                base = tps
            fwd = sum(r.forwards for r in rs)
            rows.append({"group": group, "engine": e.name, "tokens": n, "tok_s": tps,
                         "ttft_s": statistics.median(r.ttft for r in rs),
                         "tok_per_fwd": sum(len(r.tokens) - 1 for r in rs) / fwd if fwd else None,
                         "same": sum(r.tokens == runs[e.plain, c].tokens for r, c in zip(rs, labels)),
                         "same_ref": sum(r.tokens == runs[REF, c].tokens for r, c in zip(rs, labels)),
                         "cases": len(labels)})
        for r in rows[-len(engines):]:
            r["speedup"] = r["tok_s"] / base if base else None
    return rows


def markdown(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table: columns are (key, header, format)."""
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join("n/a" if r[k] is None else format(r[k], f) for k, _, f in columns) + " |")
    return "\n".join(out)


def plot(rows: list[dict], engines: list[Engine], path: Path, title: str) -> None:
    plt = pyplot()
    from matplotlib.colors import to_rgba

    groups = [g for g in ("short", "long") if any(r["group"] == g for r in rows)]
    colors = {"specedit": "tab:blue", "transformers": "tab:gray", "llama.cpp": "tab:orange"}
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 0.35 * len(engines) + 1.5), sharey=True,
                             squeeze=False)
    for ax, group in zip(axes[0], groups):
        speed = {r["engine"]: r["speedup"] or 0.0 for r in rows if r["group"] == group}
        y = range(len(engines))[::-1]
        ax.barh(list(y), [speed[e.name] for e in engines],
                color=[to_rgba(colors[e.family], 0.5 if e.mode == "plain" else 1.0) for e in engines])
        for yi, e in zip(y, engines):
            ax.text(speed[e.name], yi, f" {speed[e.name]:.2f}x", va="center", fontsize=8)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_title(f"{group} files ({', '.join(SETS[group])})", fontsize=10)
        ax.set_xlabel("speedup over transformers F32 plain (tokens/s, end to end)")
        ax.set_yticks(list(y), [e.name for e in engines], fontsize=8)
        ax.margins(x=0.15)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


SETS = {"short": SHORT, "long": LONG}


def smallest(n: int, tok):
    """(dataset, index, row) of the n smallest original files (in tokens) of every dataset, in dataset order."""
    for name in (*SHORT, *LONG):
        rows = nofuneval(name)
        size = [len(tok.encode(r["source_code"])) for r in rows]
        for i in sorted(sorted(range(len(rows)), key=size.__getitem__)[:n]):
            yield name, i, rows[i]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a GGUF file, or a name that names one")
    ap.add_argument("--short", type=int, default=4, help="cases from each short dataset")
    ap.add_argument("--long", type=int, default=2, help="cases from each long-file dataset")
    ap.add_argument("--limit", type=int, help="the N smallest files of every dataset, for a quick run (overrides "
                    "--short and --long; --limit 1 took 2.6 minutes here, 2 cores)")
    ap.add_argument("--max-long-tokens", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=1, help="rounds per case; median time per engine")
    ap.add_argument("--out", type=Path, default=OUT, help="directory for the CSV, markdown and PNG")
    args = ap.parse_args()

    src = gguf_file(args.model)
    if src is None:
        raise SystemExit(f"{args.model} is not a GGUF file: this comparison runs llama.cpp on the same file")
    quant = file_type(src)
    info = run_info()
    engines, first = [], None
    for weights, dtype in (("F32", "float32"), ("F16", "float16"), (quant, "auto")):
        eng = specedit.load(args.model, dtype=dtype)
        first = first or eng
        engines += [Engine("specedit", weights, m, partial(run_specedit, eng, m == "spec")) for m in ("plain", "spec")]
    tok = first.tokenizer
    case_list = []
    picked = (cases(args.short, args.long, tok, args.max_long_tokens) if args.limit is None
              else smallest(args.limit, tok))
    for name, i, row in picked:
        prompt, pred, n = edit_request(first, name, row)
        case_list.append(Case(f"{name}[{i}]", "long" if name in LONG else "short", first.encode(prompt), pred, n))
    hf = Transformers(resolve(src), tok)
    engines += [Engine("transformers", "F32", m, partial(hf.run, m == "lookup")) for m in ("plain", "lookup")]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp rows skipped: llama-cpp-python is not installed "
              "(CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python, a ~10 minute build)")
    else:
        n_ctx = max(len(c.ids) + c.budget for c in case_list) + LOOKUP + 1
        for weights, path in (("F32", dequantized(src, "F32")), ("F16", dequantized(src, "F16")), (quant, src)):
            engines += [Engine("llama.cpp", weights, m, LlamaCpp(path, n_ctx, m == "lookup", first.eos_ids).run)
                        for m in ("plain", "lookup")]

    print(f"machine: {info['machine']}; git {info['git_sha']}, {info['date']}")
    print(f"model: {src.name} ({quant} as stored; F32/F16 = its weights dequantized), greedy, batch 1, "
          f"prompt lookup {LOOKUP} tokens; {len(case_list)} cases, every engine in turn per case, {args.reps} round(s)")
    warm = dataclasses.replace(case_list[0], label="warm-up", budget=8)
    for e in engines:  # first-call costs (kernels, stop-string tables, cost model) stay out of the timings
        e.run(warm)
    runs = {}
    for case in tqdm(case_list, desc="cases", unit="case"):
        rounds = [[e.run(case) for e in engines] for _ in range(args.reps)]
        for e, rs in zip(engines, zip(*rounds)):
            if any(r.tokens != rs[0].tokens for r in rs):
                print(f"{e.name} on {case.label}: the tokens changed between rounds")
            runs[e.name, case.label] = dataclasses.replace(rs[0], seconds=statistics.median(r.seconds for r in rs),
                                                           ttft=statistics.median(r.ttft for r in rs))

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "compare_peers.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["machine", "model", "git_sha", "date", "engine", "dtype", "mode", "case", "group", "prompt_tokens",
                    "tokens", "seconds", "tok_s", "ttft_s", "tokens_per_forward", "same_as_plain",
                    "same_as_specedit_F32_plain"])
        per_case = []
        for c in case_list:
            for e in engines:
                r = runs[e.name, c.label]
                tpf = (len(r.tokens) - 1) / r.forwards if r.forwards else None
                row = {"case": c.label, "engine": e.name, "tokens": len(r.tokens), "tok_s": len(r.tokens) / r.seconds,
                       "ttft_s": r.ttft, "tok_per_fwd": tpf, "same": r.tokens == runs[e.plain, c.label].tokens,
                       "same_ref": r.tokens == runs[REF, c.label].tokens}
                per_case.append(row)
                w.writerow([info["machine"], src.name, info["git_sha"], info["date"], e.family, e.weights, e.mode,
                            c.label, c.group, len(c.ids), len(r.tokens), f"{r.seconds:.4f}", f"{row['tok_s']:.2f}",
                            f"{r.ttft:.4f}", "" if tpf is None else f"{tpf:.3f}", row["same"], row["same_ref"]])

    agg = aggregate(engines, case_list, runs)
    for r in agg:
        r["same_of"], r["same_ref_of"] = f"{r['same']}/{r['cases']}", f"{r['same_ref']}/{r['cases']}"
    table = markdown(agg, [("group", "files", "s"), ("engine", "engine", "s"), ("tokens", "tokens", "d"),
                           ("tok_s", "tok/s", ".1f"), ("speedup", "x transformers plain", ".2f"),
                           ("ttft_s", "TTFT s (median)", ".3f"), ("tok_per_fwd", "tok/forward", ".2f"),
                           ("same_of", "same as plain", "s"), ("same_ref_of", f"same as {REF}", "s")])
    cases_table = markdown(per_case, [("case", "case", "s"), ("engine", "engine", "s"), ("tokens", "tokens", "d"),
                                      ("tok_s", "tok/s", ".1f"), ("ttft_s", "TTFT s", ".3f"),
                                      ("tok_per_fwd", "tok/forward", ".2f"), ("same", "same as plain", ""),
                                      ("same_ref", f"same as {REF}", "")])
    header = (f"machine: {info['machine']}; git {info['git_sha']}; {info['date']}\n\nmodel {src.name} "
              f"({quant} as stored; F32 / F16: its weights dequantized), greedy, batch 1, the same prompt ids for "
              f"every engine; prompt lookup {LOOKUP} tokens; {len(case_list)} cases, engines interleaved per case, "
              f"median of {args.reps} round(s)")
    print("\n" + table)
    diffs = [r for r in per_case if not r["same"]]
    for r in diffs:
        print(f"differs from its own plain output: {r['engine']} on {r['case']}")
    (args.out / "compare_peers.md").write_text(f"{header}\n\n{table}\n\nPer case:\n\n{cases_table}\n")
    plot(agg, engines, args.out / "compare_peers.png",
         f"{src.name}, greedy, {len(case_list)} NoFunEval edits; {info['machine']}; git {info['git_sha']}")
    print(f"wrote {args.out / 'compare_peers.csv'}, {args.out / 'compare_peers.md'}, {args.out / 'compare_peers.png'}")


if __name__ == "__main__":
    main()
