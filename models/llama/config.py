"""The Llama family as a config: the few numbers the shared block needs, read once from a transformers config,
and the feed-forward part it uses (the dense SwiGLU MLP). Mistral, Qwen2 and Qwen3 are this family with
small switches (biases, q/k norms, sliding windows); other families subclass the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from ..feed_forward import MLP

LoadHook = Callable[..., None]  # an `nn.Module.register_load_state_dict_pre_hook` hook


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
    windows: tuple[int | None, ...] = ()  # per layer: attend to the last N tokens only; None (or absent) = all

    feed_forward_name: ClassVar[str] = "mlp"  # what checkpoints call it: `model.layers.{i}.mlp.gate_proj`
    load_hook: ClassVar[LoadHook | None] = None  # renames another layout of a block's weights when loading

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if layer < len(self.windows) else None

    def feed_forward(self, layer: int) -> nn.Module:
        """The feed-forward part of block `layer` (a family may vary it per layer): the dense SwiGLU MLP."""
        return MLP(self.hidden_size, self.intermediate_size, self.mlp_bias)

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> LlamaConfig:
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise ValueError(f"activation {hf.hidden_act!r} is not supported; the block code uses silu")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        model_type = hf.model_type
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
            windows=layer_windows(hf),
        )


def layer_windows(hf: PretrainedConfig) -> tuple[int | None, ...]:
    """The attention window of each layer, as transformers applies it (None = full causal attention).

    Mistral and Mixtral slide every layer. Qwen2 and Qwen3 slide only the layers `layer_types` marks
    "sliding_attention" (by default those from `max_window_layers` on, and only with `use_sliding_window`,
    without which their config sets `sliding_window` to None).
    """
    window = getattr(hf, "sliding_window", None)
    layers = range(hf.num_hidden_layers)
    if window is None or hf.model_type not in ("mistral", "mixtral", "qwen2", "qwen3"):
        return tuple(None for _ in layers)
    if hf.model_type in ("qwen2", "qwen3"):
        return tuple(window if hf.layer_types[i] == "sliding_attention" else None for i in layers)
    return tuple(window for _ in layers)


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
