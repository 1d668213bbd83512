"""Mixtral as a config: the Llama numbers plus how many experts there are and how many each token uses,
and its feed-forward, a sparse mixture of experts (in `moe.py`); attention, norms and rotary are Llama's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig

from ..llama.config import LlamaConfig, LoadHook
from .moe import SparseMoE, split_fused_experts


@dataclass(frozen=True)
class MixtralConfig(LlamaConfig):
    num_experts: int = 8  # `intermediate_size` is each expert's
    experts_per_token: int = 2

    feed_forward_name: ClassVar[str] = "block_sparse_moe"  # `model.layers.{i}.block_sparse_moe.experts.{e}.w1`
    load_hook: ClassVar[LoadHook | None] = staticmethod(split_fused_experts)  # fused 3D experts (GGUF, in memory)

    def feed_forward(self, layer: int) -> nn.Module:
        """Every Mixtral block routes each token to `experts_per_token` of `num_experts` experts."""
        return SparseMoE(self.hidden_size, self.intermediate_size, self.num_experts, self.experts_per_token)

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> MixtralConfig:
        return replace(super().from_hf(hf), num_experts=hf.num_local_experts, experts_per_token=hf.num_experts_per_tok)
