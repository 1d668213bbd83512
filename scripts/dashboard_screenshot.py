"""Starts a local swarm (a coordinator with the dashboard + 3 nodes of the embedded SmolLM2 on 127.0.0.1),
lets the monitor collect `--history` seconds of samples, takes screenshots of the three pages with
headless Chromium (every model, one model with its charts, one node), and stops everything.

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png] [--history 60] \
        [--chromium /usr/bin/chromium]

Writes `--out` (every model), and next to it `-model.png` and `-node.png`.

Needs `pip install playwright` and a Chromium on the machine (`apt-get install -y chromium`); nothing is
downloaded (no `playwright install`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from swarm import free_port, spawn, start_nodes, stop_all  # noqa: E402

MODEL_NAME = "SmolLM2-135M-Instruct"
SPANS = ["0:12", "8:22", "18:30"]  # overlaps: some blocks replicated (green), the rest on one node (amber)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--history", type=float, default=60.0, help="seconds of samples before the screenshots")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    if not args.chromium:
        sys.exit("no Chromium found: apt-get install -y chromium, or pass --chromium PATH")
    from playwright.sync_api import sync_playwright

    from torchnode.models.checkpoint import resolve

    resolve("default")  # the one-time GGUF conversion, before the nodes start
    coordinator = spawn(
        [
            sys.executable,
            "-m",
            "torchnode",
            "coordinator",
            "--port",
            str(free_port()),
            "--dashboard",
            "--http-port",
            "0",
            "--refresh",
            "2",
        ],
        0,
        None,
    )
    nodes = []
    try:
        maddr = coordinator.wait_for(r"ready: --initial-peers (\S+)", 60)[1]
        url = coordinator.wait_for(r"dashboard: (http://\S+)", 60)[1]
        print(f"dashboard at {url}; starting {len(SPANS)} nodes", flush=True)
        nodes = start_nodes("default", SPANS, "--initial-peers", maddr, "--threads", "1")
        wait_healthy(url, len(SPANS), timeout=120)
        time.sleep(args.history)  # samples for the charts
        args.out.parent.mkdir(parents=True, exist_ok=True)
        model_png, node_png = (args.out.with_name(f"{args.out.stem}-{page}.png") for page in ("model", "node"))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 640}, device_scale_factor=1)
                page.goto(url)
                page.locator(".block-bar .block").nth(29).wait_for(timeout=15_000)
                page.screenshot(path=args.out, full_page=True)
                page.goto(f"{url}#/model/{MODEL_NAME}")
                page.locator('.chart[data-chart="nodes_online"] path.line').wait_for(state="attached", timeout=15_000)
                page.screenshot(path=model_png, full_page=True)
                page.goto(f"{url}#/node/{nodes[1].peer_id}")
                page.locator('.chart[data-chart="throughput"] path.line').wait_for(state="attached", timeout=15_000)
                page.screenshot(path=node_png, full_page=True)
            finally:
                browser.close()
        print(f"saved {args.out}, {model_png}, {node_png}")
    finally:
        stop_all(nodes)
        coordinator.stop()


def wait_healthy(url: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "api/v1/state", timeout=10) as r:
            model = json.load(r)["models"][0]
        if len(model["nodes"]) == count and all(n["health"] == "healthy" for n in model["nodes"]):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{count} healthy nodes not seen within {timeout}s")


if __name__ == "__main__":
    main()
