"""Preallocated KV caches, sized up front so a node can account for every byte against its budget."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one attention layer for `max_length` tokens (gpt-fast style)."""

    def __init__(self, batch: int, kv_heads: int, max_length: int, head_dim: int, dtype: torch.dtype):
        self.k = torch.zeros(batch, kv_heads, max_length, head_dim, dtype=dtype)  # (B, Hkv, L, D)
        self.v = torch.zeros(batch, kv_heads, max_length, head_dim, dtype=dtype)

    def update(self, position: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (B, Hkv, T, D) at `position` and returns the keys/values of tokens [0, position + T)."""
        end = position + k.shape[2]
        self.k[:, :, position:end] = k
        self.v[:, :, position:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def cache_bytes(*, layers: int, batch: int, kv_heads: int, max_length: int, head_dim: int, dtype: torch.dtype) -> int:
    """What `layers` KVCaches of this shape will take, computed before allocating them."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * batch * kv_heads * max_length * head_dim * itemsize
