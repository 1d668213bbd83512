"""Decoding over distance: tokens/s of plain (client-driven hops), node-to-node push, and push with ngram or
draft-model speculative decoding (--modes), on loopback and
through a delay proxy in front of every node, and the first-token latency of a long prompt with and
without pipelined prefill.

Nodes: `torchnode join MODEL` processes splitting the model's blocks evenly over --hops nodes. The
proxy (scripts/delay_proxy.py) adds --delay-ms to every chunk each way. Prompts: a copying one
("repeat this text") and free writing; --tokens greedy tokens each. Every greedy output is compared
with every other of the same prompt (plain, speculative, loopback, delayed): they must be identical.
The bound printed for plain decoding is 1 / (legs x D + compute), compute = 1 / loopback plain tokens/s,
legs = 2 x hops (the client drives every hop) or hops + 1 (node-to-node push); the last column gives each
mode's delayed tokens/s as a multiple of the push bound (above 1: more than one token per pass).
"Links add" is delayed minus loopback time per token, from the request to the last token and, beside
it, after the first token (decoding alone). Each loopback run is followed at once by the same run
delayed, so that the machine's drift falls on both alike.

    .venv/bin/python scripts/bench_wan.py [--hops 2,4] [--delay-ms 25] [--tokens 96] [--draft-model default] \
        [--threads 1]

--draft-model default makes SmolLM2 its own draft: it accepts everything and costs a full local forward
per drafted token, so it shows the mechanism, not the speed of a real small draft. push+cheap-draft runs
the same draft model with --draft-quant: int8 (the default here: 41 ms per drafted token on one thread instead
of 56, and it agrees with the fp32 target almost always) or int4 (the GGUF's own 4-bit codes: 24 ms, but on
free writing a quarter of its tokens are rejected). Not exact either way, so some drafts are rejected; the
line under each table gives it against push alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from decode_timing import timed_decode  # noqa: E402  (scripts/ is on the path when run as a script)
from delay_proxy import spawn as spawn_proxy  # noqa: E402
from swarm import free_port, start_nodes, stop_all  # noqa: E402

COPY_TEXT = (
    "The committee met on Tuesday to review the budget for the new library. After a long discussion, the "
    "members agreed to spend more on children's books, to open the reading room on Sunday afternoons, and "
    "to replace the old computers near the entrance. The chair thanked the volunteers who had organised "
    "the book sale in the spring, which raised enough money to repair the roof. The next meeting will be "
    "held in the town hall on the first Monday of the month, and everyone is welcome to attend."
)
PROMPTS = {
    "copying": f"Repeat the following text exactly, word for word:\n\n{COPY_TEXT}",
    "free": "Write a long story about a dragon who learns to paint.",
}
LONG_TEXT = (
    "Distributed inference splits a language model across machines: each serves a span of blocks and "
    "passes hidden states on to the next. "
)


def spans(total: int, hops: int) -> list[str]:
    cuts = [round(i * total / hops) for i in range(hops + 1)]
    return [f"{a}:{b}" for a, b in itertools.pairwise(cuts)]


def start_proxy(targets: list[str], delay_ms: float) -> tuple[subprocess.Popen, list[str]]:
    listens = [f"127.0.0.1:{free_port()}" for _ in targets]
    return spawn_proxy(list(zip(listens, targets, strict=True)), delay_ms), listens


def first_token_latency(model, ids: torch.Tensor, chunk: int, runs: int) -> float:
    core = model.async_model
    kept, core.generation = core.generation, dataclasses.replace(core.generation, prefill_chunk=chunk)
    try:
        return statistics.median(timed_decode(model, ids, 1).first_token_s for _ in range(runs))
    finally:
        core.generation = kept


def bench_hops(args, hops: int, long_ids: torch.Tensor) -> dict:
    """Every run on loopback is followed at once by the same run through the proxy (interleaved, so that the
    machine's drift over the minutes of a benchmark falls on both alike); medians of --repeats."""
    from torchnode.client.sync_model import DistributedModel

    nodes = start_nodes(args.model, spans(args.blocks, hops), "--threads", str(args.threads), *args.node_args)
    proxy, proxied = start_proxy([n.address for n in nodes], args.delay_ms)
    links = {"loopback": [n.address for n in nodes], f"+{args.delay_ms:g}ms": proxied}
    results, outputs, models = {}, {}, {}
    try:
        for link, peers in links.items():
            models[link] = model = DistributedModel.from_pretrained(args.model, peers)
            timed_decode(model, model.async_model.encode("Hi"), 4)  # warm-up: channels, caches
            if args.draft_model:
                core = model.async_model
                for quant in ("none", args.draft_quant):  # load them once, outside the timings
                    core.drafter(dataclasses.replace(core.generation, draft=args.draft_model, draft_quant=quant))
        for name, text in PROMPTS.items():
            for mode in args.modes:
                kind = mode.removeprefix("push+")
                drafts = {"ngram": "ngram", "draft-model": args.draft_model, "cheap-draft": args.draft_model}
                draft = drafts.get(kind.removesuffix("-serial"))
                if draft == "":  # a draft-model mode, but --draft-model '' skips them
                    continue
                runs = {link: [] for link in links}
                for _ in range(args.repeats):
                    for link, model in models.items():
                        push = mode.startswith("push")  # plain, ngram, draft-model: hop by hop
                        model.async_model.config = dataclasses.replace(model.async_model.config, push=push)
                        quant = args.draft_quant if kind.startswith("cheap-draft") else "none"
                        model.async_model.generation = dataclasses.replace(
                            model.async_model.generation, draft_quant=quant, draft_ahead=not kind.endswith("-serial")
                        )
                        ids = model.async_model.encode(text, chat=True)
                        runs[link].append(timed_decode(model, ids, args.tokens, draft))
                for link, done in runs.items():
                    rate, per_token = (
                        statistics.median(getattr(r, f) for r in done) for f in ("tokens_per_s", "per_token_s")
                    )
                    results[link, name, mode] = rate, per_token
                    outputs.setdefault(name, []).extend(r.tokens for r in done)
                    print(
                        f"  {hops} hops {link:>9} {name:>8} {mode:>17}: {rate:6.2f} tokens/s, "
                        f"{per_token * 1000:6.1f} ms/token after the first",
                        flush=True,
                    )
        for link, model in models.items():
            for chunk in (0, args.prefill_chunk) if long_ids.shape[1] else ():
                latency = first_token_latency(model, long_ids, chunk, args.runs)
                results[link, "prefill", chunk] = latency
                print(
                    f"  {hops} hops {link:>9} first token of {long_ids.shape[1]} tokens, chunk {chunk}: "
                    f"{latency * 1000:7.0f} ms",
                    flush=True,
                )
    finally:
        for model in models.values():
            model.close()
        proxy.terminate()
        proxy.wait()
        stop_all(nodes)
    results["identical"] = all(all(o == outs[0] for o in outs) for outs in outputs.values())
    return results


def idle_slowdown(idles: tuple[float, ...] = (0.0, 0.03, 0.12), runs: int = 40) -> dict[float, float]:
    """Median seconds of the same CPU-bound work (about a node's share of a token here) right after idling
    0, 30 and 120 ms. Delayed links make every node idle ~(hops + 1) x D between its steps, loopback far
    less; on this VM a core computes slower after idling, so part of what "links add" holds is compute."""
    weights = [torch.randn(576, 1536) for _ in range(40)], [torch.randn(1536, 576) for _ in range(40)]
    x = torch.randn(1, 576)

    def work() -> None:
        y = x
        for up, down in zip(*weights, strict=True):
            y = torch.nn.functional.normalize((y @ up) @ down, dim=-1)

    for _ in range(10):
        work()
    took = {}
    for idle in idles:
        times = []
        for _ in range(runs):
            time.sleep(idle)
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        took[idle] = statistics.median(times)
    return took


def report(args, hops: int, r: dict) -> None:
    d, delayed = args.delay_ms / 1000, f"+{args.delay_ms:g}ms"
    compute = 1 / r["loopback", "free", args.modes[0]][0]
    print(f"\n## {hops} hops, {args.delay_ms:g} ms each way, {args.tokens} greedy tokens (tokens/s)")
    bound = 1 / ((hops + 1) * d + compute)  # push: hops + 1 one-way legs per pass
    print(
        f"| prompt | mode | loopback | delayed | vs {args.modes[0]} (delayed) | links add (ms/token) "
        f"| links add after the first token (ms/token) | delayed / push bound |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in PROMPTS:
        plain = r[delayed, name, args.modes[0]][0]
        for mode in args.modes:
            if (delayed, name, mode) in r:
                (loop, loop_each), (wan, wan_each) = r["loopback", name, mode], r[delayed, name, mode]
                added, added_each = (1 / wan - 1 / loop) * 1000, (wan_each - loop_each) * 1000
                print(
                    f"| {name} | {mode} | {loop:.2f} | {wan:.2f} | {wan / plain:.2f}x | {added:.0f} | {added_each:.0f} "
                    f"| {wan / bound:.2f} |"
                )
    print(
        f"bound, client-driven ({2 * hops} legs): {1 / (2 * hops * d + compute):.2f} tokens/s; "
        f"with push ({hops + 1} legs): {bound:.2f} tokens/s "
        f"(compute {compute * 1000:.0f} ms/token from loopback plain)"
    )
    for link in [link for link in ("loopback", delayed) if (link, "prefill", 0) in r]:
        one, piped = r[link, "prefill", 0], r[link, "prefill", args.prefill_chunk]
        print(
            f"first token, {args.long_tokens}-token prompt, {link}: one step {one * 1000:.0f} ms, "
            f"pipelined chunks of {args.prefill_chunk} {piped * 1000:.0f} ms ({one / piped:.2f}x)"
        )
    for name in PROMPTS:
        for mode in args.modes:
            if "cheap-draft" in mode and (delayed, name, mode) in r and (delayed, name, "push") in r:
                ratio = r[delayed, name, mode][0] / r[delayed, name, "push"][0]
                print(f"{name}, {delayed}: {mode} (--draft-quant {args.draft_quant}) is {ratio:.2f}x push alone")
    print(f"greedy outputs identical across modes and links: {'yes' if r['identical'] else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--hops", default="2", help="comma-separated chain lengths to measure (2)")
    parser.add_argument("--delay-ms", type=float, default=25.0, help="proxy delay each way (25)")
    parser.add_argument("--tokens", type=int, default=96, help="greedy tokens per run (96)")
    parser.add_argument(
        "--modes",
        default="plain,push,push+ngram,push+draft-model,push+cheap-draft",
        help="modes to measure, the first the reference (plain,push,push+ngram,push+draft-model,push+cheap-draft); "
        "plain, ngram, draft-model, cheap-draft: the client drives every hop; push+...: node-to-node push; "
        "a draft mode ending in -serial drafts only between passes (draft_ahead=False)",
    )
    parser.add_argument("--draft-quant", default="int8", help="the cheap draft's weights: int8 or int4 (int8)")
    parser.add_argument("--draft-model", default="default", help="draft model; '' skips it (default: the target)")
    parser.add_argument(
        "--long-tokens", type=int, default=1000, help="prompt length for first-token latency (1000; 0: none)"
    )
    parser.add_argument("--prefill-chunk", type=int, default=128, help="chunk of the pipelined prefill (128)")
    parser.add_argument("--runs", type=int, default=3, help="first-token latency: median of this many (3)")
    parser.add_argument("--repeats", type=int, default=1, help="decoding: median tokens/s of this many runs (1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each node and of the client (1): "
        "on a small shared machine, more threads per process spin against each other",
    )
    parser.add_argument("--node-args", default="", help="extra `torchnode join` arguments")
    args = parser.parse_args()
    args.node_args, args.modes = args.node_args.split(), args.modes.split(",")
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from torchnode.models.checkpoint import resolve
    from torchnode.models.families import num_blocks

    ckpt = resolve(args.model)
    args.blocks, tokenizer = num_blocks(ckpt), AutoTokenizer.from_pretrained(ckpt.path)
    long_ids = tokenizer(LONG_TEXT * 60, return_tensors="pt").input_ids[:, : args.long_tokens]
    for hops in (int(h) for h in args.hops.split(",")):
        report(args, hops, bench_hops(args, hops, long_ids))
    took = idle_slowdown()
    print(
        f"\nthis machine: the same compute right after idling {' / '.join(f'{i * 1000:.0f}' for i in took)} ms "
        f"takes {' / '.join(f'{t * 1000:.1f}' for t in took.values())} ms"
    )


if __name__ == "__main__":
    main()
