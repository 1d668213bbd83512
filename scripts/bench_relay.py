"""Extra latency per token through a relay, on loopback: the same node, dialled directly and through its relay.

Starts `torchnode coordinator --relay` and one node with `--reachable no` (so it registers with the relay
and announces the relay's port), then decodes greedily from a client that dials the node's own port and
from one that dials the relay's port (one hop, the whole model). Reports tokens/s and ms per token both
ways, the relay's CPU seconds per relayed token, and the time from `join` to serving through the relay.

    .venv/bin/python scripts/bench_relay.py [--model default] [--tokens 64]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from swarm import start_coordinator, start_node, stop_all  # noqa: E402

from torchnode import DistributedModel  # noqa: E402


def decode(model: str, address: str, tokens: int) -> float:
    """Tokens/s of a greedy decode of `tokens` tokens from a client that dials only `address`."""
    with DistributedModel.from_pretrained(model, peers=[address]) as m:
        m.generate("Once upon a time", max_new_tokens=4, ignore_eos=True)  # warm: channel, TLS, caches
        started = time.perf_counter()
        m.generate("Once upon a time", max_new_tokens=tokens, ignore_eos=True)
        return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    coordinator, maddr = start_coordinator("--relay")
    nodes = [coordinator]
    try:
        coordinator.wait_for(r"relay ready", 30)
        started = time.perf_counter()
        node = start_node(args.model, "--initial-peers", maddr, "--reachable", "no", "--rebalance-period", "0")
        join_s = time.perf_counter() - started
        nodes.append(node)
        relayed = re.search(r"relayed: reachable through relay \w+ at (\S+)", node.log)[1]
        direct_tps = decode(args.model, node.address, args.tokens)
        relay_proc = psutil.Process(coordinator.proc.pid)
        cpu_before = sum(relay_proc.cpu_times()[:2])
        relayed_tps = decode(args.model, relayed, args.tokens)
        relay_cpu = sum(relay_proc.cpu_times()[:2]) - cpu_before
        extra_ms = (1 / relayed_tps - 1 / direct_tps) * 1000
        print(f"model {args.model}, {args.tokens} greedy tokens, one node, loopback")
        print(f"direct:          {direct_tps:6.1f} tokens/s  {1000 / direct_tps:6.1f} ms/token")
        print(f"through a relay: {relayed_tps:6.1f} tokens/s  {1000 / relayed_tps:6.1f} ms/token  (+{extra_ms:.2f} ms/token)")
        print(f"relay CPU: {relay_cpu * 1000 / (args.tokens + 4):.2f} ms per relayed token (one stream; warm-up included)")
        print(f"join (model load, reachability, relay registration) to ready: {join_s:.1f} s")
    finally:
        stop_all(nodes)


if __name__ == "__main__":
    main()
