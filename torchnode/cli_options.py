"""Options and helpers every `torchnode` command shares: the option groups (client, swarm, limits, relay), each
declared once with its defaults and help read from the dataclasses the node and client use; parsing sizes,
devices, peers and keys; one place that turns user-fixable errors into a red line; connecting a client.

Nothing here imports torch at import time: `torchnode --help` stays fast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from torchnode.client.config import WIRE_DTYPES, ClientConfig, GenerationOptions
from torchnode.node.config import REACHABLE_MODES, NodeConfig, SwarmConfig
from torchnode.node.limits import Limits, RelayLimits

from .cli_groups import flag_help

if TYPE_CHECKING:
    import torch

    from torchnode.client.sync_model import DistributedModel

err = Console(stderr=True)

DTYPES = WIRE_DTYPES


def parse_adapters(text: str) -> tuple[str, ...]:
    """--adapters A,B: each checked now (files there, config a LoRA, weights readable), as a line naming the flag."""
    from torchnode.models.lora import AdapterError, find_adapter

    names = tuple(a.strip() for a in text.split(",") if a.strip())
    for source in names:
        try:
            find_adapter(source)
        except AdapterError as e:
            raise typer.BadParameter(str(e), param_hint="--adapters") from None
    return names


def parse_blocks(text: str) -> tuple[int, int | None]:
    """'0:15' -> (0, 15); '15:' -> (15, None), to the last block."""
    try:
        start_text, end_text = text.split(":")
        start = int(start_text)
        end = int(end_text) if end_text else None
    except ValueError:
        raise typer.BadParameter(f"expected START:END such as 0:15, got {text!r}", param_hint="--blocks") from None
    if start < 0 or (end is not None and end <= start):
        raise typer.BadParameter(f"need 0 <= START < END, got {text!r}", param_hint="--blocks")
    return start, end


def parse_dtype(name: str, flag: str) -> torch.dtype:
    import torch

    if name not in DTYPES:
        raise typer.BadParameter(f"expected one of {', '.join(DTYPES)}, got {name!r}", param_hint=flag)
    return getattr(torch, name)


DEVICE_HELP = flag_help(NodeConfig, "device")


def parse_device(name: str, flag: str = "--device") -> torch.device:
    from torchnode.models.devices import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from None


def parse_size(text: str, flag: str) -> int:
    """A size flag (1GiB, 512MB, 1048576) in bytes; a bad one is a usage error naming the flag."""
    from torchnode.node.limits import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError:
        raise typer.BadParameter(f"expected a size such as 1GiB or 512MB, got {text!r}", param_hint=flag) from None


def size_text(n: int) -> str:
    """Bytes as a size flag's default reads: 1 << 30 -> '1GiB' (the largest binary unit that divides it)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def split_peers(text: str) -> list[str]:
    """'a,b c' -> ['a', 'b', 'c']: addresses separated by commas or spaces."""
    return [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]


def swarm_peers(initial_peers: str) -> list[str]:
    """--initial-peers of a command that only reads the swarm (swarm, models, dashboard): at least one."""
    peers = split_peers(initial_peers)
    if not peers:
        raise typer.BadParameter("give the multiaddr of any swarm peer", param_hint="--initial-peers")
    return peers


INSECURE_HELP = "plaintext gRPC instead of TLS, for debugging on loopback; nodes and clients must agree"


