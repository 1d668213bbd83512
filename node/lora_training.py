"""Passes with a client's own LoRA weights: how a client fine-tunes through the swarm.

`forward` runs the span with the LoRA the request carries; `backward` recomputes that pass with autograd
and returns the gradients of the span's inputs and of those LoRA weights, given the gradient of its
outputs. The node keeps nothing between calls (no activations, no trainable weights): a client's
training loop owns its LoRA and its optimizer. Both run off the event loop, beside the batch runner.
"""

from __future__ import annotations

import torch

from ..models import torch_threads
from ..models.lora import AdapterError, LoraHooks, LoraWeights, fit_lora, lora_pass
from .errors import OutOfRange, RequestError
from .span_backend import SpanBackend


def client_lora(
    backend: SpanBackend, tensors: dict[str, torch.Tensor], scale: float, start: int, end: int
) -> dict[str, LoraWeights]:
    """The request's LoRA as {module path: weights} for blocks [start, end), checked against the span."""
    if not torch.isfinite(torch.tensor(scale)) or scale <= 0:
        raise RequestError(f"lora_scale must be a positive number, got {scale}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        path, dot, which = name.rpartition(".lora_")
        if not dot or which not in ("A", "B") or not path.startswith("layers."):
            raise RequestError(f"LoRA tensor name {name!r} is not 'layers.N.module.lora_A' or '...lora_B'")
        block = path.split(".")[1]
        if not block.isdigit() or not start <= int(block) < end:
            raise RequestError(f"LoRA tensor {name!r} is outside blocks {start}:{end} of this request")
        pairs.setdefault(path, {})[which] = tensor.to(backend.info.dtype)
    try:
        lora = {
            path: fit_lora("client LoRA", backend.span, path, pair, {"lora_alpha": 1.0}) for path, pair in pairs.items()
        }
    except AdapterError as e:
        raise RequestError(str(e)) from None
    return {path: LoraWeights(w.a, w.b, scale) for path, w in lora.items()}


def _check_size(backend: SpanBackend, x: torch.Tensor) -> None:
    """Autograd keeps every block's activations: bounded by the tokens one session may hold."""
    if x.shape[0] * x.shape[1] > backend.limits.max_session_tokens:
        raise OutOfRange(
            f"{x.shape[0]} x {x.shape[1]} tokens in one training pass; this node allows "
            f"{backend.limits.max_session_tokens} (--max-session-tokens)"
        )


def _span_pass(
    backend: SpanBackend, x: torch.Tensor, start: int, end: int, lora: dict[str, LoraWeights]
) -> torch.Tensor:
    """The span over x (B, T, hidden) from position 0 with `lora`, recorded by autograd where grads are on.

    `Span.forward_batch` runs in inference mode (no graph); its undecorated body is the same pass."""
    LoraHooks.of(backend.span).cover(list(lora))
    span = backend.span
    with lora_pass([x.shape[0] * x.shape[1]], [lora]):
        return type(span).forward_batch.__wrapped__(span, [x], [0], start, end, [None])[0]  # (B, T, hidden)


async def forward(
    backend: SpanBackend, x: torch.Tensor, start: int, end: int, tensors: dict[str, torch.Tensor], scale: float
) -> torch.Tensor:
    backend.check_span(start, end)
    backend.check_hidden(x)
    _check_size(backend, x)
    lora = client_lora(backend, tensors, scale, start, end)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return _span_pass(backend, x, start, end, lora)

    return await torch_threads.in_passing_thread(run)


async def backward(
    backend: SpanBackend,
    x: torch.Tensor,
    grad_output: torch.Tensor,
    start: int,
    end: int,
    tensors: dict[str, torch.Tensor],
    scale: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(d loss / d x (B, T, hidden), {LoRA tensor name: its gradient}) for the request's LoRA."""
    backend.check_span(start, end)
    backend.check_hidden(x)
    _check_size(backend, x)
    if grad_output.shape != x.shape:
        raise RequestError(f"grad_output must have the inputs' shape {list(x.shape)}, got {list(grad_output.shape)}")
    if not torch.isfinite(grad_output).all():
        raise RequestError("grad_output contains NaN or infinity")
    lora = client_lora(backend, tensors, scale, start, end)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.enable_grad():
            leaf = x.to(backend.info.dtype).detach().requires_grad_(True)
            trainable = {
                p: LoraWeights(w.a.detach().requires_grad_(True), w.b.detach().requires_grad_(True), w.scale)
                for p, w in lora.items()
            }
            out = _span_pass(backend, leaf, start, end, trainable)
            params = [t for w in trainable.values() for t in (w.a, w.b)]
            grads = torch.autograd.grad(out, [leaf, *params], grad_output.to(out.dtype), allow_unused=True)
        named = {}
        for (path, w), ga, gb in zip(trainable.items(), grads[1::2], grads[2::2], strict=True):
            named[f"{path}.lora_A"] = ga if ga is not None else torch.zeros_like(w.a)
            named[f"{path}.lora_B"] = gb if gb is not None else torch.zeros_like(w.b)
        return grads[0], named

    return await torch_threads.in_passing_thread(run)
