"""The SDK's options as two objects, each default declared once: how the client reaches and trusts the swarm
(`ClientConfig`), and what every generation uses unless a call names its own (`GenerationOptions`).

The CLI's `generate`, `chat` and `api` read their flags' defaults and help from these fields
(torchnode/cli_options.py), so a default changed here changes everywhere. Importing this module does not import
torch: `torchnode --help` stays fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

WIRE_DTYPES = ("float32", "bfloat16", "float16")
DRAFT_QUANT_MODES = ("none", "int8", "int4")  # a draft model's linears: as stored, 8-bit or 4-bit


@dataclass(frozen=True)
class RetryPolicy:
    """How long a session keeps recovering one failed hop (routes tried, seconds, backoff with jitter)."""

    max_attempts: int = 6  # routes tried for one failed hop
    max_seconds: float = 60.0  # time spent recovering one failed hop
    backoff_initial: float = 0.1
    backoff_max: float = 5.0


@dataclass(frozen=True)
class SpeedPolicy:
    """How a client weighs what nodes announce against what it measures (client/speed_book.py; `speed=`)."""

    measure: bool = True  # False: route on announced throughput alone (trusted, private swarms)
    trust_steps: int = 4  # timed steps after which a node's measurement alone counts (before: blended)
    ema_weight: float = 0.2  # weight of the newest timed step in a node's average
    reroute_gap: float = 4.0  # a hop this many times slower than it claims is re-routed around mid-session
    reroute_slack: float = 0.05  # seconds per step a hop may exceed its claim by before the gap counts
    reroute_after: int = 3  # timed steps of a hop before a session may re-route around it
    forget_after: float = 600.0  # seconds after which a node's measurement is dropped: a new fair trial

    def __post_init__(self) -> None:
        if self.trust_steps < 1 or self.reroute_after < 1:
            raise ValueError("trust_steps and reroute_after must be >= 1")
        if not 0 < self.ema_weight <= 1:
            raise ValueError(f"ema_weight must be in (0, 1], got {self.ema_weight}")
        if self.reroute_gap < 1 or self.reroute_slack < 0 or self.forget_after <= 0:
            raise ValueError("reroute_gap must be >= 1, reroute_slack >= 0 and forget_after > 0")


@dataclass(frozen=True)
class ClientConfig:
    """Connection and trust: what the client sends, how long it waits, what it checks, where its head runs."""

    wire_dtype: torch.dtype | str = field(
        default="float32",
        metadata={"help": "dtype of hidden states on the wire (float32: lossless; bfloat16: half the bytes)"},
    )
    step_timeout: float = field(default=30.0, metadata={"help": "seconds a node may take per step before failover"})
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    verify: bool = field(
        default=False,
        metadata={
            "help": "recompute every node's outputs elsewhere (another node, or this client's weights)"
            " before using them"
        },
    )
    verify_window: int = field(
        default=32,
        metadata={
            "help": "tokens per check: each hop's window is re-run as one prefill; tokens are released once checked"
        },
    )
    verify_local: bool = True  # with verify: the client may recompute blocks from its own checkpoint (third opinion)
    device: str = field(
        default="auto",
        metadata={
            "help": "where to compute: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps for the head"
            " (embeddings, LM head)"
        },
    )
    push: bool = field(
        default=True,
        metadata={
            "help": "node-to-node push: each node sends its output straight to the next (hops + 1 one-way legs per"
            " token instead of 2 x hops) where that saves time (--push-min-rtt-ms); --no-push: the client drives"
            " every hop"
        },
    )
    push_min_rtt_ms: float = field(
        default=5.0,
        metadata={
            "help": "push into a hop only if this client's probe round trip to its node is at least this many ms:"
            " on shorter links the push's extra messages cost more than the leg it saves; 0: push into every hop"
        },
    )
    batch_steps: bool = field(
        default=True,
        metadata={
            "help": "send the steps of all this client's sessions on a node together, one message per node per token"
            " (StepBatches); --no-batch-steps: a stream per session, as nodes before protocol 1.1 take them"
        },
    )
    speed: SpeedPolicy = field(default_factory=SpeedPolicy)  # routing on measured speed (client/speed_book.py)

    fp32_only: bool = field(
        default=False,
        metadata={
            "help": "route only through nodes computing in float32 with unquantized weights (the exact model);"
            " bf16, fp16 and --quant nodes are skipped"
        },
    )
    report_to: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "with --verify: upload each fraud proof to this health monitor (its dashboard URL; repeatable),"
            " which serves it and re-checks it"
        },
    )

    @property
    def torch_wire_dtype(self) -> torch.dtype:
        """wire_dtype as a torch dtype (__post_init__ turned a name into one)."""
        if isinstance(self.wire_dtype, str):
            raise TypeError("wire_dtype is still a name: ClientConfig.__post_init__ did not run")
        return self.wire_dtype

    def __post_init__(self) -> None:
        """A dtype given by name becomes the torch dtype once; bad values fail here, naming the option."""
        if isinstance(self.wire_dtype, str):
            if self.wire_dtype not in WIRE_DTYPES:
                raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}")
            import torch

            object.__setattr__(self, "wire_dtype", getattr(torch, self.wire_dtype))
        object.__setattr__(self, "report_to", tuple(self.report_to))
        if self.verify_window < 1:
            raise ValueError(f"verify_window must be >= 1 token, got {self.verify_window}")
        if self.step_timeout <= 0:
            raise ValueError(f"step_timeout must be > 0 seconds, got {self.step_timeout}")
        if not self.push_min_rtt_ms >= 0:  # NaN too
            raise ValueError(f"push_min_rtt_ms must be >= 0 ms (0: push into every hop), got {self.push_min_rtt_ms}")


@dataclass(frozen=True)
class GenerationOptions:
    """What a generation uses: speculative decoding, prefill chunks, and the LoRA adapter.

    The model keeps one as every call's defaults; a call that names its own draft, draft_tokens or adapter gets
    `defaults.override(...)`, and that one object travels whole to the session and the decoding loop.
    """

    draft: str | None = field(
        default=None,
        metadata={
            "help": "speculative decoding: 'ngram' (prompt lookup) or a small draft model with the same tokenizer"
            " [default: off]"
        },
    )
    draft_tokens: int = field(
        default=8, metadata={"help": "most tokens drafted per pass; fewer when drafts are rejected"}
    )
    draft_quant: str = field(
        default="none",
        metadata={
            "help": "run the --draft model here with 8- or 4-bit weights (int8, int4): cheaper drafts, the same"
            " greedy output"
        },
    )
    # greedy decoding with a draft model writes the next draft while a pass is in flight (client/speculative.py);
    # False: only between passes (one thread fewer busy while the chain works)
    draft_ahead: bool = True
    prefill_chunk: int = 128  # tokens per chunk of a pipelined prefill of a longer input; 0 = one step
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "a LoRA adapter the nodes serve (join --adapters), by name: a directory's base name or a hub id"
        },
    )

    def __post_init__(self) -> None:
        if self.draft_tokens < 0:
            raise ValueError(f"draft_tokens must be >= 0 (0 = no speculation), got {self.draft_tokens}")
        if self.prefill_chunk < 0:
            raise ValueError("prefill_chunk must be >= 0 (0 = the whole prompt in one step)")
        if self.draft_quant not in DRAFT_QUANT_MODES:
            raise ValueError(f"draft_quant must be one of {', '.join(DRAFT_QUANT_MODES)}, got {self.draft_quant!r}")

    def override(
        self, draft: str | None = None, draft_tokens: int | None = None, adapter: str | None = None
    ) -> GenerationOptions:
        """One call's options: what it names (None: these defaults); the adapter by `chosen_adapter`'s rule."""
        return dataclasses.replace(
            self,
            draft=self.draft if draft is None else draft,
            draft_tokens=self.draft_tokens if draft_tokens is None else draft_tokens,
            adapter=chosen_adapter(adapter, self.adapter),
        )


def chosen_adapter(asked: str | None, default: str | None) -> str:
    """The adapter rule, the one place it lives: None asks for the default (itself None or "": the base model);
    "" asks for the base model; anything else names the adapter (a served name, a PEFT folder or a hub id)."""
    return (default or "") if asked is None else asked


# defaults other modules name (each is its field's default above, not a second copy)
DEFAULT_STEP_TIMEOUT: float = ClientConfig.step_timeout
DEFAULT_PUSH: bool = ClientConfig.push
DEFAULT_PUSH_MIN_RTT_S: float = ClientConfig.push_min_rtt_ms / 1000
DEFAULT_BATCH_STEPS: bool = ClientConfig.batch_steps
DEFAULT_WINDOW: int = ClientConfig.verify_window
DEFAULT_DRAFT_TOKENS: int = GenerationOptions.draft_tokens
DEFAULT_PREFILL_CHUNK: int = GenerationOptions.prefill_chunk
DEFAULT_RETRY = RetryPolicy()  # frozen: one shared default
DEFAULT_SPEED_POLICY = SpeedPolicy()


def split_options(
    options: Mapping[str, Any], config: ClientConfig | None = None, generation: GenerationOptions | None = None
) -> tuple[ClientConfig, GenerationOptions]:
    """The SDK's keywords (wire_dtype=..., draft=..., as users have always passed them) laid onto the two objects;
    a keyword neither has is a TypeError naming it, as for any function."""
    config, generation = config or ClientConfig(), generation or GenerationOptions()
    own = {f.name for f in dataclasses.fields(ClientConfig)}, {f.name for f in dataclasses.fields(GenerationOptions)}
    unknown = set(options) - own[0] - own[1]
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    config = dataclasses.replace(config, **{k: v for k, v in options.items() if k in own[0]})
    generation = dataclasses.replace(generation, **{k: v for k, v in options.items() if k in own[1]})
    return config, generation
