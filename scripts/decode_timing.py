"""One greedy decode through the SDK, timed token by token: what the distance benchmarks measure
(scripts/bench_wan.py, scripts/bench_relay.py)."""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class TimedDecode:
    tokens: list[int]  # the new token ids (of the first sequence)
    started: float  # time.perf_counter() of the request
    stamps: list[float]  # time.perf_counter() as each token arrived

    @property
    def first_token_s(self) -> float:
        """Request -> first token: opening the session, prefilling the prompt."""
        return self.stamps[0] - self.started

    @property
    def tokens_per_s(self) -> float:
        """New tokens over request -> last token, first token included."""
        return len(self.stamps) / (self.stamps[-1] - self.started)

    @property
    def per_token_s(self) -> float:
        """Mean time per token after the first: the decoding alone, without the prefill."""
        return (self.stamps[-1] - self.stamps[0]) / max(1, len(self.stamps) - 1)

    @property
    def median_gap_s(self) -> float:
        """Median time between consecutive tokens (0 for one token; near 0 where speculation yields bursts)."""
        return statistics.median(b - a for a, b in itertools.pairwise(self.stamps)) if len(self.stamps) > 1 else 0.0


def timed_decode(model, ids: torch.Tensor, tokens: int, draft: str | None = None) -> TimedDecode:
    """`tokens` new tokens of `ids` from a sync `DistributedModel`, greedy, EOS ignored (every run as long)."""
    from torchnode.client.sampling import SamplingParams

    core, params = model.async_model, SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    out, stamps, started = [], [], time.perf_counter()
    options = core.generation.override(draft=draft)
    for new in model.iterate(core.generate_ids(ids, params, options=options)):
        out.append(int(new[0]))
        stamps.append(time.perf_counter())
    return TimedDecode(out, started, stamps)
