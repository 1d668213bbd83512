"""Churn at scale: clients generate without pause through the DHT while nodes die and join.

    .venv/bin/python scripts/bench_churn.py [--nodes 24] [--clients 16] [--duration 300] [--coordinators 2]

Starts `--coordinators` coordinators (the last one with the dashboard, whose /api/v1/state gives coverage
over time), `--nodes` node processes of the tiny Llama (tests/helpers/tiny_models.py, 4 blocks) that choose their
own spans (`--num-blocks`), then `--clients` generation loops (spread over `--client-dhts` SDK clients,
each with its own DHT peer) that generate greedily through the DHT without pause for `--duration` s.
Meanwhile, every `--churn-every` s one random node is killed (SIGKILL and SIGTERM in turn) and a new one
joins; halfway through, the first coordinator is SIGKILLed (with 2 or more). Every generation must
complete and equal the all-healthy output (plain transformers, computed first); the script exits 1 if
one does not.

Reports: generations done (and wrong or failed), failovers (the client's "re-routing" warnings), route
time (a fresh DHT lookup + probes + shortest chain, every 10 s), join-to-online (spawn to the node's
"ready" line, after it announced `online`), coverage over time (healthy online nodes, fewest replicas
of any block), and DHT traffic per node (bytes read + written by each node's p2pd, per second of life).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from swarm import NodeProcess, free_port, spawn, start_node, wait_ready  # noqa: E402

PROMPTS = ["The swarm", "Once upon a time", "Hello world", "A B C D", "Churn test", "One more prompt"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=24)
    p.add_argument("--clients", type=int, default=16, help="concurrent generation loops")
    p.add_argument("--client-dhts", type=int, default=4, help="SDK clients (each its own DHT peer) the loops share")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of churn")
    p.add_argument("--coordinators", type=int, default=2)
    p.add_argument("--churn-every", type=float, default=5.0, help="seconds between one kill + one join")
    p.add_argument("--num-blocks", type=int, default=2, help="blocks per node (the tiny model has 4)")
    p.add_argument("--expiration", type=float, default=10.0, help="nodes' DHT record lifetime")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    random.seed(args.seed)
    logging.basicConfig(level=logging.ERROR, format="%(name)s %(levelname)s %(message)s")  # counted, not printed
    failovers = FailoverCounter()
    session_log = logging.getLogger("torchnode.client.session")
    session_log.addHandler(failovers)
    session_log.setLevel(logging.WARNING)

    from tiny_models import save_tiny_model

    model_dir = save_tiny_model("llama", Path(tempfile.mkdtemp(prefix="churn-")) / "tiny-llama")
    references = reference_outputs(model_dir, args.max_new_tokens)
    coordinators, nodes, dead = [], [], []
    try:
        maddrs = []
        for i in range(args.coordinators):
            last = i == args.coordinators - 1
            extra = ["--dashboard", "--http-port", "0", "--refresh", "1"] if last else []
            c = spawn(
                [
                    sys.executable,
                    "-m",
                    "torchnode",
                    "coordinator",
                    "--port",
                    str(free_port()),
                    "--initial-peers",
                    ",".join(maddrs),
                    *extra,
                ],
                0,
                None,
            )
            maddrs.append(c.wait_for(r"ready: --initial-peers (\S+)", 90)[1])
            coordinators.append(c)
        url = coordinators[-1].wait_for(r"dashboard: (http://\S+)", 90)[1]
        peers = ",".join(maddrs)
        node_args = (
            "--initial-peers",
            peers,
            "--num-blocks",
            str(args.num_blocks),
            "--expiration",
            str(args.expiration),
            "--threads",
            "1",
            "--rebalance-period",
            "0",
        )
        joins: list[tuple[NodeProcess, float]] = []

        def join() -> NodeProcess:
            node = start_node(str(model_dir), *node_args, wait=False)
            node.spawned = time.monotonic()
            joins.append((node, node.spawned))
            return node

        print(f"starting {args.nodes} nodes of {model_dir.name} ({args.num_blocks} blocks each)", flush=True)
        for _ in range(args.nodes):
            nodes.append(join())
            time.sleep(0.3)  # staggered, so spans spread (each reads the swarm before choosing)
        for node in nodes:
            wait_ready(node, timeout=300)
        print(f"{len(nodes)} nodes ready; {args.clients} clients generate for {args.duration:.0f}s", flush=True)

        coverage: list[tuple[float, int, int]] = []
        stop = threading.Event()
        watcher = threading.Thread(target=watch_coverage, args=(url, model_dir.name, coverage, stop), daemon=True)
        watcher.start()
        churn = threading.Thread(target=churn_loop, args=(args, nodes, dead, coordinators, join, stop), daemon=True)
        started = time.monotonic()
        churn.start()
        results = asyncio.run(
            run_clients(args, model_dir, maddrs[-1:] if args.coordinators > 1 else maddrs, references, started)
        )
        stop.set()
        churn.join(30)
        report(args, results, failovers.count, joins, coverage, nodes + dead, time.monotonic() - started)
        ok = results["wrong"] == 0 and results["failed"] == 0 and results["done"] > 0
    finally:
        for node in nodes:
            node.stop(signal.SIGKILL, timeout=5)
        for c in coordinators:
            c.stop(timeout=5)
    sys.exit(0 if ok else 1)


class FailoverCounter(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "re-routing" in record.getMessage():
            self.count += 1


def reference_outputs(model_dir: Path, max_new_tokens: int) -> dict[str, list[int]]:
    """The all-healthy output of each prompt: plain transformers, greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out[prompt] = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0].tolist()
    return out


