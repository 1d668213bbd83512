"""Routed mixtures of SwiGLU experts as Qwen3-MoE and DeepSeek checkpoints name them: `mlp.gate` (the router)
and `mlp.experts.{e}.gate_proj/up_proj/down_proj`. The router differs per family; sending tokens to their
experts and summing the weighted outputs (`dispatch`) is the same, in transformers' order (ascending expert).
transformers' in-memory layout of the experts (fused 3-D, as a dequantized GGUF holds them) is split into
those names when a span loads (`split_fused_experts`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..feed_forward import MLP


def dispatch(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """sum_k weights[n, k] * experts[chosen[n, k]](x[n]) for x (N, C), chosen and weights (N, K)."""
    y = torch.zeros_like(x)
    for e in chosen.unique().tolist():  # ascending, the order transformers adds experts in
        token, slot = torch.where(chosen == e)  # tokens routed to expert e, and which of their K
        out = experts[e](x[token]) * weights[token, slot, None]  # (n, C)
        y.index_add_(0, token, out.to(y.dtype))
    return y


class SoftmaxMoE(nn.Module):
    """Qwen3-MoE's feed-forward: softmax over the experts' logits (fp32), top-k, optionally renormalized."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, normalize: bool):
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(hidden_size, intermediate_size) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        logits = self.gate(x)  # (N, E)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, K)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return dispatch(x, chosen, weights.to(logits.dtype), self.experts).view(shape)


def split_fused_experts(block: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Block load pre-hook: transformers' fused experts into the checkpoint names, in place (views, no copy).

    `mlp.experts.gate_up_proj` (E, 2I, C) -> `mlp.experts.{e}.gate_proj` (gate rows first, as transformers'
    GGUF loader fuses them) and `up_proj`; `mlp.experts.down_proj` (E, C, I) -> `mlp.experts.{e}.down_proj`.
    """
    experts = prefix + "mlp.experts."
    if experts + "gate_up_proj" not in state_dict:
        return
    gate_up = state_dict.pop(experts + "gate_up_proj")  # (E, 2I, C)
    down = state_dict.pop(experts + "down_proj")  # (E, C, I)
    for e in range(gate_up.shape[0]):
        gate, up = gate_up[e].chunk(2, dim=0)  # (I, C) each
        state_dict[f"{experts}{e}.gate_proj.weight"] = gate
        state_dict[f"{experts}{e}.up_proj.weight"] = up
        state_dict[f"{experts}{e}.down_proj.weight"] = down[e]
