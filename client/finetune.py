"""Fine-tuning through the swarm: trainable LoRA weights on the client, blocks on the nodes.

`DistributedLoraModel` is an `nn.Module` for a plain PyTorch loop: its parameters are the LoRA matrices
(kept here; nodes never keep a client's trainable weights), `forward(input_ids, labels)` returns the
loss (transformers' causal LM loss) and the logits, `loss.backward()` fills the LoRA gradients, and any
optimizer steps them. Each hop of the route is one autograd node: forward sends the hop's inputs and its
blocks' LoRA weights (`Forward` with `lora`), backward sends the same with the gradient of the hop's
outputs (`Backward`) and gets the gradients of its inputs and of those weights. A hop whose node fails is
re-routed and the call redone, so a training step survives a node dying mid-step. `save_pretrained` writes
a PEFT adapter that `torchnode join --adapters DIR` serves.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.families import config_of
from ..models.lora import CONFIG_FILE, TARGETS, WEIGHTS_FILE
from ..models.safetensors_files import write_safetensors
from ..protocol.wire.node_client import NodeError
from .session import Hop
from .sync_model import DistributedModel

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
IGNORE_INDEX = -100  # labels that do not count in the loss (transformers' convention)
DEFAULT_TRAIN_TIMEOUT = 120.0  # seconds one Forward/Backward call may take
MAX_ATTEMPTS = 4  # routes tried for one failed call


class LoraParameters(nn.Module):
    """LoRA matrices for every block of a model: A (r, in) Kaiming-uniform, B (out, r) zeros, as PEFT starts."""

    def __init__(
        self, config, total_blocks: int, r: int = 8, alpha: float = 16, target_modules: Sequence[str] = TARGETS
    ):
        super().__init__()
        if r < 1 or alpha <= 0:
            raise ValueError(f"LoRA needs r >= 1 and alpha > 0, got r={r}, alpha={alpha}")
        unknown = set(target_modules) - set(TARGETS)
        if unknown:
            raise ValueError(
                f"target_modules {sorted(unknown)} are not LoRA targets here; choose from {', '.join(TARGETS)}"
            )
        self.r, self.alpha, self.targets, self.total_blocks = r, alpha, tuple(target_modules), total_blocks
        c = config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        sizes = {  # (in, out)
            "q_proj": (c.hidden_size, q),
            "k_proj": (c.hidden_size, kv),
            "v_proj": (c.hidden_size, kv),
            "o_proj": (q, c.hidden_size),
            "gate_proj": (c.hidden_size, c.intermediate_size),
            "up_proj": (c.hidden_size, c.intermediate_size),
            "down_proj": (c.intermediate_size, c.hidden_size),
        }
        self.names: dict[str, str] = {}  # wire name "layers.3.self_attn.q_proj.lora_A" -> parameter key
        self.weights = nn.ParameterDict()
        for block in range(total_blocks):
            for module in self.targets:
                path = f"layers.{block}.{'self_attn' if module in ATTENTION else c.feed_forward_name}.{module}"
                fan_in, fan_out = sizes[module]
                a, b = torch.empty(r, fan_in), torch.zeros(fan_out, r)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init of lora_A
                for which, tensor in (("A", a), ("B", b)):
                    key = f"{path}.lora_{which}".replace(".", "__")  # ParameterDict keys may not hold dots
                    self.weights[key] = nn.Parameter(tensor)
                    self.names[f"{path}.lora_{which}"] = key

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def span(self, start: int, end: int) -> dict[str, nn.Parameter]:
        """{wire name: parameter} of blocks [start, end)."""
        return {n: self.weights[k] for n, k in self.names.items() if start <= int(n.split(".")[1]) < end}

    def save_pretrained(self, directory: Path | str, base_model: str) -> Path:
        """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": list(self.targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "use_rslora": False,
            "use_dora": False,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        tensors = (
            (f"base_model.model.model.{n}.weight", self.weights[k].detach().contiguous()) for n, k in self.names.items()
        )
        write_safetensors(directory / WEIGHTS_FILE, tensors, {"format": "pt"})
        return directory


