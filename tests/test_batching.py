"""Continuous batching on a node: steps of concurrent sessions run as one pass, and every session's greedy
tokens are exactly those it gets alone (different lengths, a chunked prefill arriving while others decode,
a rewind). The scheduler's policy on its own; then in-memory nodes; the dashboard's metrics; then two real
SmolLM2 node processes (marked `swarm`)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from memory_node import MemoryNode, MemoryPeers

from torchnode.client.model import AsyncDistributedModel
from torchnode.client.sampling import SamplingParams
from torchnode.models.checkpoint import resolve
from torchnode.models.huge_pages import available as huge_pages_available
from torchnode.node.limits import Limits
from torchnode.node.scheduler import Batch, Scheduler, Work
from torchnode.node.span_backend import SpanBackend

HIDDEN = 4


# ---- the scheduler's policy, no model


def work(tokens: int, start: int = 0, end: int = 2, session: str = "s", rows: int = 1) -> tuple[Work, list]:
    got: list = []
    return Work(torch.randn(rows, tokens, HIDDEN), 0, start, end, [], got.append, session), got


def run(scheduler: Scheduler, batch: Batch) -> None:
    """Stands in for the runner: each chunk's output is its input, so outputs can be checked for order."""
    scheduler.finish(batch, [c.x.clone() for c in batch.chunks])


def test_decode_steps_run_beside_a_long_prefill_cut_in_chunks():
    scheduler = Scheduler(max_batch_tokens=16, batch_wait=0)
    prefill, prefill_out = work(40, session="long")
    scheduler.submit(prefill)
    decodes = [work(1, session=f"d{i}") for i in range(3)]
    for w, _ in decodes:
        scheduler.submit(w)
    first = scheduler.next_batch()
    assert [(c.work.session_id, c.tokens) for c in first.chunks] == [("long", 13), ("d0", 1), ("d1", 1), ("d2", 1)]
    assert first.tokens == 16
    run(scheduler, first)
    assert all(len(got) == 1 for _, got in decodes) and not prefill_out  # decodes done, the prefill goes on
    sizes = []
    while not prefill_out:
        batch = scheduler.next_batch()
        sizes.append([c.tokens for c in batch.chunks])
        run(scheduler, batch)
    assert sizes == [[16], [11]]
    assert torch.equal(prefill_out[0], prefill.x)  # chunks joined back in order: (1, 40, hidden)


def test_whole_small_steps_go_first_and_the_budget_holds():
    scheduler = Scheduler(max_batch_tokens=8, batch_wait=0)
    for tokens, name in [(6, "a"), (5, "b"), (1, "c"), (2, "d")]:
        scheduler.submit(work(tokens, session=name)[0])
    batch = scheduler.next_batch()
    # whole steps, smallest first: c, d, b (8 tokens); a waits for the next batch
    assert {c.work.session_id: c.tokens for c in batch.chunks} == {"b": 5, "c": 1, "d": 2}
    run(scheduler, batch)
    scheduler.submit(work(1, session="e")[0])
    scheduler.submit(work(20, session="f")[0])
    batch = scheduler.next_batch()  # e whole; then a (older) whole in what is left; f gets the last token
    assert {c.work.session_id: c.tokens for c in batch.chunks} == {"a": 6, "e": 1, "f": 1}


def test_steps_over_different_blocks_never_share_a_batch():
    scheduler = Scheduler(max_batch_tokens=64, batch_wait=0)
    scheduler.submit(work(1, 0, 2, "a")[0])
    scheduler.submit(work(1, 1, 2, "b")[0])
    scheduler.submit(work(1, 0, 2, "c")[0])
    first = scheduler.next_batch()
    assert (first.start, first.end, [c.work.session_id for c in first.chunks]) == (0, 2, ["a", "c"])
    run(scheduler, first)
    assert [c.work.session_id for c in scheduler.next_batch().chunks] == ["b"]


