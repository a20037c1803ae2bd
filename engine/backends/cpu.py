"""The CPU backend: the C++ kernels of specedit.kernels.cpu. Every linear is packed once (weights stored in the
chosen dtype, activations float32) and all decoder blocks run in one call (Decoder, set as model.decoder), so a
decode step streams the weights once and a verify row equals the 1-row step bit for bit."""

from __future__ import annotations

import numpy as np
import torch

from ..cache import KVCache
from ..kernels.cpu.attention import attention
from ..kernels.cpu.decoder import Decoder, DecoderDims, LayerWeights
from ..kernels.cpu.linear import GGUF_FORMATS, GGUFEmbedding, PackedLinear, quantize_q8_0


def attend_cpu(q: torch.Tensor, cache: KVCache, layer: int, scale: float) -> torch.Tensor:
    """Same contract as attend_torch, through the row-invariant CPU attention (used when the blocks run one
    torch op at a time; the Decoder calls the same kernel itself)."""
    return attention(q, cache.k(layer), cache.v(layer), list(cache.lengths), scale, window=cache.sliding_window)


def decoder_dims(cfg) -> DecoderDims:
    return DecoderDims(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.norm_eps,
                       cfg.sliding_window)


def pack_model(model, weight_dtype: torch.dtype, compute: str = "exact") -> None:
    """Swap every nn.Linear of `model` for a PackedLinear in `weight_dtype` and set its Decoder. weight_dtype
    torch.int8 stores the weights as Q8_0 blocks (linear.quantize_q8_0), multiplied the `compute` way ('exact' or
    'int8'); float dtypes are float32 math whatever `compute` says.

    Packed layers are plain attributes, not modules: their bytes are never cast by a `.to()`, and a call skips
    nn.Module dispatch."""
    owners = [(blk.attn, n) for blk in model.layers for n in ("wqkv", "wo")]
    owners += [(blk.mlp, n) for blk in model.layers for n in ("w13", "w2")] + [(model, "lm_head")]
    for owner, name in owners:
        lin = getattr(owner, name)
        delattr(owner, name)
        if weight_dtype == torch.int8:
            if lin.in_features % 32:
                raise ValueError(f"dtype 'int8' quantizes linear weights to Q8_0 blocks of 32 input features, but "
                                 f"{name} has {lin.in_features}; use dtype 'float16' or 'float32' for this model")
            packed = PackedLinear.from_parts([("q8_0", quantize_q8_0(lin.weight))], lin.in_features, lin.bias, compute)
        else:
            packed = PackedLinear(lin.weight, lin.bias, weight_dtype)
        setattr(owner, name, packed)
    _set_decoder(model)


def _set_decoder(model) -> None:
    """model.decoder: every block of `model` (its packed linears, norms and rope tables) in one Decoder call."""
    layers = [
        LayerWeights(
            blk.attn_norm.weight, None if blk.attn.q_norm is None else blk.attn.q_norm.weight,
            None if blk.attn.k_norm is None else blk.attn.k_norm.weight, blk.mlp_norm.weight,
            blk.attn.wqkv, blk.attn.wo, blk.mlp.w13, blk.mlp.w2,
        )
        for blk in model.layers
    ]
    model.decoder = Decoder(layers, model.rope_cos, model.rope_sin, decoder_dims(model.cfg))


def _float32(a: np.ndarray, fmt: str) -> torch.Tensor:
    """A float tensor of a GGUF file as a float32 torch tensor of its own (exact: widening only)."""
    if fmt == "bfloat16":
        return torch.from_numpy(np.array(a, dtype=np.uint16).astype(np.int32) << 16).view(torch.float32)
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _part(name: str, tensors) -> tuple[str, torch.Tensor]:
    fmt, a = tensors[name]
    if fmt in GGUF_FORMATS:
        return fmt, torch.from_numpy(a)  # raw blocks: repacked (copied) at once, the view is not kept
    if fmt == "bfloat16":
        return fmt, _float32(a, fmt)  # packed back to bfloat16 (exact)
    return fmt, torch.from_numpy(np.asarray(a))


