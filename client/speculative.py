"""Speculative decoding across the swarm: draft K tokens here, verify them in one pass through the chain.

Over a real network every pass through the chain costs its round trips, however many tokens it carries,
so a pass that verifies K drafted tokens and keeps the n the target model agrees with yields n + 1
tokens for about the price of one. The nodes' caches are rewound past rejected drafts by the next
step's position (a step may start below the cached length).

Drafters: `ngram` (prompt lookup: copy what followed the latest earlier occurrence of the text's last
few tokens; no model) and a small local model with the target's tokenizer. Greedy decoding keeps the
longest draft prefix equal to the target's argmax, so the output is exactly plain greedy's. Sampling
uses speculative sampling (Leviathan et al. 2023, Chen et al. 2023): draft token d is kept with
probability min(1, p(d) / q(d)), else a token is drawn from max(0, p - q) renormalized, which leaves
the output distributed exactly as the target's p. `DraftLength` adapts K to the acceptance rate, down
to no drafts at all (with an occasional one-token probe), so text with nothing to copy costs what
plain decoding costs.

A draft model costs real time per token, and over a long link the client would otherwise sit idle while a
pass is in flight. So in greedy decoding the next draft is written during the pass (`DraftAhead`, a thread):
it continues from the pass's own draft as if every token of it were accepted. When they all are, and the
target's extra token is the one the draft guessed, the next pass leaves at once with that draft; otherwise
it is dropped (the thread stops at its next token) and the next draft is written as before. Either way the
output is plain greedy's: a draft only decides how many tokens a pass may keep.
"""

from __future__ import annotations

import asyncio
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.block import Head
from .config import DRAFT_QUANT_MODES
from .head_batcher import HeadBatcher
from .sampling import SamplingParams, warped_logits
from .session import InferenceSession

NGRAM = "ngram"
MAX_NGRAM = 3  # prompt lookup tries the last 3, then 2, then 1 tokens


@dataclass(frozen=True)
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # (K, V): the distribution each token was drawn from; None = certain


class DraftState(ABC):
    """One generation's drafter (a draft model keeps its own KV cache per generation)."""

    costly = False  # a draft token takes real compute: worth writing the next draft while a pass is in flight

    @abstractmethod
    def propose(
        self,
        ids: list[int],
        k: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        stop: threading.Event | None = None,
    ) -> Draft:
        """Up to k tokens likely to follow `ids` (fewer, or none, if nothing fits; fewer once `stop` is set)."""


class Drafter(ABC):
    @abstractmethod
    def start(self) -> DraftState: ...


# ---- prompt lookup


class NgramDrafter(Drafter, DraftState):
    """Prompt lookup decoding: the tokens that followed the latest earlier occurrence of the last n tokens."""

    def __init__(self, max_ngram: int = MAX_NGRAM):
        self.max_ngram = max_ngram

    def start(self) -> DraftState:
        return self  # stateless

    def propose(
        self,
        ids: list[int],
        k: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        stop: threading.Event | None = None,
    ) -> Draft:
        for n in range(min(self.max_ngram, len(ids) - 1), 0, -1):
            tail = ids[-n:]
            for at in range(len(ids) - n - 1, -1, -1):  # latest occurrence first: the most recent context
                if ids[at : at + n] == tail:
                    return Draft(ids[at + n : at + n + k])
        return Draft([])


# ---- a small local draft model


class ModelDrafter(Drafter):
    """A small causal LM run here (transformers) with the target's tokenizer."""

    def __init__(self, model: nn.Module, vocab_size: int):
        self.model, self.vocab_size = model.eval(), vocab_size

    def start(self) -> DraftState:
        return _ModelDraftState(self)


