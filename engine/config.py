"""ModelConfig: the few numbers the runtime needs, read from an HF `config.json`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
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

        Raises FileNotFoundError when the file is missing and ValueError for an unsupported architecture or a
        config that lacks a required field.
        """
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no config.json in the model directory")
        try:
            hf = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        return cls.from_hf(hf, file)

    @classmethod
    def from_hf(cls, hf: dict, file: str | Path) -> ModelConfig:
        """The same from an HF config dict (e.g. built from GGUF metadata); `file` names its source in errors."""
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"{file}: unsupported architecture {archs or hf.get('model_type')!r}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )

        def need(key):
            if key not in hf:
                raise ValueError(f"{file}: missing required field {key!r}")
            return hf[key]

        n_heads = need("num_attention_heads")
        dim = need("hidden_size")
        head_dim = hf.get("head_dim") or dim // n_heads
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
        scaling = None
        if rope_type == "llama3":
            scaling = {**legacy, **rope}
        elif rope_type != "default":
            raise ValueError(f"{file}: unsupported rope type {rope_type!r}; supported: default, llama3")
        bias, qk_norm = ARCHITECTURES[arch]
        o_bias = False
        if bias is None:
            bias = o_bias = bool(hf.get("attention_bias", False))
        if hf.get("mlp_bias"):
            raise ValueError(f"{file}: mlp_bias=true is not supported")
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", arch == "MistralForCausalLM") else None
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            dim=dim,
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=need("intermediate_size"),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position=hf.get("max_position_embeddings", 4096),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bias,
            qk_norm=qk_norm,
            o_bias=o_bias,
            rope_scaling=scaling,
            sliding_window=sliding,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
        )

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim // 2] float32 (as transformers computes them), llama3-scaled if set."""
        inv = rope_inv_freq(self.head_dim, self.rope_theta)
        return inv if self.rope_scaling is None else llama3_scale(inv, self.rope_scaling)


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
