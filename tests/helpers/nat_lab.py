"""A home network behind a NAT, built from network namespaces for one test run, and always removed.

    public ns  (coordinator, relays, client)   198.18.0.1/24  -- veth --  198.18.0.254  router ns
    home ns    (the volunteer's node)          198.19.0.1/24  -- veth --  198.19.0.254  router ns

The router forwards with iptables MASQUERADE toward the public side and drops every connection that
starts on the public side, as a home router does: the home node can dial out, nobody can dial in. The
public side even has a route to the home subnet, so inbound attempts do reach the router and die there.
Only addresses in 198.18.0.0/15 (set aside for test networks) and only namespaces made here are
touched; the machine's own interfaces never are. Needs root, `ip netns` and iptables.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

PUBLIC_IP, ROUTER_PUBLIC_IP = "198.18.0.1", "198.18.0.254"
HOME_IP, ROUTER_HOME_IP = "198.19.0.1", "198.19.0.254"


def unavailable() -> str | None:
    """Why a NAT lab cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if shutil.which("iptables") is None:
        return "iptables is not installed (apt-get install iptables)"
    probe = f"tnprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "`ip netns add` fails here (no namespace support)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass(frozen=True)
class Lab:
    public: str  # namespace names
    router: str
    home: str

    def exec(self, ns: str) -> list[str]:
        """The command prefix that runs a program inside namespace `ns`."""
        return ["ip", "netns", "exec", ns]

    def can_dial(self, ns: str, host: str, port: int, timeout: float = 2.0) -> bool:
        """Whether a TCP connection from `ns` to host:port gets through."""
        code = f"import socket; socket.create_connection(({host!r}, {port}), timeout={timeout}).close()"
        return subprocess.run([*self.exec(ns), "python3", "-c", code], capture_output=True).returncode == 0


def _run(*cmd: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")


@contextlib.contextmanager
def nat_lab() -> Iterator[Lab]:
    tag = f"{os.getpid() % 100000}"
    lab = Lab(f"tn{tag}pub", f"tn{tag}rtr", f"tn{tag}home")
    try:
        for ns in (lab.public, lab.router, lab.home):
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        # veth pairs are made inside the namespaces (never in the machine's own)
        _run(
            "ip",
            "-n",
            lab.public,
            "link",
            "add",
            f"tn{tag}p",
            "type",
            "veth",
            "peer",
            "name",
            "rp",
            "netns",
            lab.router,
        )
        _run(
            "ip", "-n", lab.home, "link", "add", f"tn{tag}h", "type", "veth", "peer", "name", "rh", "netns", lab.router
        )
        for ns, dev, addr in (
            (lab.public, f"tn{tag}p", f"{PUBLIC_IP}/24"),
            (lab.router, "rp", f"{ROUTER_PUBLIC_IP}/24"),
            (lab.router, "rh", f"{ROUTER_HOME_IP}/24"),
            (lab.home, f"tn{tag}h", f"{HOME_IP}/24"),
        ):
            _run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        _run("ip", "-n", lab.home, "route", "add", "default", "via", ROUTER_HOME_IP)
        _run("ip", "-n", lab.public, "route", "add", "198.19.0.0/24", "via", ROUTER_PUBLIC_IP)
        router = [*lab.exec(lab.router)]
        _run(*router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        _run(*router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "rp", "-j", "MASQUERADE")
        _run(
            *router,
            "iptables",
            "-A",
            "FORWARD",
            "-i",
            "rp",
            "-o",
            "rh",
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        )
        _run(*router, "iptables", "-A", "FORWARD", "-i", "rp", "-o", "rh", "-j", "DROP")
        yield lab
    finally:
        for ns in (lab.home, lab.router, lab.public):  # deleting a namespace deletes its veths and rules
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def free_port(lab: Lab, ns: str, host: str) -> int:
    """A port free on `host` inside `ns` (ports are per namespace)."""
    code = f"import socket; s=socket.socket(); s.bind(({host!r}, 0)); print(s.getsockname()[1])"
    return int(
        subprocess.run([*lab.exec(ns), "python3", "-c", code], capture_output=True, text=True, check=True).stdout
    )


def listen_forever_code(host: str, port: int) -> str:
    """Python for a TCP listener (the lab's self-check: is inbound into `home` really dropped?)."""
    return f"import socket,time; s=socket.socket(); s.bind(({host!r},{port})); s.listen(); time.sleep(30)"


__all__ = ["Lab", "nat_lab", "unavailable", "free_port", "listen_forever_code", "PUBLIC_IP", "HOME_IP"]
