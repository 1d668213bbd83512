"""Options and helpers every `torchnode` command shares: parsing sizes, devices, peers and keys; one place
that turns user-fixable errors into a red line; connecting a client to a swarm."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err = Console(stderr=True)

DTYPES = ("float32", "bfloat16", "float16")


def _adapters(text: str) -> tuple[str, ...]:
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


def _dtype(name: str, flag: str):
    import torch

    if name not in DTYPES:
        raise typer.BadParameter(f"expected one of {', '.join(DTYPES)}, got {name!r}", param_hint=flag)
    return getattr(torch, name)


DEVICE_HELP = "where to compute: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps"
QUANT_CHOICES = ("none", "int8", "int4", "nf4")


def _device(name: str, flag: str = "--device"):
    from torchnode.models.devices import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from None


def _bytes(text: str, flag: str) -> int:
    from torchnode.node.limits import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError:
        raise typer.BadParameter(f"expected a size such as 1GiB or 512MB, got {text!r}", param_hint=flag) from None


def _peers(text: str) -> list[str]:
    return [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]


def swarm_peers(initial_peers: str) -> list[str]:
    """--initial-peers of a command that only reads the swarm (swarm, models, dashboard): at least one."""
    peers = _peers(initial_peers)
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


ADAPTER_HELP = "a LoRA adapter the nodes serve (join --adapters), by name: a directory's base name or a hub id"
ADAPTERS_HELP = "LoRA adapters to serve, comma-separated: PEFT directories (adapter_config.json + adapter_model.safetensors) or hub ids"


VERIFY_HELP = "recompute every node's outputs elsewhere (another node, or this client's weights) before using them"
VERIFY_WINDOW_HELP = "tokens per check: each hop's window is re-run as one prefill; tokens are released once checked"


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


def verify_options(verify: bool, verify_window: int) -> dict:
    """SDK keywords of --verify / --verify-window."""
    return {"verify": verify, "verify_window": verify_window} if verify else {}


PUSH_HELP = "node-to-node push: each node sends its output straight to the next (hops + 1 one-way legs per token instead of 2 x hops); --no-push: the client drives every hop"
DRAFT_HELP = (
    "speculative decoding: 'ngram' (prompt lookup) or a small draft model with the same tokenizer [default: off]"
)
DRAFT_TOKENS_HELP = "most tokens drafted per pass; fewer when drafts are rejected"


@contextlib.contextmanager
def draft_errors() -> Iterator[None]:
    """A --draft that is neither 'ngram' nor a usable draft model: a usage error naming the flag."""
    from torchnode.client.speculative import DraftError

    try:
        yield
    except DraftError as e:
        raise typer.BadParameter(str(e), param_hint="--draft") from None


def connect(model: str, peers: str, initial_peers: str, identity: Path | None, **kwargs):
    """A DistributedModel over the swarm (--initial-peers) or over fixed nodes (--peers)."""
    peer_list, dht_peers = _peers(peers), _peers(initial_peers)
    if not peer_list and not dht_peers:
        raise typer.BadParameter(
            "give --initial-peers MULTIADDR (a swarm) or --peers HOST:PORT,... (fixed nodes)",
            param_hint="--initial-peers",
        )
    from torchnode.client.sync_model import DistributedModel

    with err.status("loading the model's head and tokenizer, finding nodes"):
        return DistributedModel.from_pretrained(model, peer_list, dht_peers, identity_path=identity, **kwargs)


REACHABLE_HELP = "auto: ask a relay to dial this node back, and serve through a relay if it cannot; yes: dialled directly; no: through a relay"


def _reachable(mode: str) -> str:
    if mode not in ("auto", "yes", "no"):
        raise typer.BadParameter(f"expected auto, yes or no, got {mode!r}", param_hint="--reachable")
    return mode


def _relay_limits(max_nodes: int, max_streams: int, bytes_per_second: str):
    from torchnode.node.relay import RelayLimits

    rate = _bytes(bytes_per_second, "--relay-bytes-per-second")
    if rate < 1:
        raise typer.BadParameter("must be at least 1 byte", param_hint="--relay-bytes-per-second")
    return RelayLimits(max_nodes=max_nodes, max_streams=max_streams, bytes_per_second=rate)


# Options several commands share, declared once (typer reads the Annotated metadata).
StepTimeout = Annotated[float, typer.Option(min=0.1, help="seconds a node may take per step before failover")]
HeadDevice = Annotated[str, typer.Option(help=DEVICE_HELP + " for the head (embeddings, LM head)")]
Insecure = Annotated[bool, typer.Option("--insecure", help=INSECURE_HELP)]
AllowKeys = Annotated[Path | None, typer.Option(help=ALLOW_KEYS_HELP)]
Draft = Annotated[str | None, typer.Option(help=DRAFT_HELP)]
DraftTokens = Annotated[int, typer.Option(min=1, help=DRAFT_TOKENS_HELP)]
Verify = Annotated[bool, typer.Option("--verify", help=VERIFY_HELP)]
VerifyWindow = Annotated[int, typer.Option(min=1, help=VERIFY_WINDOW_HELP)]
Adapter = Annotated[str | None, typer.Option(help=ADAPTER_HELP)]
Push = Annotated[bool, typer.Option("--push/--no-push", help=PUSH_HELP)]
# the dashboard's, on `coordinator --dashboard` and on `dashboard`
HttpHost = Annotated[str, typer.Option(help="dashboard listen address")]
HttpPort = Annotated[int, typer.Option(help="dashboard HTTP port")]
ShownModels = Annotated[
    list[str] | None, typer.Option(help="show only this model (repeatable) [default: every model in the swarm's index]")
]
Refresh = Annotated[float, typer.Option(min=0.1, help="seconds between health scans")]
