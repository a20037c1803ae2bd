"""The one place a backend is chosen: how attention, acceptance and the weights run on a device.

    be = select("cpu", "auto", None, cfg, "float32")
    model = Transformer(cfg, be.attend)       # parameters loaded in be.param_dtype
    be.prepare(model)                         # e.g. pack the linears and set model.decoder (CPU kernels)

Backends: "cpu" (the C++ kernels of specedit.kernels.cpu: packed linears, every block in one decoder call,
row-invariant attention), "torch" (F.linear and SDPA, anywhere) and "triton" (the Triton kernels of
specedit.kernels; on a CPU under TRITON_INTERPRET=1). `backend="auto"` picks triton on CUDA and cpu on a CPU that
can build the kernels, else torch, with a warning saying why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .. import checks
from ..config import ModelConfig
from ..model import AttendFn
from ..acceptance import AcceptFn
from ..weights import parse_dtype

CHOICES = ("auto", "cpu", "torch", "triton")
COMPUTES = ("auto", "exact", "int8")
# What compute="auto" picks for quantized weights (a GGUF as stored, dtype="int8") on the CPU kernels; float
# weights always run "exact". See the README's "compute" section for the measurements behind it.
AUTO_COMPUTE = "exact"


@dataclass(frozen=True)
class Backend:
    name: str  # "cpu" | "torch" | "triton"
    device: torch.device
    attend: AttendFn  # attention of the new rows over the cache
    accept: AcceptFn  # greedy acceptance of a verify step
    param_dtype: torch.dtype  # dtype the model's tensors are loaded in
    weight_dtype: torch.dtype  # storage of the linear weights once prepared (int8: Q8_0 blocks, only on "cpu")
    row_invariant: bool  # a verify row equals the 1-row decode step bit for bit
    why: str  # what row_invariant rests on, or why it does not hold
    max_context: int | None = None  # positions the attention can serve, if below the model's own
    reads_past_lengths: bool = True  # attention reads (and masks) cache slots past a row's length
    compute: str = "exact"  # how quantized weights multiply: "exact" (float32 on dequantized values) or "int8"

    def prepare(self, model) -> None:
        """Turn a loaded model into this backend's form (in place)."""
        if self.name == "cpu":
            from .cpu import pack_model

            pack_model(model, self.weight_dtype, self.compute)


def _cpu_kernels_problem(cfg: ModelConfig) -> str | None:
    """None when the CPU kernels can run `cfg` here (building them if needed), else why not."""
    from ..kernels.cpu import build
    from ..kernels.cpu.decoder import unsupported_reason

    from .cpu import decoder_dims

    why = unsupported_reason(decoder_dims(cfg)) or build.unavailable_reason()
    if why is not None:
        return why
    try:
        build.load()
    except build.BuildError as e:
        return str(e)
    return None


def select(device: str | torch.device = "cpu", backend: str = "auto", cpu_kernels: bool | None = None,
           cfg: ModelConfig | None = None, dtype: str | torch.dtype = "float32", compute: str = "auto",
           quantized: bool = False) -> Backend:
    """Choose the backend for a model of `cfg` on `device`.

    backend: 'auto' | 'cpu' | 'torch' | 'triton'. cpu_kernels (CPU only): None uses the C++ kernels when they
    run here, True requires them, False never uses them. dtype: 'float32' | 'bfloat16' | 'float16', or 'int8'
    (linear weights quantized to Q8_0 blocks at load, CPU kernels only). compute: 'auto' | 'exact' | 'int8',
    how quantized weights multiply on the CPU kernels ('int8': integer dot products on int8 activation rows);
    quantized: the weights are GGUF blocks kept as stored (dtype 'int8' counts as quantized too). Raises
    ValueError for a combination that cannot run; warns when a load loses the row-invariance guarantee (greedy
    speculative output could then differ from plain decoding at a near-tie)."""
    checks.choice("backend", backend, CHOICES)
    checks.choice("compute", compute, COMPUTES)
    checks.cpu_kernels(cpu_kernels)
    dev = checks.device(device)
    int8 = dtype in ("int8", torch.int8)
    weight_dtype = torch.int8 if int8 else parse_dtype(dtype)
    if cpu_kernels is not None and dev.type != "cpu":
        raise ValueError(f"cpu_kernels applies to device 'cpu' only, got device {str(dev)!r}")
    if backend == "cpu" and dev.type != "cpu":
        raise ValueError(f"backend 'cpu' runs on device 'cpu', got device {str(dev)!r}")
    if cpu_kernels and backend in ("torch", "triton"):
        raise ValueError(f"cpu_kernels=True asks for the C++ kernels, but backend={backend!r}; use 'auto' or 'cpu'")
    if backend == "cpu" and cpu_kernels is False:
        raise ValueError("backend 'cpu' is the C++ kernels, but cpu_kernels=False")

    name, fallback = backend, ""
    if backend == "auto":
        name = "triton" if dev.type == "cuda" else "torch" if cpu_kernels is False or dev.type != "cpu" else "cpu"
    if name == "cpu":
        why = _cpu_kernels_problem(cfg)
        if why is not None:
            if backend == "cpu" or cpu_kernels:
                raise ValueError(f"the CPU kernels cannot run here: {why}")
            name, fallback = "torch", f"CPU kernels not used ({why}); running on PyTorch, slower; "
    if int8 and name != "cpu":
        raise ValueError("dtype 'int8' (Q8_0 weights) runs only on the CPU kernels: device 'cpu', backend 'auto' or "
                         "'cpu', cpu_kernels not False")
    if compute == "int8" and name != "cpu":
        raise ValueError(f"compute='int8' runs only on the CPU kernels (device 'cpu', backend 'auto' or 'cpu', "
                         f"cpu_kernels not False), but this load runs on backend {name!r}")
    if compute == "int8" and not (quantized or int8):
        raise ValueError(f"compute='int8' multiplies quantized weights, but these are {dtype}: load a GGUF file as "
                         "stored (dtype='auto') or use dtype='int8' (linear weights quantized to Q8_0 at load)")
    computed = compute if compute != "auto" else AUTO_COMPUTE if quantized or int8 else "exact"

    from ..kernels.accept import accept, accept_ref

    if name == "cpu":
        from .cpu import attend_cpu

        return Backend("cpu", dev, attend_cpu, accept_ref, torch.float32, weight_dtype, True,
                       "C++ kernels: every reduction in a fixed order whatever the rows", reads_past_lengths=False,
                       compute=computed)
    if name == "torch":
        from .pytorch import attend_torch

        be = Backend("torch", dev, attend_torch, accept_ref, weight_dtype, weight_dtype, False,
                     "PyTorch picks GEMM and SDPA kernels by row count, so a verify row can round differently")
    else:
        from .triton import attend_triton

        window = cfg.sliding_window if cfg is not None else None
        be = Backend("triton", dev, attend_triton, accept, weight_dtype, weight_dtype, False,
                     "Triton verify attention and cuBLAS/PyTorch linears are not checked row-invariant",
                     max_context=window)
    warnings.warn(f"specedit: {fallback or f'backend {be.name!r}: '}verify rows may differ from 1-row decode steps "
                  f"in the last bits ({be.why}); a greedy near-tie could then resolve differently than in plain "
                  "decoding", stacklevel=3)
    return be


def engine_limit(be: Backend, cfg: ModelConfig) -> int:
    """Positions a sequence can reach on this backend: the model's context, capped by the backend's."""
    return cfg.max_position if be.max_context is None else min(cfg.max_position, be.max_context)