class _ModelDraftState(DraftState):
    costly = True

    def __init__(self, drafter: ModelDrafter):
        from transformers import DynamicCache

        self.drafter, self.cache = drafter, DynamicCache()
        self.fed: list[int] = []  # tokens whose keys/values are in self.cache

    @torch.inference_mode()
    def propose(
        self,
        ids: list[int],
        k: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        stop: threading.Event | None = None,
    ) -> Draft:
        common = 0
        while common < min(len(ids) - 1, len(self.fed)) and ids[common] == self.fed[common]:
            common += 1
        if common < len(self.fed):  # forget rejected drafts; at least one token is fed to get logits
            self.cache.crop(common - len(self.fed))  # transformers 5: a negative count of tokens to drop
            self.fed = self.fed[:common]
        context, tokens, probs = list(ids), [], []
        logits = self._feed(ids[common:])
        for i in range(k):
            warped = warped_logits(logits, params, torch.tensor([context]))  # (1, V)
            if params.greedy:
                token = int(warped.argmax(-1))
            else:
                q = warped.softmax(-1)[0]  # (V,)
                token = int(torch.multinomial(q, 1, generator=generator))
                probs.append(q)
            tokens.append(token)
            context.append(token)
            if stop is not None and stop.is_set():
                break
            if i + 1 < k:
                logits = self._feed([token])
        return Draft(tokens, torch.stack(probs) if probs else None)

    def _feed(self, new: list[int]) -> torch.Tensor:
        """Runs `new` tokens on top of the cache; the last position's logits (1, V), sized to the target's vocab."""
        out = self.drafter.model(input_ids=torch.tensor([new]), cache=self.cache, use_cache=True, logits_to_keep=1)
        self.fed += new
        logits = out.logits[:, -1].float()  # (1, V_draft)
        vocab = self.drafter.vocab_size
        if logits.shape[-1] >= vocab:
            return logits[:, :vocab]
        return torch.nn.functional.pad(logits, (0, vocab - logits.shape[-1]), value=float("-inf"))


class DraftError(ValueError):
    """The `draft` option names neither 'ngram' nor a usable draft model."""


def load_drafter(spec: str, tokenizer, vocab_size: int, quant: str = "none") -> Drafter:
    """'ngram', or a draft model ('default', a local directory, a .gguf, a hub id) with the target's tokenizer.

    quant ("int8" / "int4", models/quantization.py): the draft model's linear layers, LM head included, in 8 or
    4 bits, so a draft token costs less than the target's blocks would here (SmolLM2 on one CPU thread: 56 ms
    per token in fp32, 41 in int8, 24 in int4). A draft only proposes: greedy output stays plain greedy's,
    and a rougher draft only costs acceptance. int4 from a Q4_0/Q4_1 GGUF (as `default`) uses the file's own
    codes, the weights an int4 node would serve."""
    if quant not in DRAFT_QUANT_MODES:
        raise DraftError(f"unknown draft quantization {quant!r}; choose one of {', '.join(DRAFT_QUANT_MODES)}")
    if spec == NGRAM:
        if quant != "none":
            raise DraftError(f"draft quantization {quant!r} needs a draft model; 'ngram' has no weights")
        return NgramDrafter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models.checkpoint import resolve
    from ..models.gguf_q4 import read_gguf_q4_blocks
    from ..models.quantization import quantize_span

    try:
        ckpt = resolve(spec)
        if AutoTokenizer.from_pretrained(ckpt.path).get_vocab() != tokenizer.get_vocab():
            raise DraftError(f"draft model {spec!r} does not use the target model's tokenizer")
        source = ckpt.repo_id or ckpt.path
        model = AutoModelForCausalLM.from_pretrained(source, revision=ckpt.commit, dtype=torch.float32)
        if quant != "none":  # one linear at a time, so the float weights of each are freed as it is replaced
            codes = read_gguf_q4_blocks(ckpt.path, lambda _: True) if quant == "int4" else {}
            quantize_span(model, quant, {k.removesuffix(".weight"): v for k, v in codes.items()})
    except DraftError:
        raise
    except (OSError, ValueError) as e:
        raise DraftError(f"draft {spec!r} is neither 'ngram' nor a loadable model: {e}") from None
    return ModelDrafter(model, vocab_size)


# ---- how many tokens to draft


@dataclass
class DraftLength:
    """K for the next pass, from the per-token acceptance rate a (decayed counts of kept and rejected drafts).

    Under a, the k-th draft token is kept with probability about a^k; it is sent while that is at least
    MIN_GAIN. Below that even for k = 1, no drafts are sent, except a one-token probe every PROBE_EVERY
    passes, so the rate can recover when the text starts repeating itself.
    """

    max_tokens: int
    kept: float = 2.0  # prior: a = 2/3
    rejected: float = 1.0
    passes_without: int = 0

    MIN_GAIN = 0.25
    DECAY = 0.8
    PROBE_EVERY = 8

    @property
    def rate(self) -> float:
        return self.kept / (self.kept + self.rejected)

    def next(self) -> int:
        a = self.rate
        k = self.max_tokens if a >= 0.999 else int(math.log(self.MIN_GAIN) / math.log(a))
        k = min(k, self.max_tokens)
        if k == 0:
            self.passes_without += 1
            if self.passes_without >= self.PROBE_EVERY:
                self.passes_without, k = 0, 1
        return k

    def update(self, proposed: int, accepted: int) -> None:
        """A pass drafted `proposed` tokens and kept the first `accepted` (a run of successes, then one failure)."""
        if proposed:
            self.kept = self.kept * self.DECAY + accepted
            self.rejected = self.rejected * self.DECAY + (accepted < proposed)


