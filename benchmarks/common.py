"""Shared pieces of the benchmarks: machine description, timing, bandwidth, NoFunEval cases."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "nofuneval"
OUT = ROOT / "benchmarks" / "out"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def timed(fn, reps: int = 5, warmup: int = 1) -> list[float]:
    """Wall seconds of `reps` calls of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def med(xs) -> float:
    return statistics.median(xs)


def spread(xs) -> str:
    """median [min..max], for tables"""
    return f"{med(xs):.3g} [{min(xs):.3g}..{max(xs):.3g}]"


def read_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Measured memory read bandwidth in bytes/s: median of summing a `gib` GiB float32 tensor."""
    x = torch.ones(int(gib * 2**30 / 4))
    times = timed(lambda: x.sum(), reps=reps)
    return x.numel() * 4 / med(times)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter except the embedding table (one row of it is
    read); a tied lm_head counts once, as the lm_head."""
    from specedit.cpu_linear import PackedLinear

    seen, total = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if name == "embed.weight" or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    for module in model.modules():  # packed linears are plain attributes, not parameters
        for value in vars(module).values():
            if isinstance(value, PackedLinear):
                total += value.weight_bytes + (value.bias.numel() * 4 if value.bias is not None else 0)
    return total


def nofuneval(name: str) -> list[dict]:
    """Rows of ../shared/data/nofuneval/<name>.jsonl."""
    return [json.loads(line) for line in open(DATA / f"{name}.jsonl")]
