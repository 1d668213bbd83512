"""Decode tokens/s of SmolLM2 split over 2 loopback nodes (0:15, 15:30) vs plain transformers in one
process of its own (in this one, the client's compute threads would slow it: models/torch_threads.py):
same prompt, same 64 greedy tokens, the two alternating. Prints both, their ratio, first-token latency, and the
overhead per hop per token in ms ((1/swarm - 1/local) / hops).

--links tls (the default, as users run it), insecure (plaintext, both sides --insecure), or both
(one after the other, each paired with its own local runs) shows what encryption costs. --model tiny runs the
tests' 4-block random Llama instead (0:2, 2:4): its compute is negligible, so the swarm's tokens/s show what
the links and hand-offs cost on CPUs that idle between steps, as a GPU node's do.

    .venv/bin/python scripts/bench_overhead.py [--runs 3] [--tokens 64] [--wire-dtype float32] [--links both]
        [--no-huge-pages] [--model default|tiny|PATH]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torchnode  # noqa: F401  (first, as in the README's examples: it sets OpenMP's spin before torch loads)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from node_options import add_node_options, node_flags  # noqa: E402
from swarm import start_nodes, stop_all  # noqa: E402
from tiny_models import save_tiny_model  # noqa: E402

from torchnode import openmp_env  # noqa: E402
from torchnode.client.config import ClientConfig  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to paint."


def time_swarm(model, ids: torch.Tensor, tokens: int) -> tuple[float, float]:
    """(first-token latency s, decode tokens/s after the first token)."""
    stamps, started = [], time.perf_counter()
    for _ in model._loop.iterate(model._core.generate_ids(ids, _params(tokens))):
        stamps.append(time.perf_counter())
    return stamps[0] - started, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def time_local(hf, ids: torch.Tensor, tokens: int) -> tuple[float, float]:
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    stamps, started = Stamps(), time.perf_counter()
    hf.generate(
        ids,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        streamer=stamps,
        attention_mask=torch.ones_like(ids),
    )
    t = stamps.t[1:]  # the streamer's first put is the prompt
    return t[0] - started, (len(t) - 1) / (t[-1] - t[0])


class LocalProcess:
    """Plain transformers in a process of its own, timed on request (`time_local` there)."""

    def __init__(self, model: str, ids: torch.Tensor):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve_local, args=(child, model, ids), daemon=True)
        ours = dict(os.environ)
        os.environ.update(openmp_env.libgomp_default_env())  # plain transformers, as a user runs it
        try:
            self.process.start()
        finally:
            os.environ.update(ours)

    def time(self, tokens: int) -> tuple[float, float]:
        self.conn.send(tokens)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


def _serve_local(conn, model: str, ids: torch.Tensor) -> None:
    from transformers import AutoModelForCausalLM

    from torchnode.models.checkpoint import resolve

    hf = AutoModelForCausalLM.from_pretrained(resolve(model).path, dtype=torch.float32).eval()
    while (tokens := conn.recv()) is not None:
        conn.send(time_local(hf, ids, tokens))


def _params(tokens: int):
    from torchnode.client.sampling import SamplingParams

    return SamplingParams(max_new_tokens=tokens, ignore_eos=True)


HOPS = 2
TINY = "tiny-llama"  # --model tiny: built once under $TORCHNODE_CACHE/bench-shapes/, as bench_scale.py's shapes


def halves(model: str) -> list[str]:
    """The model's blocks in two spans, one per node (SmolLM2: 0:15, 15:30)."""
    from torchnode.models.checkpoint import resolve
    from torchnode.models.families import num_blocks

    n = num_blocks(resolve(model))
    return [f"0:{n // 2}", f"{n // 2}:{n}"]


def measure(links: str, spans: list[str], ids: torch.Tensor, local: LocalProcess, args) -> tuple[list, list]:
    """Paired (swarm, local) runs, each a (first-token s, tokens/s), over nodes started with `links`."""
    from torchnode.client.sync_model import DistributedModel

    insecure = links == "insecure"
    nodes = start_nodes(args.model, spans, *node_flags(args), *(["--insecure"] if insecure else []))
    try:
        model = DistributedModel.from_pretrained(
            args.model,
            [n.address for n in nodes],
            wire_dtype=getattr(torch, args.wire_dtype),
            insecure=insecure,
            push=args.push,
            push_min_rtt_ms=args.push_min_rtt_ms,
            batch_steps=args.batch_steps,
        )
        time_swarm(model, ids, 4), local.time(4)  # warm-up both
        swarm, here = [], []
        for _ in range(args.runs):  # alternate so drift on the machine hits both alike
            swarm.append(time_swarm(model, ids, args.tokens))
            here.append(local.time(args.tokens))
        model.close()
    finally:
        stop_all(nodes)
    return swarm, here