# ---- the next draft, written while a pass is in flight


class DraftAhead:
    """A greedy draft of `k` tokens after `base` (a pass's context and its draft), written in a thread.

    `base` is what the sequence becomes if the pass keeps its whole draft; the sequence continues as the draft
    foresees only if the target's extra token is also the draft's first. One DraftAhead at a time: the draft
    state is not shared between threads, so every path awaits (`take` or `drop`) before drafting again.
    """

    def __init__(self, state: DraftState, base: list[int], k: int, params: SamplingParams):
        self.base, self.stop = base, threading.Event()
        self.task = asyncio.ensure_future(asyncio.to_thread(state.propose, base, k, params, None, self.stop))

    def fits(self, ids: list[int]) -> bool:
        """Whether the draft continues `ids`: the pass kept all of `base` and one more token, the draft's first."""
        return len(ids) > len(self.base) and ids[: len(self.base)] == self.base

    async def take(self, ids: list[int], k: int) -> Draft | None:
        """The next up-to-k tokens after `ids` from this draft, or None (it does not continue `ids`); either
        way the caller then `drop`s it."""
        if not self.fits(ids):
            return None
        drafted = self.base + (await self.task).tokens
        if drafted[: len(ids)] != ids or len(drafted) <= len(ids):
            return None
        return Draft(drafted[len(ids) : len(ids) + k])

    async def drop(self) -> None:
        """Stops the thread at its next token and waits for it, so that the draft state is free again."""
        self.stop.set()
        await asyncio.gather(self.task, return_exceptions=True)


# ---- verification


def accept(
    logits: torch.Tensor, draft: Draft, params: SamplingParams, previous: list[int], generator: torch.Generator | None
) -> list[int]:
    """The target's logits (K + 1, V) at the last sent token and each draft token -> the tokens to keep.

    Returns the accepted draft tokens followed by one more: the target's own choice where it disagreed,
    or after the last draft (so always 1..K + 1 tokens).
    """
    out: list[int] = []
    for j in range(len(draft.tokens) + 1):
        warped = warped_logits(logits[j : j + 1], params, torch.tensor([previous + out]))  # (1, V)
        if params.greedy:
            token = int(warped.argmax(-1))
            out.append(token)
            if j == len(draft.tokens) or token != draft.tokens[j]:
                return out
            continue
        p = warped.softmax(-1)[0]  # (V,)
        if j == len(draft.tokens):
            out.append(int(torch.multinomial(p, 1, generator=generator)))
            return out
        d = draft.tokens[j]
        q = draft.probs[j] if draft.probs is not None else torch.nn.functional.one_hot(torch.tensor(d), p.shape[0])
        if float(torch.rand(1, generator=generator)) * float(q[d]) < float(p[d]):  # kept with prob min(1, p/q)
            out.append(d)
            continue
        residual = (p - q).clamp(min=0)  # (V,)
        if float(residual.sum()) <= 0:  # p == q up to rounding: rejection had probability ~0
            residual = p
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    raise AssertionError("unreachable: the last position always returns")


@dataclass
class SpeculationStats:
    """What a speculative generation did: for benchmarks and tests."""

    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    lengths: list[int] = field(default_factory=list)  # K chosen for each pass
    ahead: int = 0  # passes that left with a draft written while the previous pass was in flight


