"""Mixtral's feed-forward: a router sending each token to its top-k SwiGLU experts.

Parameter names are the checkpoint's (`block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1`, ...), which
is what Mixtral checkpoints on the hub hold and what transformers' `save_pretrained` writes. A state dict in
transformers' in-memory layout (fused 3D `mlp.experts.gate_up_proj`, as a GGUF dequantized by
`gguf_convert.gguf_to_safetensors` holds) is split into those names when it is loaded (`split_fused_experts`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Expert(nn.Module):
    """One SwiGLU feed-forward; w1 is the gate, w3 the up and w2 the down projection."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (n, C)


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(Expert(hidden_size, intermediate_size) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.view(B * T, C)  # (N, C)
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (N, E), in fp32 as transformers does
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, K)
        weights = weights / weights.sum(dim=-1, keepdim=True)  # renormalized over the chosen K
        y = torch.zeros_like(x)
        for e in chosen.unique().tolist():  # ascending, the order transformers adds experts in
            token, slot = torch.where(chosen == e)  # tokens routed to expert e, and which of their K
            out = self.experts[e](x[token]) * weights[token, slot, None]  # (n, C)
            y.index_add_(0, token, out.to(y.dtype))
        return y.view(B, T, C)


def split_fused_experts(block: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Block load pre-hook: renames transformers' in-memory MoE layout to the checkpoint names, in place.

    `mlp.gate.weight` (E, C) -> `block_sparse_moe.gate.weight`; `mlp.experts.gate_up_proj` (E, 2I, C) ->
    `experts.{e}.w1` (gate rows) and `w3` (up rows); `mlp.experts.down_proj` (E, C, I) -> `experts.{e}.w2`.
    It hooks the block, not the MoE: the fused names sit under `mlp.`, outside the MoE's own prefix.
    """
    fused = prefix + "mlp.experts.gate_up_proj"
    if fused not in state_dict:
        return
    new = prefix + "block_sparse_moe."
    gate_up = state_dict.pop(fused)  # (E, 2I, C)
    down = state_dict.pop(prefix + "mlp.experts.down_proj")  # (E, C, I)
    state_dict[new + "gate.weight"] = state_dict.pop(prefix + "mlp.gate.weight")
    for e in range(gate_up.shape[0]):
        w1, w3 = gate_up[e].chunk(2, dim=0)  # (I, C) each
        state_dict[f"{new}experts.{e}.w1.weight"] = w1
        state_dict[f"{new}experts.{e}.w2.weight"] = down[e]
        state_dict[f"{new}experts.{e}.w3.weight"] = w3