def load_native(model, tensors: dict[str, tuple[str, np.ndarray]], compute: str = "exact") -> None:
    """Fill a Transformer built on the meta device from GGUF tensors as stored (HF names -> (format, data), see
    specedit.gguf.read_native): linears packed in their own formats (a fused q/k/v or gate/up keeps one part
    per tensor type), the token embedding kept quantized (rows dequantized on lookup; a tied lm_head shares its
    bytes), norms and biases in float32; then the Decoder is set. Nothing keeps a view of the file.
    compute: how the quantized linears multiply, 'exact' or 'int8' (PackedLinear.from_parts).

    Strict like weights.load_hf_tensors: missing, unexpected and wrongly shaped tensors are listed."""
    from ..weights import expected_shapes

    cfg = model.cfg
    want = expected_shapes(cfg)
    shape = {n: tuple(a.shape if f not in GGUF_FORMATS else (a.shape[0], _cols(a, f))) for n, (f, a) in tensors.items()}
    missing = [n for n in want if n not in tensors]
    unexpected = [n for n in tensors if n not in want]
    wrong = [f"{n}: {shape[n]}, expected {want[n]}" for n in want if n in tensors and shape[n] != want[n]]
    problems = [f"{label}: {', '.join(items[:8])}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
    if problems:
        raise ValueError(f"GGUF tensors do not match the {cfg.architecture} config: " + "; ".join(problems))

    norms = {"norm.weight": "model.norm.weight"}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        norms[f"layers.{i}.attn_norm.weight"] = p + "input_layernorm.weight"
        norms[f"layers.{i}.mlp_norm.weight"] = p + "post_attention_layernorm.weight"
        if cfg.qk_norm:
            norms[f"layers.{i}.attn.q_norm.weight"] = p + "self_attn.q_norm.weight"
            norms[f"layers.{i}.attn.k_norm.weight"] = p + "self_attn.k_norm.weight"
    model.load_state_dict({k: _float32(*tensors[v][::-1]) for k, v in norms.items()}, strict=False, assign=True)

    def bias(names):
        if not all(n in tensors for n in names):
            return None
        return torch.cat([_float32(*tensors[n][::-1]) for n in names])

    def linear(names, k, bias_names=None):
        return PackedLinear.from_parts([_part(n, tensors) for n in names], k, bias(bias_names) if bias_names else None,
                                       compute)

    for i, blk in enumerate(model.layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        qkv = [a + x + "_proj.weight" for x in "qkv"]
        del blk.attn.wqkv, blk.attn.wo, blk.mlp.w13, blk.mlp.w2
        blk.attn.wqkv = linear(qkv, cfg.dim, [n.replace("weight", "bias") for n in qkv] if cfg.qkv_bias else None)
        o_bias = [a + "o_proj.bias"] if cfg.o_bias else None
        blk.attn.wo = linear([a + "o_proj.weight"], cfg.n_heads * cfg.head_dim, o_bias)
        blk.mlp.w13 = linear([m + "gate_proj.weight", m + "up_proj.weight"], cfg.dim)
        blk.mlp.w2 = linear([m + "down_proj.weight"], cfg.intermediate_size)

    fmt, emb = tensors["model.embed_tokens.weight"]
    del model.embed, model.lm_head
    if fmt in GGUF_FORMATS:
        model.embed = GGUFEmbedding(torch.from_numpy(emb), fmt, cfg.dim, compute if cfg.tie_embeddings else "exact")
        model.lm_head = model.embed.as_linear() if cfg.tie_embeddings else None
    else:
        model.embed = torch.nn.Embedding.from_pretrained(_float32(emb, fmt), freeze=True)
        model.lm_head = linear(["model.embed_tokens.weight"], cfg.dim) if cfg.tie_embeddings else None
    if model.lm_head is None:
        model.lm_head = linear(["lm_head.weight"], cfg.dim)
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not meta, f"left on the meta device: {meta}"
    _set_decoder(model)


def _cols(raw: np.ndarray, fmt: str) -> int:
    """Columns (K) of a GGUF block tensor from its row bytes."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt.upper()]]
    return raw.shape[1] // size * block
