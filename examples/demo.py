"""`make demo`: a real speculative edit with SmolLM2-135M-Instruct on a NoFunEval security example.

Prints the diff the model made, then tokens/s of plain vs speculative decoding on that edit and whether the
two outputs are identical (they must be: greedy speculation is lossless).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import specedit
from specedit.cli import speed_report

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "nofuneval" / "security.jsonl"
FALLBACK = Path(__file__).resolve().parent / "overflow.c"


def example() -> tuple[str, str, str, str]:
    """(name, source, instruction, language) of the demo edit."""
    if DATA.is_file():
        row = [json.loads(line) for line in open(DATA)][0]
        instr = f"Rewrite the code to avoid the {row['query']} CodeQL warning."
        return f"{DATA.name}[0] ({row['cwe']})", row["source_code"], instr, row["pl"]
    return FALLBACK.name, FALLBACK.read_text(), "Rewrite the code to avoid the integer overflow.", "c"


def main() -> int:
    name, source, instruction, language = example()
    t0 = time.perf_counter()
    eng = specedit.load("smollm2-135m-instruct")
    print(f"model: SmolLM2-135M-Instruct, Q4_1 GGUF run as stored, CPU ({eng.path}), "
          f"loaded in {time.perf_counter() - t0:.1f} s")
    print(f"edit: {name}: {instruction}\n")
    e = eng.edit(source, instruction, language)
    print(e.diff or "(the model returned the file unchanged)")
    table, same = speed_report(eng, source, instruction, language)
    print(table)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
