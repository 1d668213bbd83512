"""The decode loop: embed -> session step through the chain -> norm + LM head -> next token.

With a drafter, `generate_ids` hands one sequence to speculative.py, which verifies several drafted
tokens per pass; the plain loop below stays the reference it must equal.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import torch

from ..models.block import Head
from .head_batcher import HeadBatcher
from .sampling import SamplingParams, next_tokens
from .session import InferenceSession
from .speculative import Drafter, speculative_ids


async def generate_ids(
    head: Head | HeadBatcher,
    session: InferenceSession,
    input_ids: torch.Tensor,
    params: SamplingParams,
    eos_ids: Sequence[int],
    cached: int = 0,
    drafter: Drafter | None = None,
    draft_tokens: int = 0,
    draft_ahead: bool = True,
) -> AsyncGenerator[torch.Tensor, None]:
    """Yields the next token ids (B,) one step at a time; sequences that hit EOS keep yielding EOS.

    The first `cached` tokens of `input_ids` are already in the session's KV caches (an earlier turn):
    only the rest is sent, at position `cached` (rewinding the session if it holds more). With a
    `drafter` and `draft_tokens` > 0, a single sequence (B = 1) decodes speculatively (`draft_ahead`: see
    speculative.DraftAhead); a batch decodes plainly.
    """
    verifier = session.verifier  # client/verification/verifier.py: tokens are released once their window is checked
    if drafter is not None and draft_tokens > 0 and input_ids.shape[0] == 1:
        async for new in speculative_ids(
            head, session, input_ids, params, eos_ids, drafter, draft_tokens, cached, ahead=draft_ahead
        ):
            yield new
        return
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    eos = torch.tensor(list(eos_ids) if not params.ignore_eos else [], dtype=torch.long)
    prompt, ids = input_ids.shape[1], input_ids
    out = await session.prefill(head.embed(input_ids[:, cached:]), position=cached)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    pending: list[tuple[torch.Tensor, tuple]] = []  # unreleased tokens (B,), each with the state before it
    batcher = HeadBatcher.of(head)
    with batcher.decoding() as member:  # passes wait for concurrent sessions: their steps leave together
        while ids.shape[1] - prompt < params.max_new_tokens:
            # (B, V): only the last position needs the LM head, run in one pass with other sessions' (head_batcher.py)
            before = (generator.get_state() if generator is not None else None, finished.clone())
            if params.plain_greedy:  # the argmax comes with the pass (taken once for every session in it)
                new = (await batcher.greedy(out[:, -1:], member))[1][:, -1]
            else:
                logits = (await batcher.logits(out[:, -1:], member))[:, -1]
                new = next_tokens(logits, params, ids, generator)
            if len(eos):
                new = torch.where(finished, eos[0], new)
                finished |= torch.isin(new, eos)
            ids = torch.cat([ids, new[:, None]], dim=1)  # the token at index j came from the output at position j - 1
            pending.append((new, before))
            done = bool(finished.all()) or ids.shape[1] - prompt == params.max_new_tokens
            rewind = await verifier.check(final=done) if verifier is not None else None
            if rewind is not None:  # a node lied at `rewind`: tokens from outputs at >= rewind are void
                keep = max(rewind + 1, prompt)
                first_void = len(pending) - (ids.shape[1] - keep)
                state, finished = pending[first_void][1]
                if generator is not None:
                    generator.set_state(state)
                del pending[first_void:]
                ids = ids[:, :keep]
                out = await session.step(batcher.embed(ids[:, rewind:]), position=rewind)
                continue
            unchecked = (
                0 if verifier is None else ids.shape[1] - 1 - verifier.verified
            )  # tokens whose output is unchecked
            released = max(len(pending) - unchecked, 0)
            # the next step leaves before the tokens are handed over: the nodes work while the caller takes them
            # (a caller in another thread, the SDK's sync iterator, costs a round trip between threads per token);
            # a caller that stops here leaves it to land before anything else the session does
            step = None if done else session.step_ahead(batcher.embed(new[:, None]))
            for token, _ in pending[:released]:
                yield token
            if step is None:
                return
            del pending[:released]
            out = await step
