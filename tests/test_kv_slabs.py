"""KV cache slabs (models/kv_cache.py KVSlab, node/kv_slabs.py): sessions whose caches are slots of one slab
decode in one attention call per block, and must get what each gets against a cache of its own; the node
charges a slab for every slot it has handed out until it empties. In process, on a tiny Llama span."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_model

from torchnode.models.checkpoint import resolve
from torchnode.models.families import load_span
from torchnode.models.kv_cache import cache_bytes
from torchnode.node.errors import ResourceExhausted
from torchnode.node.kv_slabs import GRANULE
from torchnode.node.limits import Limits
from torchnode.node.span_backend import SpanBackend, SpanInfo

BLOCKS, HIDDEN = 4, 64


@pytest.fixture(scope="module")
def span(tmp_path_factory):
    ckpt = resolve(str(save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))))
    return load_span(ckpt, 0, BLOCKS)


def hidden(seed: int, tokens: int) -> torch.Tensor:
    return torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def decode(span, caches: list, prompts: list[int]) -> list[torch.Tensor]:
    """Prefills, then steps: all sessions, every third, the first alone, all with one prefilling (T > 1)."""
    n = len(prompts)
    outs = [torch.cat(span.forward_batch([hidden(i, t) for i, t in enumerate(prompts)], [0] * n, 0, BLOCKS, caches), 1)]
    length = list(prompts)
    for step, members in enumerate([list(range(n)), list(range(1, n, 3)), [0], list(range(n)), list(range(0, n, 2))]):
        tokens = {i: 3 if step == 3 and i == n - 1 else 1 for i in members}
        xs = [hidden(100 * step + i, tokens[i]) for i in members]
        got = span.forward_batch(xs, [length[i] for i in members], 0, BLOCKS, [caches[i] for i in members])
        outs.append(torch.cat(got, 1))
        for i in members:
            length[i] += tokens[i]
    return outs


def test_sessions_in_a_slab_decode_as_with_caches_of_their_own(span):
    prompts = [5, 9, 2, 7, 11, 3]
    slab = span.new_slab(0, BLOCKS, 8, GRANULE)
    taken = [slab.take(40) for _ in prompts]
    assert [slot for slot, _ in taken] == list(range(len(prompts)))
    own = decode(span, [span.new_caches(0, BLOCKS, 1, 40) for _ in prompts], prompts)
    shared = decode(span, [caches for _, caches in taken], prompts)
    for a, b in zip(own, shared, strict=True):
        assert (a - b).abs().max().item() < 1e-4


def test_a_freed_slot_is_reused_and_slots_stay_dense(span):
    slab = span.new_slab(0, BLOCKS, 4, GRANULE)
    for _ in range(3):
        slab.take(10)
    slab.release(1)
    assert slab.next_slot_is_new() is False
    assert slab.take(10)[0] == 1 and slab.touched == 3
    slab.take(10)
    assert slab.next_slot_is_new() is None  # full: the node opens another slab


def backend(span, **limits) -> SpanBackend:
    return SpanBackend(span, SpanInfo("tiny", "r", 0, BLOCKS, BLOCKS, HIDDEN, torch.float32), Limits(**limits))


def slot_bytes(span, max_length: int) -> int:
    c = span.config
    stride = -(-max_length // GRANULE) * GRANULE
    return cache_bytes(
        layers=BLOCKS, batch=1, kv_heads=c.num_kv_heads, max_length=stride, head_dim=c.head_dim, dtype=torch.float32
    )


def test_the_budget_counts_every_slot_a_slab_handed_out_until_it_empties(span):
    b = backend(span)
    try:
        one = slot_bytes(span, 50)
        sessions = [b.open_session(f"s{i}", 0, BLOCKS, 1, 50) for i in range(3)]
        assert b.cache_bytes_used == 3 * one and sessions[0].nbytes == one
        b.close_session(sessions[1])
        assert b.cache_bytes_used == 3 * one  # the freed slot stays, for the next session of this length
        again = b.open_session("again", 0, BLOCKS, 1, 60)  # rounds to the same stride: the freed slot
        assert again.slot.index == 1 and b.cache_bytes_used == 3 * one
        wide = b.open_session("wide", 0, BLOCKS, 2, 50)  # two sequences: a cache of its own, charged exactly
        assert wide.slot is None and b.cache_bytes_used == 3 * one + wide.nbytes
        for s in (sessions[0], sessions[2], again, wide):
            b.close_session(s)
        assert b.cache_bytes_used == 0 and not b.slabs.slabs
    finally:
        b.shutdown()


def test_a_full_budget_refuses_a_new_slot_but_not_a_freed_one(span):
    one = slot_bytes(span, 50)
    b = backend(span, cache_bytes=2 * one, fair_share=False)
    try:
        first, _ = b.open_session("a", 0, BLOCKS, 1, 50), b.open_session("b", 0, BLOCKS, 1, 50)
        with pytest.raises(ResourceExhausted, match="--cache-memory"):
            b.open_session("c", 0, BLOCKS, 1, 50)
        b.close_session(first)
        with pytest.raises(ResourceExhausted, match="--cache-memory"):  # another length: the slab still holds it
            b.open_session("long", 0, BLOCKS, 1, 3 * GRANULE)
        assert b.open_session("c", 0, BLOCKS, 1, 50).slot.index == 0
    finally:
        b.shutdown()


def test_slab_slots_0_gives_every_session_caches_of_its_own(span):
    b = backend(span, slab_slots=0)
    try:
        session = b.open_session("s", 0, BLOCKS, 1, 50)
        assert session.slot is None and session.caches[0].slab is None and session.nbytes < slot_bytes(span, 50)
    finally:
        b.shutdown()
