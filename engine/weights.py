"""Checkpoint loading: HF safetensors (single file or sharded index) -> the runtime's fused tensors.

An explicit name map, q/k/v and gate/up fused at load time, and a strict final check listing missing and
unexpected tensors and wrong shapes, so a bad checkpoint fails at load with names, not deep inside a forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; recomputed here


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or the torch dtype) -> torch.dtype; anything else is a ValueError."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(map(repr, DTYPES))} "
                     "(or 'int8' on the CPU kernels)")


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of an HF model directory (single file or the shards named by the index)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / s for s in shards]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard named in {index.name} is missing")
        return files
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor the checkpoint must hold."""
    D, H, Hkv, d, i = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.dim, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for n in range(cfg.n_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (H * D, d),
            p + "self_attn.k_proj.weight": (Hkv * D, d),
            p + "self_attn.v_proj.weight": (Hkv * D, d),
            p + "self_attn.o_proj.weight": (d, H * D),
            p + "mlp.gate_proj.weight": (i, d),
            p + "mlp.up_proj.weight": (i, d),
            p + "mlp.down_proj.weight": (d, i),
        }
        if cfg.qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (H * D,),
                p + "self_attn.k_proj.bias": (Hkv * D,),
                p + "self_attn.v_proj.bias": (Hkv * D,),
            }
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if cfg.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)}
    return shapes


def load_hf_tensors(path: Path, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read every expected tensor of the checkpoint in `path`, cast to `dtype`; strict on names and shapes."""
    files = safetensors_files(path)
    handles = []
    for file in files:
        try:
            handles.append(safe_open(str(file), framework="pt"))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    # the layer count first, from the names alone: a wrong num_hidden_layers (1e9) must not build a huge list
    layers = {int(n.split(".")[2]) for f in handles for n in f.keys()
              if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    if len(layers) != cfg.n_layers or max(layers, default=-1) != cfg.n_layers - 1:
        have = f"layers 0..{max(layers)}" if layers else "no layers"
        raise ValueError(f"{path}: checkpoint does not match {cfg.architecture} config: num_hidden_layers is "
                         f"{cfg.n_layers}, the checkpoint has {have} ({len(layers)} distinct)")
    want = expected_shapes(cfg)
    tensors, unexpected, wrong = {}, [], []
    for file, f in zip(files, handles):
        with f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_embeddings):
                    continue
                if name not in want:
                    unexpected.append(name)
                    continue
                stored = f.get_slice(name).get_dtype()  # from the header, before any data is read
                if not stored.startswith(("F", "BF")):
                    raise ValueError(f"{file}: tensor {name} has dtype {stored}; weights must be floating point "
                                     "(integer and bool tensors are not weights)")
                t = f.get_tensor(name)
                if tuple(t.shape) != want[name]:
                    wrong.append(f"{name}: {tuple(t.shape)}, expected {want[name]}")
                    continue
                tensors[name] = t.to(dtype)
    missing = [n for n in want if n not in tensors and not any(n in w for w in wrong)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{path}: checkpoint does not match {cfg.architecture} config: " + "; ".join(problems))
    return tensors


def to_runtime_state(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename HF tensors to the runtime's module names, fusing q/k/v and gate/up."""
    s = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    s["lm_head.weight"] = hf["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
    for n in range(cfg.n_layers):
        p, a, m = f"model.layers.{n}.", f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
        r = f"layers.{n}."
        s[r + "attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        s[r + "mlp_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        s[r + "attn.wqkv.weight"] = torch.cat([hf[a + x + "_proj.weight"] for x in "qkv"])
        if cfg.qkv_bias:
            s[r + "attn.wqkv.bias"] = torch.cat([hf[a + x + "_proj.bias"] for x in "qkv"])
        s[r + "attn.wo.weight"] = hf[a + "o_proj.weight"]
        if cfg.o_bias:
            s[r + "attn.wo.bias"] = hf[a + "o_proj.bias"]
        if cfg.qk_norm:
            s[r + "attn.q_norm.weight"] = hf[a + "q_norm.weight"]
            s[r + "attn.k_norm.weight"] = hf[a + "k_norm.weight"]
        s[r + "mlp.w13.weight"] = torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]])
        s[r + "mlp.w2.weight"] = hf[m + "down_proj.weight"]
    return s