def warn_if_insecure(insecure: bool) -> None:
    """The one line every command prints when --insecure turns encryption off."""
    if insecure:
        err.print(
            "[bold yellow]warning:[/] --insecure: gRPC links are plaintext; anyone on the path reads prompts and "
            "hidden states. Use only for debugging on loopback.",
            soft_wrap=True,
        )


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Errors a user can fix (no route, a failing node, a bad path or value) end in one red line, exit 1."""
    from torchnode.client.routing import NoRouteError
    from torchnode.client.verification.verifier import VerificationError
    from torchnode.protocol.wire.node_client import NodeError

    try:
        yield
    except (NoRouteError, NodeError, VerificationError, FileNotFoundError, ValueError, OSError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None


ALLOW_KEYS_HELP = (
    "private swarm: file of member public keys (one per line, as `torchnode identity` prints them, # comments)"
)


def allow_keys_of(path: Path | None) -> frozenset[bytes] | None:
    """The keys an --allow-keys file lists; a bad file is a usage error naming the flag."""
    if path is None:
        return None
    from torchnode.protocol.wire.allow_keys import load_allow_keys

    try:
        return load_allow_keys(path)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--allow-keys") from None


@contextlib.contextmanager
def draft_errors() -> Iterator[None]:
    """A --draft that is neither 'ngram' nor a usable draft model: a usage error naming the flag."""
    from torchnode.client.speculative import DraftError

    try:
        yield
    except DraftError as e:
        raise typer.BadParameter(str(e), param_hint="--draft") from None


def check_draft_quant(draft: str | None, draft_quant: str) -> None:
    """--draft-quant quantizes a draft model: a bad mode, or one given without a draft model, is a usage error."""
    from torchnode.client.config import DRAFT_QUANT_MODES

    if draft_quant not in DRAFT_QUANT_MODES:
        raise typer.BadParameter(
            f"expected one of {', '.join(DRAFT_QUANT_MODES)}, got {draft_quant!r}", param_hint="--draft-quant"
        )
    if draft_quant != "none" and (not draft or draft == "ngram"):
        raise typer.BadParameter(
            f"{draft_quant} applies to a draft model: give --draft MODEL (e.g. --draft default)",
            param_hint="--draft-quant",
        )


REACHABLE_HELP = flag_help(SwarmConfig, "reachable")


def parse_reachable(mode: str) -> str:
    if mode not in REACHABLE_MODES:
        raise typer.BadParameter(f"expected auto, yes or no, got {mode!r}", param_hint="--reachable")
    return mode


# Options several commands share, declared once (typer reads the Annotated metadata).
Insecure = Annotated[bool, typer.Option("--insecure", help=INSECURE_HELP)]
AllowKeys = Annotated[Path | None, typer.Option(help=ALLOW_KEYS_HELP)]
# the dashboard's, on `coordinator --dashboard` and on `dashboard`
HttpHost = Annotated[str, typer.Option(help="dashboard listen address")]
HttpPort = Annotated[int, typer.Option(help="dashboard HTTP port")]
ShownModels = Annotated[
    list[str] | None, typer.Option(help="show only this model (repeatable) [default: every model in the swarm's index]")
]
Refresh = Annotated[float, typer.Option(min=0.1, help="seconds between health scans")]
SpeedProbe = Annotated[
    bool,
    typer.Option(
        "--speed-probe/--no-speed-probe",
        help="time a one-token pass through every healthy node each scan: its measured tokens/s beside its claim",
    ),
]
CheckModels = Annotated[
    list[str] | None,
    typer.Option(
        "--check-model",
        help="re-check uploaded fraud proofs with this model's weights (torchnode check-evidence; repeatable); "
        "only proven ones mark a node dishonest [default: none: proofs are kept and served, unchecked]",
    ),
]
EvidenceMaxBytes = Annotated[str, typer.Option(help="largest fraud proof file the monitor accepts")]
EvidenceMaxFiles = Annotated[int, typer.Option(min=1, help="fraud proof files the monitor keeps (oldest go first)")]


def evidence_limits(max_bytes: str, max_files: int):
    """The monitor's bounds on uploaded fraud proofs (--evidence-max-bytes, --evidence-max-files)."""
    from torchnode.coordinator.evidence_store import EvidenceLimits

    size = parse_size(max_bytes, "--evidence-max-bytes")
    if size < 1:
        raise typer.BadParameter("must be at least 1 byte", param_hint="--evidence-max-bytes")
    return EvidenceLimits(max_bytes=size, max_files=max_files)


VolunteersFile = Annotated[
    Path | None,
    typer.Option(help="JSON file where the credit for volunteers persists across restarts [default: memory only]"),
]
CreditCapFactor = Annotated[
    float,
    typer.Option(
        min=0.001, help="credit a node at most this x its tokens/s x the seconds between scans (see /api/v1/volunteers)"
    ),
]
ChatUrl = Annotated[
    str | None,
    typer.Option(
        help="the chat page the dashboard links to for every ready model, e.g. http://HOST:8000/chat "
        "(`torchnode api`); ?model=NAME is added, or {model} in the URL is replaced [default: no link]"
    ),
]


