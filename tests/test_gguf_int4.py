"""int4 spans of a 4-bit GGUF served with the file's own codes (models/gguf_q4.py), not re-quantized floats.

The references are real: the dequantized float cache that transformers' GGUF loader (its name map and its
q/k row permutation) wrote, and the raw Q4_1 blocks themselves, decoded here from the GGUF block layout.
With float32 scales the served weights are the dequantized ones bit for bit; the bf16 scales the CPU
kernel needs round d and m + 8d (float16 in the file) to 8 significant bits, so each weight moves by at
most 2^-8 (|q - 8| d + |m + 8d|), plus the bf16 rounding of the readout (`dequantized()` in bf16).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from greedy import PROMPTS, chat_ids, hf_greedy, span_greedy
from swarm import run_cli, start_node, stop_all
from transformers import AutoTokenizer

from torchnode.models.checkpoint import default_gguf
from torchnode.models.families import LAYER_PREFIX, load_head, load_span
from torchnode.models.gguf_convert import gguf_to_safetensors
from torchnode.models.gguf_q4 import GGUF_Q4_BLOCKS, read_gguf_q4_blocks
from torchnode.models.quantization import GROUP_SIZE, Int4Linear
from torchnode.models.safetensors_files import SINGLE_SHARD

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
GREEDY_TOKENS = 16
NEAR_TIE = 0.1  # logits: where int4's own greedy answer leaves fp32's, fp32's top two are closer than this


def q4_1_parts(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (out, in) 0..15, d (out, in/32), m (out, in/32)) of Q4_1 block rows, from the GGUF layout:
    per block d and m (float16), then 16 bytes, code j in the low nibble of byte j and j + 16 in the high."""
    rows = blocks.view(blocks.shape[0], -1, 20)  # (out, in/32, 20)
    d = rows[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    m = rows[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
    codes = torch.cat([rows[..., 4:] & 0x0F, rows[..., 4:] >> 4], dim=-1).reshape(blocks.shape[0], -1)
    return codes, d, m


def in_blocks(*layers: int):
    prefixes = tuple(f"{LAYER_PREFIX}{i}." for i in layers)
    return lambda key: key.startswith(prefixes)


def test_the_kept_q4_blocks_decode_to_the_float_cache_bit_for_bit(default_checkpoint):
    """Blocks 0 and 29: every linear is kept (q and k through the same row permutation as their floats),
    and with float32 scales its weights equal the dequantized ones exactly (d and m are float16 and codes
    4 bits, so (q - 8) d + (m + 8d) rounds nowhere in float32). The Q8_0 embedding has no entry."""
    wanted = in_blocks(0, 29)
    blocks = read_gguf_q4_blocks(default_checkpoint.path, wanted)
    assert sorted(blocks) == sorted(f"{LAYER_PREFIX}{i}.{name}.weight" for i in (0, 29) for name in LINEARS)
    assert not read_gguf_q4_blocks(default_checkpoint.path, lambda key: key == "model.embed_tokens.weight")
    floats = default_checkpoint.read_tensors(wanted)
    for key, (kind, raw) in blocks.items():
        assert kind == "Q4_1"
        served = Int4Linear.from_gguf(kind, raw, torch.float32).dequantized()
        assert torch.equal(served, floats[key]), f"{key}: {(served - floats[key]).abs().max():.2e} off"


def test_a_served_int4_span_holds_the_gguf_codes_within_bf16_rounding(default_checkpoint):
    """What a node serves: load_span(..., quant="int4") on blocks 28:30. Its packed codes are the file's
    nibbles (packed by the same kernel routine), its scales and zeros the file's d and m + 8d in bf16, and
    its weights the dequantized floats within the bf16 rounding bound of the module docstring."""
    messages: list[str] = []
    span = load_span(default_checkpoint, 28, 30, quant="int4", on_status=messages.append)
    assert messages == ["int4: 14 of 14 linears served from the GGUF's own Q4_1 codes"]
    raws = read_gguf_q4_blocks(default_checkpoint.path, in_blocks(28, 29))
    floats = default_checkpoint.read_tensors(lambda key: key in raws)
    pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    for key, (_, raw) in raws.items():
        layer = span.get_submodule("layers." + key.removeprefix(LAYER_PREFIX).removesuffix(".weight"))
        assert isinstance(layer, Int4Linear) and layer.packed_for_kernel
        codes, d, m = q4_1_parts(raw)
        assert torch.equal(layer.weight, pack(codes.to(torch.int32), 1)), f"{key}: codes are not the file's"
        assert torch.equal(layer.scales_and_zeros[..., 0], d.t().to(torch.bfloat16))
        assert torch.equal(layer.scales_and_zeros[..., 1], (m + 8 * d).t().to(torch.bfloat16))
        w = floats[key]
        error = (layer.dequantized().float() - w).abs()
        d_, z_ = d.repeat_interleave(GROUP_SIZE, 1), (m + 8 * d).repeat_interleave(GROUP_SIZE, 1)  # (out, in)
        bound = 2**-8 * ((codes.float() - 8).abs() * d_ + z_.abs() + w.abs())
        assert (error <= bound).all(), f"{key}: {(error / bound).max():.2f} x the bf16 bound"


def test_a_cache_made_before_the_q4_blocks_gets_them_without_converting_again(
    default_checkpoint, tmp_path, monkeypatch
):
    """An old cache directory (config and floats, no gguf-q4/) is completed in place: the blocks written are
    the same bytes as a fresh conversion's, and the float weights are not dequantized again."""
    monkeypatch.setenv("TORCHNODE_CACHE", str(tmp_path))
    old = tmp_path / "gguf" / default_checkpoint.path.name  # the same GGUF file: the same cache key
    old.mkdir(parents=True)
    shutil.copy(default_checkpoint.path / "config.json", old)
    messages: list[str] = []
    assert gguf_to_safetensors(default_gguf(), messages.append) == old
    assert len(messages) == 1 and messages[0].startswith("keeping the Q4 blocks")
    assert not (old / SINGLE_SHARD).exists()
    assert (old / GGUF_Q4_BLOCKS).read_bytes() == (default_checkpoint.path / GGUF_Q4_BLOCKS).read_bytes()
    assert gguf_to_safetensors(default_gguf(), messages.append) == old and len(messages) == 1  # done once


def test_a_checkpoint_without_q4_blocks_is_re_quantized(tiny_llama):
    """Not from a GGUF file: every linear is rounded from its floats, and the node says so."""
    from torchnode.models.checkpoint import resolve

    messages: list[str] = []
    span = load_span(resolve(str(tiny_llama)), 0, 2, quant="int4", on_status=messages.append)
    assert messages == ["int4: 14 re-quantized from float weights (no GGUF Q4 blocks)"]
    assert sum(isinstance(m, Int4Linear) for m in span.modules()) == 14


@pytest.mark.slow
def test_int4_from_gguf_codes_answers_as_fp32_up_to_a_near_tie(default_checkpoint):
    """All 30 blocks from the GGUF's codes. Fed fp32's greedy answer to PROMPTS[0], int4 picks fp32's next
    token at every one of its 16 positions; generating on its own, it follows fp32 until a near-tie of fp32's
    top two logits, where the kernel's rounding decides (measured on an AVX-512 CPU: 6 tokens, then a tie
    0.019 apart; on the machine the README's first figure came from, all 32)."""
    tokenizer = AutoTokenizer.from_pretrained(default_checkpoint.path)
    head, total = load_head(default_checkpoint), default_checkpoint.hf_config.num_hidden_layers
    ids = chat_ids(tokenizer, PROMPTS[0])
    with torch.inference_mode():
        fp32 = load_span(default_checkpoint, 0, total)
        expected = span_greedy(head, fp32, ids, GREEDY_TOKENS)
        int4 = load_span(default_checkpoint, 0, total, quant="int4")
        assert all(isinstance(int4.get_submodule(f"layers.{i}.{n}"), Int4Linear) for i in range(total) for n in LINEARS)
        text = torch.cat([ids, torch.tensor([expected])], dim=1)
        fed = slice(ids.shape[1] - 1, -1)  # the logits that chose each of fp32's tokens
        fp32_logits = head.logits(fp32(head.embed(text), 0, 0, total))[0, fed]  # (16, V)
        int4_choice = head.logits(int4(head.embed(text), 0, 0, total))[0, fed].argmax(-1)  # (16,)
        generated = span_greedy(head, int4, ids, GREEDY_TOKENS)
    assert int4_choice.tolist() == expected, "fed fp32's answer, int4 chose another next token"
    top2 = fp32_logits.topk(2, -1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    first = next((i for i, (a, b) in enumerate(zip(generated, expected, strict=True)) if a != b), None)
    if first is not None:
        assert margins[first] < NEAR_TIE, (
            f"int4 left fp32's answer at token {first}, where fp32's margin is {margins[first]:.3f}"
        )


@pytest.mark.swarm
@pytest.mark.slow
def test_join_quant_int4_serves_the_gguf_codes_and_generate_answers_as_fp32_to_its_first_near_tie(
    default_checkpoint, default_reference
):
    """End to end: `torchnode join default --quant int4` serves all 30 blocks from the GGUF's own codes (it
    says so), and `torchnode generate` through it answers fp32's tokens up to fp32's first near-tie."""
    hf, tokenizer = default_reference
    ids = chat_ids(tokenizer, PROMPTS[0])
    with torch.inference_mode():
        expected = hf_greedy(hf, ids, GREEDY_TOKENS)
        top2 = hf(expected).logits[0, ids.shape[1] - 1 : -1].topk(2, -1).values  # the logits that chose each token
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    sure = next((i for i, m in enumerate(margins) if m < NEAR_TIE), len(margins))  # tokens before the first tie
    assert sure >= 4, f"fp32 nearly ties at token {sure}: the prompt proves too little"
    prefix = tokenizer.decode(expected[0, ids.shape[1] : ids.shape[1] + sure], skip_special_tokens=True)
    node = start_node("default", "--blocks", "0:30", "--quant", "int4")
    try:
        assert "int4: 210 of 210 linears served from the GGUF's own Q4_1 codes" in node.log
        result = run_cli(
            "generate",
            "default",
            "--peers",
            node.address,
            "--greedy",
            "--chat",
            "--max-new-tokens",
            str(GREEDY_TOKENS),
            PROMPTS[0],
        )
    finally:
        stop_all([node])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prefix), f"{result.stdout!r} does not start with fp32's {prefix!r}"