async def speculative_ids(
    head: Head | HeadBatcher,
    session: InferenceSession,
    input_ids: torch.Tensor,
    params: SamplingParams,
    eos_ids: Sequence[int],
    drafter: Drafter,
    max_draft: int,
    cached: int = 0,
    stats: SpeculationStats | None = None,
    ahead: bool = True,
) -> AsyncIterator[torch.Tensor]:
    """Like generation.generate_ids for one sequence (input_ids (1, T)): yields next ids (1,), several per pass.

    With `session.verifier` (--verify), a token is released only once the output it came from is checked
    (the token at index j of the sequence came from the output at position j - 1); when a check finds a
    lie at position r, the tokens from r on are drafted and decided again, from the state (sampling
    generator included) of the pass that first produced one of them. Greedy output is then exactly
    plain greedy's; sampled output keeps the target's distribution. `ahead`: greedy decoding with a costly
    drafter writes each next draft while the pass is in flight (DraftAhead).
    """
    if input_ids.shape[0] != 1:
        raise ValueError("speculative decoding runs one sequence per session (batch size 1)")
    stats = stats if stats is not None else SpeculationStats()
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    eos = set() if params.ignore_eos else set(eos_ids)
    state, length = drafter.start(), DraftLength(max_draft)
    verifier = session.verifier
    ids = input_ids[0].tolist()
    prompt = released = len(ids)  # ids[:released] are the prompt or already yielded
    position, pending = cached, ids[cached:]  # tokens not in the nodes' caches yet go first, at `position`
    passes: list[tuple[int, torch.Tensor | None]] = []  # (len(ids) before each pass, the generator's state then)
    stopped = False  # an EOS token was accepted
    write_ahead = ahead and params.greedy and state.costly
    pending_draft: DraftAhead | None = None  # the next pass's draft, written while a pass is in flight
    try:
        while True:
            if not stopped and len(ids) - prompt < params.max_new_tokens:
                passes.append((len(ids), generator.get_state() if generator is not None else None))
                # the pass adds one token of its own
                k = min(length.next(), params.max_new_tokens - (len(ids) - prompt) - 1)
                draft = await pending_draft.take(ids, k) if pending_draft is not None and k > 0 else None
                stats.ahead += draft is not None and len(draft.tokens) > 0
                if pending_draft is not None:
                    await pending_draft.drop()  # taken or not, the draft state is this thread's again
                    pending_draft = None
                if draft is None:
                    draft = state.propose(ids, k, params, generator) if k > 0 else Draft([])
                elif len(draft.tokens) < k:  # written for a shorter pass: the rest now, on top of it
                    more = state.propose(ids + draft.tokens, k - len(draft.tokens), params, generator)
                    draft = Draft(draft.tokens + more.tokens)
                hidden = head.embed(torch.tensor([pending + draft.tokens]))  # (1, T, H)
                # one step unless a long prompt is chunked
                sent = asyncio.ensure_future(session.prefill(hidden, position=position))
                if write_ahead and draft.tokens:
                    pending_draft = DraftAhead(state, ids + draft.tokens, k + 1, params)
                out = await sent
                # (K + 1, V), in one LM-head pass with other sessions' (head_batcher.py)
                logits = (await HeadBatcher.of(head).logits(out[:, -len(draft.tokens) - 1 :]))[0]
                new = accept(logits, draft, params, ids, generator)
                if pending_draft is not None and not pending_draft.fits(ids + new):
                    pending_draft.stop.set()  # the next draft starts elsewhere: stop writing this one
                length.update(len(draft.tokens), len(new) - 1)
                stats.passes, stats.drafted, stats.accepted = (
                    stats.passes + 1,
                    stats.drafted + len(draft.tokens),
                    stats.accepted + len(new) - 1,
                )
                stats.lengths.append(k)
                position, pending = position + len(pending) + len(new) - 1, new[-1:]
                if any(t in eos for t in new):
                    new, stopped = new[: next(j for j, t in enumerate(new) if t in eos) + 1], True
                ids += new
            done = stopped or len(ids) - prompt >= params.max_new_tokens
            checked = len(ids)
            if verifier is not None:
                rewind = await verifier.check(final=done)
                if rewind is not None:  # outputs from `rewind` on were a liar's: the tokens they gave are void
                    keep = min(max(rewind + 1, prompt), len(ids))
                    while len(passes) > 1 and passes[-1][0] > keep:
                        passes.pop()
                    start, saved = passes[-1]
                    if generator is not None and saved is not None:
                        generator.set_state(saved)
                    del ids[max(start, released) :]
                    position = min(rewind, len(ids) - 1)
                    pending, stopped = ids[position:], False
                    continue
                checked = min(len(ids), verifier.verified + 1)
            for token in ids[released:checked]:
                yield torch.tensor([token])
            released = max(released, checked)
            if done and released == len(ids):
                return
    finally:
        if pending_draft is not None:
            await pending_draft.drop()
