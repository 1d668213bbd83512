"""Extra latency per token through a relay: the same node dialled directly and through its relay.

On loopback, or over links delayed by scripts/delay_proxy.py (--delay-ms).

Starts `torchnode coordinator --relay` and one node with `--reachable no` (so it registers with the relay
and announces the relay's port), then decodes greedily from a client that dials the node's own port and
from one that dials the relay's port (one hop, the whole model). Reports tokens/s (first token included),
the median time between tokens and the first token's latency both ways, the relay's CPU seconds per
relayed token, and the time from `join` to serving through the relay.

--delay-ms D puts the delay proxy (D ms each way) on every link, as if client, relay and node were far
apart: direct = client -D- node; relayed = client -D- relay -D- node (a relay sits between two distant
parties, so a relayed token crosses two delayed links each way). For the node -> relay link the relay
announces 127.0.0.2 (`--announce-host`) while listening on 127.0.0.1, and a proxy on 127.0.0.2 forwards
its control port and the node's relayed port to it: the node's control connection and every stream it
opens for the relay, and the client's connection to the relayed port, all cross the proxy. With D = 0
(the default) nothing is proxied.

    .venv/bin/python scripts/bench_relay.py [--model default] [--tokens 64] [--runs 3] [--delay-ms 20]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from decode_timing import timed_decode  # noqa: E402  (scripts/ is on the path when run as a script)
from delay_proxy import spawn as spawn_proxy  # noqa: E402
from swarm import free_port, start_coordinator, start_node, stop_all  # noqa: E402

from torchnode import DistributedModel  # noqa: E402

PROMPT = "Once upon a time"
FAR_HOST = "127.0.0.2"  # the relay's announced host with --delay-ms: only the delay proxy listens there


@dataclass
class Decode:
    tokens_per_s: float  # new tokens / (request -> last token), first token included
    gap_ms: float  # median time between consecutive tokens
    first_ms: float  # request -> first token (prefill of the prompt, session opening)


def decode(model: DistributedModel, tokens: int) -> Decode:
    timed = timed_decode(model, model.async_model.encode(PROMPT), tokens)
    return Decode(timed.tokens_per_s, timed.median_gap_s * 1000, timed.first_token_s * 1000)


def median_of(runs: list[Decode]) -> Decode:
    return Decode(*(statistics.median(getattr(r, f) for r in runs) for f in ("tokens_per_s", "gap_ms", "first_ms")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=1, help="decodes per path, alternating direct/relayed; medians (1)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay proxy on every link, each way (0: loopback)")
    args = parser.parse_args()
    delay = args.delay_ms > 0
    procs, proxies = [], []
    try:
        relay_port = free_port()
        extra = ["--host", "127.0.0.1", "--announce-host", FAR_HOST] if delay else []
        coordinator, maddr = start_coordinator(*extra, "--relay", "--relay-port", str(relay_port))
        procs.append(coordinator)
        coordinator.wait_for(r"relay ready", 30)
        if delay:  # the node dials the relay's announced control port: through the proxy
            maddr = maddr.replace(f"/ip4/{FAR_HOST}/", "/ip4/127.0.0.1/")  # the DHT itself is not delayed
            proxies.append(spawn_proxy([(f"{FAR_HOST}:{relay_port}", f"127.0.0.1:{relay_port}")], args.delay_ms))
        started = time.perf_counter()
        node = start_node(args.model, "--initial-peers", maddr, "--reachable", "no", "--rebalance-period", "0")
        join_s = time.perf_counter() - started
        procs.append(node)
        relayed = re.search(r"relayed: reachable through relay \w+ at (\S+)", node.log)[1]
        direct = node.address
        if delay:
            direct = f"127.0.0.1:{free_port()}"
            port = relayed.rsplit(":", 1)[1]
            proxies.append(spawn_proxy([(direct, node.address), (relayed, f"127.0.0.1:{port}")], args.delay_ms))
        relay_proc = psutil.Process(coordinator.proc.pid)
        results: dict[str, list[Decode]] = {"direct": [], "relayed": []}
        relay_cpu, relayed_tokens = 0.0, 0
        with (
            DistributedModel.from_pretrained(args.model, peers=[direct]) as d,
            DistributedModel.from_pretrained(args.model, peers=[relayed]) as r,
        ):
            d.generate(PROMPT, max_new_tokens=4, ignore_eos=True)  # warm: channel, TLS, caches
            cpu_before = sum(relay_proc.cpu_times()[:2])
            r.generate(PROMPT, max_new_tokens=4, ignore_eos=True)
            relay_cpu += sum(relay_proc.cpu_times()[:2]) - cpu_before
            relayed_tokens += 4
            for _ in range(args.runs):
                results["direct"].append(decode(d, args.tokens))
                cpu_before = sum(relay_proc.cpu_times()[:2])
                results["relayed"].append(decode(r, args.tokens))
                relay_cpu += sum(relay_proc.cpu_times()[:2]) - cpu_before
                relayed_tokens += args.tokens
        link = f"+{args.delay_ms:g} ms each way on every link" if delay else "loopback"
        print(f"model {args.model}, {args.tokens} greedy tokens, one node, {link}, median of {args.runs}")
        lines = {"direct": "direct:         ", "relayed": "through a relay:"}
        m = {k: median_of(v) for k, v in results.items()}
        for key, label in lines.items():
            each = " / ".join(f"{x.tokens_per_s:.1f}" for x in results[key])
            print(
                f"{label} {m[key].tokens_per_s:6.2f} tokens/s  {m[key].gap_ms:6.1f} ms/token (median gap)  "
                f"first token {m[key].first_ms:6.0f} ms   (runs: {each} tokens/s)"
            )
        extra_ms = (1 / m["relayed"].tokens_per_s - 1 / m["direct"].tokens_per_s) * 1000
        print(
            f"relay adds {m['relayed'].gap_ms - m['direct'].gap_ms:+.1f} ms per token (median gaps), "
            f"{extra_ms:+.1f} ms per token (1/tokens/s)"
        )
        if delay:
            print(
                f"expected from the links alone: +{2 * args.delay_ms:g} ms per token "
                "(relayed: 4 one-way legs, direct: 2)"
            )
        print(f"relay CPU: {relay_cpu * 1000 / relayed_tokens:.2f} ms per relayed token (one stream; warm-up included)")
        print(
            f"join (model load, relay registration{' over the delayed link' if delay else ''}) to ready: {join_s:.1f} s"
        )
    finally:
        for proxy in proxies:
            proxy.terminate()
            proxy.wait()
        stop_all(procs)


if __name__ == "__main__":
    main()