# ---- option groups: each a dataclass of flags a command takes as one parameter (torchnode/cli_groups.py)
def _client(name: str) -> str:
    return flag_help(ClientConfig, name)


def _generation(name: str) -> str:
    return flag_help(GenerationOptions, name)


@dataclass(frozen=True)
class ClientFlags:
    """How `generate`, `chat` and `api` reach the swarm and whom they trust: the peers, the client's key, and the
    fields of client/config.py's ClientConfig and GenerationOptions (defaults and help from there)."""

    peers: Annotated[str, typer.Option(help="comma-separated node addresses host:port (no DHT)")] = ""
    initial_peers: Annotated[str, typer.Option(help="multiaddrs of swarm peers: find nodes through the DHT")] = ""
    identity: Annotated[Path | None, typer.Option(help="client key file [default: ~/.torchnode/identity.key]")] = None
    insecure: Insecure = False
    allow_keys: AllowKeys = None
    wire_dtype: Annotated[str, typer.Option(help=_client("wire_dtype"))] = str(ClientConfig.wire_dtype)
    step_timeout: Annotated[float, typer.Option(min=0.1, help=_client("step_timeout"))] = ClientConfig.step_timeout
    device: Annotated[str, typer.Option(help=_client("device"))] = ClientConfig.device
    verify: Annotated[bool, typer.Option("--verify", help=_client("verify"))] = ClientConfig.verify
    verify_window: Annotated[int, typer.Option(min=1, help=_client("verify_window"))] = ClientConfig.verify_window
    push: Annotated[bool, typer.Option("--push/--no-push", help=_client("push"))] = ClientConfig.push
    push_min_rtt_ms: Annotated[float, typer.Option(min=0.0, help=_client("push_min_rtt_ms"))] = (
        ClientConfig.push_min_rtt_ms
    )
    batch_steps: Annotated[bool, typer.Option("--batch-steps/--no-batch-steps", help=_client("batch_steps"))] = (
        ClientConfig.batch_steps
    )
    fp32_only: Annotated[bool, typer.Option("--fp32-only", help=_client("fp32_only"))] = ClientConfig.fp32_only
    report_to: Annotated[list[str] | None, typer.Option(help=_client("report_to"))] = None
    draft: Annotated[str | None, typer.Option(help=_generation("draft"))] = GenerationOptions.draft
    draft_tokens: Annotated[int, typer.Option(min=1, help=_generation("draft_tokens"))] = GenerationOptions.draft_tokens
    draft_quant: Annotated[str, typer.Option(help=_generation("draft_quant") + " [choices: none, int8, int4]")] = (
        GenerationOptions.draft_quant
    )
    adapter: Annotated[
        str | None,
        typer.Option(
            help=_generation("adapter") + "; the default of every generation (api: BASE:ADAPTER picks one per request)"
        ),
    ] = GenerationOptions.adapter

    def peer_lists(self) -> tuple[list[str], list[str]]:
        """(--peers, --initial-peers) as lists; at least one of them must name something."""
        peers, initial = split_peers(self.peers), split_peers(self.initial_peers)
        if not peers and not initial:
            raise typer.BadParameter(
                "give --initial-peers MULTIADDR (a swarm) or --peers HOST:PORT,... (fixed nodes)",
                param_hint="--initial-peers",
            )
        return peers, initial

    def sdk_options(self) -> dict[str, Any]:
        """The keywords of AsyncDistributedModel.from_pretrained these flags stand for; bad values name their flag."""
        parse_dtype(self.wire_dtype, "--wire-dtype")  # checked here for an error naming the flag
        parse_device(self.device)
        config = ClientConfig(
            wire_dtype=self.wire_dtype,
            step_timeout=self.step_timeout,
            device=self.device,
            verify=self.verify,
            verify_window=self.verify_window,
            push=self.push,
            push_min_rtt_ms=self.push_min_rtt_ms,
            batch_steps=self.batch_steps,
            fp32_only=self.fp32_only,
            report_to=tuple(self.report_to or ()),
        )
        check_draft_quant(self.draft, self.draft_quant)
        generation = GenerationOptions(
            draft=self.draft, draft_tokens=self.draft_tokens, draft_quant=self.draft_quant, adapter=self.adapter
        )
        return {
            "identity_path": self.identity,
            "insecure": self.insecure,
            "allow_keys": allow_keys_of(self.allow_keys),
            "config": config,
            "generation": generation,
        }

    def connect(self, model: str) -> DistributedModel:
        """A DistributedModel over the swarm (--initial-peers) or over fixed nodes (--peers)."""
        peers, initial = self.peer_lists()
        options = self.sdk_options()
        from torchnode.client.sync_model import DistributedModel

        with err.status("loading the model's head and tokenizer, finding nodes"):
            return DistributedModel.from_pretrained(model, peers, initial, **options)


