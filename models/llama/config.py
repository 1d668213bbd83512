"""The few numbers a Llama-style block needs, read once from a transformers config."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool = False  # biases on q, k, v (Qwen2: True)
    output_bias: bool = False  # bias on o_proj (Llama: = attention_bias; Qwen2: False)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before rotary
    sliding_window: int | None = None  # Mistral: attend to the last N tokens only

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> LlamaConfig:
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        model_type = hf.model_type
        window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
        return cls(
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            vocab_size=hf.vocab_size,
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            output_bias=model_type != "qwen2" and bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=window if model_type == "mistral" else None,
        )


def rope_inverse_frequencies(hf: PretrainedConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) exactly as transformers computes them, for every rope type it knows."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = hf.rope_parameters
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](hf, None)
    dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return inv_freq, 1.0