def test_a_closed_session_gets_nothing_even_mid_run():
    scheduler = Scheduler(max_batch_tokens=4, batch_wait=0)
    long, got = work(10, session="gone")
    scheduler.submit(long)
    batch = scheduler.next_batch()
    scheduler.drop("gone")  # the stream closed while its chunk ran
    run(scheduler, batch)
    assert not got and scheduler.queue_length == 0


def test_waits_for_more_steps_only_while_open_sessions_could_send_them():
    open_sessions = [2]
    scheduler = Scheduler(max_batch_tokens=64, batch_wait=5.0, active_sessions=lambda: open_sessions[0])
    scheduler.submit(work(1, session="a")[0])
    threading.Timer(0.2, lambda: scheduler.submit(work(1, session="b")[0])).start()
    started = time.monotonic()
    batch = scheduler.next_batch()  # waits for b (2 sessions open), not for the whole 5 s
    assert [c.work.session_id for c in batch.chunks] == ["a", "b"] and time.monotonic() - started < 4
    open_sessions[0] = 1
    scheduler.finish(batch, [c.x for c in batch.chunks])
    scheduler.submit(work(1, session="c")[0])
    started = time.monotonic()
    scheduler.next_batch()  # every open session has its step queued: no wait
    assert time.monotonic() - started < 1


def test_a_burst_of_steps_is_gathered_and_steps_queued_while_busy_start_at_once():
    scheduler = Scheduler(max_batch_tokens=64, batch_wait=1.0, active_sessions=lambda: 4)
    scheduler.submit(work(1, session="a")[0])
    threading.Timer(0.3, lambda: scheduler.submit(work(1, session="b")[0])).start()
    threading.Timer(0.6, lambda: scheduler.submit(work(1, session="c")[0])).start()
    started = time.monotonic()
    batch = scheduler.next_batch()  # each arrival within 1 s of the last extends the wait (up to 5 s)
    assert [c.work.session_id for c in batch.chunks] == ["a", "b", "c"] and time.monotonic() - started < 4.5
    scheduler.submit(work(1, session="d")[0])
    time.sleep(1.1)  # d waited in the queue (as if the runner were busy) longer than batch_wait
    started = time.monotonic()
    scheduler.next_batch()
    assert time.monotonic() - started < 0.5


def test_a_held_burst_wakes_the_runner_once_after_its_last_step():
    scheduler = Scheduler(max_batch_tokens=64, batch_wait=0, active_sessions=lambda: 1)  # no reason to wait
    got: list[Batch | None] = []
    runner = threading.Thread(target=lambda: got.append(scheduler.next_batch()))
    runner.start()
    time.sleep(0.1)  # the runner sleeps on an empty queue
    scheduler.hold()
    for session in "abc":
        scheduler.submit(work(1, session=session)[0])
    runner.join(0.3)
    assert runner.is_alive() and not got  # held: queued, the runner not woken (unheld, it would take "a" alone)
    scheduler.release()
    runner.join(5)
    assert [c.work.session_id for c in got[0].chunks] == ["a", "b", "c"]


# ---- in-memory nodes: the real span backend, the real client


def batching_node(ckpt, start: int, end: int, address: str, batches: list[list[int]]) -> MemoryNode:
    """A memory node whose backend cuts prefills at 16 tokens and records the chunk sizes of every batch."""
    node = MemoryNode(ckpt, start, end, address)
    old = node.backend
    old.shutdown()
    node.backend = SpanBackend(old.span, old.info, Limits(max_batch_tokens=16, batch_wait=0.02))
    next_batch = node.backend.scheduler.next_batch

    def recording() -> Batch | None:
        batch = next_batch()
        if batch is not None:
            batches.append([c.tokens for c in batch.chunks])
        return batch

    node.backend.scheduler.next_batch = recording  # observes what the real scheduler chose
    return node


def prompt(tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 259, (1, tokens), generator=torch.Generator().manual_seed(seed))


async def tokens_of(model, ids, params, session=None, cached=0, on_token=None) -> list[int]:
    out = []
    async for new in model.generate_ids(ids, params, session, cached):
        out.append(int(new[0]))
        if on_token is not None:
            on_token(len(out))
    return out


