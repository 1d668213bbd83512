"""Serving a span with 8-bit weights: int8 rows and one bf16 scale per output row (weight-only).

`quantize_span(span, "int8")` swaps every `nn.Linear` of a loaded span for an `Int8Linear`; norms, rotary
buffers and MoE routers stay in the span's dtype, and so do the residual stream, attention, KV caches and
the wire. Weights take a quarter of fp32 (half of bf16). The matmul is torch's CPU kernel for this format,
`torch._weight_int8pack_mm`, fed bf16 activations (its fast path; with fp32 ones it is 10x slower than a
plain fp32 linear); where the kernel is missing, the weights are dequantized on the fly instead.

SmolLM2 over all 30 blocks (scripts/bench_quant.py, 2 cores): 102 MiB of weights instead of 405, decode
31 tokens/s instead of 15, perplexity 18.57 instead of 18.45. Not token-exact: fed the same text, the next
token agrees with fp32's at 62 of 64 positions of 4 chat answers, and both misses are near-ties (top-2
margin < 0.2); so a free-running greedy answer follows fp32's until the first such tie (32, 32, 12 and 6
tokens on those 4 prompts).

Why not torch's dynamic quantization (`torch.ao.quantization.quantize_dynamic`): it is deprecated in torch
2.13, with the quantized tensor dtypes it builds on, and it rounds activations to 8 bits too, which SmolLM2
does not survive: perplexity 47.5, and the first greedy token already differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MODES = ("none", "int8")
KEEP_FLOAT = frozenset({"gate"})  # MoE routers: tiny, and a small error would flip the discrete top-k choice

# torch's CPU kernel for int8 weights: fast with bf16 activations, 10-40x slower with fp32 or fp16 ones
_int8_mm = getattr(torch, "_weight_int8pack_mm", None)
KERNEL_DTYPE = torch.bfloat16


class Int8Linear(nn.Module):
    """y = x Wᵀ + b, with W stored as int8 (out, in) and a bf16 scale per output row: W = weight * scales."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) bf16, the kernel's dtype
        self.register_buffer("bias", bias)  # (out,) in the span's dtype, or None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()  # (out, in)
        scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(KERNEL_DTYPE)  # symmetric, per row
        # rounded against the bf16 scales actually used, so the rounding of a scale is no error of its row
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scales, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        if _int8_mm is not None and x.device.type == "cpu":
            y = _int8_mm(flat.to(KERNEL_DTYPE), self.weight, self.scales).to(x.dtype)  # (N, out)
        else:
            y = F.linear(flat, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def check_mode(mode: str) -> None:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")


def quantize_span(span: nn.Module, mode: str) -> nn.Module:
    """Returns `span` with its linear layers in `mode` ("none": unchanged); modules are replaced in place."""
    check_mode(mode)
    if mode == "none":
        return span
    for parent in list(span.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in KEEP_FLOAT:
                setattr(parent, name, Int8Linear.from_linear(child))
    return span


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by the module's weights, as stored: its state dict (float parameters, int8 rows and their
    scales); a tensor under two names (a tied weight, a shared module) counts once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for value in module.state_dict().values():
        key = (value.untyped_storage().data_ptr(), value.storage_offset())
        if key not in seen:
            seen.add(key)
            total += value.nbytes
    return total
