"""The client's LM head (final norm + vocab projection) per number of rows, as computed (Head.logits, which
pads 7-15 rows to 16 on a CPU) and as a plain `lm_head` call, with the weights cold as in a decode loop
(a 400 MB buffer is rewritten before each pass, as the model's blocks would). Shows why Head.logits pads.

    .venv/bin/python scripts/bench_head_rows.py [--model default] [--rows 1,2,4,6,7,8,10,12,14,15,16,24,32]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torchnode  # noqa: F401  (first, as in the README's examples: it sets OpenMP's spin before torch loads)

# isort: split
import torch

from torchnode.models.checkpoint import resolve
from torchnode.models.families import load_head


def cold_ms(fn, x: torch.Tensor, flush: torch.Tensor, runs: int) -> float:
    times = []
    for _ in range(runs):
        flush.mul_(1.0)  # evicts the head's weights from the CPU's caches
        started = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--rows", default="1,2,4,6,7,8,10,12,14,15,16,24,32")
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, the CPUs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    head = load_head(resolve(args.model))
    flush = torch.ones(100_000_000)
    hidden = head.norm.weight.shape[0]

    def plain(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return head.lm_head(head.norm(x)).float()

    print(f"{args.model}: LM head {tuple(head.lm_head.weight.shape)}, {torch.get_num_threads()} threads, weights cold")
    print("| rows | Head.logits ms | plain lm_head ms |")
    print("|---:|---:|---:|")
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, 1, hidden)
        torch.testing.assert_close(head.logits(x), plain(x), atol=1e-4, rtol=1e-4)
        padded, unpadded = cold_ms(head.logits, x, flush, args.runs), cold_ms(plain, x, flush, args.runs)
        print(f"| {rows} | {padded:.1f} | {unpadded:.1f} |")


if __name__ == "__main__":
    main()
