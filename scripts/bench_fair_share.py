"""A greedy client vs a newcomer: one node (`join --max-sessions 4`, the whole model) whose 4 slots one client
key holds, each session with a prefill in its cache and then idle for `--hold` seconds before it closes them.
A newcomer (another key, the SDK with its default retry policy) asks for a generation meanwhile; its time to
first token, with the node's fair share on (the default) and off (`--no-fair-share`), median of `--runs`.

    .venv/bin/python scripts/bench_fair_share.py [--model default] [--runs 3] [--hold 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from swarm import start_node  # noqa: E402

SLOTS = 4


async def greedy_holds(address: str, hidden: int, blocks: int, hold: float, ready: asyncio.Event) -> None:
    """Opens every slot with one key, prefills each, idles `hold` seconds, then closes whatever is left."""
    from torchnode.protocol.wire.grpc_node import GrpcNodeClient
    from torchnode.protocol.wire.identity import Identity
    from torchnode.protocol.wire.node_client import NodeError, SessionSpec

    client = GrpcNodeClient(address, Identity.generate())
    streams = []
    try:
        for i in range(SLOTS):
            stream = client.open_session(SessionSpec(f"greedy-{i}-{time.time()}", 0, blocks, 256))
            await stream.step(torch.randn(1, 16, hidden), 0, 60)
            streams.append(stream)
        ready.set()
        await asyncio.sleep(hold)
    finally:
        ready.set()
        for stream in streams:
            try:
                await stream.close()
            except NodeError:
                stream.abort()
        await client.close()


async def newcomer_ttft(model: str, address: str, hold: float, key: Path) -> tuple[float | None, str]:
    """(seconds to the newcomer's first token, or None; what happened), while the greedy key holds the node."""
    from torchnode.client.model import AsyncDistributedModel
    from torchnode.client.sampling import SamplingParams

    client = await AsyncDistributedModel.from_pretrained(model, peers=[address], identity_path=key)
    ready = asyncio.Event()
    greedy = asyncio.create_task(
        greedy_holds(address, client.ckpt.hf_config.hidden_size, client.total_blocks, hold, ready)
    )
    await ready.wait()
    started = time.perf_counter()
    try:
        ids = client.encode("The quick brown fox")
        async for _ in client.generate_ids(ids, SamplingParams(max_new_tokens=4, ignore_eos=True)):
            return time.perf_counter() - started, "served"
        return None, "no token"
    except Exception as e:  # refused for good: the node stayed full for the whole retry policy
        return None, f"failed after {time.perf_counter() - started:.1f} s: {str(e)[:80]}"
    finally:
        await greedy
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hold", type=float, default=20.0, help="seconds the greedy key holds every slot")
    args = parser.parse_args()
    keys = Path(tempfile.mkdtemp())
    for label, flag in (("fair share (default)", []), ("--no-fair-share", ["--no-fair-share"])):
        node = start_node(args.model, "--max-sessions", str(SLOTS), *flag)
        try:
            results = [
                asyncio.run(newcomer_ttft(args.model, node.address, args.hold, keys / f"newcomer-{i}.key"))
                for i in range(args.runs)
            ]
        finally:
            node.stop()
        times = [t for t, _ in results if t is not None]
        median = f"median {statistics.median(times) * 1000:.0f} ms" if times else "never served"
        each = [what if t is None else f"{t:.2f} s" for t, what in results]
        print(f"{label}: newcomer's first token {median}; runs: {each}")


if __name__ == "__main__":
    main()
