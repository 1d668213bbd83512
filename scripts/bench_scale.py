"""A model no node can hold: a real family's shape with random weights, served by nodes whose `--max-memory`
is far below the model, each choosing its span through the DHT (no `--blocks`).

1. The checkpoint: the shape of Llama-3.2-1B / Llama-3.2-3B / Qwen3-4B (`--shape`; `--layers N` keeps the
   widths and cuts the depth) with random weights (normal, std 0.02; norms 1), written tensor by tensor in
   bf16 into 2 GB shards with an index, as the hub has them, under $TORCHNODE_CACHE/bench-shapes/ (kept
   for the next run). Nothing is downloaded; the tokenizer is the tests' tiny one (prompts are token ids).
2. transformers runs it in one process (`AutoModelForCausalLM`, fp32 on the CPU, bf16 on a GPU): load
   time, first-token latency of a --prompt-tokens prompt, decode tokens/s over --tokens greedy tokens,
   peak RSS. Alone on the machine, before any node starts, so both sides get the same cores.
3. For each --quants mode: a coordinator and --nodes `torchnode join MODEL --initial-peers ...` processes,
   started one after another (each once the previous announced its span), each with `--max-memory` =
   the runtime allowance + `--cache-memory` + the weights of ceil(blocks / nodes) + 1 blocks, so the spans
   must overlap by little and no node could hold the model. Per node: span, load time (spawn -> ready),
   peak RSS (VmHWM) against --max-memory, the RSS of its DHT helper processes (hivemind's DHT process
   and p2pd, outside --max-memory), GPU memory (nvidia-smi) on CUDA. A client process (its own, so its
   RSS is its own) finds the route in the DHT, decodes the same prompt, and reports first-token latency,
   tokens/s, the head's weight bytes and its peak RSS; its tokens are compared with transformers'.

    .venv/bin/python scripts/bench_scale.py [--shape llama-3.2-3b] [--layers N] [--nodes 4] [--quants none,int4]
    python3 scripts/bench_scale.py --device cuda --quants none,int8,int4,nf4 --json $OUT/scale.json   # a GPU

--dry-run builds a 2-block cut of the shape and runs everything with 4 tokens: a check of the script path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT / "scripts"))
from swarm import start_coordinator, start_node, stop_all, wait_ready  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
# real families' shapes (from their config.json); rope as the hub configs give it
SHAPES = {
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=32.0,
            high_freq_factor=4.0,
            low_freq_factor=1.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "llama-3.2-3b": dict(
        model_type="llama",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=32.0,
            high_freq_factor=4.0,
            low_freq_factor=1.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "qwen3-4b": dict(
        model_type="qwen3",
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
}
SHARD_BYTES = 2 * GiB


# ---- the checkpoint


def hf_config(shape: str, layers: int | None):
    from transformers import AutoConfig

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    model_type = kw.pop("model_type")
    return AutoConfig.for_model(model_type, **kw)


def tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in the hub's names and order."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    names = [("model.embed_tokens.weight", (config.vocab_size, h))]
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        names += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h))]
        names += [(p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q))]
        if config.model_type == "qwen3":
            names += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,))]
        names += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h))]
        names += [(p + "mlp.down_proj.weight", (h, i))]
    names.append(("model.norm.weight", (h,)))
    if not config.tie_word_embeddings:
        names.append(("lm_head.weight", (config.vocab_size, h)))
    return names


def build_checkpoint(shape: str, layers: int | None, root: Path) -> Path:
    """Writes the random checkpoint once (tensor by tensor: memory stays at one shard); returns its folder."""
    import torch
    from safetensors.torch import save_file
    from tiny_models import tiny_tokenizer

    config = hf_config(shape, layers)
    folder = root / f"{shape}-{config.num_hidden_layers}"
    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    weight_map, total, shard = {}, 0, {}

    def write(shard: dict) -> None:  # each shard as soon as it is full: memory stays at one shard
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard.clear()

    for name, dims in tensor_shapes(config):
        if name.endswith("norm.weight"):
            t = torch.ones(dims, dtype=torch.bfloat16)
        else:
            t = torch.empty(dims, dtype=torch.float32).normal_(0.0, 0.02, generator=generator).to(torch.bfloat16)
        shard[name], total = t, total + t.nbytes
        if sum(v.nbytes for v in shard.values()) >= SHARD_BYTES:
            write(shard)
    if shard:
        write(shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    config.torch_dtype = "bfloat16"
    config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return folder


def block_bytes(config, itemsize: float) -> int:
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return int((h * q * 2 + h * kv * 2 + 3 * h * i) * itemsize)


# ---- child processes: transformers in one process, and the swarm's client


def peak_rss(pid: int | str = "self") -> int:
    """VmHWM: the process's peak resident memory, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def prompt_ids(n: int):
    import torch

    return (torch.arange(n)[None] * 37 + 11) % 500  # ids the tiny tokenizer knows, no special tokens


