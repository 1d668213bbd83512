"""The chat page (`torchnode api` -> /chat) in Debian's Chromium through Playwright, against a real swarm.

The swarm (module fixture): three SmolLM2 nodes started by the CLI (0:15, and 15:30 twice, so a node can be
killed mid-answer and replaced), and two `torchnode api` processes on them: one open, one that needs an API key
(given by --api-key, by TORCHNODE_API_KEY and by --api-key-file). Tests run in file order; the last ones kill
nodes. Screenshots go to $TORCHNODE_SCREENSHOT_DIR when set (docs/ was made that way), else to tmp_path.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from swarm import free_port, run_cli, spawn, start_nodes, stop_all

from torchnode.protocol.wire.grpc_node import GrpcNodeClient
from torchnode.protocol.wire.identity import Identity

pytestmark = pytest.mark.swarm  # the process tier: real node processes

TORCHNODE = [sys.executable, "-m", "torchnode"]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEY, OTHER_KEY, FILE_KEY = "sk-chat-test-1", "sk-chat-test-2", "sk-from-file"
SCRIPT_PROMPT = "Write a minimal HTML page with a <script> tag that calls alert."
STORY_PROMPT = "Tell me a long story about a lighthouse keeper."
PHONE = {"width": 390, "height": 844}  # an iPhone 12-sized screen


def chromium() -> str:
    for candidate in (os.environ.get("TORCHNODE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    pytest.skip("no Chromium found (apt-get install -y chromium, or set TORCHNODE_CHROMIUM)")


def start_api(peers: str, *args: str, env: dict | None = None):
    port = free_port()
    cmd = [*TORCHNODE, "api", "default", "--peers", peers, "--port", str(port), *args]
    proc = spawn(cmd, port, env)
    proc.wait_for(r"ready: OpenAI API at", 240)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    nodes = start_nodes("default", ["0:15", "15:30", "15:30"])
    peers = ",".join(n.address for n in nodes)
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# chat test keys\n{FILE_KEY}\n")
    apis = []
    try:
        apis.append(start_api(peers))
        apis.append(
            start_api(peers, "--api-key", KEY, "--api-key-file", str(key_file), env={"TORCHNODE_API_KEY": OTHER_KEY})
        )
        yield SimpleNamespace(nodes=nodes, peers=peers, url=apis[0][1], locked=apis[1][1])
    finally:
        stop_all([proc for proc, _ in apis])
        stop_all(nodes)


@pytest.fixture(scope="module")
def browser():
    executable = chromium()
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    where = Path(os.environ.get("TORCHNODE_SCREENSHOT_DIR", tmp_path))
    where.mkdir(parents=True, exist_ok=True)
    return where


class Page:
    """A chat page in a fresh browser context; records every request it makes and every dialog it opens."""

    def __init__(self, browser, url: str, viewport: dict | None = None):
        # bypass_csp: Playwright's wait_for_function evaluates strings, which the page's policy forbids
        self.context = browser.new_context(viewport=viewport or {"width": 1280, "height": 800}, bypass_csp=True)
        self.page = self.context.new_page()
        self.requested: list[str] = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requested.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url)

    def ready(self) -> Page:
        self.page.locator('#model[data-ready="true"]').wait_for(timeout=30_000)
        return self

    def send(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def answer(self, n: int = -1):
        return self.page.locator('.msg[data-role="assistant"]').nth(n)

    def wait_done(self, n: int = -1, timeout: float = 120_000) -> None:
        """Until the answer is no longer streaming (done, stopped or failed)."""
        answers = "torchnodeChat.messages.filter(m => m.role === 'assistant')"
        self.page.wait_for_function(f"{answers}.length && {answers}.at({n}).state !== 'streaming'", timeout=timeout)

    def content(self, n: int = -1) -> str:
        return self.page.evaluate(f"torchnodeChat.messages.filter(m => m.role === 'assistant').at({n}).content")

    def close(self) -> None:
        self.context.close()


def sessions_open(address: str) -> int:
    """Sessions the node holds now, from its signed Info (sessions free below its --max-sessions of 64)."""

    async def ask() -> int:
        client = GrpcNodeClient(address, Identity.generate())
        try:
            return 64 - (await client.info()).sessions_free
        finally:
            await client.close()

    with ThreadPoolExecutor(1) as thread:  # sync Playwright runs an event loop in this thread
        return thread.submit(asyncio.run, ask()).result()


def test_greedy_answer_equals_the_cli_and_model_html_is_text(swarm, browser, shots):
    chat = Page(browser, f"{swarm.url}/chat?temperature=0&max_tokens=64").ready()
    try:
        chat.send(SCRIPT_PROMPT)
        chat.page.locator('.msg[data-role="user"]').wait_for()
        chat.answer().locator(".content").wait_for()
        chat.wait_done()
        answer = chat.content()
        cli = run_cli(
            "generate", "default", "--peers", swarm.peers, "--chat", "--greedy", "--max-new-tokens", "64", SCRIPT_PROMPT
        )
        assert cli.returncode == 0, cli.stderr
        assert answer == cli.stdout.removesuffix("\n")
        assert "<script>" in answer  # the model wrote markup: the page shows it as text
        code = chat.answer().locator("pre code")
        assert "<script>alert(" in code.inner_text()
        assert chat.page.locator("script").count() == 1  # the page's own, nothing the model wrote
        assert chat.page.locator(".msg script, .msg html, .msg body").count() == 0
        meta = chat.answer().locator(".meta")
        assert float(meta.locator(".tps").get_attribute("data-tps")) > 0
        assert float(meta.locator(".ttft").get_attribute("data-ttft-ms")) > 0
        assert float(meta.locator(".ttft").get_attribute("data-api-ttft-s")) > 0
        hops = meta.locator(".route .hop")
        assert hops.count() == 2 and "blocks 0:15" in hops.nth(0).inner_text() and "TLS" in hops.nth(1).inner_text()
        assert chat.page.locator('#verified[data-verified="false"]').count() == 1
        chat.page.screenshot(path=shots / "chat.png", full_page=True)
    finally:
        chat.close()
    assert not chat.dialogs and not chat.errors, (chat.dialogs, chat.errors)
    assert all(u.startswith(swarm.url) for u in chat.requested), chat.requested  # nothing from another host
    policy = httpx.get(f"{swarm.url}/chat").headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe-inline" not in policy


def test_route_header_and_field_in_a_stream(swarm):
    body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{swarm.url}/v1/chat/completions", json=body, timeout=60) as response:
        route = response.headers["x-torchnode-route"]
        events = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert re.fullmatch(r"127\.0\.0\.1:\d+ 0:15 tls, 127\.0\.0\.1:\d+ 15:30 tls", route), route
    infos = [e for e in events if '"torchnode"' in e]
    assert len(infos) == 1 and '"finish_reason":"length"' in infos[0] and '"completion_tokens":4' in infos[0]


def test_stop_ends_the_session_on_the_nodes(swarm, browser):
    chat = Page(browser, f"{swarm.url}/chat?temperature=0&max_tokens=400").ready()
    try:
        chat.send(STORY_PROMPT)
        chat.page.wait_for_function("torchnodeChat.messages.at(-1).content.length > 20", timeout=60_000)
        assert chat.answer().get_attribute("data-state") == "streaming"
        assert sum(sessions_open(n.address) for n in swarm.nodes) == 2  # one per hop
        chat.page.click("#stop")
        chat.wait_done()
        assert chat.answer().get_attribute("data-state") == "stopped"
        stopped_at = len(chat.content())
        deadline = time.monotonic() + 5  # the nodes free the session at once, not after 400 tokens
        while sum(sessions_open(n.address) for n in swarm.nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sum(sessions_open(n.address) for n in swarm.nodes) == 0
        time.sleep(1)
        assert len(chat.content()) == stopped_at  # nothing more arrived
        assert chat.page.locator("#send").is_enabled() and chat.page.locator("#stop").is_disabled()
    finally:
        chat.close()


def test_regenerate_new_conversation_system_prompt_and_shift_enter(swarm, browser):
    chat = Page(browser, f"{swarm.url}/chat?temperature=0&max_tokens=12").ready()
    try:
        chat.page.fill("#prompt", "Name a colour.")
        chat.page.press("#prompt", "Shift+Enter")  # a new line, not a send
        chat.page.type("#prompt", "Just one word.")
        assert chat.page.input_value("#prompt") == "Name a colour.\nJust one word."
        assert chat.page.locator(".msg").count() == 0
        chat.page.press("#prompt", "Enter")
        chat.wait_done()
        first = chat.content()
        assert first
        chat.page.click("#regenerate")  # greedy: the same answer again, in place of the first
        chat.wait_done()
        assert chat.page.locator('.msg[data-role="assistant"]').count() == 1
        assert chat.content() == first
        chat.page.click("#new-chat")
        assert chat.page.locator(".msg").count() == 0
        chat.page.click("#settings summary")
        chat.page.fill("#system", "Always answer in French.")
        chat.send("Name a colour.")
        chat.wait_done()
        assert chat.page.evaluate("torchnodeChat.messages.length") == 2
    finally:
        chat.close()


def test_phone_sized_screen(swarm, browser, shots):
    chat = Page(browser, f"{swarm.url}/chat?temperature=0&max_tokens=48", viewport=PHONE).ready()
    try:
        chat.send("Show a Python hello world in a code block.")
        chat.wait_done()
        assert chat.page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scrolling
        for control in ("#prompt", "#send", "#stop", "#regenerate", "#model"):
            box = chat.page.locator(control).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], control
        chat.page.screenshot(path=shots / "chat-phone.png")
    finally:
        chat.close()


def test_bad_settings_are_a_clear_error(swarm, browser):
    chat = Page(browser, f"{swarm.url}/chat?max_tokens=100000").ready()
    try:
        chat.send("Hi")
        chat.wait_done()
        error = chat.answer().locator(".error").inner_text()
        assert "refused these settings (max_tokens)" in error and "maximum context length" in error
    finally:
        chat.close()


def test_api_key_401_in_openai_shape_and_the_page_asks_once(swarm, browser):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        response = httpx.get(f"{swarm.locked}/v1/models", headers=headers)
        assert response.status_code == 401
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
    for key in (KEY, OTHER_KEY, FILE_KEY):  # --api-key, TORCHNODE_API_KEY, --api-key-file
        assert httpx.get(f"{swarm.locked}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(f"{swarm.locked}/chat").status_code == 200  # the page itself asks for the key
    assert httpx.get(f"{swarm.url}/v1/models").status_code == 200  # without --api-key: open

    chat = Page(browser, f"{swarm.locked}/chat?temperature=0&max_tokens=8")
    try:
        chat.page.locator("#key-dialog:not([hidden])").wait_for(timeout=30_000)
        chat.page.fill("#api-key", "wrong")
        chat.page.press("#api-key", "Enter")
        chat.page.locator("#key-reason", has_text="refused").wait_for(timeout=30_000)
        chat.page.fill("#api-key", KEY)
        chat.page.press("#api-key", "Enter")
        chat.ready()
        chat.send("Hi")
        chat.wait_done()
        assert chat.content() and chat.answer().get_attribute("data-state") == "done"
        chat.page.reload()  # kept in the browser: not asked again
        chat.ready()
        assert chat.page.locator("#key-dialog").is_hidden()
    finally:
        chat.close()


def test_a_node_killed_mid_answer_is_replaced_and_the_page_says_so(swarm, browser):
    chat = Page(browser, f"{swarm.url}/chat?temperature=0&max_tokens=120").ready()
    try:
        chat.send(STORY_PROMPT)
        chat.page.wait_for_function("torchnodeChat.messages.at(-1).content.length > 10", timeout=60_000)
        busy = [n for n in swarm.nodes[1:] if sessions_open(n.address)]
        assert len(busy) == 1
        busy[0].stop(signal.SIGKILL)
        chat.wait_done(timeout=180_000)
        assert chat.answer().get_attribute("data-state") == "done"
        notice = chat.answer().locator(".notice").inner_text()
        assert "replaced" in notice and busy[0].address in notice
    finally:
        chat.close()


def test_no_route_names_the_missing_blocks(swarm, browser):
    for node in swarm.nodes[1:]:
        node.stop(signal.SIGKILL)
    chat = Page(browser, f"{swarm.url}/chat?temperature=0&max_tokens=8").ready()
    try:
        chat.send("Hi")
        chat.wait_done(timeout=180_000)
        error = chat.answer().locator(".error").inner_text()
        assert "swarm cannot answer" in error and "15:30" in error, error
        assert chat.answer().get_attribute("data-state") == "error"
    finally:
        chat.close()
