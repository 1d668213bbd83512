"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings, not included in the output
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE  # dividing logits by ~0 overflows: that limit *is* greedy

    @property
    def plain_greedy(self) -> bool:
        """next_tokens is the logits' own argmax (greedy, no repetition penalty)."""
        return self.greedy and self.repetition_penalty == 1.0


def warped_logits(logits: torch.Tensor, params: SamplingParams, previous: torch.Tensor) -> torch.Tensor:
    """logits (B, V) float32, previous ids (B, T) -> the logits next_tokens chooses from (B, V).

    Greedy: repetition penalty only (argmax them). Sampling: also temperature, top-k and top-p, with the
    tokens left out at -inf (softmax them). Speculative sampling needs these distributions themselves.
    """
    if params.repetition_penalty != 1.0:  # as transformers' RepetitionPenaltyLogitsProcessor
        seen = torch.gather(logits, 1, previous)
        seen = torch.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
        logits = logits.scatter(1, previous, seen)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest set reaching top_p
        drop[:, 0] = False  # the most likely token always stays, however small top_p is
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def next_tokens(
    logits: torch.Tensor, params: SamplingParams, previous: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """logits (B, V) float32, previous ids (B, T) -> next ids (B,)."""
    logits = warped_logits(logits, params, previous)
    if params.greedy:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
