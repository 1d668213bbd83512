"""DeepSeek-V3's feed-forward in its MoE layers: a sigmoid router with group-limited top-k and a score
correction bias that only steers the choice, the routed experts, and shared experts every token runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..feed_forward import MLP
from ..qwen3_moe.moe import dispatch


class GroupRouter(nn.Module):
    """Scores = sigmoid(logits) in fp32; experts come in `groups`; a token first keeps the `top_groups` groups
    whose two best (bias-corrected) scores sum highest, then its top-k experts there. Weights are the
    uncorrected scores, optionally renormalized, times `scaling` (transformers' DeepseekV3TopkRouter)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        groups: int,
        top_groups: int,
        normalize: bool,
        scaling: float,
    ):
        super().__init__()
        self.top_k, self.groups, self.top_groups = top_k, groups, top_groups
        self.normalize, self.scaling = normalize, scaling
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))  # in the checkpoint

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C) -> chosen experts (N, K) and their weights (N, K), fp32."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        corrected = scores + self.e_score_correction_bias.float()
        N, E = scores.shape
        group_scores = corrected.view(N, self.groups, -1).topk(2, dim=-1)[0].sum(dim=-1)  # (N, G)
        kept = torch.topk(group_scores, k=self.top_groups, dim=-1, sorted=False)[1]  # (N, top_groups)
        group_mask = torch.zeros_like(group_scores).scatter_(1, kept, 1)  # (N, G)
        expert_mask = group_mask.unsqueeze(-1).expand(N, self.groups, E // self.groups).reshape(N, E)
        chosen = torch.topk(
            corrected.masked_fill(~expert_mask.bool(), float("-inf")), self.top_k, dim=-1, sorted=False
        )[1]
        weights = scores.gather(1, chosen)  # (N, K)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return chosen, weights * self.scaling


class DeepseekMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, shared: int, router: GroupRouter):
        super().__init__()
        self.gate = router
        self.experts = nn.ModuleList(MLP(hidden_size, intermediate_size) for _ in range(num_experts))
        self.shared_experts = MLP(hidden_size, intermediate_size * shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        chosen, weights = self.gate(flat)
        return dispatch(flat, chosen, weights, self.experts).view(shape) + self.shared_experts(x)
