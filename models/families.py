"""Which family config serves which transformers `model_type`, and loading spans and heads from checkpoints.

Every family runs the shared `block.Block`, `Span` and `Head`; a family is its config class, which reads
the transformers config and builds the parts that differ (the feed-forward; DeepSeek's attention too).
A new family is one entry here.
"""

from __future__ import annotations

import torch
from torch import nn

from .block import Head, Span
from .checkpoint import Checkpoint
from .llama.config import LlamaConfig, rope_inverse_frequencies
from .deepseek.config import DeepseekV3Config
from .mixtral.config import MixtralConfig
from .qwen3_moe.config import Qwen3MoeConfig
from .quantization import check_mode, quantize_span

LAYER_PREFIX = "model.layers."

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


def _load(module: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
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
) -> nn.Module:
    """Builds blocks [start, end) on `device` and reads only their weights, each converted to `dtype` and
    moved there as it is read, so the peak is the span plus one tensor; quant="int8"/"int4" stores linear
    weights in 8 or 4 bits (quantized on `device`, one layer at a time)."""
    total = num_blocks(ckpt)
    if not 0 <= start < end <= total:
        raise ValueError(f"span {start}:{end} is outside the model's {total} blocks (0:{total})")
    check_mode(quant, torch.device(device))
    config = config_of(ckpt)
    inv_freq, scaling = rope_inverse_frequencies(ckpt.hf_config)
    with torch.device("meta"):
        span = Span(config, start, end, inv_freq, scaling)
    tensors = ckpt.read_tensors(lambda key: _block_index(key) in range(start, end), dtype, device)
    tensors = {"layers." + k.removeprefix(LAYER_PREFIX): v for k, v in tensors.items()}
    span = _load(span, tensors, dtype)
    span.inv_freq = inv_freq.to(device)  # buffers are not in the checkpoint
    return quantize_span(span, quant)


def load_head(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> nn.Module:
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
