"""Mixtral's numbers: the Llama ones plus how many experts there are and how many each token uses."""

from __future__ import annotations

from dataclasses import dataclass, replace

from transformers import PretrainedConfig

from ..llama.config import LlamaConfig


@dataclass(frozen=True)
class MixtralConfig(LlamaConfig):
    num_experts: int = 8  # `intermediate_size` is each expert's
    experts_per_token: int = 2

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> MixtralConfig:
        return replace(
            super().from_hf(hf), num_experts=hf.num_local_experts, experts_per_token=hf.num_experts_per_tok
        )
