"""Routed mixtures of SwiGLU experts as Qwen3-MoE and DeepSeek checkpoints name them: `mlp.gate` (the router)
and `mlp.experts.{e}.gate_proj/up_proj/down_proj`. The router differs per family; sending tokens to their
experts and summing the weighted outputs (`dispatch`) is the same, in transformers' order (ascending expert).
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
