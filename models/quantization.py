"""Serving a span with 8- or 4-bit weights (weight-only): `--quant int8`, `int4`, and `nf4` on CUDA.

int8: int8 rows and one bf16 scale per output row.

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

int4 (`Int4Linear`): groups of 32 inputs share a bf16 scale and zero point (asymmetric min/max, 16
levels), the layout of torch's int4 kernels; on the CPU the matmul is `aten._weight_int4pack_mm_for_cpu`
on bf16 activations over weights packed by `aten._convert_weight_to_int4pack_for_cpu` (its fast path,
as for int8); on other devices the same codes are kept two to a byte and dequantized per call. Weights take
about 0.16x of fp32 (4 bits plus 2 x 16 bits per 32). SmolLM2 over all 30 blocks (scripts/bench_quant.py):
63 MiB instead of 405, decode 39.8 tokens/s instead of 15.8 (re-quantized; the GGUF's own codes, below, run
the same kernel), perplexity 18.47 from the GGUF's codes / 18.40 re-quantized instead of 18.45, next token
as fp32's at 98.4 % of positions either way. (On random Gaussian weights int4 moves each linear's output by
~7.7 %, the rounding of 16 levels; SmolLM2's came from a Q4_1 GGUF, whose groups of 32 this grid nearly
reproduces.)

nf4 (`nf4_linear`): bitsandbytes' 4-bit NormalFloat on CUDA only (bitsandbytes is not a dependency:
`pip install bitsandbytes` on the GPU machine).

A GGUF checkpoint that is already 4-bit (Q4_0: w = d (q - 8); Q4_1: w = d q + m, blocks of 32) maps onto
the int4 layout with the same codes: scale d, zero m + 8d (Q4_0: 0), no requantization (`Int4Linear.from_gguf`).
`--quant int4` serves it that way: the GGUF conversion keeps each Q4_0/Q4_1 weight's raw blocks beside the
float cache (models/gguf_q4.py), and `quantize_span` builds those linears from them, without reading their
floats; weights of other types (Q8_0, Q6_K, ...) and checkpoints without blocks are re-quantized
(`from_linear`). Is that exact to GGUF's dequantized weights? The codes always are (the file's nibbles);
the weights only with float32 scales and zeros, where (q - 8) d + (m + 8d) rounds nowhere (d, m are float16):
bit-identical on all 210 of SmolLM2's linears. The CPU kernel's fast path wants them in bf16, which keeps 8
of float16's 11 significant bits, so a served weight is off by at most 2^-8 (|q - 8| d + |m + 8d|), plus one
bf16 rounding of itself where it is read back in bf16 (`dequantized()`): measured at most 0.63 % of a
tensor's largest weight (tests/test_gguf_int4.py checks both bounds). Still closer than
re-quantizing the floats, whose bf16 grid does not reproduce GGUF's: 10 blocks of SmolLM2 move the hidden
states by 0.7 % from the file's codes, 1.6 % re-quantized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MODES = ("none", "int8", "int4", "nf4")
GROUP_SIZE = 32  # int4: inputs sharing one scale and zero (GGUF Q4 blocks are 32 too)
CPU = torch.device("cpu")
M = TypeVar("M", bound=nn.Module)
KEEP_FLOAT = frozenset({"gate"})  # MoE routers: tiny, and a small error would flip the discrete top-k choice

# torch's CPU kernel for int8 weights: fast with bf16 activations, 10-40x slower with fp32 or fp16 ones
_int8_mm = getattr(torch, "_weight_int8pack_mm", None)
KERNEL_DTYPE = torch.bfloat16
# and for int4 weights: the same story (bf16 fast, fp32 ~20x slower than bf16)
_int4_pack = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
_int4_mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)


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


class Int4Linear(nn.Module):
    """y = x Wᵀ + b with W in 4-bit codes q (0..15), per group of GROUP_SIZE inputs a scale s and zero z:
    W[o, i] = (q[o, i] - 8) * s[g, o] + z[g, o], g = i // GROUP_SIZE (torch's int4 kernel layout)."""

    def __init__(self, codes: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.packed_for_kernel = _int4_pack is not None and codes.device.type == "cpu"
        if self.packed_for_kernel:  # (out, in/2) uint8, in the CPU kernel's blocked order
            packed = _int4_pack(codes.to(torch.int32), 1)
        else:  # (out, in/2) uint8: even inputs in the low nibble, odd ones in the high
            packed = (codes[:, ::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (in/G, out, 2): [..., 0] scale, [..., 1] zero
        self.register_buffer("bias", bias)  # (out,) in the span's dtype, or None

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        return linear.in_features % GROUP_SIZE == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = KERNEL_DTYPE) -> Int4Linear:
        """Rounds each group of 32 weights to 16 levels between its min and max (in `dtype` scales/zeros)."""
        w = linear.weight.detach().float()  # (out, in)
        groups = w.view(w.shape[0], -1, GROUP_SIZE)  # (out, in/G, G)
        low, high = groups.amin(-1), groups.amax(-1)  # (out, in/G)
        scale = ((high - low) / 15).clamp(min=1e-8).to(dtype)
        zero = (low + 8 * scale.float()).to(dtype)  # the kernel adds z to (q - 8) s
        # rounded against the scales and zeros actually used, so their own rounding is no error of the codes
        codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
        codes = codes.to(torch.uint8).view_as(w)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(codes, torch.stack([scale.t(), zero.t()], dim=-1).contiguous(), bias)

    @classmethod
    def from_gguf(
        cls, kind: str, blocks: torch.Tensor, dtype: torch.dtype = KERNEL_DTYPE, bias: torch.Tensor | None = None
    ) -> Int4Linear:
        """Serves a GGUF Q4_0 / Q4_1 weight (out rows of raw blocks, uint8 (out, in/32 x 18 or 20 bytes)) with
        its own codes: no dequantization to float, no requantization. Q4_0 block: d (f16), 16 bytes of codes;
        Q4_1: d, m (f16), 16 bytes; code j of a block in the low nibble of byte j, code j + 16 in the high.
        `bias` (the GGUF keeps biases as separate float tensors) is added as it is."""
        head = {"Q4_0": 2, "Q4_1": 4}[kind]
        out = blocks.shape[0]
        blocks = blocks.view(out, -1, head + GROUP_SIZE // 2)  # (out, in/G, bytes)
        d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()  # (out, in/G)
        m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float() if kind == "Q4_1" else None
        qs = blocks[..., head:]  # (out, in/G, 16)
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(out, -1)  # (out, in)
        zero = m + 8 * d if m is not None else torch.zeros_like(d)  # Q4_1: d q + m = (q - 8) d + (m + 8 d)
        return cls(codes, torch.stack([d.t(), zero.t()], dim=-1).to(dtype).contiguous(), bias)

    def dequantized(self) -> torch.Tensor:
        """W (out, in) as the layer uses it, in the scales' dtype."""
        sz = self.scales_and_zeros
        if self.packed_for_kernel:  # the kernel applied to the identity returns Wᵀ exactly: one term per sum
            eye = torch.eye(self.in_features, dtype=sz.dtype, device=sz.device)
            return _int4_mm(eye, self.weight, GROUP_SIZE, sz).t()
        codes = torch.stack([self.weight & 0x0F, self.weight >> 4], dim=-1).view(self.out_features, -1)
        groups = codes.view(self.out_features, -1, GROUP_SIZE).to(sz.dtype) - 8  # (out, in/G, G)
        scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # (out, in/G, 1)
        return (groups * scale + zero).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        sz = self.scales_and_zeros
        if self.packed_for_kernel:
            y = _int4_mm(flat.to(sz.dtype), self.weight, GROUP_SIZE, sz).to(x.dtype)  # (N, out)
        else:
            y = F.linear(flat, self.dequantized().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={GROUP_SIZE}"


def nf4_linear(linear: nn.Linear) -> nn.Module:
    """bitsandbytes' NF4 linear on CUDA, computing in the layer's dtype (quantized when moved to the GPU)."""
    import bitsandbytes as bnb

    device = linear.weight.device
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=linear.weight.dtype,
        quant_type="nf4",
        device="cpu",
    )
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().cpu(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().cpu(), requires_grad=False)
    return layer.to(device)


def check_mode(mode: str, device: torch.device = CPU) -> None:
    """Refuses, before any weight is read, a mode that does not exist or cannot run on `device`."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    if mode == "nf4":
        if device.type != "cuda":
            raise ValueError(f"--quant nf4 runs on CUDA only (bitsandbytes); this span is on {device}: use int4")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("--quant nf4 needs bitsandbytes: pip install bitsandbytes") from None


def _quantized(linear: nn.Linear, mode: str) -> nn.Module:
    if mode == "int8":
        return Int8Linear.from_linear(linear)
    if mode == "int4":
        return Int4Linear.from_linear(linear) if Int4Linear.fits(linear) else linear
    return nf4_linear(linear)


def _from_gguf(linear: nn.Linear, kind: str, blocks: torch.Tensor) -> Int4Linear:
    bias = None if linear.bias is None else linear.bias.detach()
    served = Int4Linear.from_gguf(kind, blocks, bias=bias)
    if (served.out_features, served.in_features) != (linear.out_features, linear.in_features):
        raise ValueError(
            f"GGUF {kind} blocks give a ({served.out_features}, {served.in_features}) weight for a layer of "
            f"({linear.out_features}, {linear.in_features})"
        )
    return served


@dataclass
class QuantizeReport:
    """What quantizing did so far, over one or several calls (a span loaded block by block)."""

    linears: int = 0
    from_codes: int = 0
    kinds: set[str] = field(default_factory=set)

    def status(self, mode: str) -> str | None:
        """The one line `on_status` hears: for int4, how many linears came from which path."""
        if mode != "int4":
            return None
        rest = f"{self.linears - self.from_codes} re-quantized from float weights"
        if not self.from_codes:
            return f"int4: {rest} (no GGUF Q4 blocks)"
        kinds = "/".join(sorted(self.kinds))
        codes = f"int4: {self.from_codes} of {self.linears} linears served from the GGUF's own {kinds} codes"
        return codes + (f", {rest}" if self.from_codes < self.linears else "")


def quantize_linears(
    module: nn.Module,
    mode: str,
    gguf_blocks: dict[str, tuple[str, torch.Tensor]] | None = None,
    prefix: str = "",
    report: QuantizeReport | None = None,
) -> QuantizeReport:
    """Replaces, in place and one at a time, every linear of `module` (named `prefix` inside the span whose
    names `gguf_blocks` uses) by its `mode` version; counts what it did into `report`."""
    report = report if report is not None else QuantizeReport()
    gguf_blocks = {} if gguf_blocks is None else gguf_blocks
    for inner, parent in list(module.named_modules()):
        path = ".".join(p for p in (prefix, inner) if p)
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in KEEP_FLOAT:
                report.linears += 1
                raw = gguf_blocks.pop(f"{path}.{name}" if path else name, None)
                if raw is not None:
                    report.from_codes, report.kinds = report.from_codes + 1, report.kinds | {raw[0]}
                    setattr(parent, name, _from_gguf(child, *raw))
                elif child.weight.is_meta:
                    raise ValueError(f"{path}.{name} has neither float weights nor GGUF Q4 blocks")
                else:
                    setattr(parent, name, _quantized(child, mode))
    return report


def quantize_span(
    span: M,
    mode: str,
    gguf_blocks: dict[str, tuple[str, torch.Tensor]] | None = None,
    on_status: Callable[[str], None] = lambda _: None,
) -> M:
    """Returns `span` with its linear layers in `mode` ("none": unchanged); modules are replaced in place,
    one at a time, so the float weights of a layer are freed as soon as its quantized copy exists.
    int4 leaves float a linear whose input size is not a multiple of GROUP_SIZE (none in common models).

    `gguf_blocks` ({linear's name in the span: (GGUF type, raw Q4_0/Q4_1 block rows)}, int4 only) serves
    those linears with the file's own codes (`Int4Linear.from_gguf`); their float weights need not have
    been read (they may be on the meta device). Entries are dropped as they are used, so the raw blocks
    of a layer are freed once it is built; `on_status` hears, once, how many linears came from which path."""
    check_mode(mode, next(p.device for p in span.parameters() if not p.is_meta))
    if mode == "none":
        return span
    if gguf_blocks and mode != "int4":
        raise ValueError(f"GGUF Q4 blocks are served by int4 only, not {mode}")
    line = quantize_linears(span, mode, gguf_blocks).status(mode)
    if line:
        on_status(line)
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
