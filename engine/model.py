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

from .cache import KVCache
from .config import ModelConfig

# attend(q [B, T, H, D], cache, layer, scale) -> [B, T, H, D]; the cache already holds the T new rows
# (cache.lengths_dev and cache.positions describe them).
AttendFn = Callable[[torch.Tensor, KVCache, int, float], torch.Tensor]
# decoder(x [B, T, dim], cache.buf, starts) -> [B, T, dim]: every block at once, the new K/V rows written;
# decoder(x [M, dim], cache.buf, starts, counts) -> [M, dim]: the same with counts[b] rows for cache row b.
DecoderFn = Callable[..., torch.Tensor]


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

    def forward(self, x, cos, sin, cache: KVCache, layer: int, attend: AttendFn):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, D)
        qk, v = qkv[:, :, : H + Hkv], qkv[:, :, H + Hkv :]  # q and k heads are adjacent: rotate them at once
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, D]
        qk = qk * cos + rotate_half(qk) * sin
        q, k = qk[:, :, :H], qk[:, :, H:]  # [B, T, H, D], [B, T, H_kv, D]
        cache.write(layer, k, v)
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

    def forward(self, x, cos, sin, cache, layer, attend):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, attend)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The model. `attend` computes attention over the cache; a backend may set `decoder` to run every block
    in one call (both chosen in specedit.backends, never here)."""

    def __init__(self, cfg: ModelConfig, attend: AttendFn):
        super().__init__()
        self.cfg = cfg
        self.attend = attend
        # given its weight, Embedding skips a random init (on the meta device it would import torch._dynamo, ~1.4 s)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope_cos: torch.Tensor | None = None  # [max_position, D], built by setup_rope()
        self.rope_sin: torch.Tensor | None = None
        self.decoder: DecoderFn | None = None

    def setup_rope(self, device, dtype) -> None:
        """Precompute cos/sin tables [max_position, head_dim] the way transformers does (float32 angles)."""
        inv = self.cfg.inv_freq().to(device)
        pos = torch.arange(self.cfg.max_position, device=device, dtype=torch.float32)
        ang = torch.outer(pos, inv)
        emb = torch.cat((ang, ang), dim=-1)
        self.rope_cos, self.rope_sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, tokens: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Append `tokens` [B, T] to the cache and return float32 logits.

        Returns [B, T, V] when `all_logits` (verification needs every row), else [B, V] for the last row only
        (prefill and plain decoding). Every row of the cache advances by T.
        """
        B, T = tokens.shape
        self._check_room(cache, [T] * B)
        starts = cache.advance(T)
        x = self.embed(tokens)  # [B, T, dim]
        if self.decoder is not None:
            x = self.decoder(x, cache.buf, starts)
        else:
            cos, sin = self.rope_cos[cache.positions], self.rope_sin[cache.positions]  # [B, T, D]
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, cache, i, self.attend)
        if not all_logits:
            x = x[:, -1]  # [B, dim]
        return self.lm_head(self.norm(x)).float()

    def forward_rows(self, rows: list[list[int]], cache: KVCache) -> torch.Tensor:
        """Append rows[b] (any number of tokens, none for a free row) to cache row b in one forward.

        Returns float32 logits [M, V] of every new row, sequence after sequence (M = total tokens). The decoder
        takes the rows ragged; the per-layer path pads every row to the longest with its last token and
        rolls the padding back, which changes no other row's logits where rows are computed independently.
        """
        counts = [len(r) for r in rows]
        device = self.rope_cos.device
        if self.decoder is None:
            T = max(counts)
            padded = [r + (r[-1:] or [0]) * (T - len(r)) for r in rows]
            logits = self(torch.tensor(padded, device=device), cache, True)
            for b, n in enumerate(counts):
                cache.rollback(b, cache.lengths[b] - (T - n))
            return torch.cat([logits[b, :n] for b, n in enumerate(counts)])  # [M, V]
        self._check_room(cache, counts)
        starts = cache.advance(counts)
        x = self.embed(torch.tensor([t for r in rows for t in r], device=device))  # [M, dim]
        return self.lm_head(self.norm(self.decoder(x, cache.buf, starts, counts))).float()

    def _check_room(self, cache: KVCache, counts: list[int]) -> None:
        end = max(n + c for n, c in zip(cache.lengths, counts))
        if end > self.cfg.max_position:
            raise ValueError(f"position {end} exceeds the model's max_position_embeddings {self.cfg.max_position}")
