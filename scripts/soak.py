"""A node that runs for days: one `torchnode join` process under steady load, watched for leaks.

    .venv/bin/python scripts/soak.py                      # 30 minutes, 4 clients, the embedded SmolLM2
    .venv/bin/python scripts/soak.py --duration 600 --csv soak.csv

The node starts its own swarm (`--new-swarm`: its DHT peer and announcer run, as for a volunteer) and serves
every block. Client workers in this process loop over four kinds of sessions, one after another:
  complete   a greedy generation through the SDK, compared token for token with plain transformers;
  abandoned  a session opened on a channel of its own, two steps, then the channel closed mid-stream;
  refused    a session the node must refuse (max_length above --max-session-tokens);
  malformed  a stateless Forward with hidden states of the wrong width (INVALID_ARGUMENT).
Every --sample-every seconds it samples the node's process tree (the node, its DHT process and p2pd): RSS,
open file descriptors, threads, and the asyncio tasks of the node's event loop (from its signed Info). After
the warm-up, each metric's median over the last tenth of the samples must be within --max-growth (5 %) of
its median over the first tenth (fds excepted: under load they follow the connections in flight, whose sockets
close up to ~30 s after their channel), and so must every metric at rest: sampled after --rest seconds without
load once the warm-up is over, and again at the end; every complete generation must equal transformers'.
Exit 0 when all of that holds.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

PROMPTS = (
    "The capital of France is",
    "Once upon a time, a little robot",
    "Three good reasons to cook at home:",
    "def fibonacci(n):",
)
METRICS = ("rss_mib", "fds", "threads", "asyncio_tasks")
KINDS = ("complete", "complete", "abandoned", "complete", "refused", "malformed")
MIN_WINDOW = 3  # samples whose median opens and closes the comparison: a tenth of them, at least this many


@dataclass
class Options:
    model: str = "default"
    duration: float = 1800.0  # seconds of load
    clients: int = 4  # concurrent client workers
    sample_every: float = 10.0
    warmup: float = 0.0  # seconds before the first compared sample; 0: a fifth of the duration, at least 60 s
    max_new_tokens: int = 8
    max_growth: float = 0.05
    rest: float = 45.0  # seconds without load before each at-rest sample (closed channels' sockets close in ~30 s)
    csv: Path | None = None

    def __post_init__(self) -> None:
        self.warmup = self.warmup or max(60.0, self.duration / 5)


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)  # complete generations that differ from transformers
    unexpected: list[str] = field(default_factory=list)  # errors where none was due, or none where one was

    def add(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


def start_node(options: Options, home: Path) -> tuple[subprocess.Popen, str, list[str]]:
    env = {**os.environ, "TORCHNODE_HOME": str(home), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    cmd = [sys.executable, "-m", "torchnode", "join", options.model, "--new-swarm", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        for line in list(lines):
            if m := re.search(r"ready: serving blocks .* on ([\d.]+:\d+)", line):
                print(line.strip(), flush=True)
                return proc, m[1], lines
        time.sleep(0.2)
    raise RuntimeError(f"the node did not get ready:\n{''.join(lines)}")


def references(options: Options, ckpt) -> dict[str, list[int]]:
    """Plain transformers' greedy continuation of each prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        new = model.generate(
            ids, max_new_tokens=options.max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids)
        )
        out[prompt] = new[0, ids.shape[1] :].tolist()
    return out


