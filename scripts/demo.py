"""`make demo`: two nodes on 127.0.0.1 serve the embedded SmolLM2 (blocks 0:15 and 15:30), the client
asks them a chat question and streams the answer, which is then checked against plain transformers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

QUESTION = "What are three good reasons to learn to cook at home? Answer briefly."
MAX_NEW_TOKENS = 64
console = Console()


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port")


def start_node(span: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "torchnode", "join", "default", "--blocks", span, "--port", str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_ready(proc: subprocess.Popen, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if "ready:" in line:
            return line.strip()
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"node did not start (exit code {proc.poll()})")


def main() -> int:
    from torchnode.models.checkpoint import resolve

    nodes: list[subprocess.Popen] = []
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("preparing the embedded SmolLM2-135M-Instruct (dequantized once, then cached)")
            resolve("default", on_status=lambda m: bar.update(task, description=m))
            bar.update(task, description="starting node A (blocks 0:15) and node B (blocks 15:30) on 127.0.0.1")
            ports = [free_port(31330), free_port(31331)]
            nodes = [start_node("0:15", ports[0]), start_node("15:30", ports[1])]
            for node in nodes:
                console.log(wait_ready(node).split("node ", 1)[-1])
            bar.update(task, description="loading the client's embeddings, LM head and tokenizer")
            from torchnode.client.sync_model import DistributedModel

            model = DistributedModel.from_pretrained("default", [f"127.0.0.1:{p}" for p in ports])
            bar.update(task, description="ready", completed=True)

        console.rule("[bold]torchnode demo")
        console.print(f"[bold]You:[/] {QUESTION}")
        console.print("[bold]SmolLM2 via 2 nodes:[/] ", end="")
        started, answer = time.perf_counter(), ""
        for piece in model.stream(QUESTION, chat=True, max_new_tokens=MAX_NEW_TOKENS):
            answer += piece
            console.print(piece, end="", markup=False, highlight=False)
        elapsed = time.perf_counter() - started
        console.print()
        model.close()

        with console.status("checking against plain transformers on this machine"):
            expected = reference_answer()
        same = answer.strip() == expected.strip()
        console.rule()
        console.print(f"answered in {elapsed:.1f}s through 2 nodes (at most {MAX_NEW_TOKENS} new tokens)")
        if same:
            console.print("[green]✓ same text as plain transformers (greedy)[/]")
        else:
            console.print(f"[red]✗ differs from plain transformers:[/]\n{expected}")
        return 0 if same else 1
    finally:
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            node.wait(30)
        if nodes:
            console.print("nodes stopped")


def reference_answer() -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torchnode.models.checkpoint import resolve

    path = resolve("default").path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, attention_mask=torch.ones_like(ids))
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


if __name__ == "__main__":
    sys.exit(main())
