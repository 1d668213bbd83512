"""Time from `torchnode join` behind a real NAT to online through a relay, and to a client's first token.

Builds tests/helpers/nat_lab.py's network namespaces (a home network behind an iptables MASQUERADE router that
drops every inbound connection; 198.18.0.0/15, removed afterwards; needs root, `ip netns`, iptables).
A coordinator with `--relay` runs in the public namespace. For each repetition a fresh node (a new port,
so a new identity) runs `torchnode join MODEL --initial-peers ...` in the home namespace with the default
`--reachable auto`: it asks the relay to dial it back, fails (the NAT), registers with the relay and
announces the relay's port. A client started beforehand in the public namespace (its start-up is not
counted) polls the DHT for a full route, then decodes one greedy token. Times, from starting `join`:
  verdict  the node's `reachability: NOT reachable (... behind a NAT)` line (the relay's dial-back failed)
  relayed  the node's `relayed: reachable through relay ...` line
  ready    its `ready: serving blocks ...` line (announced online, through the relay)
  route    the client first finds a full route (DHT lookup + Info probe of the node through the relay)
  token    the client has its first token (session opened through the relay, prompt prefilled)
Then the node is stopped (SIGTERM) before the next repetition.

    sudo .venv/bin/python scripts/bench_nat_join.py [--model tiny|default|PATH] [--reps 3]

`tiny` (the default) is tests/helpers/tiny_models.py's 4-block llama, saved to a temporary directory: the times
are then Python start-up, DHT, reachability check and relay registration, with no real model load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from nat_lab import HOME_IP, PUBLIC_IP, nat_lab, unavailable  # noqa: E402
from swarm import TORCHNODE, NodeProcess, spawn, stop_all  # noqa: E402

RELAYED = r"relayed: reachable through relay (\w+) at (\S+)"
VERDICT = r"reachability: NOT reachable \(.*behind a NAT"  # the relay's dial-back failed: the NAT is real
READY = r"ready: serving blocks"

# Runs in the public namespace: joins the DHT, says READY, waits for a line, then polls for a route and
# decodes one token; prints absolute wall-clock times (one clock for every namespace of this machine).
CLIENT = r"""
import asyncio, json, sys, time
from torchnode.client.model import AsyncDistributedModel
from torchnode.client.sampling import SamplingParams

async def main():
    model = await AsyncDistributedModel.from_pretrained(sys.argv[1], initial_peers=[sys.argv[2]])
    print("READY", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    tries, errors = 0, []
    while True:
        tries += 1
        try:
            hops = await model.route()
            break
        except Exception as e:
            errors.append(type(e).__name__)
            await asyncio.sleep(0.1)
    route_at = time.time()
    ids = model.encode("Once upon a time")
    while True:
        try:
            tokens = [t async for t in model.generate_ids(ids, SamplingParams(max_new_tokens=1, ignore_eos=True))]
            break
        except Exception as e:
            errors.append(type(e).__name__)
            await asyncio.sleep(0.1)
    token_at = time.time()
    route = " -> ".join(f"{h.node.address} [{h.start}:{h.end})" for h in hops)
    print("RESULT " + json.dumps({"route": route_at, "token": token_at, "tries": tries, "via": route,
                                  "errors": sorted(set(errors))}), flush=True)
    await model.close()

asyncio.run(main())
"""


def in_ns(lab, ns: str, *args: str, env: dict) -> NodeProcess:
    return spawn([*lab.exec(ns), *TORCHNODE, *args], 0, env)


def timed_line(node: NodeProcess, pattern: str, timeout: float) -> float:
    """Wall-clock time at which `pattern` was first seen in the node's output (polled every 50 ms)."""
    node.wait_for(pattern, timeout)
    return time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny", help="tiny (tests/helpers/tiny_models.py's llama), default, or a path"
    )
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if reason := unavailable():
        sys.exit(f"no NAT lab here: {reason}")
    with tempfile.TemporaryDirectory(prefix="bench-nat-join-") as tmp:
        model = args.model
        if model == "tiny":
            from tiny_models import save_tiny_model

            model = str(save_tiny_model("llama", Path(tmp) / "tiny-llama"))
        else:
            from torchnode.models.checkpoint import resolve

            resolve(model)  # a one-time download / conversion is not part of joining
        env = {"TORCHNODE_HOME": str(Path(tmp) / "home")}  # fresh keys, nobody else's files touched
        rows = []
        with nat_lab() as lab:
            procs: list[NodeProcess] = []
            try:
                coordinator = in_ns(
                    lab,
                    lab.public,
                    "coordinator",
                    "--host",
                    PUBLIC_IP,
                    "--port",
                    "31337",
                    "--relay",
                    "--relay-port",
                    "31400",
                    env=env,
                )
                procs.append(coordinator)
                maddr = coordinator.wait_for(r"ready: --initial-peers (\S+)", 60)[1]
                coordinator.wait_for(r"relay ready", 60)
                for rep in range(args.reps):
                    client = subprocess.Popen(
                        [*lab.exec(lab.public), TORCHNODE[0], "-c", CLIENT, model, maddr],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                        env={**os.environ, **env},
                    )
                    try:
                        seen = []
                        for line in client.stdout:
                            seen.append(line)
                            if line.startswith("READY"):
                                break
                        else:
                            raise RuntimeError("client ended before READY:\n" + "".join(seen))
                        time.sleep(1.0)  # let the client's DHT settle before the clock starts
                        started = time.time()
                        node = in_ns(
                            lab,
                            lab.home,
                            "join",
                            model,
                            "--initial-peers",
                            maddr,
                            "--host",
                            HOME_IP,
                            "--port",
                            str(31330 + rep),
                            "--rebalance-period",
                            "0",
                            env=env,
                        )
                        procs.append(node)
                        client.stdin.write("go\n")
                        client.stdin.flush()
                        verdict_at = timed_line(node, VERDICT, 300)
                        relayed_at = timed_line(node, RELAYED, 300)
                        ready_at = timed_line(node, READY, 300)
                        for line in client.stdout:
                            seen.append(line)
                            if line.startswith("RESULT"):
                                result = json.loads(line[7:])
                                break
                        else:
                            raise RuntimeError("client ended without a result:\n" + "".join(seen))
                    finally:
                        client.kill()
                        client.wait()
                    row = {
                        "verdict": verdict_at - started,
                        "relayed": relayed_at - started,
                        "ready": ready_at - started,
                        "route": result["route"] - started,
                        "token": result["token"] - started,
                    }
                    rows.append(row)
                    print(
                        f"rep {rep + 1}: NAT found {row['verdict']:.2f} s, relayed {row['relayed']:.2f} s, "
                        f"ready {row['ready']:.2f} s, route {row['route']:.2f} s, first token {row['token']:.2f} s "
                        f"(client polls {result['tries']}, "
                        f"route {result['via']}; errors while waiting: {', '.join(result['errors']) or 'none'})",
                        flush=True,
                    )
                    node.stop()
                    procs.remove(node)
            finally:
                stop_all(procs)
    print(f"\nmodel {args.model}, {args.reps} joins behind the NAT, seconds from starting `join`:")
    for key in ("verdict", "relayed", "ready", "route", "token"):
        values = [r[key] for r in rows]
        print(f"  {key:8} min {min(values):6.2f}  median {statistics.median(values):6.2f}  max {max(values):6.2f}")


if __name__ == "__main__":
    main()