async def run_clients(args, model_dir: Path, maddrs: list[str], references: dict, started: float) -> dict:
    from torchnode.client.model import AsyncDistributedModel

    models = [
        await AsyncDistributedModel.from_pretrained(str(model_dir), initial_peers=maddrs)
        for _ in range(args.client_dhts)
    ]
    results = {"done": 0, "wrong": 0, "failed": 0, "errors": [], "latency": [], "route_ms": []}
    deadline = started + args.duration

    async def client(i: int) -> None:
        model = models[i % len(models)]
        for n in itertools.count():
            if time.monotonic() > deadline:
                return
            prompt = PROMPTS[(i + n) % len(PROMPTS)]
            t0 = time.monotonic()
            try:
                ids = await model.generate(prompt, max_new_tokens=args.max_new_tokens)
            except Exception as e:  # counted and reported: the goal is that none happens
                results["failed"] += 1
                results["errors"].append(repr(e)[:300])
                continue
            results["latency"].append(time.monotonic() - t0)
            if ids.reshape(-1).tolist() == references[prompt]:
                results["done"] += 1
            else:
                results["wrong"] += 1

    async def time_routes() -> None:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                await models[0].route()
                results["route_ms"].append((time.perf_counter() - t0) * 1000)
            except Exception as e:
                results["errors"].append(f"route: {e!r}"[:300])
            await asyncio.sleep(10)

    try:
        await asyncio.gather(*(client(i) for i in range(args.clients)), time_routes())
    finally:
        for model in models:
            await model.close()
    return results


def churn_loop(args, nodes: list, dead: list, coordinators: list, join, stop: threading.Event) -> None:
    """Every tick: a new node joins (at most 2 joining at once), and, while the swarm holds its full count
    of ready nodes, one node dies, SIGKILL and SIGTERM in turn, chosen among those whose blocks other
    ready nodes also serve (churn, not an outage: the goal is that clients never notice)."""
    started, kills, coordinator_killed = time.monotonic(), 0, len(coordinators) < 2
    while not stop.wait(args.churn_every):
        if not coordinator_killed and time.monotonic() - started > args.duration / 2:
            print(f"[{time.monotonic() - started:5.0f}s] SIGKILL coordinator 1 of {len(coordinators)}", flush=True)
            coordinators[0].stop(signal.SIGKILL)
            coordinator_killed = True
        ready = [n for n in nodes if n.proc.poll() is None and n.start >= 0]
        joining = [n for n in nodes if n.proc.poll() is None and n.start < 0]
        spare = [
            n
            for n in ready
            if all(any(o is not n and o.start <= b < o.end for o in ready) for b in range(n.start, n.end))
        ]
        if len(ready) >= args.nodes and spare:
            victim = random.choice(spare)
            sig = signal.SIGKILL if kills % 2 == 0 else signal.SIGTERM
            victim.traffic, victim.died = p2pd_bytes(victim), time.monotonic()
            victim.stop(sig, timeout=20)
            nodes.remove(victim)
            dead.append(victim)
            kills += 1
        if len(joining) < 2:
            fresh = join()
            nodes.append(fresh)
            threading.Thread(target=wait_quietly, args=(fresh, stop), daemon=True).start()
    print(f"churn: {kills} nodes killed ({(kills + 1) // 2} SIGKILL, {kills // 2} SIGTERM)", flush=True)


