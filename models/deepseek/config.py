"""DeepSeek-V3 as a config: the shared block with its own attention (multi-head latent attention,
`attention.py`) and feed-forward (dense SwiGLU in the first `first_k_dense_replace` layers, then shared +
routed experts, `moe.py`). Norms, residuals and the rotary tables are the shared block's.

The KV cache geometry the node allocates and budgets is the latent's: one "head" of (r + d_rope) / 2 in
each of k and v (see attention.py), so `num_kv_heads` and `head_dim` here describe the cache, not the heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from torch import nn
from transformers import PretrainedConfig

from ..feed_forward import MLP
from ..llama.config import LlamaConfig
from .attention import LatentAttention
from .moe import DeepseekMoE, GroupRouter


@dataclass(frozen=True)
class DeepseekV3Config(LlamaConfig):
    q_lora_rank: int | None = None  # None: a plain q_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True
    attention_scale: float = 1.0  # qk_head_dim ** -0.5, times yarn's mscale² where the rope is scaled
    moe_intermediate_size: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    shared_experts: int = 0
    groups: int = 1
    top_groups: int = 1
    normalize_top_k: bool = True
    routed_scaling: float = 1.0
    dense_layers: int = 0  # the first this many layers use the dense MLP

    def attention(self, layer: int) -> nn.Module:
        return LatentAttention(self)

    def feed_forward(self, layer: int) -> nn.Module:
        if layer < self.dense_layers:
            return MLP(self.hidden_size, self.intermediate_size, self.mlp_bias)
        router = GroupRouter(
            self.hidden_size,
            self.num_experts,
            self.experts_per_token,
            self.groups,
            self.top_groups,
            self.normalize_top_k,
            self.routed_scaling,
        )
        return DeepseekMoE(self.hidden_size, self.moe_intermediate_size, self.num_experts, self.shared_experts, router)

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> DeepseekV3Config:
        latent = hf.kv_lora_rank + hf.qk_rope_head_dim
        if latent % 2:
            raise ValueError(
                f"kv_lora_rank + qk_rope_head_dim = {latent} must be even (the cache holds it in two halves)"
            )
        return replace(
            super().from_hf(hf),
            num_kv_heads=1,
            head_dim=latent // 2,
            q_lora_rank=hf.q_lora_rank,
            kv_lora_rank=hf.kv_lora_rank,
            qk_nope_head_dim=hf.qk_nope_head_dim,
            qk_rope_head_dim=hf.qk_rope_head_dim,
            v_head_dim=hf.v_head_dim,
            rope_interleave=bool(getattr(hf, "rope_interleave", True)),
            attention_scale=attention_scale(hf),
            moe_intermediate_size=hf.moe_intermediate_size,
            num_experts=hf.n_routed_experts,
            experts_per_token=hf.num_experts_per_tok,
            shared_experts=hf.n_shared_experts or 0,
            groups=hf.n_group,
            top_groups=hf.topk_group,
            normalize_top_k=bool(hf.norm_topk_prob),
            routed_scaling=float(hf.routed_scaling_factor),
            dense_layers=hf.first_k_dense_replace,
        )


def attention_scale(hf: PretrainedConfig) -> float:
    """As transformers' `yarn_apply_mscale`: qk_head_dim^-0.5, times mscale² under a scaled rope with mscale_all_dim."""
    scale = (hf.qk_nope_head_dim + hf.qk_rope_head_dim) ** -0.5
    params = hf.rope_parameters
    mscale_all_dim = params.get("mscale_all_dim", 0) if params.get("rope_type", "default") != "default" else 0
    if mscale_all_dim and params["factor"] > 1:
        mscale = 0.1 * mscale_all_dim * math.log(params["factor"]) + 1.0
        scale *= mscale * mscale
    return scale
