"""int4 spans: group-wise 4-bit weights through torch's int4 CPU kernel, GGUF Q4 blocks served as they are.

Not token-exact (like int8): the checks are the rounding bound of each weight, that the kernel computes
with the weights the layer reports, a span's error against fp32, the memory it takes, and how close a
GGUF Q4_1 tensor served without widening is to GGUF's own dequantization (models/quantization.py).
"""

from __future__ import annotations

import gguf
import pytest
import torch
from torch import nn

from torchnode.models import quantization
from torchnode.models.checkpoint import default_gguf
from torchnode.models.families import load_span
from torchnode.models.quantization import GROUP_SIZE, Int4Linear, check_mode, quantize_span, weight_bytes


def linear(inputs: int, outputs: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inputs, outputs, bias=True)


def test_each_weight_is_within_half_a_step_of_its_group():
    layer = linear(576, 192)
    q = Int4Linear.from_linear(layer)
    w = layer.weight.detach()
    groups = w.view(192, -1, GROUP_SIZE)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # (out, in/G)
    error = (q.dequantized().float() - w).abs().view(192, -1, GROUP_SIZE).amax(-1)
    slack = groups.abs().amax(-1) * 2**-7  # the bf16 roundings of scale, zero and the dequantized weight
    assert (error <= step * 0.5 + slack).all()
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (192, 288)  # two codes a byte


def test_the_kernel_multiplies_by_the_weights_it_reports():
    layer = linear(128, 96, seed=1)
    q = Int4Linear.from_linear(layer)
    assert q.packed_for_kernel  # torch's CPU kernel is there in the pinned torch
    x = torch.randn(3, 5, 128)
    expected = x.to(torch.bfloat16).float() @ q.dequantized().float().t() + layer.bias.detach()
    got = q(x)
    assert got.shape == (3, 5, 96)
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()


def test_the_plain_layout_other_devices_use_gives_the_same_weights(monkeypatch):
    layer = linear(64, 32, seed=2)
    kernel = Int4Linear.from_linear(layer)
    monkeypatch.setattr(quantization, "_int4_pack", None)  # as on a device without the CPU kernel
    plain = Int4Linear.from_linear(layer)
    assert not plain.packed_for_kernel
    a, b = plain.dequantized().float(), kernel.dequantized().float()
    assert ((a - b).abs() <= a.abs() * 2**-7 + 1e-6).all()  # the same codes; at most a bf16 rounding apart
    x = torch.randn(2, 64)
    assert (plain(x) - kernel(x)).abs().max().item() < 0.05


def test_a_smollm2_span_in_int4_stays_close_to_fp32_in_a_sixth_of_the_memory(default_checkpoint):
    """SmolLM2's real weights, 10 blocks, re-quantized from the floats (what a node does for a checkpoint
    without Q4 blocks; this GGUF's own codes are test_gguf_int4.py's): measured 1.6 % relative error of the
    output hidden states (0.7 % from the GGUF's codes; its weights came from a Q4_1 GGUF, whose groups of 32
    this int4 grid nearly reproduces; random weights lose ~7.7 % per layer, the rounding of 16 levels)."""
    fp32, int4 = load_span(default_checkpoint, 0, 10), quantize_span(load_span(default_checkpoint, 0, 10), "int4")
    x = torch.randn(1, 9, 576, generator=torch.Generator().manual_seed(3)) * 0.1
    a, b = fp32(x, 0, 0, 10), int4(x, 0, 0, 10)
    relative = ((a - b).norm() / a.norm()).item()
    assert 0 < relative < 0.05, f"int4 span off by {relative:.3f} relative to fp32"
    linears = sum(m.weight.numel() * 4 for m in fp32.modules() if isinstance(m, nn.Linear))
    quantized = sum(weight_bytes(m) for m in int4.modules() if isinstance(m, Int4Linear))
    assert quantized <= linears * (0.5 + 4 / GROUP_SIZE) / 4  # 4 bits + a bf16 scale and zero per 32 weights


def test_nf4_is_refused_on_the_cpu_with_a_reason():
    with pytest.raises(ValueError, match="CUDA only"):
        check_mode("nf4", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown quantization"):
        check_mode("int2")


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-6), (torch.bfloat16, 2**-8)])
def test_gguf_q4_1_served_as_4_bit_against_its_dequantized_weights(dtype, bound):
    """The embedded SmolLM2 GGUF's first FFN down projection (Q4_1), served with its own codes: in float32
    it matches gguf's dequantization up to float32 rounding; in bf16 (the kernel's fast path) d and m lose
    precision, so weights move by up to ~2^-8 of their magnitude."""
    reader = gguf.GGUFReader(default_gguf())
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type.name == "Q4_1"
    dequantized = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type))  # (out, in) float32
    served = Int4Linear.from_gguf("Q4_1", torch.from_numpy(tensor.data.copy()), dtype)
    assert served.weight.numel() == dequantized.numel() // 2  # 4 bits a weight, never widened
    error = (served.dequantized().float() - dequantized).abs().max().item()
    assert error <= bound * dequantized.abs().max().item(), f"{dtype}: max weight error {error:.2e}"