def wait_quietly(node: NodeProcess, stop: threading.Event) -> None:
    try:
        wait_ready(node, timeout=300)
        node.ready_at = time.monotonic()
    except Exception as e:
        if not stop.is_set():  # at the end, nodes still joining are stopped: not a failure
            print(f"a joining node failed: {e}"[:500], flush=True)


def p2pd_bytes(node: NodeProcess) -> int | None:
    """Bytes read + written so far by the node's p2pd (its DHT transport; gRPC runs in the node itself)."""
    try:
        for child in psutil.Process(node.proc.pid).children(recursive=True):
            if "p2pd" in child.name():
                io = child.io_counters()
                return io.read_chars + io.write_chars
    except (psutil.Error, AttributeError):
        return None
    return None


def watch_coverage(url: str, model: str, out: list, stop: threading.Event) -> None:
    started = time.monotonic()
    while not stop.wait(2.0):
        try:
            with urllib.request.urlopen(url + "api/v1/state", timeout=5) as r:
                state = json.load(r)
        except Exception:
            continue
        m = next((m for m in state["models"] if m["name"] == model), None)
        if m:
            online = sum(n["health"] == "healthy" and n["state"] == "online" for n in m["nodes"])
            out.append((time.monotonic() - started, online, min((b["servers"] for b in m["blocks"]), default=0)))


def report(args, results, failovers, joins, coverage, all_nodes, elapsed) -> None:
    lat, routes = results["latency"], results["route_ms"]
    join_s = [n.ready_at - n.spawned for n, _ in joins if hasattr(n, "ready_at")]
    initial = [n for n, _ in joins[: args.nodes]]
    for n in all_nodes:
        if not hasattr(n, "traffic"):
            n.traffic, n.died = p2pd_bytes(n), time.monotonic()
    rates = [n.traffic / (n.died - n.spawned) for n in all_nodes if getattr(n, "traffic", None)]
    print("\n=== churn benchmark ===")
    print(
        f"scale: {args.nodes} nodes x {elapsed:.0f}s, {args.clients} clients over {args.client_dhts} DHT clients, "
        f"{args.coordinators} coordinator(s), a kill + a join every {args.churn_every:g}s"
    )
    print(
        f"generations: {results['done']} correct, {results['wrong']} wrong, {results['failed']} failed "
        f"({args.max_new_tokens} tokens each; median {statistics.median(lat) if lat else float('nan'):.2f}s)"
    )
    print(f"failovers (client re-routes): {failovers}")
    if routes:
        print(
            f"route time: median {statistics.median(routes):.0f} ms, max {max(routes):.0f} ms ({len(routes)} samples)"
        )
    if join_s:
        print(
            f"join-to-online (churn joins): median {statistics.median(join_s):.1f}s, max {max(join_s):.1f}s "
            f"({len(join_s)} joins); initial {len(initial)} nodes started together"
        )
    if coverage:
        print(
            f"coverage: healthy online nodes min {min(c[1] for c in coverage)} / median "
            f"{statistics.median(c[1] for c in coverage):.0f}; fewest replicas of a block: min "
            f"{min(c[2] for c in coverage)}, median {statistics.median(c[2] for c in coverage):.0f}"
        )
        step = max(1, len(coverage) // 12)
        print("  t(s) online min-replicas: " + "  ".join(f"{t:.0f}:{o}/{r}" for t, o, r in coverage[::step]))
    if rates:
        print(
            f"DHT traffic per node (p2pd bytes read+written): median {statistics.median(rates) / 1024:.1f} KiB/s, "
            f"max {max(rates) / 1024:.1f} KiB/s over {len(rates)} nodes"
        )
    for e in results["errors"][:5]:
        print("error:", e)


if __name__ == "__main__":
    main()
