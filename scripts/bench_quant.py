"""SmolLM2 served as fp32, bf16, int8 and int4 spans: weight memory, decode speed, perplexity, agreement.

int4 twice: `int4` is what `--quant int4` serves for this GGUF checkpoint, the file's own Q4_1 codes
(models/gguf_q4.py); `int4-rq` re-quantizes the dequantized floats instead (`Int4Linear.from_linear`, what a
node does for a checkpoint without Q4 blocks).

All 30 blocks in one span with the client's head (`load_head`, fp32), as one node serving the whole model:
- weights: bytes of the span's weights as stored (`models.quantization.weight_bytes`), in MiB;
- decode: tokens/s at batch 1, 64 greedy tokens with a KV cache after the prompt (median of --runs, the
  modes taking turns);
- perplexity: of the fixed English TEXT below (~300 tokens), one forward pass without a cache;
- agreement: fed the same TEXT, the share of positions where the mode's most likely next token is fp32's;
- KL: fed the same TEXT, KL(fp32 || mode) of the next-token distributions, mean over positions (nats): how
  far from fp32 a mode is, where perplexity can move either way.

    .venv/bin/python scripts/bench_quant.py [--runs 3] [--tokens 64] [--modes fp32,int4,int4-rq]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from torchnode.models.checkpoint import resolve
from torchnode.models.families import load_head, load_span
from torchnode.models.quantization import quantize_span, weight_bytes

PROMPT = "Write a long story about a dragon who learns to paint."
TEXT = """\
The history of the bicycle begins in the early nineteenth century, when inventors in Germany and France
built wooden machines that riders pushed along with their feet. These early designs were heavy and hard
to steer, but they showed that a person could balance on two wheels while moving forward. In the 1860s,
French makers added pedals to the front wheel, and the new machines quickly became popular in Paris.
Because the pedals turned the front wheel directly, builders made that wheel larger and larger to go
faster, which led to the famous high wheeler. It was fast on good roads, yet a sudden stop could throw
the rider over the handlebars. The safety bicycle of the 1880s solved this problem with two wheels of
equal size and a chain that drove the rear wheel. Soon afterwards, air-filled rubber tyres made the ride
far more comfortable. Within a few years, millions of people in Europe and North America owned bicycles.
They used them to travel to work, to visit friends in nearby towns, and to explore the countryside on
weekends. Women in particular gained a new kind of freedom, and the bicycle changed the fashion of the
time, as long skirts gave way to clothing better suited for riding. Cycling clubs organised races and
tours, and they campaigned for smoother roads, long before the first cars appeared. Today the bicycle
remains one of the most efficient ways to travel, turning almost all of the rider's effort into motion.
"""
MODES = (
    ("fp32", torch.float32, "none"),
    ("bf16", torch.bfloat16, "none"),
    ("int8", torch.float32, "int8"),
    ("int4", torch.float32, "int4"),
    ("int4-rq", torch.float32, "int4-rq"),
)


def load(ckpt, total: int, dtype: torch.dtype, quant: str):
    if quant == "int4-rq":  # the floats rounded again: the GGUF's Q4 blocks left unused
        return quantize_span(load_span(ckpt, 0, total, dtype), "int4")
    return load_span(ckpt, 0, total, dtype, quant)


@torch.inference_mode()
def decode_tokens_per_s(head, span, ids: torch.Tensor, tokens: int) -> float:
    caches = span.new_caches(span.start, span.end, 1, ids.shape[1] + tokens)
    hidden = span(head.embed(ids), 0, span.start, span.end, caches)  # prefill, not timed
    position = ids.shape[1]
    started = time.perf_counter()
    for _ in range(tokens):
        token = head.logits(hidden[:, -1:]).argmax(-1)  # (1, 1)
        hidden = span(head.embed(token), position, span.start, span.end, caches)
        position += 1
    return tokens / (time.perf_counter() - started)


@torch.inference_mode()
def text_logits(head, span, ids: torch.Tensor) -> torch.Tensor:
    return head.logits(span(head.embed(ids), 0, span.start, span.end))  # (1, T, V)


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return F.cross_entropy(logits[0, :-1], ids[0, 1:]).exp().item()


def kl_from(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(reference || logits) per position, averaged: (1, T, V) logits each."""
    log_p, log_q = reference[0].log_softmax(-1), logits[0].log_softmax(-1)  # (T, V)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean").item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--modes", default=",".join(m[0] for m in MODES), help="comma-separated; fp32 always runs")
    args = parser.parse_args()
    chosen = {"fp32", *args.modes.split(",")}
    if chosen - {m[0] for m in MODES}:
        parser.error(f"unknown modes {chosen - {m[0] for m in MODES}}; choose from {[m[0] for m in MODES]}")

    from transformers import AutoTokenizer

    ckpt = resolve("default")
    tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    head = load_head(ckpt)
    total = ckpt.hf_config.num_hidden_layers
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    text_ids = tokenizer(TEXT, return_tensors="pt").input_ids
    print(
        f"SmolLM2-135M-Instruct, blocks 0:{total} in one span, {torch.get_num_threads()} threads; "
        f"decode: batch 1, {args.tokens} tokens, median of {args.runs}; perplexity: {text_ids.shape[1]} tokens"
    )
    spans = {name: load(ckpt, total, dtype, quant) for name, dtype, quant in MODES if name in chosen}
    speeds: dict[str, list[float]] = {name: [] for name in spans}
    for _ in range(args.runs):  # round robin, so a busy machine slows every mode alike
        for name, span in spans.items():
            speeds[name].append(decode_tokens_per_s(head, span, prompt_ids, args.tokens))
    logits = {name: text_logits(head, span, text_ids) for name, span in spans.items()}
    fp32_next = logits["fp32"][0].argmax(-1)  # (T,)
    rows = [
        (
            name,
            weight_bytes(span) / 2**20,
            statistics.median(speeds[name]),
            perplexity(logits[name], text_ids),
            (logits[name][0].argmax(-1) == fp32_next).float().mean().item(),
            kl_from(logits["fp32"], logits[name]),
        )
        for name, span in spans.items()
    ]
    base = rows[0][1]
    print(
        f"| {'span':<7} | {'weights MiB':>11} | {'vs fp32':>7} | {'decode tok/s':>12} | {'perplexity':>10} "
        f"| {'agreement':>9} | {'KL':>6} |"
    )
    print(f"|{'-' * 9}|{'-' * 13}|{'-' * 9}|{'-' * 14}|{'-' * 12}|{'-' * 11}|{'-' * 8}|")
    for name, mib, speed, ppl, agree, kl in rows:
        print(
            f"| {name:<7} | {mib:>11.1f} | {mib / base:>6.2f}x | {speed:>12.1f} | {ppl:>10.3f} | {agree:>8.1%} "
            f"| {kl:>6.4f} |"
        )


if __name__ == "__main__":
    main()
