"""Shared pieces of the benchmarks: machine description, timing, bandwidth, NoFunEval cases."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "nofuneval"
OUT = ROOT / "benchmarks" / "out"


def machine(device: torch.device | None = None) -> str:
    """The processor (or the CUDA device), torch version and thread count, for every table and CSV."""
    if device is not None and device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def stopwatch(fn):
    """(fn(), wall seconds of that call)."""
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def interleaved(series: dict[str, list], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds per call for each named series of zero-argument callables. The series are interleaved
    call by call, so a change in the machine's memory bandwidth (shared host) hits all of them alike; within a
    series the callables are used round-robin. Each callable runs `warmup` times first."""
    for fns in series.values():
        for f in fns:
            for _ in range(warmup):
                f()
    ts: dict[str, list[float]] = {name: [] for name in series}
    for i in range(reps):
        for name, fns in series.items():
            ts[name].append(stopwatch(fns[i % len(fns)])[1])
    return ts


def timed(fn, reps: int = 5, warmup: int = 1) -> list[float]:
    """Wall seconds of `reps` calls of fn() after `warmup` calls."""
    return interleaved({"": [fn]}, reps, warmup)[""]


def med(xs) -> float:
    return statistics.median(xs)


def spread(xs) -> str:
    """median [min..max], for tables"""
    return f"{med(xs):.3g} [{min(xs):.3g}..{max(xs):.3g}]"


_PROBE: torch.Tensor | None = None


def _extension(name: str, cflags: list[str]):
    """benchmarks/<name>.cpp compiled once (None where the CPU kernels cannot be built). This is a benchmark
    process, so it may put ninja on its own PATH for torch's builder."""
    from specedit.kernels.cpu import build

    if not build.available():
        return None
    from torch.utils.cpp_extension import load

    os.environ["PATH"] = build._ninja_dir() + os.pathsep + os.environ.get("PATH", "")
    out = build.cache_root() / "ext" / f"bench_{name}"
    out.mkdir(parents=True, exist_ok=True)
    return load(name=f"bench_{name}", sources=[str(ROOT / "benchmarks" / f"{name}.cpp")], extra_cflags=cflags,
                extra_ldflags=["-fopenmp"], build_directory=str(out))


def _probe_buffer() -> torch.Tensor:
    """1 GiB of float32 ones, in huge pages as the packed weights are (4 KB pages read ~7% slower here) when
    the CPU kernels run here; allocated once."""
    global _PROBE
    if _PROBE is None:
        from specedit.kernels.cpu import build

        if build.available():
            from specedit.kernels.cpu.linear import map_huge

            _PROBE = map_huge(2**30).view(torch.float32).fill_(1.0)
        else:
            _PROBE = torch.ones(2**28)
    return _PROBE


def read_probe():
    """(fn, bytes): fn() reads the 1 GiB probe buffer once with read_probe.cpp, which prefetches like the
    matmul does (torch's sum where it cannot be built): the read-bandwidth yardstick."""
    x = _probe_buffer()
    module = _extension("read_probe", ["-O3", "-mavx2", "-fopenmp"])
    if module is None:
        return (lambda: x.sum()), x.numel() * 4
    return (lambda: module.read_probe(x)), x.numel() * 4


def read_bandwidth(reps: int = 5) -> float:
    """Measured memory read bandwidth in bytes/s: the probe buffer read by torch's sum and by read_probe(),
    the better median of `reps`."""
    x = _probe_buffer()
    probe, nbytes = read_probe()
    return nbytes / min(med(timed(lambda: x.sum(), reps=reps)), med(timed(probe, reps=reps)))


def matmul_rate(n: int = 2048, reps: int = 5) -> float:
    """Measured float32 FLOP/s of torch.mm on two n x n matrices (2 n^3 FLOPs a call, median of `reps`) with
    this process's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / med(timed(lambda: torch.mm(a, b), reps=reps))


def fma_peak(reps: int = 5) -> float:
    """Measured peak float32 FLOP/s: fma_probe.cpp, independent FMAs on registers on every thread, the widest
    vectors the CPU has (median of `reps`): the compute yardstick. torch.mm's rate where it cannot be built."""
    module = _extension("fma_probe", ["-O3", "-march=native", "-fopenmp"])
    if module is None:
        return matmul_rate(reps=reps)
    iters = 1 << 21
    return module.fma_probe(iters) / med(timed(lambda: module.fma_probe(iters), reps=reps))


def int8_peak(reps: int = 5) -> float:
    """Measured peak int8 multiply-add rate (x2, ops/s, comparable to FLOP/s): fma_probe.cpp's int8_probe,
    4-way u8 x s8 dot products into int32 on registers on every thread (AVX-512 VNNI vpdpbusd where the CPU
    has it, else AVX2 pmaddubsw): the compute yardstick of compute='int8'. None where it cannot be built."""
    module = _extension("fma_probe", ["-O3", "-march=native", "-fopenmp"])
    if module is None:
        return None
    iters = 1 << 21
    return module.int8_probe(iters) / med(timed(lambda: module.int8_probe(iters), reps=reps))


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter except the embedding table (one row of it is
    read); a tied lm_head counts once, as the lm_head."""
    from specedit.kernels.cpu.linear import PackedLinear

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


def run_info() -> dict:
    """machine, git sha of HEAD (+dirty when engine/ or kernels/ differ from it: the code timed is not HEAD's)
    and date: the columns every CSV carries."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "engine", "kernels")
                                                      else "")
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    return {"machine": machine(), "git_sha": sha, "date": time.strftime("%Y-%m-%d %H:%M")}


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load(model: str, spec: str):
    """specedit.load(model, ...) from a benchmark's engine spec 'DTYPE' or 'DTYPE:COMPUTE' (e.g. 'auto:int8':
    the GGUF as stored, integer compute; 'auto' alone is compute='auto')."""
    import specedit

    dtype, _, compute = spec.partition(":")
    return specedit.load(model, dtype=dtype, compute=compute or "auto")


def nofuneval(name: str) -> list[dict]:
    """Rows of ../shared/data/nofuneval/<name>.jsonl."""
    return [json.loads(line) for line in open(DATA / f"{name}.jsonl")]