def child_reference(args) -> dict:
    """transformers alone: load, first token, greedy decode with its KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    load_s = time.perf_counter() - started
    ids = prompt_ids(args.prompt_tokens).to(device)
    tokens, stamps = [], []
    with torch.inference_mode():
        model(input_ids=ids[:, :4])  # warm-up, as the client's first call (route, channels) is not timed either
        started = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        for _ in range(args.tokens):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            stamps.append(time.perf_counter())
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
    first = stamps[0] - started
    per_token = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {
        "tokens": tokens,
        "load_s": load_s,
        "first_token_s": first,
        "tokens_per_s": len(stamps) / (stamps[-1] - started),
        "per_token_s": per_token,
        "peak_rss": peak_rss(),
        "gpu_bytes": gpu,
    }


def child_client(args) -> dict:
    """The swarm's client: find the route in the DHT, decode the prompt; its own peak RSS and head size."""
    from decode_timing import timed_decode

    from torchnode.client.sync_model import DistributedModel
    from torchnode.models.quantization import weight_bytes

    model = DistributedModel.from_pretrained(args.model, initial_peers=[args.initial_peers], device=args.device)
    ids = prompt_ids(args.prompt_tokens)
    deadline = time.monotonic() + 120
    while True:  # the route: every node has announced itself online
        try:
            timed_decode(model, ids[:, :4], 1)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    run = timed_decode(model, ids, args.tokens)
    head = weight_bytes(model.async_model.head)
    model.close()
    return {
        "tokens": run.tokens,
        "first_token_s": run.first_token_s,
        "tokens_per_s": run.tokens_per_s,
        "per_token_s": run.per_token_s,
        "peak_rss": peak_rss(),
        "head_bytes": head,
    }


