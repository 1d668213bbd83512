"""The decoder block every family shares, its span and the client's head, in the op order transformers uses.

Matching transformers op for op (fp32 RMSNorm, the same rotary formula, SDPA) is what makes a split
model token-exact with a local one. Parameter names mirror the checkpoint's (`self_attn.q_proj`, ...)
so span weights load with a plain `load_state_dict`. A family differs only in its config and in the
feed-forward part the config builds (gpt-fast's one `TransformerBlock`, with MoE swapping the MLP).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache, KVSlab

if TYPE_CHECKING:
    from .llama.config import LlamaConfig


PADDED_ROWS = (7, 16)  # a CPU LM head pads this many rows [7, 16) to 16 (Head.logits)


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


@dataclass(frozen=True)
class SlabStep:
    """The one-token, single-sequence steps of a pass whose caches are slots of one slab (models/kv_cache.py
    KVSlab), laid out for one attention call over the slab rows [lo, hi) (Attention.attend_slab). Worked out
    once per pass (Span.forward_batch), not per block: a session has the same slot in every block's layer."""

    members: list[int]  # the segments' indices in the pass
    slots: torch.Tensor  # (n,) their slots
    positions: torch.Tensor  # (n,) their new tokens' positions
    lo: int
    hi: int
    rows: torch.Tensor | None  # (n,) slots - lo; None where the slots are exactly lo, ..., hi - 1
    mask: torch.Tensor  # (hi - lo, 1, 1, end): each row sees its keys up to its own position

    @property
    def end(self) -> int:
        return self.mask.shape[-1]


def slab_steps(segments: Sequence[Segment], caches: Sequence[KVCache | None]) -> list[SlabStep]:
    """The pass's slab steps (`caches`: each segment's cache of one block), one per slab where two or more
    of its sessions step together. Rows of slots in [lo, hi) not in the step see only their first key (their
    output is thrown away)."""
    groups: dict[int, list[int]] = {}
    for i, (s, cache) in enumerate(zip(segments, caches, strict=True)):
        if cache is not None and cache.slab is not None and s.rows == 1 and s.tokens == 1:
            groups.setdefault(id(cache.slab[0]), []).append(i)
    steps = []
    for members in (g for g in groups.values() if len(g) > 1):
        slot_list = [caches[i].slot for i in members]  # type: ignore[union-attr]
        position_list = [segments[i].position for i in members]
        lo, hi, end = min(slot_list), max(slot_list) + 1, max(position_list) + 1
        slots, positions = torch.tensor(slot_list), torch.tensor(position_list)
        rows, seen = None, positions
        if slot_list != list(range(lo, hi)):
            rows, seen = slots - lo, torch.zeros(hi - lo, dtype=positions.dtype)
            seen[rows] = positions
        mask = (torch.arange(end)[None, :] <= seen[:, None])[:, None, None, :]  # (R, 1, 1, end)
        steps.append(SlabStep(members, slots, positions, lo, hi, rows, mask))
    return steps


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


