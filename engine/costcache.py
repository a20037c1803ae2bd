"""The cost model (forward time vs rows) on disk: measured once per machine, model shape and weight format.

A fresh engine's first speculative call would otherwise pay for the timing (0.9-1.5 s on SmolLM2-135M, more on
larger models), which on a short edit is more than speculation saves. Files live in `$SPECEDIT_CACHE/cost`
(default ~/.cache/specedit/cost), one small JSON per key; a missing, unreadable, malformed or week-old file
means measuring again. The key covers the machine (CPU model, threads, GPU name), the torch build, the model's
config, every module type and tensor shape/dtype (so packed, half and int8 weights differ), the backend and the
sources the forward runs (editing them re-measures once).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from inspect import isroutine
from pathlib import Path

import torch

from .kernels.cpu.build import CSRC, cache_root
from .draft_policy import CostModel

MAX_AGE_S = 7 * 24 * 3600  # a cached cost model is measured again after a week


def cache_dir() -> Path:
    return cache_root() / "cost"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """What the forward time depends on outside the model: CPU, threads, torch build, GPU."""
    parts = [_cpu_name(), platform.machine(), f"{os.cpu_count()} cpus", f"{torch.get_num_threads()} threads",
             f"torch {torch.__version__}"]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    return ", ".join(parts)


def _sources() -> list:
    """Size and mtime of the sources a forward runs (model, cache, backends, every kernel), so editing them
    re-measures; other files (CLI, prompts, drafter) don't change the forward's cost."""
    here = Path(__file__).resolve().parent
    kernels = CSRC.parent.parent
    files = [here / "model.py", here / "cache.py", *here.glob("backends/*.py"), *kernels.glob("*.py"),
             *kernels.glob("cpu/*.py"), *CSRC.iterdir()]
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file())


def _describe(v, depth: int = 1):
    """A tensor's shape and dtype; a plain object's type and (one level down) its tensor, dtype and number
    attributes, e.g. a packed linear's storage dtype; None for anything else."""
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), str(v.dtype))
    if isinstance(v, (torch.dtype, int, float, str, bool)):
        return repr(v)
    if depth and v is not None and not isinstance(v, (torch.nn.Module, type)) and not isroutine(v):
        names = set(getattr(v, "__dict__", ()))
        names.update(n for c in type(v).__mro__ for n in getattr(c, "__slots__", ()) if hasattr(v, n))
        inner = {k: _describe(getattr(v, k), depth - 1) for k in names if not k.startswith("__")}
        return (type(v).__name__, sorted((k, d) for k, d in inner.items() if d is not None))
    return None


def _format(model) -> list:
    """Module types and every tensor's shape and dtype (parameters, buffers, plain attributes such as packed
    weights), so float32, half and int8 storage get different keys."""
    out = []
    for name, mod in model.named_modules():
        attrs = {**dict(mod.named_parameters(recurse=False)), **dict(mod.named_buffers(recurse=False))}
        attrs.update({k: v for k, v in vars(mod).items() if not k.startswith("_")})
        described = {k: _describe(v) for k, v in attrs.items()}
        out.append((name, type(mod).__name__, sorted((k, d) for k, d in described.items() if d is not None)))
    return out


def key(model, backend: str) -> str:
    """A hex digest naming this (machine, model, weight format, backend, code) combination. `backend` is the
    backend's name (a Backend is taken by its name: its repr holds function addresses that differ per process)."""
    backend = getattr(backend, "name", backend)
    device = model.rope_cos.device  # (a GGUF embedding kept quantized has no .weight)
    attend = getattr(model, "attend", None)
    blob = repr((machine(device), repr(model.cfg), _format(model), backend, getattr(attend, "__name__", None),
                 str(device), _sources()))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def path(k: str) -> Path:
    return cache_dir() / f"{k}.json"


def load(k: str) -> CostModel | None:
    """The cached cost model for key `k`, or None (absent, unreadable, or older than MAX_AGE_S: measure again,
    so a timing taken while the machine was busy doesn't steer chunk sizes for ever)."""
    try:
        d = json.loads(path(k).read_text())
        if not 0 <= time.time() - float(d.get("measured_at", 0)) <= MAX_AGE_S:
            return None
        return CostModel.from_dict(d)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def save(k: str, cost: CostModel) -> None:
    """Write atomically; a cache that can't be written is skipped (the engine keeps its measurement)."""
    target = path(k)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({**cost.to_dict(), "measured_at": time.time()}, f)
        os.replace(tmp, target)
    except OSError:
        try:
            os.unlink(tmp)
        except (OSError, UnboundLocalError):
            pass
