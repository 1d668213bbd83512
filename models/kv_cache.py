"""Preallocated KV caches, sized up front so a node can account for every byte against its budget."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one attention layer for `max_length` tokens (gpt-fast style): tensors of its own,
    or one slot of a `KVSlab` layer (`slab`: that layer's whole (slots, Hkv, stride, D) keys and values)."""

    def __init__(self, batch: int, kv_heads: int, max_length: int, head_dim: int, dtype: torch.dtype):
        self.k = torch.zeros(batch, kv_heads, max_length, head_dim, dtype=dtype)  # (B, Hkv, L, D)
        self.v = torch.zeros(batch, kv_heads, max_length, head_dim, dtype=dtype)
        self.slab: tuple[torch.Tensor, torch.Tensor] | None = None
        self.slot = 0

    @classmethod
    def in_slab(cls, slab_k: torch.Tensor, slab_v: torch.Tensor, slot: int, max_length: int) -> KVCache:
        """The cache of one slot of a slab layer: views of its rows, so writes land in the slab."""
        cache = cls.__new__(cls)
        cache.k, cache.v = slab_k[slot : slot + 1, :, :max_length], slab_v[slot : slot + 1, :, :max_length]
        cache.slab, cache.slot = (slab_k, slab_v), slot
        return cache

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


class KVSlab:
    """The KV caches of up to `slots` single-sequence sessions of one length (`stride` tokens), over `layers`
    blocks: per block one (slots, Hkv, stride, D) tensor of keys and one of values, a session per slot.

    Why: a decode step of many sessions, each against its own cache, costs one attention call per session
    per block (16 sessions: ~430 us a block on 2 cores, more than a third of the attention's share of the
    step); sessions whose caches are slots of one slab decode in one call over the slab (~100 us), their
    lengths told apart by a mask (Attention.attend_slab). The slab's memory is allocated untouched; a
    slot is zeroed when first taken, so only slots ever taken are resident (`touched`), and masked rows
    are always finite. A freed slot keeps its memory for the next session of this length: the slab's
    whole footprint is `touched * slot_bytes` until it empties and is dropped.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, stride: int, head_dim: int, dtype: torch.dtype):
        shape = (slots, kv_heads, stride, head_dim)
        self.k = [torch.empty(shape, dtype=dtype) for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=dtype) for _ in range(layers)]
        self.slots = slots
        self.slot_bytes = cache_bytes(
            layers=layers, batch=1, kv_heads=kv_heads, max_length=stride, head_dim=head_dim, dtype=dtype
        )
        self.touched = 0  # slots [0, touched) have been taken at least once (zeroed, resident)
        self.live: set[int] = set()

    def next_slot_is_new(self) -> bool | None:
        """Whether taking a slot now touches a new one (True), reuses a freed one (False), or cannot (None: full)."""
        if len(self.live) < self.touched:
            return False
        return True if self.touched < self.slots else None

    def take(self, max_length: int) -> tuple[int, list[KVCache]]:
        """The lowest free slot (so the live ones stay dense) and its caches, one per block."""
        slot = next(i for i in range(self.slots) if i not in self.live)
        if slot == self.touched:
            for k, v in zip(self.k, self.v, strict=True):
                k[slot].zero_()
                v[slot].zero_()
            self.touched += 1
        self.live.add(slot)
        return slot, [KVCache.in_slab(k, v, slot, max_length) for k, v in zip(self.k, self.v, strict=True)]

    def release(self, slot: int) -> None:
        self.live.discard(slot)