async def worker(
    n: int, model, address: str, expected: dict[str, list[int]], stop: float, tally: Tally, gate: asyncio.Event
) -> None:
    from torchnode.protocol.wire.grpc_node import GrpcNodeClient
    from torchnode.protocol.wire.identity import Identity
    from torchnode.protocol.wire.node_client import NodeError, SessionSpec

    identity, total = Identity.generate(), model.total_blocks
    for i in itertools.count():
        await gate.wait()  # closed while the node rests for an at-rest sample
        if time.monotonic() >= stop:
            return
        kind, prompt = KINDS[(i + n) % len(KINDS)], PROMPTS[(i + n) % len(PROMPTS)]
        ids = model.encode(prompt)
        try:
            if kind == "complete":
                out = await model.generate(ids, max_new_tokens=len(expected[prompt]))
                got = out[0, ids.shape[1] :].tolist()
                if got != expected[prompt]:
                    tally.wrong.append(f"{prompt!r}: {got} != {expected[prompt]}")
            elif kind == "abandoned":  # a client that vanishes mid-stream: its channel closes under the session
                client = GrpcNodeClient(address, identity)
                session = client.open_session(SessionSpec(uuid.uuid4().hex, 0, total, ids.shape[1] + 8))
                x = model.head.embed(ids)
                await session.step(x, 0, timeout=60)
                await session.step(x[:, -1:], ids.shape[1], timeout=60)
                await client.close()
            elif kind == "refused":
                client = GrpcNodeClient(address, identity)
                session = client.open_session(SessionSpec(uuid.uuid4().hex, 0, total, 1 << 20))
                try:
                    await session.step(model.head.embed(ids), 0, timeout=60)
                    tally.unexpected.append("a session of 2^20 tokens was opened")
                except NodeError:
                    pass
                finally:
                    await client.close()
            else:  # malformed
                client = GrpcNodeClient(address, identity)
                try:
                    await client.train_forward(torch.zeros(1, 2, 3), 0, total, {}, 1.0, timeout=60)
                    tally.unexpected.append("a Forward of width 3 was answered")
                except NodeError:
                    pass
                finally:
                    await client.close()
        except Exception as e:  # noqa: BLE001 - any failure of a session that should work is counted
            tally.unexpected.append(f"{kind}: {e!r}")
        tally.add(kind)


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


async def sample(pid: int, address: str) -> dict[str, float]:
    from torchnode.protocol.wire.grpc_node import GrpcNodeClient
    from torchnode.protocol.wire.identity import Identity

    row = {"rss_mib": 0.0, "fds": 0, "threads": 0}
    for p in tree(pid):
        try:
            row["rss_mib"] += p.memory_info().rss / 2**20
            row["fds"] += p.num_fds()
            row["threads"] += p.num_threads()
        except psutil.NoSuchProcess:
            pass
    client = GrpcNodeClient(address, Identity.generate())
    try:
        row["asyncio_tasks"] = (await client.info(timeout=60)).asyncio_tasks
    finally:
        await client.close()
    return row


