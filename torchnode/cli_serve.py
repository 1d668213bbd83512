"""Commands that serve: `join` (a node), `coordinator` (bootstrap peer, dashboard, relay), `dashboard`."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from torchnode.coordinator.evidence_store import DEFAULT_MAX_BYTES as DEFAULT_EVIDENCE_BYTES
from torchnode.coordinator.evidence_store import DEFAULT_MAX_FILES as DEFAULT_EVIDENCE_FILES
from torchnode.node.config import NodeConfig

if TYPE_CHECKING:
    from torchnode.coordinator.dashboard import DashboardConfig

from .cli_groups import flag_help, option_groups
from .cli_options import (
    AllowKeys,
    ChatUrl,
    CheckModels,
    CreditCapFactor,
    EvidenceMaxBytes,
    EvidenceMaxFiles,
    HttpHost,
    HttpPort,
    Insecure,
    LimitFlags,
    Refresh,
    RelayFlags,
    ShownModels,
    SpeedProbe,
    SwarmFlags,
    VolunteersFile,
    allow_keys_of,
    err,
    evidence_limits,
    parse_adapters,
    parse_blocks,
    parse_device,
    parse_dtype,
    size_text,
    split_peers,
    swarm_peers,
    user_errors,
    warn_if_insecure,
)

EVIDENCE_BYTES_TEXT = size_text(DEFAULT_EVIDENCE_BYTES)  # --evidence-max-bytes' default


@dataclass(frozen=True)
class DashboardFlags:
    """The dashboard's flags, on `coordinator --dashboard` and on `dashboard`: declared once, made into the
    DashboardConfig both run (coordinator/dashboard.py; tests/test_options.py holds these defaults to its own)."""

    http_host: HttpHost = "127.0.0.1"
    http_port: HttpPort = 8080
    model: ShownModels = None
    refresh: Refresh = 5.0
    check_model: CheckModels = None
    evidence_max_bytes: EvidenceMaxBytes = EVIDENCE_BYTES_TEXT
    evidence_max_files: EvidenceMaxFiles = DEFAULT_EVIDENCE_FILES
    chat_url: ChatUrl = None
    volunteers_file: VolunteersFile = None
    credit_cap_factor: CreditCapFactor = 64.0
    speed_probe: SpeedProbe = True

    def config(self, insecure: bool) -> DashboardConfig:
        """The monitor's and dashboard's settings; a bad value raises naming its flag."""
        from torchnode.coordinator.dashboard import DashboardConfig

        return DashboardConfig(
            tuple(self.model or ()),
            self.http_host,
            self.http_port,
            self.refresh,
            insecure=insecure,
            speed_probe=self.speed_probe,
            check_models=tuple(self.check_model or ()),
            evidence=evidence_limits(self.evidence_max_bytes, self.evidence_max_files),
            chat_url=self.chat_url,
            volunteers_file=self.volunteers_file,
            credit_cap_factor=self.credit_cap_factor,
        )


def _node(name: str) -> str:
    return flag_help(NodeConfig, name)


@option_groups
def join(
    model: Annotated[str, typer.Argument(help="'default', a local directory, a .gguf file, or a hub id")],
    blocks: Annotated[
        str | None, typer.Option(help="span to serve, START:END (END exclusive) [default: chosen by the swarm, or all]")
    ] = None,
    *,
    swarm: SwarmFlags,
    host: Annotated[str, typer.Option(help=_node("host"))] = NodeConfig.host,
    port: Annotated[int, typer.Option(help=_node("port"))] = NodeConfig.port,
    dtype: Annotated[str, typer.Option(help=_node("dtype"))] = "auto",
    quant: Annotated[str, typer.Option(help=_node("quant"))] = NodeConfig.quant,
    device: Annotated[str, typer.Option(help=_node("device"))] = str(NodeConfig.device),
    huge_pages: Annotated[bool, typer.Option(help=_node("huge_pages"))] = NodeConfig.huge_pages,
    identity: Annotated[
        Path | None, typer.Option(help="Ed25519 key file [default: ~/.torchnode/node-PORT.key]")
    ] = None,
    limits: LimitFlags,
    shutdown_grace: Annotated[float, typer.Option(min=0.0, help=_node("shutdown_grace"))] = NodeConfig.shutdown_grace,
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0: torch's default)")] = 0,
    insecure: Insecure = False,
    allow_keys: AllowKeys = None,
    adapters: Annotated[str, typer.Option(help=_node("adapters"))] = "",
    relay: RelayFlags,
) -> None:
    """Serve a span of a model's blocks, alone (for --peers clients) or in a swarm."""
    warn_if_insecure(insecure)
    adapter_list = parse_adapters(adapters)
    start, end = parse_blocks(blocks) if blocks is not None else (None, None)
    torch_dtype = None if dtype == "auto" else parse_dtype(dtype, "--dtype")
    torch_device = parse_device(device)
    from torchnode.models.quantization import QUANT_MODES

    if quant not in QUANT_MODES:
        raise typer.BadParameter(f"expected one of {', '.join(QUANT_MODES)}, got {quant!r}", param_hint="--quant")
    if quant == "nf4" and torch_device.type != "cuda":
        raise typer.BadParameter(
            f"nf4 runs on CUDA only (bitsandbytes); this node is on {torch_device}: use int4", param_hint="--quant"
        )
    swarm_config = swarm.config(relay)
    if swarm.num_blocks is not None and blocks is not None:
        raise typer.BadParameter("--num-blocks applies only when the swarm chooses the span", param_hint="--num-blocks")
    from torchnode.models import torch_threads
    from torchnode.node.server import serve
    from torchnode.protocol.wire.identity import torchnode_home

    torch_threads.set_threads(threads)
    torch_threads.keep_thread_light()  # the event loop's thread: the runner computes (models/torch_threads.py)
    config = NodeConfig(
        model=model,
        start=start,
        end=end,
        host=host,
        port=port,
        dtype=torch_dtype,
        quant=quant,
        device=torch_device,
        huge_pages=huge_pages,
        identity_path=identity or torchnode_home() / f"node-{port}.key",
        limits=limits.limits(),
        shutdown_grace=shutdown_grace,
        swarm=swarm_config,
        insecure=insecure,
        allow_keys=allow_keys_of(allow_keys),
        adapters=adapter_list,
    )
    logging.basicConfig(level=logging.WARNING)
    with user_errors():
        asyncio.run(serve(config, on_status=lambda m: err.print(f"[bold cyan]node[/] {m}", soft_wrap=True)))
    # Everything the node owns is stopped by now; a helper thread stuck in a third-party call (the DHT's
    # process, a torch pool) must not keep the process alive, so skip interpreter shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@option_groups
