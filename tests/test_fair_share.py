"""A fair share per client key (node/fair_share.py): the policy on its own, the scheduler's turns, then a real
`torchnode join --max-sessions 4` process whose 4 slots one client key holds: a second key is served,
token-exact, and the first key's evicted session is told why; with `--no-fair-share` the newcomer is refused."""

from __future__ import annotations

import pytest
import torch
from swarm import start_node
from transformers import AutoModelForCausalLM

from torchnode.client.model import AsyncDistributedModel
from torchnode.client.routing import NoRouteError
from torchnode.client.sampling import SamplingParams
from torchnode.client.session import RetryPolicy
from torchnode.node.fair_share import Holding, refusal, victim
from torchnode.node.scheduler import Scheduler, Work
from torchnode.protocol.wire.grpc_node import GrpcNodeClient
from torchnode.protocol.wire.identity import Identity
from torchnode.protocol.wire.node_client import NodeError, SessionSpec

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32
PROMPT = torch.tensor([[1, 17, 42, 99, 7, 300, 12]])
NEW = 8
QUICK = RetryPolicy(max_attempts=2, max_seconds=5.0, backoff_initial=0.01, backoff_max=0.05)


def held(*clients: bytes, nbytes: int = 100, busy: tuple[int, ...] = ()) -> list[Holding]:
    """Sessions in order of last use (the first is the least recently used)."""
    return [Holding(c, nbytes, float(i), i in busy) for i, c in enumerate(clients)]


# ---- the policy, no node


def test_a_newcomer_takes_a_slot_from_the_key_holding_the_most():
    holdings = held(A, A, A, A)
    assert refusal(holdings, B, 100, max_sessions=4, cache_bytes=10_000) is None
    assert victim(holdings, B, True, False, 4, 10_000) == 0  # A's least recently used session


def test_busy_sessions_are_never_evicted():
    holdings = held(A, A, A, A, busy=(0, 1))
    assert victim(holdings, B, True, False, 4, 10_000) == 2


def test_a_key_within_its_share_is_not_evicted_and_the_asker_beyond_its_share_is_refused():
    holdings = held(A, A, B, B)  # two keys, two slots each: everyone at its share
    assert victim(holdings, B, True, False, 4, 10_000) is None
    assert "fair share of 2 sessions" in refusal(holdings, B, 100, 4, 10_000)
    assert victim(holdings, C, True, False, 4, 10_000) == 0  # a third key: share 1, A and B are beyond it
    holdings = held(B, A, A, B, A)
    assert victim(holdings, C, True, False, 5, 10_000) == 1  # A holds the most: its least recently used


def test_cache_memory_is_shared_too():
    holdings = held(A, A, A, nbytes=300)  # 900 of 1000 bytes
    assert victim(holdings, B, False, True, 64, 1000) == 0  # A holds beyond 500
    assert "--cache-memory" in refusal(held(A, B, nbytes=400), B, 200, 64, 1000)  # B would pass 500


def test_scheduler_turns_interleave_client_keys():
    got: list = []
    scheduler = Scheduler(max_batch_tokens=4, batch_wait=0, fair=True)
    for i in range(6):
        scheduler.submit(Work(torch.randn(1, 1, 4), 0, 0, 2, [], got.append, f"greedy{i}", A))
    scheduler.submit(Work(torch.randn(1, 1, 4), 0, 0, 2, [], got.append, "newcomer", B))
    batch = scheduler.next_batch()  # 4 tokens of budget, 7 one-token steps: the newcomer's is among them
    assert [c.work.session_id for c in batch.chunks] == ["greedy0", "greedy1", "greedy2", "newcomer"]
    unfair = Scheduler(max_batch_tokens=4, batch_wait=0)
    for i in range(6):
        unfair.submit(Work(torch.randn(1, 1, 4), 0, 0, 2, [], got.append, f"greedy{i}", A))
    unfair.submit(Work(torch.randn(1, 1, 4), 0, 0, 2, [], got.append, "newcomer", B))
    assert "newcomer" not in [c.work.session_id for c in unfair.next_batch().chunks]


# ---- a real node


@pytest.fixture(scope="module")
def expected(tiny_llama) -> list[int]:
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    out = hf.generate(PROMPT, max_new_tokens=NEW, do_sample=False, attention_mask=torch.ones_like(PROMPT))
    return out[0, PROMPT.shape[1] :].tolist()


@pytest.mark.swarm
@pytest.mark.parametrize("fair", [True, False])
async def test_a_client_holding_every_slot_does_not_shut_out_a_newcomer(tiny_llama, tmp_path, expected, fair, caplog):
    node = start_node(str(tiny_llama), "--blocks", "0:4", "--max-sessions", "4", *([] if fair else ["--no-fair-share"]))
    greedy = GrpcNodeClient(node.address, Identity.generate())
    held_sessions = []
    try:
        for i in range(4):  # every slot, each with a prefill in its cache, then idle
            stream = greedy.open_session(SessionSpec(f"greedy-{i}", 0, 4, 64))
            await stream.step(torch.randn(1, 5, 64), 0, 30)
            held_sessions.append(stream)
        newcomer = await AsyncDistributedModel.from_pretrained(
            str(tiny_llama), peers=[node.address], identity_path=tmp_path / "newcomer.key", retry=QUICK
        )
        try:
            params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
            if not fair:
                with pytest.raises(NoRouteError):  # first come, first served: the only node refused it
                    [t async for t in newcomer.generate_ids(PROMPT, params)]
                assert "node is full: 4 sessions open (--max-sessions)" in caplog.text
                return
            tokens = [int(t[0]) async for t in newcomer.generate_ids(PROMPT, params)]
        finally:
            await newcomer.close()
        assert tokens == expected
        errors = []
        for stream in held_sessions:  # exactly one of the greedy key's sessions made room, and is told so
            try:
                await stream.step(torch.randn(1, 1, 64), 5, 30)
            except NodeError as e:
                errors.append(e)
        assert len(errors) == 1 and errors[0].status == "ABORTED", errors
        assert "evicted" in str(errors[0]) and "fair share" in str(errors[0])
    finally:
        for stream in held_sessions:
            stream.abort()
        await greedy.close()
        node.stop()
