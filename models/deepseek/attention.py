"""DeepSeek's multi-head latent attention (MLA), with the same forward as the shared `block.Attention`.

Keys and values are not cached per head: each token's hidden state is compressed to a latent of
`kv_lora_rank` values (normalized) plus one rotary key of `qk_rope_head_dim` shared by all heads, and the
KV cache keeps exactly that, r + d_rope values per token and layer (576 for DeepSeek-V3 against
128 heads x (192 + 128) = 40,960 for full keys and values). Every step expands the cached latents into
per-head keys and values with `kv_b_proj`, as transformers does (it caches the same latents).

The latent goes into the shared `KVCache` split in two halves (its `k` and `v`, each (r + d_rope) / 2 wide,
one "head"), so the node's cache accounting and allocation need nothing family-specific: the config
declares that geometry as `num_kv_heads = 1`, `head_dim = (r + d_rope) / 2`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..block import RMSNorm, Segment, SlabStep, attention_mask
from ..kv_cache import KVCache

LATENT_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm: transformers builds them with its default eps


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on dimension pairs (x0, x1), (x2, x3), ... (DeepSeek's layout), output de-interleaved as
    transformers' `apply_rotary_pos_emb_interleave`; cos, sin (..., D) are cat(freqs, freqs)."""
    cos, sin = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LatentAttention(nn.Module):
    def __init__(self, c: DeepseekV3Config):  # noqa: F821 (config.py builds this class: no import back)
        super().__init__()
        self.c = c
        H, qk = c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(c.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * c.v_head_dim, c.hidden_size, bias=c.attention_bias)
        self.rope = rotate_interleaved if c.rope_interleave else rotate

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segments: Sequence[Segment],
        caches: Sequence[KVCache | None],
        steps: Sequence[SlabStep] = (),
    ) -> torch.Tensor:
        """x (1, N, C): the segments' tokens packed one after another; cos, sin (N, D_rope); one cache each.
        `steps` (slab steps) are ignored: latents attend per session, slab slots or not (their views update
        in place)."""
        c, N = self.c, x.shape[1]
        x = x[0]  # (N, C)
        q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(N, c.num_heads, -1)  # (N, H, nope + rope)
        q_pass, q_rot = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        q = torch.cat([q_pass, self.rope(q_rot, cos[:, None], sin[:, None])], dim=-1)  # (N, H, nope + rope)
        packed = torch.cat([self.kv_a_layernorm(latent), self.rope(k_rot, cos, sin)], dim=-1)  # (N, r + rope)
        sizes = [s.size for s in segments]
        ys = [
            self.attend(s, cache, *parts)
            for s, cache, *parts in zip(segments, caches, q.split(sizes), packed.split(sizes), strict=True)
        ]
        return self.o_proj((ys[0] if len(ys) == 1 else torch.cat(ys))[None])  # (1, N, C)

    def attend(self, s: Segment, cache: KVCache | None, q: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """One segment: q (B*T, H, nope + rope), packed latents (B*T, r + rope) -> (B*T, H * v)."""
        c, B, T = self.c, s.rows, s.tokens
        q = q.view(B, T, c.num_heads, -1).transpose(1, 2)  # (B, H, T, nope + rope)
        packed = packed.view(B, 1, T, -1)  # (B, 1, T, r + rope)
        if cache is not None:
            half = packed.shape[-1] // 2
            k_half, v_half = cache.update(s.position, packed[..., :half], packed[..., half:])
            packed = torch.cat([k_half, v_half], dim=-1)  # (B, 1, L, r + rope): every cached token's latents
        latent, k_rot = packed.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        L = latent.shape[2]
        kv = self.kv_b_proj(latent).view(B, L, c.num_heads, -1).transpose(1, 2)  # (B, H, L, nope + v)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(B, c.num_heads, L, -1)], dim=-1)  # (B, H, L, nope + rope)
        mask = attention_mask(s.position, T, None)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=c.attention_scale
        )  # (B, H, T, v)
        return y.transpose(1, 2).reshape(B * T, -1)
