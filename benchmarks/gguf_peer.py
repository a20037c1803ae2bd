"""specedit running a GGUF as stored vs llama.cpp plain decoding of the same file, in one run.

End to end (prefill included) tokens/s of greedy plain decoding on the same prompt, rounds interleaved, median
[min..max]. llama.cpp is an optional peer: `CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python`
(builds from source, about 10 minutes here); it is not a dependency of specedit.

    python benchmarks/gguf_peer.py [--model smollm2-135m-instruct | path.gguf] [--new-tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import machine, nofuneval

import specedit
from specedit.gguf import SMOLLM2_NAME, smollm2_path


def spread(xs) -> str:
    return f"{statistics.median(xs):.1f} [{min(xs):.1f}..{max(xs):.1f}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=SMOLLM2_NAME)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed (see this file's docstring)") from None

    path = str(smollm2_path() if args.model.lower() == SMOLLM2_NAME else Path(args.model))
    eng = specedit.load(path)
    llm = Llama(model_path=path, n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False)
    text = nofuneval("security")[0]["source_code"]
    eng.generate(text, max_new_tokens=8)
    llm.create_completion(text, max_tokens=8, temperature=0.0)
    ours, peer = [], []
    for _ in range(args.rounds):
        r = eng.generate(text, max_new_tokens=args.new_tokens)
        ours.append(r.stats.tokens_per_s)
        llm.reset()
        t0 = time.perf_counter()
        out = llm.create_completion(text, max_tokens=args.new_tokens, temperature=0.0)
        peer.append(out["usage"]["completion_tokens"] / (time.perf_counter() - t0))
    ratio = [a / b for a, b in zip(ours, peer)]
    print(f"machine: {machine()}; {Path(path).name} as stored, {r.stats.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, greedy, end to end")
    print(f"specedit ({eng.backend.name} backend): {spread(ours)} tok/s")
    print(f"llama.cpp (llama-cpp-python, plain decoding): {spread(peer)} tok/s")
    print(f"specedit / llama.cpp: {spread(ratio)}")


if __name__ == "__main__":
    main()
