"""A dishonest node, for tests only (never a production flag): the real span backend, with outputs corrupted
by one of three policies, or only its speed a lie:

  decode     lies on every single-token (decode) step, answers prefills honestly
  random     lies on a random quarter of its steps (seeded)
  unchecked  lies only where it believes nobody checks: on decode steps of sessions that look like plain
             generation (one prefill, then single tokens), after a few honest steps; any session with a
             multi-token step after its first (what a verifier's prefill would look like) gets the truth
  slow       honest outputs, but sleeps SLOW_STEP_S before every step and stateless pass

All of them claim to be 100x faster than they are, to attract clients. In-process:
`dishonest_memory_node(ckpt, start, end, address, mode)` (tests/helpers/memory_node.py's node). As a process:
`python tests/helpers/dishonest_node.py MODE join MODEL --blocks ... ` runs the real `torchnode join` with
this backend in place of the honest one.
"""

from __future__ import annotations

import asyncio
import random
import sys

import torch

from torchnode.node.span_backend import Session, SpanBackend

MODES = ("decode", "random", "unchecked")  # the lying ones
SLOW = "slow"
SLOW_STEP_S = 0.25  # `slow` sleeps this long before each step (the node's own speed figure never sees it)
LIE_PROBABILITY = 0.25
TRUST_STEPS = 3  # `unchecked` answers this many steps of each session honestly first
CLAIMED_SPEEDUP = 100  # the tokens/s it announces, over what it measures or serves


def corrupt(out: torch.Tensor) -> torch.Tensor:
    """A lie big enough to change the next token: every position pushed by twice its RMS along a fixed
    direction (deterministic, so runs repeat)."""
    direction = torch.sin(torch.arange(out.shape[-1], dtype=torch.float32))  # (H,)
    rms = out.float().pow(2).mean(-1, keepdim=True).sqrt()  # (B, T, 1)
    return (out.float() + 2.0 * rms * direction).to(out.dtype)


class DishonestBackend(SpanBackend):
    def __init__(self, *args, mode: str = "decode", seed: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if mode not in (*MODES, SLOW):
            raise ValueError(f"mode must be one of {(*MODES, SLOW)}, got {mode!r}")
        self.mode, self.rng = mode, random.Random(seed)
        self.looks_checked: set[str] = set()  # sessions with a multi-token step after the first
        self.steps_seen: dict[str, int] = {}
        self.lies = 0
        self.lie_positions: list[int] = []  # where each lie started (benchmarks: how soon it is caught)

    def _lies(self, session: Session, x: torch.Tensor, step: int) -> bool:
        if self.mode == SLOW:
            return False
        if self.mode == "decode":
            return x.shape[1] == 1
        if self.mode == "random":
            return self.rng.random() < LIE_PROBABILITY
        if step > 0 and x.shape[1] > 1:
            self.looks_checked.add(session.id)
        seen = self.steps_seen[session.id] = self.steps_seen.get(session.id, 0) + 1
        return session.id not in self.looks_checked and x.shape[1] == 1 and seen > TRUST_STEPS

    def measure_throughput(self, steps: int = 8) -> float:
        """Claims to be 100x faster than it is, so that routing sends clients its way (in what it announces:
        `self.throughput`, not only in what it returns)."""
        self.throughput = super().measure_throughput(steps) * CLAIMED_SPEEDUP
        return self.throughput

    def refresh_throughput(self) -> float:
        """Keeps claiming it: the honest refresh would announce the speed it really serves at, after which
        routing (rightly) prefers honest chains and a test waiting for the liar to be picked waits in vain."""
        self.throughput = self.speed.current(self.throughput / CLAIMED_SPEEDUP) * CLAIMED_SPEEDUP
        return self.throughput

    async def forward(self, x, start: int, end: int, reply_dtype=None, client: bytes = b""):
        if self.mode == SLOW:
            await asyncio.sleep(SLOW_STEP_S)
        return await super().forward(x, start, end, reply_dtype, client)

    async def step(self, session: Session, step: int, x, position: int, reply_dtype=None):
        if self.mode == SLOW and x is not None:
            await asyncio.sleep(SLOW_STEP_S)
        out = await super().step(session, step, x, position, reply_dtype)
        if out is not None and self._lies(session, x, step):
            self.lies += 1
            self.lie_positions.append(position)
            return corrupt(out)
        return out


def dishonest_memory_node(
    ckpt, start: int, end: int, address: str, mode: str, seed: int = 1, adapters=(), quant: str = "none"
):
    """tests/helpers/memory_node.py's in-memory node, lying with `mode` (also on sessions with one of its
    `adapters`), with `quant` weights."""
    from memory_node import MemoryNode

    node = MemoryNode(ckpt, start, end, address, adapters=adapters, quant=quant)
    honest = node.backend
    node.backend = DishonestBackend(honest.span, honest.info, honest.limits, honest.adapters, mode=mode, seed=seed)
    node.backend.throughput = honest.throughput
    honest.shutdown()
    return node


def main() -> None:
    """`python tests/helpers/dishonest_node.py MODE join ...`: the real node process, with this backend."""
    mode, args = sys.argv[1], sys.argv[2:]
    import functools

    import torchnode.node.server as server
    from torchnode.cli import app

    server.SpanBackend = functools.partial(DishonestBackend, mode=mode)  # test-only: this process lies
    app(args, prog_name="torchnode")


if __name__ == "__main__":
    main()
