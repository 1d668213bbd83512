"""Where a hop's milliseconds go: the parts of one decode step's exchange (a (1, 1, hidden) tensor each way),
timed one by one, beside a real node's round trips over TLS and plaintext.

In this process (no network), per message: the tensor's encoding and decoding, protobuf serialization, the
Ed25519 envelope (signing, which serializes the message once more, and checking). Against `torchnode join`
nodes serving one block (`--blocks 0:1`): a signed Info round trip (no tensor, no compute) over TLS and
over --insecure, and a session's one-token step through that block, push off, beside the block's own
compute timed here. What a hop costs per token is about the step's round trip minus the block's compute;
bench_overhead.py gives the same figure from whole generations.

    .venv/bin/python scripts/hop_costs.py [--model default] [--repeats 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from swarm import start_node, stop_all  # noqa: E402


def per_call_us(fn: Callable[[], object], repeats: int) -> float:
    """Median of `repeats` timings of fn(), in microseconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


async def per_await_us(fn: Callable[[], Awaitable[object]], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


async def decode_us(session, hidden: int, repeats: int) -> float:
    """Median microseconds of a session's one-token steps, after an 8-token prompt."""
    await session.step(torch.randn(1, 8, hidden), 0, 30.0)
    x, times = torch.randn(1, 1, hidden), []
    for position in range(8, 8 + repeats):
        started = time.perf_counter()
        await session.step(x, position, 30.0)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def local_parts(hidden_size: int, repeats: int) -> dict[str, float]:
    from torchnode.protocol.wire import signing, tensor_codec
    from torchnode.protocol.wire import torchnode_pb2 as pb
    from torchnode.protocol.wire.identity import Identity

    client, node = Identity.generate(), Identity.generate()
    x = torch.randn(1, 1, hidden_size)
    encoded = tensor_codec.encode(x)
    step = pb.Step(session_id="s" * 32, step=5, position=40, wire_dtype="float32")
    step.hidden.CopyFrom(encoded)
    signing.sign(client, "Inference", step, audience=node.public_key)
    wire = step.SerializeToString()
    guard = signing.ReplayGuard()

    def check_fresh() -> None:  # a fresh nonce each time, as every real message has
        signing.sign(client, "Inference", step, audience=node.public_key)
        signing.check("Inference", step, replay_guard=guard, audience=node.public_key)

    sign_us = per_call_us(lambda: signing.sign(client, "Inference", step, audience=node.public_key), repeats)
    return {
        "tensor encode": per_call_us(lambda: tensor_codec.encode(x), repeats),
        "tensor decode": per_call_us(lambda: tensor_codec.decode(encoded), repeats),
        "protobuf serialize": per_call_us(step.SerializeToString, repeats),
        "protobuf parse": per_call_us(lambda: pb.Step.FromString(wire), repeats),
        "sign (Ed25519 + serialize)": sign_us,
        "check (Ed25519 + serialize + replay)": per_call_us(check_fresh, repeats) - sign_us,
    }


async def remote_parts(model: str, repeats: int) -> dict[str, float]:
    from torchnode.models.checkpoint import resolve
    from torchnode.models.families import load_span
    from torchnode.protocol.wire.grpc_node import GrpcNodeClient
    from torchnode.protocol.wire.identity import Identity
    from torchnode.protocol.wire.node_client import SessionSpec

    ckpt = resolve(model)
    hidden = ckpt.hf_config.hidden_size
    nodes = [start_node(model, "--blocks", "0:1"), start_node(model, "--blocks", "0:1", "--insecure")]
    out: dict[str, float] = {}
    try:
        for node, link in zip(nodes, ("TLS", "plaintext"), strict=True):
            client = GrpcNodeClient(node.address, Identity.generate(), insecure=link == "plaintext")
            await client.info()
            out[f"Info round trip, {link}"] = await per_await_us(client.info, repeats)
            session = client.open_session(SessionSpec("b" * 32, 0, 1, repeats + 64, 1, torch.float32))
            out[f"one-token step through 1 block, {link}"] = await decode_us(session, hidden, repeats)
            await session.close()
            await client.close()
        span = load_span(ckpt, 0, 1)
        caches = span.new_caches(0, 1, 1, repeats + 64)
        span(torch.randn(1, 8, hidden), 0, 0, 1, caches)
        at = [8]

        def block() -> None:
            span(torch.randn(1, 1, hidden), at[0], 0, 1, caches)
            at[0] += 1

        out["that block's compute, here"] = per_call_us(block, repeats)
    finally:
        stop_all(nodes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    from torchnode.models.checkpoint import resolve

    hidden = resolve(args.model).hf_config.hidden_size
    local = local_parts(hidden, args.repeats)
    remote = asyncio.run(remote_parts(args.model, args.repeats))
    print(f"\n| part (one (1, 1, {hidden}) float32 message) | µs, median of {args.repeats} |\n|---|---:|")
    for name, us in {**local, **remote}.items():
        print(f"| {name} | {us:.0f} |")
    for link in ("TLS", "plaintext"):
        hop = remote[f"one-token step through 1 block, {link}"] - remote["that block's compute, here"]
        print(f"a hop's cost per token ({link}): step round trip minus the block's compute = {hop / 1000:.2f} ms")
    per_message = sum(local.values())
    print(
        f"in-process work per message (encode + decode + serialize + parse + sign + check): {per_message:.0f} µs; "
        f"a client-driven hop exchanges 2 messages"
    )


if __name__ == "__main__":
    main()