class SpanCalls:
    """Forward and Backward of blocks [start, end) on whichever nodes serve them now, with failover: a failed
    call bans its node, re-routes the blocks (maybe over several nodes) and is redone."""

    def __init__(self, model: DistributedModel, timeout: float = DEFAULT_TRAIN_TIMEOUT):
        self.model, self.core, self.timeout = model, model.async_model, timeout

    def forward(self, hops: list[Hop], hidden: torch.Tensor, lora: LoraParameters) -> torch.Tensor:
        async def run(hops: list[Hop]) -> torch.Tensor:
            h = hidden
            for hop in hops:
                h = await hop.node.train_forward(h, hop.start, hop.end, _detached(lora, hop), lora.scale, self.timeout)
            return h

        return self.model.run(self._with_failover(hops, run))

    def backward(
        self, hops: list[Hop], hidden: torch.Tensor, grad: torch.Tensor, lora: LoraParameters
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        async def run(hops: list[Hop]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            inputs = [hidden]  # a re-routed span may span several nodes: their inputs first
            for hop in hops[:-1]:
                inputs.append(
                    await hop.node.train_forward(
                        inputs[-1], hop.start, hop.end, _detached(lora, hop), lora.scale, self.timeout
                    )
                )
            grads: dict[str, torch.Tensor] = {}
            g = grad
            for hop, x in zip(reversed(hops), reversed(inputs), strict=True):
                g, more = await hop.node.backward(
                    x, g, hop.start, hop.end, _detached(lora, hop), lora.scale, self.timeout
                )
                grads |= more
            return g, grads

        return self.model.run(self._with_failover(hops, run))

    async def _with_failover(self, hops: list[Hop], run: Callable[[list[Hop]], Awaitable]):
        start, end = hops[0].start, hops[-1].end
        for attempt in range(MAX_ATTEMPTS):
            try:
                return await run(hops)
            except NodeError as e:
                if attempt == MAX_ATTEMPTS - 1 or e.status not in (
                    None,
                    "UNAVAILABLE",
                    "DEADLINE_EXCEEDED",
                    "CANCELLED",
                ):
                    raise
                for hop in hops:
                    if hop.node.address in str(e):
                        self.core.bans.ban(hop.node.address)
                hops = await self.core.route(start, end)


def _detached(lora: LoraParameters, hop: Hop) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in lora.span(hop.start, hop.end).items()}


class _RemoteSpan(torch.autograd.Function):
    """One hop as an autograd node: inputs and the hop's LoRA parameters in, outputs out."""

    @staticmethod
    def forward(ctx, hidden, calls: SpanCalls, hop: Hop, lora: LoraParameters, *weights):  # noqa: ANN001
        ctx.calls, ctx.hop, ctx.lora = calls, hop, lora
        ctx.save_for_backward(hidden)
        return calls.forward([hop], hidden.detach(), lora)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001
        (hidden,) = ctx.saved_tensors
        grad_hidden, grads = ctx.calls.backward([ctx.hop], hidden.detach(), grad_output.contiguous(), ctx.lora)
        names = list(ctx.lora.span(ctx.hop.start, ctx.hop.end))
        return (grad_hidden, None, None, None, *(grads[n] for n in names))


class DistributedLoraModel(nn.Module):
    """A distributed model with trainable LoRA weights: train it like any PyTorch module, save it as PEFT."""

    def __init__(
        self,
        model: DistributedModel,
        r: int = 8,
        alpha: float = 16,
        target_modules: Sequence[str] = TARGETS,
        timeout: float = DEFAULT_TRAIN_TIMEOUT,
    ):
        super().__init__()
        self.model, self.core = model, model.async_model
        self.lora = LoraParameters(config_of(self.core.ckpt), self.core.total_blocks, r, alpha, target_modules)
        self.calls = SpanCalls(model, timeout)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(loss or None, logits (B, T, vocab)); loss is transformers' causal LM loss (labels shifted by one,
        IGNORE_INDEX positions left out, mean over the rest)."""
        head = self.core.head
        hidden = head.embed(input_ids).clone()  # (B, T, H); a plain tensor, not an inference-mode one
        for hop in self.model.run(self.core.route()):
            weights = self.lora.span(hop.start, hop.end).values()
            hidden = _RemoteSpan.apply(hidden, self.calls, hop, self.lora, *weights)  # (B, T, H)
        logits = head.lm_head(head.norm(hidden)).float()  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
            )
        return loss, logits

    def save_pretrained(self, directory: Path | str) -> Path:
        """The trained LoRA as a PEFT adapter; its directory's name is the adapter's name when served."""
        return self.lora.save_pretrained(directory, self.core.ckpt.name)
