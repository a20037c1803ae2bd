"""ModelConfig: the few numbers the runtime needs, read from an HF `config.json`."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import torch

# architectures -> (qkv bias, q/k RMSNorm)
ARCHITECTURES = {
    "LlamaForCausalLM": (None, False),  # None: read attention_bias
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (None, True),
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    o_bias: bool = False  # Llama with attention_bias biases o_proj too; Qwen2 does not
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        """Read `path/config.json` (transformers 4 or 5 layout) into a ModelConfig.

        Raises FileNotFoundError when the file is missing and ValueError naming the file and the field for an
        unsupported architecture, a missing field or one of the wrong type or range (see `from_hf`).
        """
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no config.json in the model directory")
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{file}: {file.stat().st_size:,} bytes is too large for a config.json")
        try:
            hf = json.loads(file.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        return cls.from_hf(hf, file)

    @classmethod
    def from_hf(cls, hf: dict, file: str | Path) -> ModelConfig:
        """The same from an HF config dict (e.g. built from GGUF metadata); `file` names its source in errors.

        Every field the runtime uses is checked (ValueError naming the file and the field): counts are positive
        integers, the attention heads are a multiple of the key/value heads, rms_norm_eps and rope_theta are finite
        and positive, flags are booleans, token ids lie in the vocabulary, and the RoPE tables for
        max_position_embeddings fit in this machine's memory (they are built for the whole context)."""
        if not isinstance(hf, dict):
            raise ValueError(f"{file}: must hold a JSON object (a dict of fields), got {type(hf).__name__}")
        f = _Fields(hf, file)
        archs = hf.get("architectures") or []
        if isinstance(archs, str):
            archs = [archs]
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ValueError(f"{file}: field 'architectures' must be a list of class names, got {archs!r:.80}")
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"{file}: unsupported architecture {archs or hf.get('model_type')!r}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )

        n_heads = f.int("num_attention_heads")
        dim = f.int("hidden_size")
        n_kv = f.int("num_key_value_heads", n_heads)
        if n_heads % n_kv:
            raise ValueError(f"{file}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
        head_dim = f.int("head_dim", 0, minimum=0) or None
        if head_dim is None:  # as transformers: hidden_size // num_attention_heads (need not divide)
            if dim < n_heads:
                raise ValueError(f"{file}: hidden_size {dim} is smaller than num_attention_heads {n_heads} "
                                 "(and no head_dim is given)")
            head_dim = dim // n_heads
        if head_dim % 2:
            raise ValueError(f"{file}: head_dim {head_dim} must be even (RoPE rotates pairs)")
        rope = f.dict("rope_parameters")
        legacy = f.dict("rope_scaling")
        rope_theta = f.real("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
        scaling = None
        if rope_type == "llama3":
            scaling = {**legacy, **rope}
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key in scaling:
                    _Fields(scaling, file, "rope_scaling.").real(key)
            if "factor" not in scaling:
                raise ValueError(f"{file}: llama3 rope scaling needs a 'factor'")
        elif rope_type != "default":
            raise ValueError(f"{file}: unsupported rope type {rope_type!r}; supported: default, llama3")
        bias, qk_norm = ARCHITECTURES[arch]
        o_bias = False
        if bias is None:
            bias = o_bias = f.bool("attention_bias", False)
        if f.bool("mlp_bias", False):
            raise ValueError(f"{file}: mlp_bias=true is not supported")
        sliding = (f.int("sliding_window", None)
                   if f.bool("use_sliding_window", arch == "MistralForCausalLM") else None)
        vocab = f.int("vocab_size")
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        for t in eos:
            f.token("eos_token_id", t, vocab)
        bos = hf.get("bos_token_id")
        if bos is not None:
            f.token("bos_token_id", bos, vocab)
        max_position = f.int("max_position_embeddings", 4096)
        check_rope_memory(file, max_position, head_dim)
        return cls(
            architecture=arch,
            vocab_size=vocab,
            dim=dim,
            n_layers=f.int("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=f.int("intermediate_size"),
            norm_eps=f.real("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            max_position=max_position,
            tie_embeddings=f.bool("tie_word_embeddings", False),
            qkv_bias=bias,
            qk_norm=qk_norm,
            o_bias=o_bias,
            rope_scaling=scaling,
            sliding_window=sliding,
            bos_token_id=bos,
            eos_token_ids=tuple(int(t) for t in eos),
        )

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim // 2] float32 (as transformers computes them), llama3-scaled if set."""
        inv = rope_inv_freq(self.head_dim, self.rope_theta)
        return inv if self.rope_scaling is None else llama3_scale(inv, self.rope_scaling)


MAX_CONFIG_BYTES = 16 * 2**20
_MISSING = object()


class _Fields:
    """Typed reads of a config dict, each a ValueError naming the file and the field when it is wrong."""

    def __init__(self, hf: dict, file, prefix: str = ""):
        self.hf, self.file, self.prefix = hf, file, prefix

    def _get(self, key, default):
        value = self.hf.get(key, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise ValueError(f"{self.file}: missing required field {self.prefix + key!r}")
            return default, True
        return value, False

    def int(self, key, default=_MISSING, minimum: int = 1):
        value, absent = self._get(key, default)
        if absent:
            return value
        if not isinstance(value, Integral) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{self.file}: field {self.prefix + key!r} must be an integer >= {minimum}, "
                             f"got {value!r:.80}")
        return int(value)

    def real(self, key, default=_MISSING) -> float:
        value, absent = self._get(key, default)
        if absent:
            return float(value)
        if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{self.file}: field {self.prefix + key!r} must be a finite number > 0, "
                             f"got {value!r:.80}")
        return float(value)

    def bool(self, key, default) -> bool:
        value, absent = self._get(key, default)
        if not absent and not isinstance(value, bool):
            raise ValueError(f"{self.file}: field {self.prefix + key!r} must be true or false, got {value!r:.80}")
        return bool(value)

    def dict(self, key) -> dict:
        value = self.hf.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{self.file}: field {self.prefix + key!r} must be an object, got {value!r:.80}")
        return dict(value)

    def token(self, key, value, vocab: int) -> None:
        if not isinstance(value, Integral) or isinstance(value, bool) or not 0 <= value < vocab:
            raise ValueError(f"{self.file}: field {key!r}: {value!r:.80} is not a token of the vocabulary "
                             f"(0..{vocab - 1})")


def memory_bytes() -> int | None:
    """This machine's physical memory, or None when it cannot be told."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_rope_memory(file, max_position: int, head_dim: int) -> None:
    """The RoPE cos/sin tables cover every position of the context (float32 [max_position, head_dim] each,
    about four such arrays at the peak while they are built): refuse a context they cannot fit, with the bytes
    it would need, rather than fail (or swap) for minutes inside torch."""
    need = 4 * 4 * max_position * head_dim
    have = memory_bytes()
    if have is not None and need > have // 2:
        raise ValueError(f"{file}: max_position_embeddings {max_position:,} needs {need / 2**30:,.1f} GiB for its "
                         f"RoPE tables (head_dim {head_dim}); this machine has {have / 2**30:,.1f} GiB")


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Unscaled RoPE inverse frequencies [head_dim // 2] float32, as transformers computes them."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def llama3_scale(inv: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3 RoPE scaling of inverse frequencies `inv` (transformers' `_compute_llama3_parameters`): long
    wavelengths divided by `factor`, short ones kept, a smooth blend between. `s` holds factor and optionally
    low_freq_factor (1), high_freq_factor (4), original_max_position_embeddings (8192)."""
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(is_mid, mid, scaled)
