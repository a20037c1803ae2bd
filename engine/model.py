"""The Llama-family transformer: plain nn.Modules, forward(tokens [B, T], cache) -> logits.

Covers Llama, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm). Q/K/V and gate/up projections are fused at
load time (see weights.py). New K/V rows are written into the cache at each row's current length, then
attention runs over the cached prefix with bottom-right causal masking: query row i of T new rows sits at
absolute position `len + i` and sees keys `0 .. len + i`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_attention
from .cache import KVCache
from .config import ModelConfig

# attend(q [B, T, H, D], cache, layer, scale) -> [B, T, H, D]; cache lengths already include the T new rows.
AttendFn = Callable[[torch.Tensor, KVCache, int, float], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op; same result as below, bit for bit in float32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, q + 2 * kv, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q, cfg.dim, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5

    def forward(self, x, cos, sin, cache: KVCache, layer: int, starts: list[int], attend: AttendFn):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, D)
        qk, v = qkv[:, :, : H + Hkv], qkv[:, :, H + Hkv :]  # q and k heads are adjacent: rotate them at once
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B|1, T, 1, D]
        qk = qk * cos + rotate_half(qk) * sin
        q, k = qk[:, :, :H], qk[:, :, H:]
        kc, vc = cache.k(layer), cache.v(layer)  # [B, H_kv, S_max, D]
        for b, s in enumerate(starts):
            kc[b, :, s : s + T] = k[b].transpose(0, 1)
            vc[b, :, s : s + T] = v[b].transpose(0, 1)
        o = attend(q, cache, layer, self.scale)  # [B, T, H, D]
        return self.wo(o.reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, layer, starts, attend):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, starts, attend)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, attend: AttendFn):
        super().__init__()
        self.cfg = cfg
        self.attend = attend
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope_cos: torch.Tensor | None = None  # [max_position, D], built by setup_rope()
        self.rope_sin: torch.Tensor | None = None
        self.stack = None  # a cpu_stack.CpuStack running every layer in one C++ call, set by fuse_cpu()

    def setup_rope(self, device, dtype) -> None:
        """Precompute cos/sin tables [max_position, head_dim] the way transformers does (float32 angles)."""
        inv = self.cfg.inv_freq().to(device)
        pos = torch.arange(self.cfg.max_position, device=device, dtype=torch.float32)
        ang = torch.outer(pos, inv)
        emb = torch.cat((ang, ang), dim=-1)
        self.rope_cos, self.rope_sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def pack_linears(self, dtype: torch.dtype) -> None:
        """Swap every nn.Linear for a cpu_linear.PackedLinear holding its weight in `dtype` (CPU only).

        Packed layers are plain attributes, not modules: their bytes are never cast, and a call skips
        nn.Module dispatch. Activations stay float32.
        """
        from .cpu_linear import PackedLinear

        owners = [(blk.attn, n) for blk in self.layers for n in ("wqkv", "wo")]
        owners += [(blk.mlp, n) for blk in self.layers for n in ("w13", "w2")] + [(self, "lm_head")]
        for owner, name in owners:
            lin = getattr(owner, name)
            delattr(owner, name)
            setattr(owner, name, PackedLinear(lin.weight, lin.bias, dtype))

    def fuse_cpu(self) -> None:
        """Run all layers through one cpu_stack.CpuStack call (after pack_linears, with CPU attention)."""
        from .cpu_stack import CpuStack

        self.stack = CpuStack(self)

    def forward(self, tokens: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Append `tokens` [B, T] to the cache and return float32 logits.

        Returns [B, T, V] when `all_logits` (verification needs every row), else [B, V] for the last row only
        (prefill and plain decoding). Every row of the cache advances by T.
        """
        B, T = tokens.shape
        cache.check_room(T)
        starts = list(cache.lengths)
        if max(starts) + T > self.cfg.max_position:
            raise ValueError(
                f"position {max(starts) + T} exceeds the model's max_position_embeddings {self.cfg.max_position}"
            )
        cache.lengths = [s + T for s in starts]
        x = self.embed(tokens)  # [B, T, dim]
        if self.stack is not None:
            x = self.stack(x, cache, starts)
        else:
            if B == 1 or len(set(starts)) == 1:
                s = starts[0]
                cos, sin = self.rope_cos[s : s + T][None], self.rope_sin[s : s + T][None]  # [1, T, D]
            else:
                pos = torch.tensor(starts, device=tokens.device)[:, None] + torch.arange(T, device=tokens.device)
                cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [B, T, D]
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, cache, i, starts, self.attend)
        if not all_logits:
            x = x[:, -1]  # [B, dim]
        return self.lm_head(self.norm(x)).float()


def attend_torch(q: torch.Tensor, cache: KVCache, layer: int, scale: float) -> torch.Tensor:
    """Bottom-right causal attention of q [B, T, H, D] over the cache (lengths include the T new rows).

    PyTorch SDPA; with one row per sequence and no mask needed it reads the valid prefix directly.
    """
    B, T, H, D = q.shape
    n = max(cache.lengths)
    k = cache.k(layer)[:, :, :n]  # [B, H_kv, n, D]
    v = cache.v(layer)[:, :, :n]
    window = cache.sliding_window
    mask = None
    if T > 1 or len(set(cache.lengths)) > 1 or (window is not None and n > window):
        lens = torch.tensor(cache.lengths, device=q.device)
        qpos = lens[:, None] - T + torch.arange(T, device=q.device)  # [B, T] absolute positions
        kpos = torch.arange(n, device=q.device)
        mask = kpos[None, None, :] <= qpos[:, :, None]  # [B, T, n]
        if window is not None:
            mask &= kpos[None, None, :] > qpos[:, :, None] - window
        mask = mask[:, None]  # [B, 1, T, n]
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=mask, scale=scale, enable_gqa=H != k.shape[1]
    )
    return o.transpose(1, 2)  # [B, T, H, D]


def attend_cpu(q: torch.Tensor, cache: KVCache, layer: int, scale: float) -> torch.Tensor:
    """Same contract as attend_torch, through the CPU extension (cpu_attention): each query row is reduced in
    an order fixed by key index, so a row of a verify pass equals the 1-row decode step bit for bit."""
    return cpu_attention.attention(q, cache.k(layer), cache.v(layer), cache.lengths, scale, window=cache.sliding_window)


def attend_triton(q: torch.Tensor, cache: KVCache, layer: int, scale: float) -> torch.Tensor:
    """Same contract as attend_torch, through the Triton verification-attention kernel."""
    from .kernels.verify_attention import verify_attention

    lens = torch.tensor(cache.lengths, dtype=torch.int32, device=q.device)
    return verify_attention(q, cache.k(layer), cache.v(layer), lens, scale=scale)
