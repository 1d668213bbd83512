"""Fine-tune a LoRA adapter through 2 nodes, save it in PEFT's format, then serve it with --adapters.

The text set is generated here (short arithmetic facts, "Q: what is 12 plus 7? A: 19."), cut into windows
of --seq-len tokens. The loop is plain PyTorch over `DistributedLoraModel` (client/finetune.py): loss,
backward through the nodes, AdamW. It prints the loss curve and the time of one training step through the
nodes against the same step (same batch, same LoRA) of a local peft model in this process. With
--serve-check, 2 fresh nodes serve the saved adapter and the swarm's greedy output is compared token for
token with the local tuned model's.

    .venv/bin/python scripts/finetune.py [--model default] [--steps 20] [--batch 4] [--seq-len 64] [--r 8]
        [--alpha 16] [--lr 2e-3] [--out adapters/arith] [--serve-check]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from swarm import start_nodes, stop_all  # noqa: E402


def text_set(n: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    facts = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        facts.append(f"Q: what is {a} plus {b}? A: {a + b}.")
    return "\n".join(facts)


def windows(tokenizer, seq_len: int) -> torch.Tensor:
    ids = tokenizer(text_set(), return_tensors="pt").input_ids[0]
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)  # (N, seq_len)


def local_step_seconds(ckpt_path: Path, tuned, batch: torch.Tensor) -> float:
    """One forward + backward of the same batch through a local peft model with the same LoRA."""
    import peft
    from transformers import AutoModelForCausalLM

    lora = tuned.lora
    local = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(ckpt_path, dtype=torch.float32),
        peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.targets), init_lora_weights=False),
    )
    params = dict(local.named_parameters())
    with torch.no_grad():
        for name, key in lora.names.items():
            params[f"base_model.model.model.{name}.default.weight"].copy_(lora.weights[key])
    local(input_ids=batch, labels=batch).loss.backward()  # warm-up
    started = time.perf_counter()
    local(input_ids=batch, labels=batch).loss.backward()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", type=Path, default=Path("adapters/arith"))
    parser.add_argument("--serve-check", action="store_true", help="serve the result on 2 fresh nodes and compare")
    args = parser.parse_args()

    from torchnode import DistributedModel
    from torchnode.client.finetune import DistributedLoraModel
    from torchnode.models.checkpoint import resolve
    from torchnode.models.families import num_blocks

    ckpt = resolve(args.model)
    half = num_blocks(ckpt) // 2
    spans = [f"0:{half}", f"{half}:{num_blocks(ckpt)}"]
    nodes = start_nodes(args.model, spans)
    try:
        with DistributedModel.from_pretrained(args.model, peers=[n.address for n in nodes]) as model:
            torch.manual_seed(0)
            tuned = DistributedLoraModel(model, r=args.r, alpha=args.alpha)
            optimizer = torch.optim.AdamW(tuned.parameters(), lr=args.lr)
            data = windows(model.tokenizer, args.seq_len)
            step_times = []
            for step in range(args.steps):
                batch = data[torch.randint(len(data), (args.batch,))]  # (batch, seq_len)
                started = time.perf_counter()
                loss, _ = tuned(batch, batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step_times.append(time.perf_counter() - started)
                print(f"step {step:3d}  loss {loss.item():.4f}  {step_times[-1]:.2f}s", flush=True)
            tuned.save_pretrained(args.out)
            swarm_step = sorted(step_times[1:])[len(step_times[1:]) // 2] if len(step_times) > 1 else step_times[0]
            local = local_step_seconds(ckpt.path, tuned, data[: args.batch])
            print(f"saved the adapter to {args.out}")
            print(
                f"one training step (batch {args.batch} x {args.seq_len} tokens): {swarm_step:.2f}s through 2 nodes "
                f"(median), {local:.2f}s in one process with peft ({swarm_step / local:.2f}x)"
            )
    finally:
        stop_all(nodes)
    if args.serve_check:
        serve_check(args, ckpt, spans)


def serve_check(args, ckpt, spans: list[str]) -> None:
    """Serves the saved adapter on fresh nodes; the swarm's greedy output must equal the local tuned model's."""
    import peft
    from transformers import AutoModelForCausalLM

    from torchnode import DistributedModel

    name = args.out.resolve().name
    nodes = start_nodes(args.model, spans, "--adapters", str(args.out))
    try:
        with DistributedModel.from_pretrained(args.model, peers=[n.address for n in nodes]) as model:
            ids = model.tokenizer("Q: what is 21 plus 13? A:", return_tensors="pt").input_ids
            swarm = model.generate(ids, adapter=name, max_new_tokens=16)[0].tolist()
        local = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32), args.out
        )
        with torch.no_grad():
            expected = local.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False
            )
        print(
            f"served adapter {name!r}: swarm greedy output "
            f"{'equals' if swarm == expected[0].tolist() else 'DIFFERS FROM'} the local tuned model's"
        )
    finally:
        stop_all(nodes)


if __name__ == "__main__":
    main()