async def test_concurrent_sessions_equal_each_alone_in_memory(tiny_llama):
    ckpt = resolve(str(tiny_llama))
    batches: list[list[int]] = []
    nodes = [batching_node(ckpt, 0, 2, "a:1", batches), batching_node(ckpt, 2, 4, "b:1", batches)]
    model = AsyncDistributedModel(ckpt, MemoryPeers(nodes), step_timeout=10.0)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    short = [prompt(n, seed) for seed, n in enumerate((3, 9, 17))]  # different lengths, run from the start
    late = prompt(40, 7)  # a long prefill (3 chunks) arriving while the others decode
    first_turn, edited = prompt(10, 8), torch.cat([prompt(10, 8)[:, :6], prompt(5, 9)], dim=1)  # rewind to 6
    try:
        alone = [await tokens_of(model, ids, params) for ids in (*short, late, edited)]
        batches.clear()
        decoding = asyncio.Event()

        async def late_prefill() -> list[int]:
            await decoding.wait()
            return await tokens_of(model, late, params)

        async def rewinding() -> list[int]:
            session = await model.open_session(64)
            try:
                await tokens_of(model, first_turn, params, session)  # 22 tokens cached
                return await tokens_of(model, edited, params, session, cached=6)  # rewinds to position 6
            finally:
                await session.close()

        on_token = lambda n: n == 3 and decoding.set()  # noqa: E731
        together = await asyncio.gather(
            tokens_of(model, short[0], params, on_token=on_token),
            *(tokens_of(model, ids, params) for ids in short[1:]),
            late_prefill(),
            rewinding(),
        )
    finally:
        for node in nodes:
            node.shutdown()
    assert together == alone
    assert max(len(b) for b in batches) >= 3, batches  # sessions really shared passes
    assert all(sum(b) <= 16 for b in batches), batches  # prefills of 17 and 40 tokens were cut
    assert any(max(b) > 1 and 1 in b for b in batches), batches  # a prefill chunk beside decode steps


async def test_sessions_opened_together_share_one_probe(tiny_llama):
    """generate([...]): the sessions' routes come from one probe of the swarm, not one each, so they are ready
    at the same moment (over gRPC their first steps then leave in one StepBatch); each session's tokens are
    still its own."""
    ckpt = resolve(str(tiny_llama))
    node = MemoryNode(ckpt, 0, 4, "a:1")
    model = AsyncDistributedModel(ckpt, MemoryPeers([node]), step_timeout=10.0)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    prompts = [prompt(4 + i, seed=i) for i in range(6)]
    try:
        alone = [await tokens_of(model, ids, params) for ids in prompts]
        probes = node.infos
        together = await asyncio.gather(*(tokens_of(model, ids, params) for ids in prompts))
    finally:
        node.shutdown()
    assert together == alone
    assert node.infos - probes <= 2  # one probe (a first-contact probe asks twice), not one per session


async def test_announced_throughput_follows_the_steps_served(tiny_llama):
    node = MemoryNode(resolve(str(tiny_llama)), 0, 4, "a:1", throughput=12345.0)  # a start-up figure far off
    backend = node.backend
    sessions = [backend.open_session(f"s{i}", 0, 4, 1, 64) for i in range(4)]

    async def feed(session, tokens: int = 1) -> None:
        await backend.step(session, session.next_step, torch.randn(1, tokens, 64), session.length)

    try:
        await asyncio.gather(*(feed(s, 8) for s in sessions))  # prefills: not decode speed
        assert backend.refresh_throughput() == 12345.0
        for _ in range(5):  # one session decoding alone
            await feed(sessions[0])
        alone = backend.refresh_throughput()
        assert alone != 12345.0 and 0 < alone < float("inf") and backend.speed.busy is None
        for _ in range(5):  # four sessions at once: the figure becomes what each gets at that batch
            await asyncio.gather(*(feed(s) for s in sessions))
        assert backend.speed.usual_batch > 1 and backend.refresh_throughput() == backend.speed.busy
        info = backend.describe(b"k" * 32)
        assert info.batch_size > 1
        # every batch and its sequences counted: the 4 prefills (in 1 to 4 batches), 5 alone, 5 rounds of 4
        assert 1 + 5 + 5 <= info.batches_run <= 4 + 5 + 5 * 4 and info.sequences_run == 4 + 5 + 5 * 4
    finally:
        node.shutdown()


