"""Decode tokens/s through 2 SmolLM2 nodes (0:15, 15:30) with and without a LoRA adapter (goal: at most
15 % slower with one).

The adapter is made here with peft: rank --r on q/k/v/o and gate/up/down of every block, random weights.
Both nodes serve it (--adapters); the same prompt is decoded greedily --tokens tokens, alternating base
and adapter runs --repeats times; the medians are compared.

    .venv/bin/python scripts/bench_adapters.py [--tokens 64] [--repeats 3] [--r 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from swarm import start_nodes, stop_all  # noqa: E402

SPANS = ["0:15", "15:30"]


def make_adapter(base: Path, directory: Path, r: int) -> Path:
    import peft
    from transformers import AutoModelForCausalLM

    from torchnode.models.lora import TARGETS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), init_lora_weights=False)
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    lora.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--r", type=int, default=8)
    args = parser.parse_args()

    from torchnode import DistributedModel
    from torchnode.models.checkpoint import resolve

    ckpt = resolve("default")
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(ckpt.path, Path(tmp) / "bench-lora", args.r)
        nodes = start_nodes("default", SPANS, "--adapters", str(adapter))
        try:
            with DistributedModel.from_pretrained("default", peers=[n.address for n in nodes]) as model:
                prompt = "Write a story about a lighthouse"
                model.generate(prompt, max_new_tokens=8)  # warm-up
                times: dict[str, list[float]] = {"base": [], "adapter": []}
                for _ in range(args.repeats):
                    for label, name in (("base", None), ("adapter", "bench-lora")):
                        started = time.perf_counter()
                        out = model.generate(prompt, adapter=name, max_new_tokens=args.tokens, ignore_eos=True)
                        new = out.shape[1] - len(model.tokenizer(prompt).input_ids)
                        times[label].append(new / (time.perf_counter() - started))
        finally:
            stop_all(nodes)
    base, tuned = statistics.median(times["base"]), statistics.median(times["adapter"])
    print(f"decode through 2 nodes, {args.tokens} tokens, LoRA r={args.r} on q/k/v/o/gate/up/down:")
    print(f"  base    {base:.1f} tokens/s   {[f'{t:.1f}' for t in times['base']]}")
    print(f"  adapter {tuned:.1f} tokens/s   {[f'{t:.1f}' for t in times['adapter']]}")
    print(f"  adapter is {100 * (1 - tuned / base):.1f} % slower (goal: at most 15 %)")


if __name__ == "__main__":
    main()
