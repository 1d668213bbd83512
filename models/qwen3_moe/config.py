"""Qwen3-MoE as a config: Qwen3's numbers (q/k RMSNorm per head) plus the experts, and which layers stay dense
(`mlp_only_layers`, and all but every `decoder_sparse_step`-th); attention, norms and rotary are the shared block's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig

from ..feed_forward import MLP
from ..llama.config import LlamaConfig, LoadHook
from .moe import SoftmaxMoE, split_fused_experts


@dataclass(frozen=True)
class Qwen3MoeConfig(LlamaConfig):
    moe_intermediate_size: int = 0  # each expert's; `intermediate_size` is the dense layers'
    num_experts: int = 0
    experts_per_token: int = 0
    normalize_top_k: bool = False  # renormalize the chosen experts' probabilities to sum to 1
    dense_layers: frozenset[int] = frozenset()

    load_hook: ClassVar[LoadHook | None] = staticmethod(split_fused_experts)  # fused 3D experts (GGUF)

    def feed_forward(self, layer: int) -> nn.Module:
        if layer in self.dense_layers:
            return MLP(self.hidden_size, self.intermediate_size, self.mlp_bias)
        return SoftmaxMoE(
            self.hidden_size, self.moe_intermediate_size, self.num_experts, self.experts_per_token, self.normalize_top_k
        )

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> Qwen3MoeConfig:
        if getattr(hf, "use_sliding_window", False):
            raise ValueError("Qwen3-MoE with use_sliding_window is not supported")
        step = hf.decoder_sparse_step
        dense = {
            i for i in range(hf.num_hidden_layers) if i in hf.mlp_only_layers or hf.num_experts == 0 or (i + 1) % step
        }
        return replace(
            super().from_hf(hf),
            qk_norm=True,
            moe_intermediate_size=hf.moe_intermediate_size,
            num_experts=hf.num_experts,
            experts_per_token=hf.num_experts_per_tok,
            normalize_top_k=bool(hf.norm_topk_prob),
            dense_layers=frozenset(dense),
        )
