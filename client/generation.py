"""The decode loop: embed -> session step through the chain -> norm + LM head -> next token."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import torch
from torch import nn

from .sampling import SamplingParams, next_tokens
from .session import InferenceSession


async def generate_ids(
    head: nn.Module,
    session: InferenceSession,
    input_ids: torch.Tensor,
    params: SamplingParams,
    eos_ids: Sequence[int],
    cached: int = 0,
) -> AsyncIterator[torch.Tensor]:
    """Yields the next token ids (B,) one step at a time; sequences that hit EOS keep yielding EOS.

    The first `cached` tokens of `input_ids` are already in the session's KV caches (an earlier turn):
    only the rest is sent, at position `cached` (rewinding the session if it holds more).
    """
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    eos = torch.tensor(list(eos_ids) if not params.ignore_eos else [], dtype=torch.long)
    ids = input_ids
    out = await session.step(head.embed(input_ids[:, cached:]), position=cached)  # prefill
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for i in range(params.max_new_tokens):
        logits = head.logits(out[:, -1:])[:, -1]  # (B, V): only the last position needs the LM head
        new = next_tokens(logits, params, ids, generator)
        if len(eos):
            new = torch.where(finished, eos[0], new)
            finished |= torch.isin(new, eos)
        yield new
        if finished.all() or i + 1 == params.max_new_tokens:
            return
        ids = torch.cat([ids, new[:, None]], dim=1)
        out = await session.step(head.embed(new[:, None]))
