"""Where a session's KV cache lives: a slot of a shared slab (models/kv_cache.py KVSlab) or tensors of its own.

Single-sequence sessions over the same blocks whose max_length rounds up to the same `GRANULE` multiple
share slabs, so the scheduler's batches of their one-token steps attend in one call per block
(Attention.attend_slab): at 16 sessions a 15-block SmolLM2 span's step went from ~34 to ~30 ms. A
session in a slab is charged its slot (its max_length rounded up: at most GRANULE - 1 tokens more than
its own cache). A slab is charged for the slots it has ever handed out, freed ones included (their
memory stays for the next session of that length), until its last session closes and it is dropped:
the budget counts what the slabs really hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.block import Span
from ..models.kv_cache import KVCache, KVSlab

GRANULE = 64  # a slab's stride: max_length rounded up to this many tokens


@dataclass(frozen=True)
class Slot:
    slab: KVSlab
    index: int
    key: tuple[int, int, int]  # (start, end, stride): its slab's place in KVSlabs.slabs


class KVSlabs:
    """The slabs of one span, keyed by (start, end, stride); `slots` 0 turns them off."""

    def __init__(self, span: Span, budget: int, slots: int):
        self.span, self.budget, self.slots = span, budget, slots
        self.slabs: dict[tuple[int, int, int], list[KVSlab]] = {}

    @staticmethod
    def stride(max_length: int) -> int:
        return -(-max_length // GRANULE) * GRANULE

    def takes(self, batch: int) -> bool:
        """Whether a session of this batch size goes into a slab: single sequences, on a CPU (where a slab's
        untouched slots take no memory; a GPU would reserve them all), with the span's attention batching them."""
        return self.slots > 0 and batch == 1 and isinstance(self.span, Span)

    def _free_slab(self, key: tuple[int, int, int]) -> KVSlab | None:
        """The slab a session of this key takes a slot of: one with a freed slot first, then one with an untouched
        slot; None: every slab is full (a new one is needed)."""
        open_ = [s for s in self.slabs.get(key, []) if s.next_slot_is_new() is not None]
        return min(open_, key=lambda s: bool(s.next_slot_is_new()), default=None)  # False (a freed slot) first

    def new_bytes(self, start: int, end: int, max_length: int, slot_bytes: int) -> int:
        """What taking a slot now adds to the budget: 0 for a freed slot of a live slab, else the slot."""
        slab = self._free_slab((start, end, self.stride(max_length)))
        return 0 if slab is not None and slab.next_slot_is_new() is False else slot_bytes

    def take(self, start: int, end: int, max_length: int, slot_bytes: int) -> tuple[Slot, list[KVCache]]:
        """A slot for the session (a freed one first, then a new one, then a new slab) and its caches. A new
        slab has room for as many slots as the budget could ever charge (its memory is allocated untouched)."""
        key = (start, end, self.stride(max_length))
        slab = self._free_slab(key)
        if slab is None:
            slab = self.span.new_slab(start, end, max(1, min(self.slots, self.budget // slot_bytes)), key[2])
            self.slabs.setdefault(key, []).append(slab)
        index, caches = slab.take(max_length)
        return Slot(slab, index, key), caches

    def release(self, slot: Slot) -> int:
        """Frees the slot; the bytes given back to the budget (the slab's, once it empties and is dropped)."""
        slot.slab.release(slot.index)
        if slot.slab.live:
            return 0
        left = [s for s in self.slabs.get(slot.key, []) if s is not slot.slab]
        if left:
            self.slabs[slot.key] = left
        else:
            self.slabs.pop(slot.key, None)
        return slot.slab.touched * slot.slab.slot_bytes
