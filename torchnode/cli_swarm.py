"""Commands that look at a swarm or a key: `swarm`, `models`, `identity`, `check-evidence`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from torchnode.protocol.version import protocol

from .cli_options import (
    AllowKeys,
    Insecure,
    allow_keys_of,
    err,
    swarm_peers,
    user_errors,
    warn_if_insecure,
)


def swarm(
    model: Annotated[str, typer.Argument(help="the model to look up ('default', a path, or a hub id)")],
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of swarm peers")] = "",
    insecure: Insecure = False,
    allow_keys: AllowKeys = None,
) -> None:
    """Show which node serves which blocks, its state, throughput, RTT and link, and whether all blocks are covered."""
    warn_if_insecure(insecure)
    peers = swarm_peers(initial_peers)
    from rich.table import Table

    from torchnode.coordinator.health_monitor import scan_once
    from torchnode.models.checkpoint import swarm_name

    allowed = allow_keys_of(allow_keys)
    name = swarm_name(model)  # no weights needed: the table comes from the DHT and the nodes

    with user_errors():
        state = asyncio.run(scan_once(peers, [name], insecure, allowed))
    view = next((m for m in state.models if m.name == name), None)
    if view is None:
        err.print(f"[red]error:[/] the swarm has no record of {name!r}" + (f" ({state.error})" if state.error else ""))
        raise typer.Exit(1)
    table = Table(title=f"{view.name} · {view.total_blocks} blocks")
    columns = ("peer", "address", "via", "blocks", "state", "health", "tokens/s", "RTT ms", "link", "protocol")
    for column in columns:
        table.add_column(column, justify="right" if column in ("tokens/s", "RTT ms") else "left")
    for n in view.nodes:
        rtt = f"{n.rtt_ms:.1f}" if n.rtt_ms is not None else "[red]-[/]"
        health = n.health if n.problem is None else f"{n.health}: {n.problem}"
        link = "-" if n.encrypted is None else "TLS" if n.encrypted else "[red]plaintext[/]"
        via = f"relay {n.relay[:12]}" if n.relay else "direct"  # behind a NAT: reached through that relay
        speaks = protocol_cell(n.protocol, n.outdated, n.newer)
        table.add_row(
            n.short_id, n.address, via, f"{n.start}:{n.end}", n.state, health, f"{n.throughput:.1f}", rtt, link, speaks
        )
    console = Console()
    console.print(table)
    if any(n.outdated or n.newer for n in view.nodes):
        console.print(f"protocol: this torchnode speaks {protocol()}; nodes of another major serve no client of it")
    if view.ready:
        console.print(f"[green]all {view.total_blocks} blocks covered[/]")
    else:
        console.print(
            f"[red]not covered:[/] blocks {view.missing_ranges or '(unknown model size)'}; generation is not possible"
        )


def protocol_cell(speaks: str, outdated: bool, newer: bool) -> str:
    """A node's protocol version, marked when this release cannot use it."""
    if outdated:
        return f"[red]{speaks} outdated[/]"
    return f"[yellow]{speaks} newer: upgrade[/]" if newer else speaks


def outdated_note(nodes: list) -> str:
    """How many of a model's nodes speak an older (or newer) protocol major than this release, if any."""
    old, new = sum(n.outdated for n in nodes), sum(n.newer for n in nodes)
    return (f" [red]{old} outdated[/]" if old else "") + (f" [yellow]{new} newer: upgrade[/]" if new else "")


def models_command(
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of swarm peers")] = "",
    insecure: Insecure = False,
    allow_keys: AllowKeys = None,
) -> None:
    """List every model the swarm serves (from the DHT model index): coverage, nodes, ready or not."""
    warn_if_insecure(insecure)
    peers = swarm_peers(initial_peers)
    from rich.table import Table

    from torchnode.coordinator.health_monitor import scan_once

    with user_errors():
        state = asyncio.run(scan_once(peers, insecure=insecure, allow_keys=allow_keys_of(allow_keys)))
    table = Table(title=f"{len(state.models)} model(s) in the swarm")
    for column in ("model", "family", "blocks covered", "nodes", "tokens/s", "ready"):
        table.add_column(column, justify="right" if column in ("nodes", "tokens/s") else "left")
    for m in state.models:
        covered = sum(b.servers > 0 for b in m.blocks)
        healthy = sum(n.health == "healthy" for n in m.nodes)
        ready = "[green]ready[/]" if m.ready else f"[red]no[/] (missing {m.missing_ranges or 'unknown'})"
        table.add_row(
            m.name,
            m.family or "-",
            f"{covered}/{m.total_blocks}",
            f"{healthy}/{len(m.nodes)}{outdated_note(m.nodes)}",
            f"{m.bottleneck_throughput:.1f}",
            ready,
        )
    Console().print(table)
    if state.error:
        err.print(f"[red]error:[/] {state.error}")
        raise typer.Exit(1)


def identity(
    identity: Annotated[
        Path | None, typer.Option(help="key file [default: ~/.torchnode/identity.key, the client's]")
    ] = None,
) -> None:
    """Print this key's public key (64 hex digits, as --allow-keys files list them), creating the key if missing."""
    from torchnode.protocol.wire.identity import Identity

    with user_errors():
        print(Identity.load_or_create(identity).public_key.hex())


def check_evidence_command(
    file: Annotated[Path, typer.Argument(help="an evidence file (from $TORCHNODE_HOME/evidence/)")],
    model: Annotated[
        str,
        typer.Argument(help="the model it is about ('default', a path, or a hub id): its weights recompute the span"),
    ],
    adapter: Annotated[
        str, typer.Option(help="the LoRA adapter (directory or hub id) the session used, if it used one")
    ] = "",
) -> None:
    """Check a fraud proof: verify the node's signatures and recompute its span locally. Exit 0: the node
    signed a wrong output (proven); 2: every signed output is right; 1: not a valid evidence file."""
    from torchnode.client.verification.evidence import check_evidence
    from torchnode.models.checkpoint import resolve

    with user_errors():  # EvidenceError is a ValueError: one red line, exit 1
        verdict = check_evidence(file, resolve(model), adapter or None)
    print(verdict.message)
    raise typer.Exit(0 if verdict.proven else 2)