@dataclass(frozen=True)
class Segment:
    """One sequence's share of a packed pass: `rows` x `tokens` hidden states whose first token sits at `position`.

    A pass over several sessions lays their tokens one after another along one axis, so every linear layer
    runs them as one matrix (where batching pays); attention then runs segment by segment, each against its
    own KV cache, so every sequence keeps its own length, positions and mask.
    """

    rows: int  # the session's batch size
    tokens: int
    position: int

    @property
    def size(self) -> int:
        return self.rows * self.tokens


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
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segments: Sequence[Segment],
        caches: Sequence[KVCache | None],
        steps: Sequence[SlabStep] = (),
    ) -> torch.Tensor:
        """x (1, N, C): the segments' tokens packed one after another; cos, sin (N, D); one cache per segment;
        steps: the pass's slab steps (`slab_steps`), attended one call each."""
        N, D = x.shape[1], self.c.head_dim
        q = self.q_proj(x).view(N, -1, D)  # (N, H, D)
        k = self.k_proj(x).view(N, -1, D)  # (N, Hkv, D)
        v = self.v_proj(x).view(N, -1, D)  # (N, Hkv, D)
        if self.c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos[:, None], sin[:, None]  # (N, 1, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        steps = steps if self.window is None else ()  # a sliding window is masked per session
        if len(steps) == 1 and len(steps[0].members) == len(segments):  # a decode step of sessions of one slab
            return self.o_proj(self.attend_slab(steps[0], caches[0], q, k, v)[None])  # type: ignore[arg-type]
        sizes = [s.size for s in segments]
        qs, ks, vs = q.split(sizes), k.split(sizes), v.split(sizes)
        ys: list[torch.Tensor | None] = [None] * len(segments)
        for step in steps:
            y = self.attend_slab(
                step,
                caches[step.members[0]],  # type: ignore[arg-type]
                *(torch.cat([parts[i] for i in step.members]) for parts in (qs, ks, vs)),
            )
            for row, i in enumerate(step.members):
                ys[i] = y[row : row + 1]
        ys = [
            y if y is not None else self.attend(s, cache, *parts)
            for y, s, cache, *parts in zip(ys, segments, caches, qs, ks, vs, strict=True)
        ]  # (B_i * T_i, H * D) each
        return self.o_proj((ys[0] if len(ys) == 1 else torch.cat(ys))[None])  # (1, N, C)

    def attend_slab(
        self, step: SlabStep, cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """A slab step's attention in one call over its slab rows (`cache`: any of its sessions' caches of this
        block): q (n, H, D), k, v (n, Hkv, D) -> (n, H * D), each row what `attend` gives that session alone."""
        D, n = self.c.head_dim, len(step.members)
        slab_k, slab_v = cache.slab  # type: ignore[misc]
        slab_k[step.slots, :, step.positions] = k  # each session's new key at its own position
        slab_v[step.slots, :, step.positions] = v
        queries = q.view(n, -1, 1, D)
        if step.rows is not None:
            queries = q.new_zeros(step.hi - step.lo, q.shape[1], 1, D)
            queries[step.rows] = q.view(n, -1, 1, D)
        y = F.scaled_dot_product_attention(
            queries,
            slab_k[step.lo : step.hi, :, : step.end],
            slab_v[step.lo : step.hi, :, : step.end],
            attn_mask=step.mask,
            enable_gqa=True,
        ).reshape(step.hi - step.lo, -1)  # (R, H * D)
        return y if step.rows is None else y[step.rows]

    def attend(
        self, s: Segment, cache: KVCache | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """One segment's attention over its own cache: q (B*T, H, D), k, v (B*T, Hkv, D) -> (B*T, H*D)."""
        B, T, D = s.rows, s.tokens, self.c.head_dim
        # a decode step (T = 1): (B, 1, H, D) and (B, H, 1, D) are the same memory, so views replace the
        # transposes (this runs per session per block: 16 sessions, 15 blocks, 1.2 ms of 38 saved)
        if T == 1:
            q, k, v = q.view(B, -1, 1, D), k.view(B, -1, 1, D), v.view(B, -1, 1, D)  # (B, H or Hkv, 1, D)
        else:
            q = q.view(B, T, -1, D).transpose(1, 2)  # (B, H, T, D)
            k = k.view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
            v = v.view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(s.position, k, v)  # (B, Hkv, position + T, D)
        mask = attention_mask(s.position, T, self.window)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=True
        )  # (B, H, T, D)
        return y.reshape(B, -1) if T == 1 else y.transpose(1, 2).reshape(B * T, -1)


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
        # a family with its own attention (DeepSeek's latent attention) builds it: `c.attention(layer)`
        self.self_attn = c.attention(layer) if hasattr(c, "attention") else Attention(c, c.window(layer))
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.feed_forward_name = c.feed_forward_name
        self.add_module(c.feed_forward_name, c.feed_forward(layer))
        if c.load_hook is not None:
            self.register_load_state_dict_pre_hook(c.load_hook)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segments: Sequence[Segment],
        caches: Sequence[KVCache | None],
        steps: Sequence[SlabStep] = (),
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segments, caches, steps)  # (1, N, C)
        feed_forward = getattr(self, self.feed_forward_name)
        return x + feed_forward(self.post_attention_layernorm(x))  # (1, N, C)


