"""Real node processes for tests: started with the `torchnode` CLI, on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

READY = re.compile(r"ready: serving blocks (\d+):(\d+) .* on ([\d.]+):(\d+) as peer (\w+)")
TORCHNODE = [sys.executable, "-m", "torchnode"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NodeProcess:
    proc: subprocess.Popen
    port: int
    lines: list[str] = field(default_factory=list)
    peer_id: str = ""
    start: int = -1
    end: int = -1

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := regex.search(line):
                    return m
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log}")
            time.sleep(0.05)
        raise TimeoutError(f"no {pattern!r} from node within {timeout}s:\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Sends `sig`, waits, and then kills whatever is left of the process group (DHT child, p2pd)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


def start_node(
    model: str, *args: str, port: int | None = None, env: dict | None = None, wait: bool = True
) -> NodeProcess:
    """`torchnode join MODEL --port P ARGS...`; waits for its ready line unless wait=False."""
    port = port or free_port()
    node = spawn([*TORCHNODE, "join", model, "--port", str(port), *args], port, env)
    if wait:
        wait_ready(node)
    return node


def start_coordinator(*args: str, env: dict | None = None) -> tuple[NodeProcess, str]:
    """`torchnode coordinator --port P`; returns the process and the multiaddr to pass as --initial-peers."""
    port = free_port()
    proc = spawn([*TORCHNODE, "coordinator", "--port", str(port), *args], port, env)
    return proc, proc.wait_for(r"ready: --initial-peers (\S+)", 60)[1]


def spawn(cmd: list[str], port: int, env: dict | None) -> NodeProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, start_new_session=True
    )  # its own process group, so stop() can clean up its children too
    node = NodeProcess(proc, port)

    def pump() -> None:
        for line in proc.stdout:
            node.lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return node


def wait_ready(node: NodeProcess, timeout: float = 180) -> NodeProcess:
    m = node.wait_for(READY.pattern, timeout)
    node.start, node.end, node.peer_id = int(m[1]), int(m[2]), m[5]
    return node


def start_nodes(model: str, spans: list[str], *args: str, env: dict | None = None) -> list[NodeProcess]:
    """Starts all nodes at once (they load in parallel), then waits for each."""
    nodes = [start_node(model, "--blocks", span, *args, env=env, wait=False) for span in spans]
    try:
        for node in nodes:
            wait_ready(node)
    except Exception:
        stop_all(nodes)
        raise
    return nodes


def stop_all(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
    for node in nodes:
        node.stop()


async def node_infos(addresses: list[str]) -> list:
    """Each node's signed Info (NodeInfo), read over the wire."""
    from torchnode.protocol.wire.grpc_node import GrpcNodeClient
    from torchnode.protocol.wire.identity import Identity

    infos = []
    for address in addresses:
        client = GrpcNodeClient(address, Identity.generate())
        infos.append(await client.info())
        await client.close()
    return infos


def mean_batch(before: list, after: list) -> float:
    """The nodes' mean batch between two `node_infos` reads: sequences run / batches run in between. Read
    before and after a run, so nothing polls the nodes while it runs (0.0: no batch ran)."""
    batches = sum(a.batches_run - b.batches_run for a, b in zip(after, before, strict=True))
    sequences = sum(a.sequences_run - b.sequences_run for a, b in zip(after, before, strict=True))
    return sequences / batches if batches else 0.0


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([*TORCHNODE, *args], capture_output=True, text=True, env=full_env, timeout=timeout)