def _limit(name: str) -> str:
    return flag_help(Limits, name)


@dataclass(frozen=True)
class LimitFlags:
    """`join`'s limits: node/limits.py's Limits, defaults and help from there (sizes as text, the batch wait in ms)."""

    max_sessions: Annotated[int, typer.Option(min=1, help=_limit("max_sessions"))] = Limits.max_sessions
    cache_memory: Annotated[str, typer.Option(help=_limit("cache_bytes"))] = size_text(Limits.cache_bytes)
    max_session_tokens: Annotated[int, typer.Option(min=1, help=_limit("max_session_tokens"))] = (
        Limits.max_session_tokens
    )
    session_timeout: Annotated[float, typer.Option(min=0.001, help=_limit("session_idle_timeout"))] = (
        Limits.session_idle_timeout
    )
    max_message_size: Annotated[str, typer.Option(help=_limit("max_message_bytes"))] = size_text(
        Limits.max_message_bytes
    )
    max_batch_tokens: Annotated[int, typer.Option(min=1, help=_limit("max_batch_tokens"))] = Limits.max_batch_tokens
    batch_wait_ms: Annotated[float, typer.Option(min=0.0, max=1000.0, help=_limit("batch_wait"))] = round(
        Limits.batch_wait * 1000, 6
    )
    push_timeout: Annotated[float, typer.Option(min=0.001, help=_limit("push_timeout"))] = Limits.push_timeout
    push_wait: Annotated[float, typer.Option(min=0.001, help=_limit("push_wait"))] = Limits.push_wait
    max_pushed: Annotated[int, typer.Option(min=1, help=_limit("max_pushed"))] = Limits.max_pushed
    slab_slots: Annotated[int, typer.Option(min=0, help=_limit("slab_slots"))] = Limits.slab_slots
    fair_share: Annotated[bool, typer.Option("--fair-share/--no-fair-share", help=_limit("fair_share"))] = (
        Limits.fair_share
    )

    def limits(self) -> Limits:
        return Limits(
            max_sessions=self.max_sessions,
            cache_bytes=parse_size(self.cache_memory, "--cache-memory"),
            max_session_tokens=self.max_session_tokens,
            session_idle_timeout=self.session_timeout,
            max_message_bytes=parse_size(self.max_message_size, "--max-message-size"),
            max_batch_tokens=self.max_batch_tokens,
            batch_wait=self.batch_wait_ms / 1000,
            push_timeout=self.push_timeout,
            push_wait=self.push_wait,
            max_pushed=self.max_pushed,
            slab_slots=self.slab_slots,
            fair_share=self.fair_share,
        )


def _relay(name: str) -> str:
    return flag_help(RelayLimits, name)


