"""Extra latency of the step at which a node is SIGKILLed (detect + re-route + replay), with a 128-token
prefix already in the session: SmolLM2 with 2 replicas of each half on loopback, median of 5 runs.

    .venv/bin/python scripts/bench_failover.py [--runs 5] [--prefix 128]
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from swarm import start_node, start_nodes, stop_all  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prefix", type=int, default=128)
    args = parser.parse_args()

    from torchnode.client.sampling import SamplingParams
    from torchnode.client.sync_model import DistributedModel

    nodes = start_nodes("default", ["0:15", "0:15", "15:30", "15:30"])
    rng = random.Random(0)
    extras, normals = [], []
    try:
        with DistributedModel.from_pretrained("default", [n.address for n in nodes], step_timeout=10) as model:
            core, loop = model._core, model._loop
            prompt = torch.randint(100, 20000, (1, args.prefix), generator=torch.Generator().manual_seed(0))
            for run in range(args.runs):
                model._core.bans = type(model._core.bans)()  # each run starts with no bans
                session = loop.run(core.open_session(args.prefix + 16))
                victim_address = rng.choice(session.hops).node.address
                victim = next(n for n in nodes if n.address == victim_address)
                times, last = [], time.perf_counter()
                params = SamplingParams(max_new_tokens=12, ignore_eos=True)
                for i, _ in enumerate(loop.iterate(core.generate_ids(prompt, params, session))):
                    now = time.perf_counter()
                    times.append(now - last)
                    last = now
                    if i == 7:
                        victim.stop(signal.SIGKILL)  # the next step finds it dead
                loop.run(session.close())
                normal = statistics.median(times[1:8])
                extra = times[8] - normal
                extras.append(extra)
                normals.append(normal)
                print(
                    f"run {run + 1}: normal step {normal * 1000:.1f} ms, failover step {times[8] * 1000:.1f} ms "
                    f"(+{extra * 1000:.1f} ms), killed {victim.address} [{victim.start}:{victim.end})",
                    flush=True,
                )
                nodes[nodes.index(victim)] = start_node(
                    "default", "--blocks", f"{victim.start}:{victim.end}", port=victim.port
                )
    finally:
        stop_all(nodes)
    print(
        f"prefix {args.prefix} tokens: median normal step {statistics.median(normals) * 1000:.1f} ms; "
        f"median extra latency of the failover step {statistics.median(extras) * 1000:.1f} ms over {args.runs} runs"
    )


if __name__ == "__main__":
    main()