def coordinator(
    host: Annotated[str, typer.Option(help="address to listen on; 0.0.0.0 exposes the DHT peer")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="DHT (p2pd) port")] = 31337,
    announce_host: Annotated[str | None, typer.Option(help="address others dial [default: --host]")] = None,
    initial_peers: Annotated[str, typer.Option(help="other peers to connect to (another coordinator, a node)")] = "",
    dashboard: Annotated[
        bool, typer.Option("--dashboard", help="also run the health monitor and web dashboard")
    ] = False,
    insecure: Insecure = False,
    allow_keys: AllowKeys = None,
    *,
    board: DashboardFlags,
    relay: RelayFlags,
    identity: Annotated[
        Path | None, typer.Option(help="the relay's Ed25519 key file [default: ~/.torchnode/relay-PORT.key]")
    ] = None,
) -> None:
    """Run a bootstrap DHT peer (prints the multiaddr others pass as --initial-peers), optionally with the dashboard."""
    warn_if_insecure(insecure)
    from torchnode.coordinator.bootstrap import run_bootstrap

    status = lambda m: err.print(f"[bold magenta]coordinator[/] {m}", soft_wrap=True)  # noqa: E731
    with user_errors():
        dashboard_config = board.config(insecure) if dashboard else None
        relay_setup = None
        relay_limits = relay.limits()
        if relay_limits is not None:
            from torchnode.node.relay import RelaySetup
            from torchnode.protocol.wire.identity import torchnode_home

            key = identity or torchnode_home() / f"relay-{port}.key"
            relay_setup = RelaySetup(key, relay.relay_port, relay_limits)
        asyncio.run(
            run_bootstrap(
                host,
                port,
                announce_host,
                split_peers(initial_peers),
                on_status=status,
                dashboard=dashboard_config,
                allow_keys=allow_keys_of(allow_keys),
                relay=relay_setup,
            )
        )


@option_groups
def dashboard_command(
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of swarm peers")] = "",
    insecure: Insecure = False,
    allow_keys: AllowKeys = None,
    *,
    board: DashboardFlags,
) -> None:
    """Run the health monitor and web dashboard (/, /api/v1/state, /metrics) on its own DHT client."""
    warn_if_insecure(insecure)
    peers = swarm_peers(initial_peers)
    from torchnode.coordinator.dashboard import run_dashboard

    status = lambda m: err.print(f"[bold magenta]dashboard[/] {m}", soft_wrap=True)  # noqa: E731
    with user_errors():
        asyncio.run(
            run_dashboard(peers, board.config(insecure), on_status=status, allow_keys=allow_keys_of(allow_keys))
        )
