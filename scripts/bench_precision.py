"""How far apart honest computations of different precisions are, in the verifier's own error measure
(client/verification/verifier.py `first_mismatch`): what `--verify` tolerances must allow, and which
precisions cannot be compared at all.

For each (node, judge) pair of precisions, a span of SmolLM2 runs the node's way (a prompt prefill, then
decode steps one token at a time, as a served session does) and the judge's way (the same inputs as one
prefill, as a verifier's opinion does); the largest error over all positions is printed next to the
tolerance the verifier uses for that pair (client/precision.py). A pair the verifier never compares
(another quantization) is printed with its error, to show why.

    .venv/bin/python scripts/bench_precision.py [--blocks 0:15] [--prompts 4] [--tokens 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchnode.client.precision import Precision, tolerance  # noqa: E402
from torchnode.client.verification.verifier import first_mismatch  # noqa: E402
from torchnode.models.checkpoint import resolve  # noqa: E402
from torchnode.models.families import load_head, load_span  # noqa: E402

PROMPTS = [
    "Write a long story about a dragon who learns to paint.",
    "Explain how a bicycle stays upright, step by step.",
    "List ten uses for a paperclip and say why each works.",
    "def fibonacci(n):\n    # return the n-th Fibonacci number",
    "Translate into French: the weather is nice today and we will go for a walk.",
    "What is the capital of Australia, and why is it not Sydney?",
]
PAIRS = [  # (node, judge)
    (Precision("float32", "none"), Precision("float32", "none")),
    (Precision("bfloat16", "none"), Precision("float32", "none")),
    (Precision("float16", "none"), Precision("float32", "none")),
    (Precision("float32", "int8"), Precision("float32", "int8")),
    (Precision("bfloat16", "int8"), Precision("float32", "int8")),
    (Precision("float32", "int4"), Precision("float32", "int4")),
    (Precision("float32", "int8"), Precision("float32", "none")),
    (Precision("float32", "int4"), Precision("float32", "none")),
]


def run(span, x: torch.Tensor, start: int, end: int, decode_from: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Outputs (1, T, H) of blocks [start, end) over x: one prefill, or a prefill of `decode_from` tokens
    and then one step per token."""
    caches = span.new_caches(start, end, 1, x.shape[1] + 1)
    x = x.to(dtype)
    with torch.inference_mode():
        if decode_from is None:
            return span(x, 0, start, end, caches).float()
        outs = [span(x[:, :decode_from], 0, start, end, caches)]
        outs += [span(x[:, t : t + 1], t, start, end, caches) for t in range(decode_from, x.shape[1])]
        return torch.cat(outs, dim=1).float()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", default="0:15")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32, help="decode steps after each prompt")
    args = parser.parse_args()
    start, end = (int(b) for b in args.blocks.split(":"))
    ckpt = resolve("default")
    head = load_head(ckpt)
    spans: dict[Precision, torch.nn.Module] = {}

    def span_of(p: Precision) -> torch.nn.Module:
        if p not in spans:
            spans[p] = load_span(ckpt, start, end, p.torch_dtype, p.quant)
        return spans[p]

    # inputs: each prompt, embedded as a client does, then random tokens (decoded one at a time)
    tokenizer = ckpt_tokenizer(ckpt)
    inputs = []
    for prompt in PROMPTS[: args.prompts]:
        ids = torch.tensor([tokenizer(prompt).input_ids])  # (1, T)
        inputs.append((head.embed(ids).detach(), ids.shape[1]))
    print(f"blocks {start}:{end} of SmolLM2-135M, {len(inputs)} prompts + {args.tokens} decode steps each")
    print(f"{'node':>16} {'judge':>16} {'max error':>10} {'tolerance':>10}")
    for node, judge in PAIRS:
        worst = 0.0
        for embedded, prompt_len in inputs:
            x = extend(embedded, args.tokens, span_of(Precision("float32", "none")), head, start, end)
            claimed = run(span_of(node), x, start, end, prompt_len, node.torch_dtype)
            reference = run(span_of(judge), x, start, end, None, judge.torch_dtype)
            worst = max(worst, first_mismatch(claimed, reference, float("inf"))[1])
        tol = tolerance(node, judge)
        shown = f"{tol:.3g}" if tol is not None else "not compared"
        print(f"{node.name:>16} {judge.name:>16} {worst:>10.3g} {shown:>10}")


def ckpt_tokenizer(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt.path)


def extend(embedded: torch.Tensor, tokens: int, span, head, start: int, end: int) -> torch.Tensor:
    """The span's inputs for the prompt followed by `tokens` random embedded tokens (1, T + tokens, H): only
    blocks 0.. see embeddings, so later spans get the fp32 outputs of the blocks before them (a noisy but
    realistic residual stream)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, head.embed_tokens.num_embeddings, (1, tokens), generator=generator)
    x = torch.cat([embedded, head.embed(ids)], dim=1)
    if start > 0:
        full = load_span(resolve("default"), 0, start, torch.float32)
        x = run(full, x, 0, start, None, torch.float32)
    return x.detach()


if __name__ == "__main__":
    main()
