"""The chat page's weight and its time to first token, against the API's own.

Starts two SmolLM2 nodes (0:15, 15:30) and `torchnode api` on them (real processes on 127.0.0.1), opens
/chat in Debian's Chromium through Playwright and reports:
- page weight: requests made to load the page and their bytes (HTTP bodies as sent, uncompressed);
- per question, greedy, `--runs` times: the time from Enter to the first token inserted into the page
  (measured in the page: the Enter key's handler to the first text in the DOM), the API's own time to first
  token for that answer (`torchnode.time_to_first_token_s`: the request's arrival to the first text piece), and
  the same question asked by a plain HTTP client (httpx streaming: request sent to first content chunk).

    .venv/bin/python scripts/bench_chat_page.py [--runs 5] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from swarm import TORCHNODE, free_port, spawn, start_nodes, stop_all  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "What is 2 + 2?",
    "Say hello.",
    "Why is the sky blue?",
]


def http_ttft(url: str, question: str, max_tokens: int) -> float:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                return time.perf_counter() - started
    raise RuntimeError("no content")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    nodes = start_nodes("default", ["0:15", "15:30"])
    api = None
    try:
        port = free_port()
        peers = ",".join(n.address for n in nodes)
        api = spawn([*TORCHNODE, "api", "default", "--peers", peers, "--port", str(port)], port, None)
        api.wait_for(r"ready: OpenAI API", 240)
        url = f"http://127.0.0.1:{port}"
        http_ttft(url, "Warm up.", 2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--headless", "--no-sandbox"])
            page = browser.new_context(bypass_csp=True).new_page()
            loaded: list[tuple[str, int]] = []
            page.on("requestfinished", lambda r: loaded.append((r.url, len(r.response().body()))))
            page.goto(f"{url}/chat?temperature=0&max_tokens={args.max_tokens}")
            page.locator('#model[data-ready="true"]').wait_for(timeout=60_000)
            page.wait_for_load_state("networkidle")
            weight = list(loaded)
            rows = []
            for i in range(args.runs):
                question = QUESTIONS[i % len(QUESTIONS)]
                page.click("#new-chat")
                page.fill("#prompt", question)
                page.press("#prompt", "Enter")
                page.wait_for_function("torchnodeChat.messages.at(-1).state === 'done'", timeout=120_000)
                shown_ms, api_s = page.evaluate(
                    "[torchnodeChat.messages.at(-1).ttftMs, torchnodeChat.messages.at(-1).info.time_to_first_token_s]"
                )
                rows.append((shown_ms / 1000, api_s, http_ttft(url, question, args.max_tokens)))
            browser.close()
    finally:
        if api is not None:
            api.stop()
        stop_all(nodes)

    print(f"page weight: {len(weight)} requests, {sum(b for _, b in weight)} bytes")
    for u, b in weight:
        print(f"  {b:>7} B  {u}")
    print("run  page: Enter -> first token shown   API's own TTFT   plain HTTP client TTFT")
    for i, (shown, own, plain) in enumerate(rows):
        print(f"{i:>3}  {shown * 1000:>10.0f} ms {own * 1000:>22.0f} ms {plain * 1000:>18.0f} ms")
    shown, own, plain = (statistics.median(c) for c in zip(*rows, strict=True))
    added = sorted((r[0] - r[1]) * 1000 for r in rows)  # per answer: the page's figure less the API's own
    print(
        f"median: page {shown * 1000:.0f} ms, API {own * 1000:.0f} ms, HTTP client {plain * 1000:.0f} ms; "
        f"the page adds {statistics.median(added):.0f} ms (median per answer; {added[0]:.0f}-{added[-1]:.0f} ms)"
        " to the API's own time to first token"
    )


if __name__ == "__main__":
    main()
