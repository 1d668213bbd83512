"""Load on the OpenAI API: concurrent streaming chat clients against `torchnode api` over a 2-node swarm.

Starts a coordinator, two SmolLM2 nodes (0:15, 15:30) that join it, and `torchnode api` on the swarm
(all real processes on 127.0.0.1). Then `--clients` clients each send streaming chat completions one
after another for `--duration` seconds (requests in flight at the end are finished and counted).
Reports aggregate completion tokens/s, p50/p99 time to first token and between streamed pieces, errors
(there must be none) and the nodes' RSS against their --cache-memory.

    .venv/bin/python scripts/bench_load.py [--clients 32] [--duration 120] [--max-tokens 32] [--cache-memory 512MiB]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from swarm import TORCHNODE, free_port, spawn, start_coordinator, start_nodes, stop_all  # noqa: E402

SPANS = ["0:15", "15:30"]
TOPICS = ["volcanoes", "the Roman empire", "bicycles", "coffee", "black holes", "jazz", "honey bees", "glaciers"]


@dataclass
class Stats:
    ttft: list[float] = field(default_factory=list)  # seconds to the first content piece
    gaps: list[float] = field(default_factory=list)  # seconds between content pieces
    tokens: int = 0  # completion tokens (usage)
    requests: int = 0
    errors: list[str] = field(default_factory=list)


async def client_loop(url: str, index: int, deadline: float, max_tokens: int, stats: Stats) -> None:
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300) as client:
        turn = 0
        while time.monotonic() < deadline:
            topic = TOPICS[(index + turn) % len(TOPICS)]
            messages = [
                {"role": "user", "content": f"Tell me something about {topic} (reader {index}, question {turn})."}
            ]
            turn += 1
            started = last = time.perf_counter()
            first = True
            try:
                stream = await client.chat.completions.create(
                    model="default",
                    messages=messages,
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                async for chunk in stream:
                    now = time.perf_counter()
                    if chunk.choices and chunk.choices[0].delta.content:
                        (stats.ttft if first else stats.gaps).append(now - (started if first else last))
                        first, last = False, now
                    if chunk.usage is not None:
                        stats.tokens += chunk.usage.completion_tokens
                stats.requests += 1
            except Exception as e:  # every failure is counted and shown, never hidden
                stats.errors.append(f"client {index}: {type(e).__name__}: {e}")


class RssWatch:
    """Peak RSS of each node process, sampled every 0.2 s in a thread."""

    def __init__(self, pids: list[int]):
        self.processes = [psutil.Process(p) for p in pids]
        self.peak = [p.memory_info().rss for p in self.processes]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for i, p in enumerate(self.processes):
                self.peak[i] = max(self.peak[i], p.memory_info().rss)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [0.0])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming chat clients")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds clients keep sending requests")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    parser.add_argument("--cache-memory", default="512MiB", help="each node's --cache-memory")
    parser.add_argument("--node-threads", type=int, default=1, help="torch threads per node")
    args = parser.parse_args()

    from torchnode.node.limits import parse_bytes

    coordinator, maddr = start_coordinator()
    nodes = []
    api = None
    try:
        flags = ["--initial-peers", maddr, "--cache-memory", args.cache_memory, "--threads", str(args.node_threads)]
        nodes = start_nodes("default", SPANS, *flags)
        port = free_port()
        api = spawn([*TORCHNODE, "api", "default", "--initial-peers", maddr, "--port", str(port)], port, None)
        api.wait_for(r"ready: OpenAI API", 180)
        url = f"http://127.0.0.1:{port}/v1"
        baseline = [psutil.Process(n.proc.pid).memory_info().rss for n in nodes]
        stats = Stats()
        with RssWatch([n.proc.pid for n in nodes]) as rss:
            started = time.monotonic()
            deadline = started + args.duration

            async def run_all() -> None:
                await asyncio.gather(
                    *(client_loop(url, i, deadline, args.max_tokens, stats) for i in range(args.clients))
                )

            asyncio.run(run_all())
            elapsed = time.monotonic() - started
    finally:
        if api is not None:
            stop_all([api])
        stop_all(nodes)
        coordinator.stop()

    budget = parse_bytes(args.cache_memory)
    print(
        f"{args.clients} streaming chat clients for {args.duration:.0f} s (ran {elapsed:.0f} s), max_tokens "
        f"{args.max_tokens}, 2 nodes {', '.join(SPANS)} "
        f"(--threads {args.node_threads}, --cache-memory {args.cache_memory})"
    )
    print(f"requests completed: {stats.requests}, errors: {len(stats.errors)}")
    for line in stats.errors[:10]:
        print("  " + line)
    print(f"aggregate: {stats.tokens / elapsed:.1f} completion tokens/s ({stats.tokens} tokens)")
    ttft, gaps = stats.ttft, stats.gaps
    print(f"time to first token: p50 {percentile(ttft, 50) * 1000:.0f} ms, p99 {percentile(ttft, 99) * 1000:.0f} ms")
    print(
        f"between streamed pieces: p50 {percentile(gaps, 50) * 1000:.0f} ms, p99 {percentile(gaps, 99) * 1000:.0f} ms"
    )
    for span, before, peak in zip(SPANS, baseline, rss.peak, strict=True):
        print(
            f"node {span}: RSS {before / 2**20:.0f} MiB idle, peak {peak / 2**20:.0f} MiB "
            f"(+{(peak - before) / 2**20:.0f} MiB) for a {budget / 2**20:.0f} MiB --cache-memory"
        )
    sys.exit(1 if stats.errors else 0)


if __name__ == "__main__":
    main()
