"""A multi-turn conversation over one inference session: only the tokens the nodes have not seen are sent.

`AsyncDistributedModel.session()` opens one; the KV cache stays on the nodes between turns.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import torch

from .config import GenerationOptions
from .sampling import SamplingParams
from .session import InferenceSession
from .text_stream import text_only, text_pieces

if TYPE_CHECKING:
    from .model import AsyncDistributedModel, Prompt


class AsyncChatSession:
    """Turns of one conversation over one inference session.

    Each call passes the whole conversation (messages, text or ids); only the tokens the nodes have not
    seen yet are sent. If the new conversation is not an extension of the cached one (an edited turn),
    the session rewinds to the common prefix instead of starting over.
    """

    def __init__(self, model: AsyncDistributedModel, max_length: int, options: GenerationOptions | None = None):
        self.model, self.max_length = model, max_length
        self.options = options or model.generation  # this conversation's draft, draft_tokens and adapter
        self.session: InferenceSession | None = None
        self.cached: list[int] = []  # token ids whose keys/values are on the nodes
        self.history: list[int] = []  # the conversation so far, generated tokens included

    async def __aenter__(self) -> AsyncChatSession:
        self.session = await self.model.open_session(self.max_length, options=self.options)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    def _ids(self, prompt: Prompt, chat: bool) -> torch.Tensor:
        if isinstance(prompt, str) and not chat and self.history:  # plain text continues the conversation
            more = self.model.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
            return torch.cat([torch.tensor([self.history]), more], dim=1)
        return self.model.encode(prompt, chat)

    async def generate_ids(
        self,
        prompt: Prompt,
        chat: bool = False,
        draft: str | None = None,
        draft_tokens: int | None = None,
        **sampling: Any,
    ) -> AsyncGenerator[torch.Tensor, None]:
        """draft, draft_tokens: this turn's (None: the conversation's); its adapter is the session's."""
        ids = self._ids(prompt, chat)
        if ids.shape[0] != 1:
            raise ValueError("a chat session holds one conversation (batch size 1)")
        flat = ids[0].tolist()
        common = 0
        while common < min(len(flat), len(self.cached)) and flat[common] == self.cached[common]:
            common += 1
        common = min(common, len(flat) - 1)  # at least one token must go through the nodes
        params = SamplingParams(**sampling)
        if len(flat) + params.max_new_tokens > self.max_length:
            raise ValueError(f"the conversation would exceed the session's max_length {self.max_length}")
        self.cached, self.history = flat, list(flat)
        options = self.options.override(draft, draft_tokens)
        new_ids = self.model.generate_ids(ids, params, self.session, common, options)
        async with contextlib.aclosing(new_ids):  # closed now if this turn is: the next may step the session
            async for new in new_ids:
                token = int(new[0])
                self.cached, self.history = list(self.history), self.history + [token]  # all but the newest are cached
                yield new

    async def generate(self, prompt: Prompt, chat: bool = False, **sampling: Any) -> torch.Tensor:
        """sampling: as AsyncDistributedModel.generate, draft and draft_tokens included."""
        ids = self._ids(prompt, chat)
        new = [n async for n in self.generate_ids(ids, **sampling)]
        return torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids

    def stream(
        self,
        prompt: Prompt,
        chat: bool = False,
        draft: str | None = None,
        draft_tokens: int | None = None,
        **sampling: Any,
    ) -> AsyncGenerator[str, None]:
        new_ids, model = self.generate_ids(prompt, chat, draft, draft_tokens, **sampling), self.model
        return text_only(text_pieces(model.tokenizer, new_ids, SamplingParams(**sampling), model.eos_ids))