def report(links: str, swarm: list, local: list) -> None:
    med = statistics.median
    s_first, s_rate = med([r[0] for r in swarm]), med([r[1] for r in swarm])
    l_first, l_rate = med([r[0] for r in local]), med([r[1] for r in local])
    pairs = list(zip(swarm, local, strict=True))  # paired runs: drift hits both alike
    ratios = sorted(s[1] / here[1] for s, here in pairs)
    per_hop = sorted((1 / s[1] - 1 / here[1]) / HOPS * 1000 for s, here in pairs)
    print(f"[{links}] local transformers : {l_rate:6.2f} tokens/s, first token {l_first * 1000:6.1f} ms")
    print(f"[{links}] swarm ({HOPS} nodes)    : {s_rate:6.2f} tokens/s, first token {s_first * 1000:6.1f} ms")
    print(
        f"[{links}] ratio swarm/local  : {med(ratios):.3f} "
        f"(median of paired runs; range {ratios[0]:.3f}-{ratios[-1]:.3f})"
    )
    print(f"[{links}] overhead per hop   : {med(per_hop):.2f} ms per token (range {per_hop[0]:.2f}-{per_hop[-1]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--wire-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--model",
        default="default",
        help="default (SmolLM2), tiny (the tests' 4-block random Llama: the links' cost alone), or a checkpoint",
    )
    add_node_options(parser)
    parser.add_argument(
        "--links",
        default="tls",
        choices=["tls", "insecure", "both"],
        help="tls: encrypted (default); insecure: plaintext; both: one after the other",
    )
    parser.add_argument(
        "--push",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="node-to-node push where a hop is at least --push-min-rtt-ms away (the default: none on loopback) or "
        "client-driven hops (--no-push)",
    )
    parser.add_argument(
        "--push-min-rtt-ms",
        type=float,
        default=ClientConfig.push_min_rtt_ms,
        help="push into a hop only if its probe round trip is at least this many ms (the client's default); 0: all",
    )
    parser.add_argument(
        "--batch-steps",
        action=argparse.BooleanOptionalAction,
        default=ClientConfig.batch_steps,
        help="the session's steps on the node's shared StepBatches stream (the default) or on a stream of its own",
    )
    args = parser.parse_args()
    if args.model == "tiny":
        from torchnode.models.gguf_convert import cache_root

        tiny = cache_root() / "bench-shapes" / TINY
        if not (tiny / "config.json").exists():
            save_tiny_model("llama", tiny)
        args.model = str(tiny)

    from transformers import AutoTokenizer

    from torchnode.models.checkpoint import resolve

    ckpt = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids

    modes = ["tls", "insecure"] if args.links == "both" else [args.links]
    spans = halves(args.model)
    local = LocalProcess(args.model, ids)
    try:
        results = {links: measure(links, spans, ids, local, args) for links in modes}
    finally:
        local.close()
    print(
        f"{args.model} over {', '.join(spans)}: "
        f"prompt {ids.shape[1]} tokens, {args.tokens} greedy tokens, median of {args.runs} runs, "
        f"wire {args.wire_dtype}, "
        f"node threads {args.node_threads or 'default'}"
    )
    for links, (swarm, local) in results.items():
        report(links, swarm, local)
    if len(results) == 2:  # what encryption itself costs, without the local baseline's noise
        tls_rate = statistics.median(r[1] for r in results["tls"][0])
        plain_rate = statistics.median(r[1] for r in results["insecure"][0])
        extra = (1 / tls_rate - 1 / plain_rate) / HOPS * 1000
        print(
            f"[tls vs insecure] swarm tokens/s ratio {tls_rate / plain_rate:.3f}; "
            f"TLS adds {extra:+.2f} ms per hop per token"
        )


if __name__ == "__main__":
    main()