def window(rows: list[dict], warmup: float) -> int:
    """Samples per compared window: a tenth of those after the warm-up (fds and tasks move with the sessions
    in flight; a median over a wider window sees the trend, not the moment)."""
    after = sum(r["t"] >= warmup for r in rows)
    if after < 2 * MIN_WINDOW:
        raise RuntimeError(f"only {after} samples after the warm-up: run longer or sample more often")
    return max(MIN_WINDOW, after // 10)


def growth(rows: list[dict], metric: str, warmup: float) -> tuple[float, float, float]:
    """(median of the first window after the warm-up, of the last window, relative growth)."""
    after, n = [r[metric] for r in rows if r["t"] >= warmup], window(rows, warmup)
    first, last = statistics.median(after[:n]), statistics.median(after[-n:])
    return first, last, (last - first) / first if first else 0.0


async def soak(options: Options) -> tuple[list[dict], Tally, int | None, list[str]]:
    """Runs the node under load; (samples, what the clients saw, the node's exit code, its output)."""
    from torchnode.client.model import AsyncDistributedModel
    from torchnode.models.checkpoint import resolve

    ckpt = resolve(options.model)
    expected = references(options, ckpt)
    home = Path(tempfile.mkdtemp(prefix="torchnode-soak-"))
    proc, address, log = start_node(options, home)
    tally, rows, at_rest = Tally(), [], []
    try:
        models = [
            await AsyncDistributedModel.from_pretrained(options.model, [address], identity_path=home / f"c{n}.key")
            for n in range(options.clients)
        ]
        started = time.monotonic()
        stop, gate, rested = started + options.duration, asyncio.Event(), False
        gate.set()
        workers = [
            asyncio.create_task(worker(n, m, address, expected, stop, tally, gate)) for n, m in enumerate(models)
        ]
        print(f"{'t s':>6} " + " ".join(f"{m:>13}" for m in METRICS) + "  sessions", flush=True)
        while time.monotonic() < stop and proc.poll() is None:
            row = {"t": time.monotonic() - started} | await sample(proc.pid, address)
            rows.append(row)
            done = sum(tally.counts.values())
            print(f"{row['t']:6.0f} " + " ".join(f"{row[m]:13.1f}" for m in METRICS) + f"  {done}", flush=True)
            if not rested and row["t"] >= options.warmup:
                rested = True
                at_rest.append(await rest(options, proc.pid, address, gate))
                gate.set()
            await asyncio.sleep(max(0.0, options.sample_every - (time.monotonic() - started - row["t"])))
        await asyncio.gather(*workers)
        at_rest.append(await rest(options, proc.pid, address, gate))
        for m in models:
            await m.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        shutil.rmtree(home, ignore_errors=True)  # the node's and the clients' throwaway keys
    return rows, at_rest, tally, proc.returncode, log


async def rest(options: Options, pid: int, address: str, gate: asyncio.Event) -> dict[str, float]:
    """A sample with no load for `options.rest` seconds first: what the node holds when idle."""
    gate.clear()
    print(f"resting {options.rest:.0f} s (no new sessions) for an at-rest sample", flush=True)
    await asyncio.sleep(options.rest)
    row = await sample(pid, address)
    print("at rest: " + ", ".join(f"{m} {row[m]:.1f}" for m in METRICS), flush=True)
    return row


def report(
    options: Options, rows: list[dict], at_rest: list[dict], tally: Tally, exit_code: int | None, log: list[str]
) -> int:
    ok = True
    print(f"sessions: {tally.counts}; wrong generations: {len(tally.wrong)}; unexpected: {len(tally.unexpected)}")
    for line in tally.wrong[:5] + tally.unexpected[:5]:
        print(f"  {line}")
    ok &= not tally.wrong and not tally.unexpected and tally.counts.get("complete", 0) > 0
    if exit_code not in (None, 0, -signal.SIGTERM):
        print(f"the node exited with {exit_code}:\n{''.join(log[-20:])}")
        ok = False
    n = window(rows, options.warmup)
    print(f"growth after the {options.warmup:.0f} s warm-up (median of the first {n} samples -> of the last {n}):")
    for metric in METRICS:
        first, last, g = growth(rows, metric, options.warmup)
        passed = g < options.max_growth
        ok &= passed or metric == "fds"  # under load, fds follow the connections in flight; at rest they must not grow
        print(f"  {metric:14} {first:10.1f} -> {last:10.1f}  {g:+7.2%}  {'ok' if passed else 'GROWS'}")
    if len(at_rest) == 2:
        print(f"at rest ({options.rest:.0f} s without load), after the warm-up -> at the end:")
        for metric in METRICS:
            first, last = at_rest[0][metric], at_rest[1][metric]
            g = (last - first) / first if first else 0.0
            ok &= g < options.max_growth
            print(
                f"  {metric:14} {first:10.1f} -> {last:10.1f}  {g:+7.2%}  {'ok' if g < options.max_growth else 'GROWS'}"
            )
    else:
        ok = False
        print("no at-rest samples: the node stopped before the warm-up ended")
    print("soak: passed" if ok else "soak: FAILED")
    return 0 if ok else 1


def main() -> int:
    defaults = Options()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--duration", type=float, default=defaults.duration, help="seconds of load")
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--sample-every", type=float, default=defaults.sample_every, help="seconds")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds; 0: a fifth of --duration, >= 60")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--max-growth", type=float, default=defaults.max_growth, help="allowed relative growth")
    parser.add_argument("--rest", type=float, default=defaults.rest, help="seconds without load before at-rest samples")
    parser.add_argument("--csv", type=Path, default=None, help="write every sample here")
    args = parser.parse_args()
    options = Options(**vars(args))
    rows, at_rest, tally, exit_code, log = asyncio.run(soak(options))
    if options.csv:
        with open(options.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["t", *METRICS])
            writer.writeheader()
            writer.writerows(rows)
    return report(options, rows, at_rest, tally, exit_code, log)


if __name__ == "__main__":
    sys.exit(main())
