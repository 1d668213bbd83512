"""Aggregate tokens/s of N concurrent sessions through 2 SmolLM2 nodes (0:15, 15:30; --spans), against plain
transformers running the same N prompts as one padded batch (the reference).

Two swarm figures per N:
- `sdk`: what a user writes, `model.generate([N prompts])`: one session each, run concurrently; the
  client's head batcher merges their LM-head passes and keeps them in step, and the nodes batch their steps;
- `lockstep`: the same N sessions stepped together by this script (one head pass for all N per token,
  all steps sent at once): the upper bound of keeping them in step.
Every figure is N x new tokens / wall time, prefill included. The nodes' Info before and after each run
gives their mean batch over it (what the nodes actually did). The reference runs in a process of its own,
started before the swarm: in this one, the client's compute threads would slow it (models/torch_threads.py).

    .venv/bin/python scripts/bench_batching.py [--sessions 1,2,4,8,16] [--tokens 32] [--node-threads 0]
        [--spans 0:15,15:30] [--max-batch-tokens 256] [--batch-wait-ms 5] [--slab-slots 32] [--no-batch-steps]
        [--no-huge-pages]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import torchnode  # noqa: F401  (first, as in the README's examples: it sets OpenMP's spin before torch loads)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from node_options import add_node_options, node_flags  # noqa: E402
from swarm import mean_batch, node_infos, start_nodes, stop_all  # noqa: E402

from torchnode import openmp_env  # noqa: E402
from torchnode.models.torch_threads import on_compute_thread  # noqa: E402
from torchnode.node.limits import Limits  # noqa: E402

SPANS = "0:15,15:30"
SUBJECTS = [
    "dragons",
    "the sea",
    "a robot",
    "Paris",
    "winter",
    "a lost key",
    "music",
    "the moon",
    "trains",
    "a garden",
    "chess",
    "rain",
    "a lighthouse",
    "bread",
    "mountains",
    "a clock",
]


def prompts(n: int) -> list[str]:
    """n different prompts of different lengths."""
    return [f"Write a story about {SUBJECTS[i % len(SUBJECTS)]}" + " in detail" * (i % 4) for i in range(n)]


class BatchCount:
    """The nodes' mean batch over a run: their Info counters (batches run, sequences in them) read before and
    after it. Why not poll while it runs: polling costs the nodes and this process time the run then lacks
    (polls every 20 ms took a quarter off the figures: N=16 109 instead of 142 tokens/s)."""

    def __init__(self, model, addresses: list[str]):
        self.model, self.addresses, self.mean = model, addresses, 0.0
        self._before: list = []

    def __enter__(self) -> BatchCount:
        self._before = self.model._loop.run(node_infos(self.addresses))
        return self

    def __exit__(self, *exc) -> None:
        self.mean = mean_batch(self._before, self.model._loop.run(node_infos(self.addresses)))


def time_swarm(model, texts: list[str], tokens: int) -> float:
    started = time.perf_counter()
    outs = model.generate(texts, max_new_tokens=tokens, ignore_eos=True)
    elapsed = time.perf_counter() - started
    assert all(o.shape[1] > tokens for o in outs)
    return len(texts) * tokens / elapsed


async def lockstep(core, texts: list[str], tokens: int) -> None:
    """N sessions, greedy, one head pass per token for all of them; each session's steps go to the nodes
    concurrently (the nodes batch them)."""
    ids = [core.encode(t) for t in texts]
    sessions = [await core.open_session(i.shape[1] + tokens) for i in ids]
    try:
        outs = await asyncio.gather(
            *(s.step(core.head.embed(i)) for s, i in zip(sessions, ids, strict=True))
        )  # prefills
        last = torch.cat([o[:, -1:] for o in outs])  # (N, 1, hidden)
        for step in range(tokens):
            logits = await on_compute_thread(core.head.logits, last)
            new = logits[:, -1].argmax(-1)  # (N,): one LM-head pass for every session, on the compute thread
            if step + 1 == tokens:
                return
            embedded = core.head.embed(new[:, None])  # (N, 1, hidden)
            last = torch.cat(await asyncio.gather(*(s.step(embedded[i : i + 1]) for i, s in enumerate(sessions))))
    finally:
        for s in sessions:
            await s.close()


def time_lockstep(model, texts: list[str], tokens: int) -> float:
    started = time.perf_counter()
    model._loop.run(lockstep(model._core, texts, tokens))
    return len(texts) * tokens / (time.perf_counter() - started)


def time_reference(hf, tokenizer, texts: list[str], tokens: int) -> float:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    started = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    elapsed = time.perf_counter() - started
    assert out.shape[1] == batch.input_ids.shape[1] + tokens
    return len(texts) * tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,2,4,8,16", help="comma-separated N")
    parser.add_argument("--tokens", type=int, default=32, help="new greedy tokens per session")
    parser.add_argument(
        "--spans", default=SPANS, help="the nodes' blocks (0:30: one node holding all, no hop between nodes)"
    )
    add_node_options(parser)
    parser.add_argument("--reference-threads", type=int, default=0, help="torch threads of the reference (0: default)")
    parser.add_argument("--max-batch-tokens", type=int, default=256, help="the nodes' --max-batch-tokens")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="the nodes' --batch-wait-ms")
    parser.add_argument(
        "--slab-slots", type=int, default=Limits.slab_slots, help="the nodes' --slab-slots (0: a cache per session)"
    )
    parser.add_argument(
        "--batch-steps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the client's steps to a node in one message per round (StepBatches, the default) or a stream each",
    )
    parser.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)  # the reference's process
    args = parser.parse_args()
    counts = [int(n) for n in args.sessions.split(",")]
    if args.reference_only:
        for n, tokens_per_s in run_reference(counts, args.tokens, args.reference_threads).items():
            print(f"reference {n} {tokens_per_s}", flush=True)
        return

    from torchnode.client.sync_model import DistributedModel

    references = reference_in_own_process(args)
    flags = [
        *node_flags(args),
        "--max-batch-tokens",
        str(args.max_batch_tokens),
        "--batch-wait-ms",
        str(args.batch_wait_ms),
        "--slab-slots",
        str(args.slab_slots),
    ]
    spans = args.spans.split(",")
    nodes = start_nodes("default", spans, *flags)
    rows = []
    try:
        model = DistributedModel.from_pretrained("default", [n.address for n in nodes], batch_steps=args.batch_steps)
        time_swarm(model, prompts(2), 4), time_lockstep(model, prompts(2), 4)  # warm-up
        for n in counts:
            texts = prompts(n)
            addresses = [node.address for node in nodes]
            with BatchCount(model, addresses) as watch:
                sdk = time_swarm(model, texts, args.tokens)
            with BatchCount(model, addresses) as watch_lockstep:
                stepped = time_lockstep(model, texts, args.tokens)
            reference = references[n]
            batches = [watch.mean, watch_lockstep.mean]
            rows.append((n, sdk, stepped, reference, batches))
            print(
                f"N={n:>2}: sdk {sdk:6.1f} tokens/s (node batch {batches[0]:4.1f}), lockstep {stepped:6.1f} "
                f"(node batch {batches[1]:4.1f}), transformers batched {reference:6.1f}",
                flush=True,
            )
        model.close()
    finally:
        stop_all(nodes)

    base = {"sdk": rows[0][1], "lockstep": rows[0][2]} if rows and rows[0][0] == 1 else None
    print(
        f"\n{len(spans)} nodes {', '.join(spans)}, {args.tokens} greedy tokens per session, "
        f"node flags: {' '.join(flags)}, client: {'--batch-steps' if args.batch_steps else '--no-batch-steps'}"
    )
    print(
        "|  N | sdk tokens/s | x N=1 | lockstep tokens/s | x N=1 | transformers batched | sdk / tf | lockstep / tf "
        "| node batch sdk / lockstep |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, sdk, stepped, reference, (batch_sdk, batch_lockstep) in rows:
        gains = [f"{v / base[k]:.2f}" if base else "-" for k, v in (("sdk", sdk), ("lockstep", stepped))]
        print(
            f"| {n} | {sdk:.1f} | {gains[0]} | {stepped:.1f} | {gains[1]} | {reference:.1f} | {sdk / reference:.2f} "
            f"| {stepped / reference:.2f} | {batch_sdk:.1f} / {batch_lockstep:.1f} |"
        )


def run_reference(counts: list[int], tokens: int, threads: int) -> dict[int, float]:
    """transformers' batched tokens/s for each N, in this process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torchnode.models.checkpoint import resolve

    if threads:
        torch.set_num_threads(threads)
    ckpt = resolve("default")
    hf = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt.path, padding_side="left")
    time_reference(hf, tokenizer, prompts(2), 4)  # warm-up
    return {n: time_reference(hf, tokenizer, prompts(n), tokens) for n in counts}


def reference_in_own_process(args: argparse.Namespace) -> dict[int, float]:
    """run_reference in a fresh process of this script, alone on the machine (before the swarm starts)."""
    command = [sys.executable, __file__, "--reference-only", "--sessions", args.sessions, "--tokens", str(args.tokens)]
    command += ["--reference-threads", str(args.reference_threads)]
    env = openmp_env.libgomp_default_env()  # plain transformers, as a user runs it
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return {
        int(n): float(v) for _, n, v in (line.split() for line in out.splitlines() if line.startswith("reference "))
    }


if __name__ == "__main__":
    main()