def run_child(kind: str, args, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--model",
        args.model,
        "--device",
        args.device,
        "--tokens",
        str(args.tokens),
        "--prompt-tokens",
        str(args.prompt_tokens),
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the swarm


def helper_rss(pid: int) -> int:
    """Summed RSS of a node's child processes (hivemind's DHT process, p2pd): outside --max-memory."""
    total = 0
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for c in child.read_text().split():
            try:
                for line in Path(f"/proc/{c}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                total += helper_rss(int(c))
            except OSError:
                pass
    return total


def gpu_memory() -> dict[int, int]:
    """{pid: bytes} of processes on the GPU (nvidia-smi), or {} without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(p): int(m) * MiB for p, m in (line.split(",") for line in out.strip().splitlines() if "," in line)}


def run_swarm(args, quant: str, config) -> dict:
    from torchnode.node.server import QUANT_LOADING_BLOCKS, RUNTIME_ALLOWANCE

    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    if device_type == "cpu":
        itemsize = {"int8": 1.0, "int4": 0.625}.get(quant, 4.0)
    else:
        itemsize = {"int8": 1.0, "int4": 0.625, "nf4": 0.5}.get(quant, 2.0)
    per_node = math.ceil(config.num_hidden_layers / args.nodes) + 1
    cache = args.cache_memory
    weights = per_node * block_bytes(config, itemsize) + block_bytes(config, itemsize) // 2  # half a block of slack
    if quant != "none":  # a quantized span loads block by block, each read in the compute dtype, then rounded
        weights += QUANT_LOADING_BLOCKS * block_bytes(config, 4.0 if device_type == "cpu" else 2.0)
    max_memory = RUNTIME_ALLOWANCE[device_type] + cache + weights
    coordinator, addr = start_coordinator()
    nodes, spawned = [], []
    try:
        for _ in range(args.nodes):
            node = start_node(
                args.model,
                "--initial-peers",
                addr,
                "--max-memory",
                str(max_memory),
                "--cache-memory",
                str(cache),
                "--device",
                args.device,
                "--quant",
                quant,
                "--max-session-tokens",
                str(args.prompt_tokens + args.tokens + 8),
                *(["--threads", str(args.threads)] if args.threads else []),
                wait=False,
            )
            spawned.append(time.perf_counter())
            nodes.append(node)
            node.wait_for(r"loading blocks", 300)  # announced `joining` with its span: the next one sees it
            time.sleep(args.settle)  # ...once the DHT has it everywhere (a busy machine is slow at that)
        ready = []
        for node in nodes:
            wait_ready(node, timeout=900)
            ready.append(time.perf_counter())
        client = run_child("client", args, ["--initial-peers", addr])
        gpus = gpu_memory()
        rows = [
            {
                "span": f"{n.start}:{n.end}",
                "load_s": r - s,
                "peak_rss": peak_rss(n.proc.pid),
                "helpers_rss": helper_rss(n.proc.pid),
                "gpu_bytes": gpus.get(n.proc.pid, 0),
                "moved": [line.strip() for line in n.lines if "rebalancing: moving" in line],
            }
            for n, s, r in zip(nodes, spawned, ready, strict=True)
        ]
    finally:
        stop_all([*nodes, coordinator])
    covered = set()  # as the nodes chose at joining (a rebalance check may move one later: "moved")
    for n in nodes:
        covered |= set(range(n.start, n.end))
    return {
        "quant": quant,
        "max_memory": max_memory,
        "cache_memory": cache,
        "nodes": rows,
        "client": client,
        "covered": covered == set(range(config.num_hidden_layers)),
    }


def report(args, config, ref: dict, swarms: list[dict]) -> None:
    from torchnode.node.server import RUNTIME_ALLOWANCE

    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    total = sum(block_bytes(config, 4 if device_type == "cpu" else 2) for _ in range(config.num_hidden_layers))
    head = config.vocab_size * config.hidden_size * (4 if device_type == "cpu" else 2)
    print(
        f"\n## {args.shape} shape, {config.num_hidden_layers} blocks, random weights; {args.device}, "
        f"{args.tokens} greedy tokens after a {args.prompt_tokens}-token prompt; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"blocks {total / GiB:.2f} GiB + embeddings/head {head / GiB:.2f} GiB at compute dtype; "
        f"runtime allowance {RUNTIME_ALLOWANCE[device_type] / MiB:.0f} MiB"
    )
    print(
        f"transformers, one process: load {ref['load_s']:.1f} s, first token {ref['first_token_s'] * 1000:.0f} ms, "
        f"{ref['tokens_per_s']:.2f} tokens/s ({ref['per_token_s'] * 1000:.0f} ms/token after the first), "
        f"peak RSS {ref['peak_rss'] / GiB:.2f} GiB"
        + (f", GPU {ref['gpu_bytes'] / GiB:.2f} GiB" if ref["gpu_bytes"] else "")
    )
    for s in swarms:
        report_swarm(args, config, ref, s)


def report_swarm(args, config, ref: dict, s: dict) -> None:
    c = s["client"]
    same = sum(a == b for a, b in zip(c["tokens"], ref["tokens"], strict=False))
    print(
        f"\n### {args.nodes} nodes, --quant {s['quant']}, --max-memory {s['max_memory'] / GiB:.2f} GiB each "
        f"(--cache-memory {s['cache_memory'] / MiB:.0f} MiB), spans chosen through the DHT; "
        f"cover every block: {'yes' if s['covered'] else 'NO'}"
    )
    print("| node | span | load s | peak RSS GiB | vs --max-memory | DHT helpers RSS MiB | GPU GiB |")
    print("|---|---|---|---|---|---|---|")
    for k, n in enumerate(s["nodes"]):
        print(
            f"| {k} | {n['span']} | {n['load_s']:.1f} | {n['peak_rss'] / GiB:.2f} | "
            f"{n['peak_rss'] / s['max_memory']:.2f} | {n['helpers_rss'] / MiB:.0f} | {n['gpu_bytes'] / GiB:.2f} |"
        )
    for k, n in enumerate(s["nodes"]):
        for line in n["moved"]:
            print(f"node {k} later: {line}")
    print(
        f"client: first token {c['first_token_s'] * 1000:.0f} ms ({c['first_token_s'] / ref['first_token_s']:.2f}x "
        f"transformers'), {c['tokens_per_s']:.2f} tokens/s ({c['tokens_per_s'] / ref['tokens_per_s']:.2f}x), "
        f"{c['per_token_s'] * 1000:.0f} ms/token after the first; peak RSS {c['peak_rss'] / GiB:.2f} GiB for a "
        f"{c['head_bytes'] / GiB:.2f} GiB head (+{(c['peak_rss'] - c['head_bytes']) / MiB:.0f} MiB runtime)"
    )
    print(
        f"greedy tokens equal to transformers': {same} of {len(ref['tokens'])}"
        + (" (all)" if same == len(ref["tokens"]) else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.2-3b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="keep the widths, cut the depth to N blocks")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--quants", default="none,int4", help="node --quant modes, one swarm each (none,int4)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (nodes, client head and transformers)")
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens (16)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (32)")
    parser.add_argument("--cache-memory", type=int, default=256 * MiB, help="each node's --cache-memory, bytes")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds between one node's span and the next's")
    parser.add_argument("--threads", type=int, default=0, help="each node's --threads (0: torch's default)")
    parser.add_argument("--cache-dir", default=None, help="where the checkpoint is kept")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--dry-run", action="store_true", help="a 2-block cut, 4 tokens: checks the script path")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--initial-peers", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_reference(args) if args.child == "reference" else child_client(args)), flush=True)
        return
    if args.dry_run:
        args.layers, args.tokens, args.prompt_tokens = 2, 4, 8
    from torchnode.models.gguf_convert import cache_root

    cache = Path(args.cache_dir or cache_root()) / "bench-shapes"
    config = hf_config(args.shape, args.layers)
    started = time.perf_counter()
    args.model = str(build_checkpoint(args.shape, args.layers, cache))
    print(f"checkpoint {args.model} ready in {time.perf_counter() - started:.0f} s", flush=True)
    ref = run_child("reference", args, [])
    print(f"transformers: {ref['tokens_per_s']:.2f} tokens/s", flush=True)
    report(args, config, ref, [])
    swarms = []
    for quant in args.quants.split(","):
        try:
            swarms.append(run_swarm(args, quant, config))
        except Exception as e:  # one mode failing (nf4 without bitsandbytes) leaves the others' figures
            print(f"swarm --quant {quant} failed: {e}", flush=True)
            continue
        report_swarm(args, config, ref, swarms[-1])  # each as it comes: a run cut short keeps what it measured
        sys.stdout.flush()
        if args.json:
            record = {"shape": args.shape, "layers": config.num_hidden_layers, "device": args.device}
            Path(args.json).write_text(json.dumps({**record, "reference": ref, "swarms": swarms}, default=list))


if __name__ == "__main__":
    main()
