"""Share of a slow liar's traffic, before and after measuring: a node that announces 100x its speed and sleeps
0.25 s before every step (tests/helpers/dishonest_node.py `slow`, honest outputs) serves the whole model beside
an honest chain of two nodes; one long-lived SDK client (the API's case) runs `--generations` greedy generations
through the coordinator's DHT, once routing on announced speed (SpeedPolicy(measure=False): before) and once
with the defaults (measured speed). Prints, per mode, the share of decoded tokens whose route went through the
liar, tokens/s, and how often a session was re-routed around it mid-way.

    .venv/bin/python scripts/bench_speed.py [--model default] [--generations 8] [--tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

HELPERS = Path(__file__).resolve().parents[1] / "tests" / "helpers"
sys.path.insert(0, str(HELPERS))
from swarm import free_port, spawn, start_coordinator, start_nodes, stop_all, wait_ready  # noqa: E402


async def client_run(model: str, maddr: str, liar: str, generations: int, tokens: int, measure: bool) -> dict:
    from torchnode.client.config import SpeedPolicy
    from torchnode.client.model import AsyncDistributedModel
    from torchnode.client.sampling import SamplingParams

    client = await AsyncDistributedModel.from_pretrained(
        model, initial_peers=[maddr], speed=SpeedPolicy(measure=measure)
    )
    prompt = client.encode("The quick brown fox jumps over the lazy dog. Tell me a story about it.")
    through, total, reroutes, seconds = 0, 0, 0, 0.0
    try:
        for _ in range(generations):
            session = await client.open_session(prompt.shape[1] + tokens)
            started = time.perf_counter()
            params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
            async for _ in client.generate_ids(prompt, params, session):
                total += 1
                through += any(h.node.address == liar for h in session.hops)
            seconds += time.perf_counter() - started
            reroutes += session.reroutes
            await session.close()
    finally:
        await client.close()
    return dict(share=through / total, tokens_per_s=total / seconds, reroutes=reroutes, tokens=total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="a model every node can load (default: SmolLM2)")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per generation")
    parser.add_argument("--blocks", type=int, default=30, help="the model's block count (SmolLM2: 30)")
    args = parser.parse_args()
    half = args.blocks // 2
    coordinator, maddr = start_coordinator()
    nodes = []
    try:
        port = free_port()
        join = ["join", args.model, "--blocks", f"0:{args.blocks}", "--port", str(port), "--initial-peers", maddr]
        liar = spawn([sys.executable, str(HELPERS / "dishonest_node.py"), "slow", *join], port, None)
        nodes = [liar, *start_nodes(args.model, [f"0:{half}", f"{half}:{args.blocks}"], "--initial-peers", maddr)]
        wait_ready(liar)
        for label, measure in (("announced (before)", False), ("measured (after)", True)):
            r = asyncio.run(client_run(args.model, maddr, liar.address, args.generations, args.tokens, measure))
            print(
                f"{label}: {r['share']:.0%} of {r['tokens']} tokens through the slow liar, "
                f"{r['tokens_per_s']:.1f} tokens/s, {r['reroutes']} mid-session re-routes",
                flush=True,
            )
    finally:
        stop_all(nodes)
        coordinator.stop()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
