"""What `torchnode join` configures, as dataclasses whose defaults and help are declared once: the CLI's flags read
both from these fields (torchnode/cli_options.py). Importing this module does not import torch, so
`torchnode --help` stays fast; `NodeConfig` resolves its device and dtype when it is made."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..protocol.dht.credit import validate_contact, validate_public_name
from .limits import Limits, RelayLimits

if TYPE_CHECKING:
    import torch

REACHABLE_MODES = ("auto", "yes", "no")


@dataclass(frozen=True)
class SwarmConfig:
    """How a node takes part in a swarm: whom it knows, where others dial it, which span it picks and when it moves."""

    initial_peers: tuple[str, ...] = field(
        default=(), metadata={"help": "multiaddrs of any swarm peers (comma-separated): join that swarm"}
    )  # empty: start a new swarm
    announce_host: str | None = field(default=None, metadata={"help": "address others dial [default: --host]"})
    dht_port: int = field(default=0, metadata={"help": "DHT (p2pd) port; 0 picks a free one"})
    num_blocks: int | None = field(
        default=None,
        metadata={"help": "blocks to serve when the swarm chooses [default: what fits --max-memory]"},
    )
    max_memory: int | None = field(
        default=None,
        metadata={
            "help": "memory the node may use, e.g. 8GiB: weights + --cache-memory + a runtime allowance (768MiB on"
            " CPU, the whole process; 1GiB of GPU memory on CUDA) [default: half the RAM, or the GPU's free memory]"
        },
    )  # bytes; None: half of this machine's RAM (node/server.py weight_budget)
    expiration: float = field(default=30.0, metadata={"help": "seconds a DHT record lives without refresh"})
    rebalance_period: float = field(
        default=120.0, metadata={"help": "seconds between rebalance checks; 0 = never move"}
    )
    rebalance_threshold: float = field(
        default=0.25, metadata={"help": "move if the weakest block gains more than this fraction"}
    )
    reachable: str = field(
        default="auto",
        metadata={
            "help": "auto: ask a relay to dial this node back, and serve through a relay if it cannot; yes: dialled"
            " directly; no: through a relay"
        },
    )
    relay: RelayLimits | None = field(
        default=None, metadata={"help": "also relay for nodes that cannot be dialled (behind a NAT)"}
    )  # None: no relay
    relay_port: int = field(default=0, metadata={"help": "the relay's control port (with --relay); 0 picks a free one"})
    public_name: str = field(
        default="",
        metadata={
            "help": "a display name (1-32 letters, digits, spaces, - _ . ') announced, signed, with what this node"
            " serves: dashboards credit it [default: anonymous]"
        },
    )
    contact: str = field(
        default="", metadata={"help": "an http(s) URL or e-mail address shown with --public-name [default: none]"}
    )

    def __post_init__(self) -> None:
        if self.reachable not in REACHABLE_MODES:
            raise ValueError(f"reachable must be one of {', '.join(REACHABLE_MODES)}, got {self.reachable!r}")
        validate_public_name(self.public_name)  # ValueError: shown on dashboards, so checked (protocol/dht/credit.py)
        validate_contact(self.contact)


DEFAULT_EXPIRATION: float = SwarmConfig.expiration


@dataclass(frozen=True)
class NodeConfig:
    """One node: the model and span it serves, where it listens, how it computes, its limits and its swarm."""

    model: str
    start: int | None  # None: choose (in a swarm) or 0
    end: int | None  # None: to the last block, or start + num_blocks when choosing
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address to listen on (gRPC and DHT); 0.0.0.0 exposes the node"},
    )
    port: int = field(default=31330, metadata={"help": "gRPC port"})
    dtype: torch.dtype | None = field(
        default=None,
        metadata={
            "help": "compute dtype: auto (float32 on CPU, bfloat16 on a GPU, float16 where bf16 is missing), float32,"
            " bfloat16 or float16"
        },
    )  # None (auto on the command line): the device's default
    quant: str = field(
        default="none",
        metadata={
            "help": "none; int8 (8-bit weights, ~0.25x fp32); int4 (4-bit groups of 32, ~0.16x); nf4 (CUDA +"
            " bitsandbytes). Not token-exact"
        },
    )  # models.quantization.QUANT_MODES
    device: torch.device | str = field(
        default="auto",
        metadata={"help": "where to compute: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps"},
    )  # where the span, its KV caches and its work live
    huge_pages: bool = field(
        default=True,
        metadata={
            "help": "a CPU node keeps its weights in 2 MiB pages where Linux gives them (transparent huge pages);"
            " off: 4 KiB pages, as torch allocates them"
        },
    )  # models/huge_pages.py
    identity_path: Path | None = None
    limits: Limits = field(default_factory=Limits)
    shutdown_grace: float = field(default=10.0, metadata={"help": "seconds sessions in flight get on SIGTERM"})
    swarm: SwarmConfig | None = None
    insecure: bool = False  # plaintext gRPC (--insecure, debugging on loopback); default: TLS bound to the identity
    allow_keys: frozenset[bytes] | None = None  # private swarm (--allow-keys): serve and trust only these keys
    adapters: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "LoRA adapters to serve, comma-separated: PEFT directories (adapter_config.json +"
            " adapter_model.safetensors) or hub ids"
        },
    )

    def __post_init__(self) -> None:
        """Resolves `auto` to this machine's device and the dtype to its default, once, for every later use."""
        from ..models.devices import default_dtype, resolve_device

        device = resolve_device(str(self.device))
        object.__setattr__(self, "device", device)
        if self.dtype is None:
            object.__setattr__(self, "dtype", default_dtype(device))