# ---- the dashboard


def test_metrics_show_each_nodes_batch_size_and_queue():
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from torchnode.coordinator.dashboard_app import create_app
    from torchnode.coordinator.history import History
    from torchnode.coordinator.state_schema import ModelState, NodeState, SwarmState
    from torchnode.coordinator.volunteers import VolunteerLedger

    node = NodeState(
        peer_id="ab" * 16,
        short_id="ab" * 6,
        public_key="00" * 32,
        address="127.0.0.1:1",
        model="m",
        revision="r",
        start=0,
        end=2,
        state="online",
        health="healthy",
        throughput=10.0,
        cache_bytes_free=1,
        version="0.1.0",
        total_blocks=2,
        first_seen=0.0,
        uptime_s=1.0,
        expires_in_s=5.0,
        batch_size=7,
        queue_length=3,
    )
    model = ModelState(
        name="m",
        total_blocks=2,
        total_blocks_known=True,
        ready=True,
        missing=[],
        missing_ranges="",
        bottleneck_throughput=10.0,
        blocks=[],
        nodes=[node],
    )
    state = SwarmState(
        generated_at=1.0, refresh_s=1.0, scan_duration_s=0.1, monitor_version="0.1.0", dht_maddrs=[], models=[model]
    )
    client = TestClient(create_app(SimpleNamespace(state=state, history=History(), volunteers=VolunteerLedger())))
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
    }
    assert values["torchnode_node_batch_size"] == 7 and values["torchnode_node_queue_length"] == 3
    assert client.get("/api/v1/state").json()["models"][0]["nodes"][0]["batch_size"] == 7


# ---- real node processes


@pytest.mark.swarm
def test_generate_many_prompts_batches_on_real_nodes_and_equals_transformers(default_reference):
    # imported here: the rest of this module is the unit tier
    from swarm import mean_batch, node_infos, start_nodes, stop_all

    hf, tokenizer = default_reference
    prompts = [
        "The capital of France is",
        "Once upon a time",
        "def fibonacci(n):",
        "Water boils at",
        "The largest planet is",
        "In 1492,",
        "A haiku about rain:",
        "Photosynthesis converts",
    ]
    new = 12
    expected = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine runs 2 OpenMP threads per process several times slower
    try:
        for text in prompts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            with torch.inference_mode():
                out = hf.generate(ids, max_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(ids))
            expected.append(out[0].tolist())
    finally:
        torch.set_num_threads(threads)
    nodes = start_nodes("default", ["0:15", "15:30"], "--threads", "1")

    async def scenario() -> tuple[list[torch.Tensor], float]:
        model = await AsyncDistributedModel.from_pretrained("default", peers=[n.address for n in nodes])
        addresses = [n.address for n in nodes]
        try:
            before = await node_infos(addresses)
            outs = await model.generate(prompts, max_new_tokens=new, ignore_eos=True)
            after = await node_infos(addresses)
        finally:
            await model.close()
        assert all(info.queue_length >= 0 for info in before + after)
        return outs, mean_batch(before, after)

    try:
        outs, batch = asyncio.run(scenario())
        huge = [node_huge_pages(n.proc.pid) for n in nodes]
    finally:
        stop_all(nodes)
    assert [o[0].tolist() for o in outs] == expected
    assert batch > 2, batch  # the nodes ran several sessions' steps per batch (8 sessions, in step)
    if huge_pages_available():  # the defaults: each node's 15 blocks (212 MB in float32) are in 2 MiB pages
        assert all(h > 100 * 10**6 for h in huge), huge  # most of them (the kernel may fall back for a few)


def node_huge_pages(pid: int) -> int:
    """A process's memory in transparent huge pages (AnonHugePages of /proc/PID/smaps_rollup), in bytes."""
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0