@dataclass(frozen=True)
class RelayFlags:
    """`--relay` and its limits, on `join` and `coordinator`: node/limits.py's RelayLimits (defaults and help)."""

    relay: Annotated[bool, typer.Option("--relay", help=flag_help(SwarmConfig, "relay"))] = False
    relay_port: Annotated[int, typer.Option(help=flag_help(SwarmConfig, "relay_port"))] = SwarmConfig.relay_port
    relay_max_nodes: Annotated[int, typer.Option(min=1, help=_relay("max_nodes"))] = RelayLimits.max_nodes
    relay_max_streams: Annotated[int, typer.Option(min=1, help=_relay("max_streams"))] = RelayLimits.max_streams
    relay_bytes_per_second: Annotated[str, typer.Option(help=_relay("bytes_per_second"))] = size_text(
        RelayLimits.bytes_per_second
    )

    def limits(self) -> RelayLimits | None:
        """The relay's limits with --relay; None without."""
        if not self.relay:
            return None
        rate = parse_size(self.relay_bytes_per_second, "--relay-bytes-per-second")
        if rate < 1:
            raise typer.BadParameter("must be at least 1 byte", param_hint="--relay-bytes-per-second")
        return RelayLimits(max_nodes=self.relay_max_nodes, max_streams=self.relay_max_streams, bytes_per_second=rate)


def _swarm(name: str) -> str:
    return flag_help(SwarmConfig, name)


@dataclass(frozen=True)
class SwarmFlags:
    """How `join` takes part in a swarm: node/config.py's SwarmConfig, defaults and help from there."""

    initial_peers: Annotated[str, typer.Option(help=_swarm("initial_peers"))] = ""
    new_swarm: Annotated[
        bool, typer.Option("--new-swarm", help="start a new swarm with this node as its first peer")
    ] = False
    num_blocks: Annotated[int | None, typer.Option(min=1, help=_swarm("num_blocks"))] = SwarmConfig.num_blocks
    max_memory: Annotated[str | None, typer.Option(help=_swarm("max_memory"))] = None
    announce_host: Annotated[str | None, typer.Option(help=_swarm("announce_host"))] = SwarmConfig.announce_host
    dht_port: Annotated[int, typer.Option(help=_swarm("dht_port"))] = SwarmConfig.dht_port
    expiration: Annotated[float, typer.Option(min=1.0, help=_swarm("expiration"))] = SwarmConfig.expiration
    rebalance_period: Annotated[float, typer.Option(min=0.0, help=_swarm("rebalance_period"))] = (
        SwarmConfig.rebalance_period
    )
    rebalance_threshold: Annotated[float, typer.Option(min=0.0, help=_swarm("rebalance_threshold"))] = (
        SwarmConfig.rebalance_threshold
    )
    reachable: Annotated[str, typer.Option(help=_swarm("reachable"))] = SwarmConfig.reachable
    public_name: Annotated[str, typer.Option(help=_swarm("public_name"))] = SwarmConfig.public_name
    contact: Annotated[str, typer.Option(help=_swarm("contact"))] = SwarmConfig.contact

    def config(self, relay: RelayFlags) -> SwarmConfig | None:
        """The node's swarm (None: it serves alone, for --peers clients); contradictions name their flag."""
        peers = split_peers(self.initial_peers)
        if peers and self.new_swarm:
            raise typer.BadParameter(
                "either join a swarm (--initial-peers) or start one (--new-swarm)", param_hint="--new-swarm"
            )
        from torchnode.protocol.dht.credit import validate_contact, validate_public_name

        for value, check, flag in (
            (self.public_name, validate_public_name, "--public-name"),
            (self.contact, validate_contact, "--contact"),
        ):
            try:
                check(value)
            except ValueError as e:
                raise typer.BadParameter(str(e), param_hint=flag) from None
        if not peers and not self.new_swarm:
            if self.public_name or self.contact:
                raise typer.BadParameter(
                    "a name is announced in a swarm: add --initial-peers or --new-swarm", param_hint="--public-name"
                )
            if relay.relay or self.reachable != "auto":
                raise typer.BadParameter(
                    "relays and reachability need a swarm (--initial-peers or --new-swarm)",
                    param_hint="--relay" if relay.relay else "--reachable",
                )
            return None
        return SwarmConfig(
            initial_peers=tuple(peers),
            announce_host=self.announce_host,
            dht_port=self.dht_port,
            num_blocks=self.num_blocks,
            max_memory=parse_size(self.max_memory, "--max-memory") if self.max_memory else None,
            expiration=self.expiration,
            rebalance_period=self.rebalance_period,
            rebalance_threshold=self.rebalance_threshold,
            reachable=parse_reachable(self.reachable),
            relay_port=relay.relay_port,
            relay=relay.limits(),
            public_name=self.public_name,
            contact=self.contact,
        )
