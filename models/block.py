"""The decoder block every family shares, its span and the client's head, in the op order transformers uses.

Matching transformers op for op (fp32 RMSNorm, the same rotary formula, SDPA) is what makes a split
model token-exact with a local one. Parameter names mirror the checkpoint's (`self_attn.q_proj`, ...)
so span weights load with a plain `load_state_dict`. A family differs only in its config and in the
feed-forward part the config builds (gpt-fast's one `TransformerBlock`, with MoE swapping the MLP).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache

if TYPE_CHECKING:
    from .llama.config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention_mask(position: int, tokens: int, window: int | None) -> torch.Tensor | None:
    """Boolean (T, position + T) mask; None where SDPA's own is_causal / no mask is exact.

    Query i (at position + i) sees key j when j <= position + i and, with a window, j > position + i - window:
    the token itself and the window - 1 before it, as transformers' `sliding_window_overlay`.
    """
    if window is None and (tokens == 1 or position == 0):
        return None
    q = torch.arange(position, position + tokens)[:, None]
    k = torch.arange(position + tokens)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig, window: int | None = None):
        super().__init__()
        self.c, self.window = c, window
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.output_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: int, cache: KVCache | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.c.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, -1, self.c.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, -1, self.c.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(position, k, v)  # (B, Hkv, position + T, D)
        mask = attention_mask(position, T, self.window)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=True
        )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm attention, then pre-norm feed-forward, each added to the residual stream.

    The feed-forward is the family's part: `c.feed_forward(layer)` builds it, and it is registered under
    the name the family's checkpoints give it, `c.feed_forward_name` (`mlp` for Llama, `block_sparse_moe`
    for Mixtral). Registering it under that name, rather than under one fixed attribute with renaming
    hooks, keeps the state dict's keys the checkpoint's own, so a span loads by key prefix with a plain
    `load_state_dict` and `quantize_span` sees the same tree. `c.load_hook`, where a family has one,
    renames other layouts of the same weights (fused experts) into those names when they are loaded.
    """

    def __init__(self, c: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, c.window(layer))
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.feed_forward_name = c.feed_forward_name
        self.add_module(c.feed_forward_name, c.feed_forward(layer))
        if c.load_hook is not None:
            self.register_load_state_dict_pre_hook(c.load_hook)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: int, cache: KVCache | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, position, cache)  # (B, T, C)
        feed_forward = getattr(self, self.feed_forward_name)
        return x + feed_forward(self.post_attention_layernorm(x))  # (B, T, C)


class Span(nn.Module):
    """Blocks [start, end) of a model; `layers` holds them under their global index (`layers.{i}`)."""

    def __init__(self, c: LlamaConfig, start: int, end: int, inv_freq: torch.Tensor, rope_scaling: float):
        super().__init__()
        self.config, self.start, self.end = c, start, end
        self.layers = nn.ModuleDict({str(i): Block(c, i) for i in range(start, end)})
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scaling = rope_scaling

    def rotary(self, position: int, tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (T, D) of tokens [position, position + T), computed once for all blocks of the span."""
        positions = torch.arange(position, position + tokens, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        return (emb.cos() * self.rope_scaling).to(dtype), (emb.sin() * self.rope_scaling).to(dtype)

    def new_caches(self, start: int, end: int, batch: int, max_length: int) -> list[KVCache]:
        """One KV cache per block of [start, end), in the span's dtype."""
        dtype = next(self.parameters()).dtype
        c = self.config
        return [KVCache(batch, c.num_kv_heads, max_length, c.head_dim, dtype) for _ in range(start, end)]

    @torch.inference_mode()
    def forward(
        self, x: torch.Tensor, position: int, start: int, end: int, caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        """Runs blocks [start, end) on x (B, T, hidden) whose first token sits at `position`."""
        dtype = x.dtype
        x = x.to(next(self.parameters()).dtype)
        cos, sin = self.rotary(position, x.shape[1], x.dtype)
        for offset, i in enumerate(range(start, end)):
            x = self.layers[str(i)](x, cos, sin, position, caches[offset] if caches is not None else None)
        return x.to(dtype)


class Head(nn.Module):
    """What the client keeps: token embeddings, the final norm and the LM head (maybe tied)."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)  # (B, T) -> (B, T, hidden)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden.to(self.norm.weight.dtype))).float()  # (B, T, vocab)
