"""Which family config serves which transformers `model_type`, and loading spans and heads from checkpoints.

Every family runs the shared `block.Block`, `Span` and `Head`; a family is its config class, which reads
the transformers config and builds the parts that differ (the feed-forward; DeepSeek's attention too).
A new family is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from .block import Head, Span
from .checkpoint import Checkpoint
from .deepseek.config import DeepseekV3Config
from .gguf_q4 import read_gguf_q4_blocks, replaced_by_q4_blocks
from .llama.config import LlamaConfig, rope_inverse_frequencies
from .mixtral.config import MixtralConfig
from .quantization import KEEP_FLOAT, QuantizeReport, check_mode, quantize_linears
from .qwen3_moe.config import Qwen3MoeConfig

LAYER_PREFIX = "model.layers."
M = TypeVar("M", bound=nn.Module)

FAMILIES: dict[str, type[LlamaConfig]] = {
    "llama": LlamaConfig,
    "mistral": LlamaConfig,
    "qwen2": LlamaConfig,
    "qwen3": LlamaConfig,
    "mixtral": MixtralConfig,
    "qwen3_moe": Qwen3MoeConfig,
    "deepseek_v3": DeepseekV3Config,
}


def config_of(ckpt: Checkpoint) -> LlamaConfig:
    """The block config of the checkpoint's family; unsupported model types fail here, before any weight is read."""
    model_type = ckpt.hf_config.model_type
    if model_type not in FAMILIES:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type].from_hf(ckpt.hf_config)


def num_blocks(ckpt: Checkpoint) -> int:
    return ckpt.hf_config.num_hidden_layers


def _block_index(key: str) -> int | None:
    """12 for "model.layers.12.mlp.up_proj.weight"; None for tensors outside the blocks."""
    if not key.startswith(LAYER_PREFIX):
        return None
    return int(key[len(LAYER_PREFIX) :].split(".", 1)[0])


def _load(module: M, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> M:
    """Puts the read tensors into a meta-device module as its own parameters (`assign`: no second copy)."""
    missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
    tensors.clear()  # the module holds them now; no reference may outlive a later conversion
    missing = [k for k in missing if k != "lm_head.weight"]  # tied heads share the embedding
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model code: missing {missing}, unexpected {unexpected}")
    return module.to(dtype).eval().requires_grad_(False)


def load_span(
    ckpt: Checkpoint,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    quant: str = "none",
    device: torch.device | str = "cpu",
    on_status: Callable[[str], None] = lambda _: None,
) -> Span:
    """Builds blocks [start, end) on `device` and reads only their weights, each converted to `dtype` and
    moved there as it is read, so the peak is the span plus one tensor; quant="int8"/"int4" stores linear
    weights in 8 or 4 bits (quantized on `device`, one layer at a time). With int4, a linear a GGUF file
    holds in Q4_0/Q4_1 is served with the file's own codes (models/gguf_q4.py), and its float weights are
    never read (MoE experts too: their fused float tensors are skipped where the blocks hold every expert)."""
    total = num_blocks(ckpt)
    if not 0 <= start < end <= total:
        raise ValueError(f"span {start}:{end} is outside the model's {total} blocks (0:{total})")
    check_mode(quant, torch.device(device))
    config = config_of(ckpt)
    inv_freq, scaling = rope_inverse_frequencies(ckpt.hf_config)
    with torch.device("meta"):
        span = Span(config, start, end, inv_freq, scaling)
    blocks = _gguf_q4_blocks(ckpt, span, start, end, device) if quant == "int4" else {}
    from_blocks = {name + ".weight" for name in blocks}
    replaced = replaced_by_q4_blocks(ckpt.path) if blocks else frozenset()  # fused experts, all in blocks

    def wanted(key: str) -> bool:
        return _block_index(key) in range(start, end) and _in_span(key) not in from_blocks and key not in replaced

    if quant == "none":
        tensors = {_in_span(k): v for k, v in ckpt.read_tensors(wanted, dtype, device).items()}
        span = _load(span, tensors, dtype)
    else:  # block by block, each quantized as soon as it is read: the peak is the quantized span plus one float block
        check_mode(quant, torch.device(device))
        report = QuantizeReport()
        for i in range(start, end):
            prefix = f"layers.{i}."
            tensors = {
                _in_span(k).removeprefix(prefix): v
                for k, v in ckpt.read_tensors(lambda k, i=i: wanted(k) and _block_index(k) == i, dtype, device).items()
            }
            for key in from_blocks:  # left on the meta device: the layer is built from its blocks, not from floats
                if key.startswith(prefix):
                    tensors[key.removeprefix(prefix)] = span.get_parameter(key)
            block = _load(span.layers[str(i)], tensors, dtype)
            quantize_linears(block, quant, blocks, prefix.removesuffix("."), report)
        if line := report.status(quant):
            on_status(line)
    span.inv_freq = inv_freq.to(device)  # buffers are not in the checkpoint
    return span.eval().requires_grad_(False)


def _in_span(key: str) -> str:
    """The span's name of a checkpoint tensor: "model.layers.12.mlp.up.weight" -> "layers.12.mlp.up.weight"."""
    return "layers." + key.removeprefix(LAYER_PREFIX)


def _gguf_q4_blocks(
    ckpt: Checkpoint, span: nn.Module, start: int, end: int, device: torch.device | str
) -> dict[str, tuple[str, torch.Tensor]]:
    """{linear's name in the span: (GGUF type, raw blocks)} for the span's quantizable linears whose weights
    the checkpoint's GGUF file holds in Q4_0/Q4_1; empty for a checkpoint that is not from a GGUF file."""
    linears = {
        name for name, m in span.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1] not in KEEP_FLOAT
    }

    def wanted(key: str) -> bool:
        return _block_index(key) in range(start, end) and _in_span(key).removesuffix(".weight") in linears

    blocks = read_gguf_q4_blocks(ckpt.path, wanted, device)
    return {_in_span(key).removesuffix(".weight"): raw for key, raw in blocks.items()}


def load_head(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Head:
    """Builds the client's part on `device`: embeddings, final norm, LM head."""
    config = config_of(ckpt)
    with torch.device("meta"):
        head = Head(config)
    names = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    tensors = ckpt.read_tensors(lambda key: key in names, dtype, device)
    head = _load(head, {names[k]: v for k, v in tensors.items()}, dtype)
    if config.tie_word_embeddings:
        head.lm_head.weight = head.embed_tokens.weight  # assign=True replaced the embedding the head was tied to
    return head
