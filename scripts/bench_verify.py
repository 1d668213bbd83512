"""What --verify costs and how soon it catches a liar, on SmolLM2 split 0:15 / 15:30 with two replicas each.

1. Throughput: 4 node processes (two per span, --threads 1), 64 greedy tokens from a client without and
   with --verify (window W), in each mode a user may pick: the default (push into hops at least
   --push-min-rtt-ms away: none on loopback), push into every hop (--push-min-rtt-ms 0), --no-push, and
   --draft ngram; tokens/s over the whole generation, median of --runs alternating runs, and the
   overhead of --verify against the same mode unverified (goal: at most 25 % on this CPU).
   Also the cost of one W-token prefill against one decode step on a span here, and the overhead one
   would see where a W-token prefill costs about one decode step (as on a GPU): ~1/W of a chain step.
2. Catch step: in-memory nodes (the real span backend) with a dishonest replica of 15:30
   (tests/helpers/dishonest_node.py: decode / random / unchecked) in the main chain: the position of its first
   lie, the position at which the client caught it, and whether the output equals the honest one.

    .venv/bin/python scripts/bench_verify.py [--runs 3] [--tokens 64] [--window 32] [--skip-processes]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from swarm import start_nodes, stop_all  # noqa: E402

from torchnode.client.sampling import SamplingParams  # noqa: E402
from torchnode.client.verification.verifier import Verifier  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to paint."


def tokens_per_s(model, ids: torch.Tensor, tokens: int) -> float:
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    started = time.perf_counter()
    count = sum(1 for _ in model.iterate(model.async_model.generate_ids(ids, params)))
    return count / (time.perf_counter() - started)


def prefill_vs_decode(window: int) -> float:
    """Seconds of one W-token prefill / one decode step, blocks 0:15 in float32, after a 64-token context."""
    from torchnode.models.checkpoint import resolve
    from torchnode.models.families import load_span

    span = load_span(resolve("default"), 0, 15, torch.float32)
    x = torch.randn(1, 64 + window, span.config.hidden_size)
    caches = span.new_caches(0, 15, 1, 64 + 2 * window + 8)
    span(x[:, :64], 0, 0, 15, caches)
    decode, prefill = [], []
    for _ in range(5):
        t = time.perf_counter()
        span(x[:, 64:65], 64, 0, 15, caches)
        decode.append(time.perf_counter() - t)
        t = time.perf_counter()
        span(x[:, 64:], 64, 0, 15, caches)
        prefill.append(time.perf_counter() - t)
    return statistics.median(prefill) / statistics.median(decode)


MODES = {  # what a user may run with; --verify is measured against the same mode without it
    "default": {},
    "push into every hop": {"push_min_rtt_ms": 0.0},
    "--no-push": {"push": False},
    "--draft ngram": {"draft": "ngram"},
}


def throughput(runs: int, tokens: int, window: int) -> dict[str, tuple[float, float]]:
    """{mode: (tokens/s without --verify, with it)}."""
    from torchnode.client.sync_model import DistributedModel

    nodes = start_nodes("default", ["0:15", "0:15", "15:30", "15:30"], "--threads", "1")
    results = {}
    try:
        peers = [n.address for n in nodes]
        for mode, options in MODES.items():
            plain = DistributedModel.from_pretrained("default", peers, **options)
            checked = DistributedModel.from_pretrained("default", peers, verify=True, verify_window=window, **options)
            ids = plain.tokenizer(PROMPT, return_tensors="pt").input_ids
            tokens_per_s(plain, ids, 8), tokens_per_s(checked, ids, 8)  # warm-up: channels, TLS, caches
            without, with_ = [], []
            for _ in range(runs):
                without.append(tokens_per_s(plain, ids, tokens))
                with_.append(tokens_per_s(checked, ids, tokens))
            plain.close(), checked.close()
            results[mode] = statistics.median(without), statistics.median(with_)
            print(
                f"  {mode:15s}: {results[mode][0]:.1f} tokens/s without --verify, {results[mode][1]:.1f} with",
                flush=True,
            )
        return results
    finally:
        stop_all(nodes)


class TimedVerifier(Verifier):
    """Notes the session position at which each rewind (a caught lie) was decided."""

    caught_at: list[tuple[int, int]] = []

    async def check(self, final: bool = False) -> int | None:
        rewind = await super().check(final)
        if rewind is not None:
            self.caught_at.append((rewind, self.session.position))
        return rewind


async def catch_steps(tokens: int, window: int) -> None:
    from dishonest_node import MODES, dishonest_memory_node
    from memory_node import MemoryNode, MemoryPeers

    from torchnode.client.model import AsyncDistributedModel
    from torchnode.models.checkpoint import resolve

    ckpt = resolve("default")
    honest = [MemoryNode(ckpt, 0, 15, "a:1"), MemoryNode(ckpt, 0, 15, "a:2"), MemoryNode(ckpt, 15, 30, "b:1")]
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    model = AsyncDistributedModel(ckpt, MemoryPeers(honest))
    ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
    reference = [int(t[0]) async for t in model.generate_ids(ids, params)]
    print(f"\ncatch step (prompt {ids.shape[1]} tokens, window {window}):")
    for mode in MODES:
        liar = dishonest_memory_node(ckpt, 15, 30, "liar:1", mode)
        liar.backend.throughput = 1e6  # routing puts it in the main chain
        model = AsyncDistributedModel(ckpt, MemoryPeers([*honest, liar]), verify=True, verify_window=window)
        session = await model.open_session(ids.shape[1] + tokens)
        timed = TimedVerifier(session, model.route, model.caught, window, ckpt)  # third opinion: local weights
        TimedVerifier.caught_at = []
        session.verifier = timed
        out = [int(t[0]) async for t in model.generate_ids(ids, params, session)]
        await session.close()
        first = liar.backend.lie_positions[0] if liar.backend.lie_positions else None
        wrong, at = TimedVerifier.caught_at[0] if TimedVerifier.caught_at else (None, None)
        late = None if first is None or at is None else at - first
        print(
            f"  {mode:9s}: first lie at position {first}, first wrong position found {wrong}, decided at position "
            f"{at} ({late} positions later: {'within' if late is not None and late <= window else 'NOT within'} one "
            f"window); output {'equals' if out == reference else 'DIFFERS from'} the honest run"
        )
        liar.shutdown()
    for node in honest:
        node.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--skip-processes", action="store_true", help="only the catch-step part")
    args = parser.parse_args()
    ratio = prefill_vs_decode(args.window)
    print(f"one {args.window}-token prefill costs {ratio:.1f} decode steps on this CPU (blocks 0:15, float32)")
    if not args.skip_processes:
        print(f"{args.tokens} greedy tokens, 2 spans x 2 replicas, --verify-window {args.window}:")
        for mode, (without, with_) in throughput(args.runs, args.tokens, args.window).items():
            overhead = 100 * (without / with_ - 1)
            print(
                f"{mode:15s} {without:5.1f} tokens/s without --verify, {with_:5.1f} with: overhead {overhead:.0f} % "
                f"({'within' if overhead <= 25 else 'MISSES'} the 25 % goal)"
            )
    print(
        f"where a {args.window}-token prefill costs about one decode step (GPU): each window adds about one chain "
        f"step per {args.window} tokens, overhead ~{100 / args.window:.0f} % (here: ~{100 * ratio / args.window:.0f} % "
        "of compute, plus a round trip per hop per window)"
    )
    asyncio.run(catch_steps(args.tokens, args.window))


if __name__ == "__main__":
    main()
