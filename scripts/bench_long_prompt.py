"""A long prompt through 3 nodes: first-token latency of an 8,192-token prompt sent in one step vs pipelined
in chunks (the SDK's prefill_chunk, 128 by default), and the KV cache each node holds for it against its
--cache-memory (computed from the session's max_length, and the rise of the node's peak RSS).

Nodes: SmolLM2 (its context allows 8,192) split 0:10, 10:20, 20:30, started with --max-session-tokens
above the prompt and --cache-memory; greedy first tokens of both runs must be equal.

    .venv/bin/python scripts/bench_long_prompt.py [--tokens 8192] [--cache-memory 512MiB]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT / "scripts"))
from decode_timing import timed_decode  # noqa: E402
from swarm import start_nodes, stop_all  # noqa: E402

MiB = 1 << 20
TEXT = (
    "Distributed inference splits a language model across machines: each serves a span of blocks and passes "
    "hidden states on to the next. Long prompts flow through the chain in chunks, so every node keeps working. "
)


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="prompt length (8192)")
    parser.add_argument("--cache-memory", default="512MiB", help="each node's --cache-memory (512MiB)")
    parser.add_argument("--chunk", type=int, default=128, help="pipelined chunk (128, the SDK's default)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from torchnode.client.sync_model import DistributedModel
    from torchnode.models.checkpoint import resolve
    from torchnode.node.limits import parse_bytes

    ckpt = resolve("default")
    tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    ids = tokenizer(TEXT * (args.tokens // 30), return_tensors="pt").input_ids[:, : args.tokens]
    assert ids.shape[1] == args.tokens, ids.shape
    limit = str(args.tokens + 64)
    spans = ["0:10", "10:20", "20:30"]
    nodes = start_nodes("default", spans, "--max-session-tokens", limit, "--cache-memory", args.cache_memory)
    c = ckpt.hf_config
    per_token = 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4 * 10  # fp32, 10 blocks
    kv = per_token * (args.tokens + 1)  # the session's max_length: prompt + the first token
    budget = parse_bytes(args.cache_memory)
    print(f"load average {os.getloadavg()[0]:.1f}; {args.tokens}-token prompt, 3 nodes x 10 blocks", flush=True)
    try:
        with DistributedModel.from_pretrained("default", [n.address for n in nodes], step_timeout=900) as model:
            timed_decode(model, ids[:, :8], 1)  # warm-up: channels
            before = [peak_rss(n.proc.pid) for n in nodes]
            core, results = model.async_model, {}
            for chunk in (0, args.chunk):
                core.generation = dataclasses.replace(core.generation, prefill_chunk=chunk)
                run = timed_decode(model, ids, 1)
                results[chunk] = run
                print(f"chunk {chunk}: first token {run.first_token_s:.2f} s", flush=True)
            after = [peak_rss(n.proc.pid) for n in nodes]
    finally:
        stop_all(nodes)
    one, piped = results[0].first_token_s, results[args.chunk].first_token_s
    print(f"\n## {args.tokens}-token prompt through 3 SmolLM2 nodes (load average {os.getloadavg()[0]:.1f})")
    print(f"first token: one step {one:.2f} s, pipelined chunks of {args.chunk} {piped:.2f} s ({one / piped:.2f}x)")
    print(f"first tokens equal: {'yes' if results[0].tokens == results[args.chunk].tokens else 'NO'}")
    print(f"KV cache per node for the session: {kv / MiB:.1f} MiB of --cache-memory {budget / MiB:.0f} MiB")
    for span, b, a in zip(spans, before, after, strict=True):
        print(f"node {span}: peak RSS {b / MiB:.0f} -> {a / MiB:.0f} MiB (+{(a - b) / MiB:.0f} MiB)")


if __name__ == "__main__":
    main()
