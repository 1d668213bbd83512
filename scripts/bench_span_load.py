"""Memory and bytes a node spends on loading a span: peak RSS, and what it downloads from a hub.

A random 24-block Llama (hidden 768, fp32, ~0.7 GB, sharded like a hub checkpoint) is saved locally. Then:
- peak RSS: a fresh process does what `torchnode join --blocks 8:12` does to load its span
  (`load_span`), and reports the rise of its peak resident memory (VmHWM, reset after the imports)
  over the span's weights (`weight_bytes`); the goal is under 1.3x;
- bytes downloaded: the same checkpoint served by a local hub (tests/helpers/hub_server.py) through HF_ENDPOINT;
  a fresh process resolves the hub id and loads blocks 8:12 (a node) or the head (a client) into an
  empty HF cache, and the server counts the bytes it sent, against the whole checkpoint.

    .venv/bin/python scripts/bench_span_load.py [--blocks 8:12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))

MiB = 1 << 20
REPO_ID = "bench-org/llama-24"

CHILD = """
import json, sys, torch
from torchnode.models.checkpoint import resolve
from torchnode.models.families import load_head, load_span
from torchnode.models.quantization import weight_bytes

def status(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024

model, part, start, end = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ckpt = resolve(model)
ckpt.hf_config
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak RSS, to the RSS now
before = status("VmRSS")
module = load_span(ckpt, start, end) if part == "span" else load_head(ckpt)
print(json.dumps({"before": before, "peak": status("VmHWM"), "weights": weight_bytes(module)}))
"""


def save_model(directory: Path) -> Path:
    import torch
    from tiny_models import tiny_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=24,
        num_attention_heads=12,
        num_key_value_heads=12,
        tie_word_embeddings=False,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory, max_shard_size="100MB")
    tiny_tokenizer().save_pretrained(directory)
    return directory


def child(model: str, part: str, start: int, end: int, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-c", CHILD, model, part, str(start), str(end)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", default="8:12")
    args = parser.parse_args()
    start, end = map(int, args.blocks.split(":"))
    from hub_server import HubServer

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model(Path(tmp) / "llama-24")
        total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(f"checkpoint: 24 blocks, {total / MiB:.0f} MiB in {len(list(folder.glob('*.safetensors')))} shards")

        r = child(str(folder), "span", start, end)
        rise = r["peak"] - r["before"]
        print(
            f"peak RSS loading blocks {start}:{end} from the local folder: +{rise / MiB:.0f} MiB over "
            f"{r['before'] / MiB:.0f} MiB after imports, for {r['weights'] / MiB:.0f} MiB of span weights: "
            f"{rise / r['weights']:.2f}x (goal < 1.3x); whole process peak {r['peak'] / MiB:.0f} MiB"
        )

        for part, label in (("span", f"node, blocks {start}:{end}"), ("head", "client head")):
            with HubServer(folder, REPO_ID) as hub:
                env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(Path(tmp) / f"hf-{part}"), "HF_HUB_OFFLINE": "0"}
                child(REPO_ID, part, start, end, env)
                got = hub.bytes_sent(".safetensors")
            print(f"downloaded for the {label}: {got / MiB:.1f} MiB of {total / MiB:.0f} MiB ({got / total:.0%})")


if __name__ == "__main__":
    main()