class Span(nn.Module):
    """Blocks [start, end) of a model; `layers` holds them under their global index (`layers.{i}`)."""

    def __init__(self, c: LlamaConfig, start: int, end: int, inv_freq: torch.Tensor, rope_scaling: float):
        super().__init__()
        self.config, self.start, self.end = c, start, end
        self.layers = nn.ModuleDict({str(i): Block(c, i) for i in range(start, end)})
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scaling = rope_scaling

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (N, D) of tokens at `positions` (N,), computed once for all blocks of the span."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (N, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (N, D)
        return (emb.cos() * self.rope_scaling).to(dtype), (emb.sin() * self.rope_scaling).to(dtype)

    def new_caches(self, start: int, end: int, batch: int, max_length: int) -> list[KVCache]:
        """One KV cache per block of [start, end), in the span's dtype."""
        dtype = next(self.parameters()).dtype
        c = self.config
        return [KVCache(batch, c.num_kv_heads, max_length, c.head_dim, dtype) for _ in range(start, end)]

    def new_slab(self, start: int, end: int, slots: int, stride: int) -> KVSlab:
        """A slab of `slots` single-sequence caches of `stride` tokens over blocks [start, end) (KVSlab)."""
        c = self.config
        return KVSlab(end - start, slots, c.num_kv_heads, stride, c.head_dim, next(self.parameters()).dtype)

    def forward(
        self, x: torch.Tensor, position: int, start: int, end: int, caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        """Runs blocks [start, end) on x (B, T, hidden) whose first token sits at `position`."""
        return self.forward_batch([x], [position], start, end, [caches])[0]

    @torch.inference_mode()
    def forward_batch(
        self,
        xs: Sequence[torch.Tensor],
        positions: Sequence[int],
        start: int,
        end: int,
        caches: Sequence[list[KVCache] | None],
    ) -> list[torch.Tensor]:
        """Runs several sequences through blocks [start, end) as one pass: xs[i] (B_i, T_i, hidden) whose
        first token sits at positions[i], with caches[i] (one per block, or None). Each output is what
        `forward` gives that sequence alone (the linear layers see more rows; attention is per sequence)."""
        dtype = next(self.parameters()).dtype
        segments = [Segment(x.shape[0], x.shape[1], p) for x, p in zip(xs, positions, strict=True)]
        flat = [x.reshape(-1, x.shape[-1]).to(dtype) for x in xs]  # (B_i * T_i, hidden) each
        h = (flat[0] if len(flat) == 1 else torch.cat(flat))[None]  # (1, N, hidden)
        token_positions = torch.cat(
            [
                torch.arange(s.position, s.position + s.tokens, device=self.inv_freq.device).repeat(s.rows)
                for s in segments
            ]
        )  # (N,)
        cos, sin = self.rotary(token_positions, dtype)  # (N, D)
        steps = slab_steps(segments, [c[0] if c else None for c in caches])  # the same slots in every block
        for offset, i in enumerate(range(start, end)):
            layer_caches = [c[offset] if c is not None else None for c in caches]
            h = self.layers[str(i)](h, cos, sin, segments, layer_caches, steps)  # (1, N, hidden)
        outs = h[0].split([s.size for s in segments])  # (B_i * T_i, hidden) each
        return [out.view(x.shape).to(x.dtype) for out, x in zip(outs, xs, strict=True)]


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
        """(B, T, hidden) -> (B, T, vocab) float32.

        On a CPU, 7 to 15 rows are padded to 16 for the vocab projection. Why: for a matrix this wide,
        torch's CPU GEMM (MKL) takes a slow path at 7-15 rows. SmolLM2's head (576 x 49152), weights cold,
        2 threads: 16 rows 10.6 ms, 8 rows 16.0, 12 rows 21.1, 14 rows 26.1, and 10.6-11.2 padded; 1 thread:
        16 rows 27, 8 rows 32, 14 rows 54 (scripts/bench_head_rows.py [--threads 1]). 6 rows or fewer cost
        less than 16 on one thread, so they are left alone. These counts are common: a batch of 7-15
        sessions, a verify pass of 6-14 drafted tokens.
        """
        x = self.norm(hidden.to(self.norm.weight.dtype))  # (B, T, hidden)
        rows = x.shape[:-1].numel()
        if x.device.type != "cpu" or not PADDED_ROWS[0] <= rows < PADDED_ROWS[1]:
            return self.lm_head(x).float()
        padded = F.pad(x.reshape(rows, -1), (0, 0, 0, PADDED_ROWS[1] - rows))  # (16, hidden)
        return self.lm_head(padded)[:rows].reshape(*x.shape[:-1], -1).float()
