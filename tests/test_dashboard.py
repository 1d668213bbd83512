"""The health monitor and the dashboard: state logic on hand-made data, then a real swarm on 127.0.0.1.

The swarm (module fixture): a coordinator process running the dashboard in the same process
(`run_bootstrap(dashboard=...)`) with no `--model` (it finds models in the DHT model index), three
tiny-llama nodes on blocks 0:2, 0:2 and 2:4 and one tiny-qwen2 node on all 4 blocks, with 6 s records.
Tests run in file order; the last two kill a node, then the coordinator, and time the last node's exit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from hivemind.utils.timed_storage import get_dht_time
from node_records import info_of, record_of
from prometheus_client.parser import text_string_to_metric_families
from swarm import free_port, run_cli, spawn, start_node, start_nodes, stop_all, wait_ready

from torchnode.coordinator.dashboard import DashboardConfig, bind_http
from torchnode.coordinator.dashboard_app import create_app
from torchnode.coordinator.health_monitor import DEFAULT_MODEL_NAME, HealthMonitor, Probe, build_model_state
from torchnode.coordinator.history import History
from torchnode.coordinator.state_schema import NodeState, SwarmState
from torchnode.coordinator.volunteers import VolunteerLedger
from torchnode.protocol.dht.network import announce, start_dht
from torchnode.protocol.dht.records import ServerRecord
from torchnode.protocol.wire.identity import Identity

pytestmark = pytest.mark.swarm  # the process tier: real node processes / DHT peers

EXPIRATION = 6.0  # seconds a node's record lives without refresh
REFRESH = 1.0  # seconds between the monitor's scans
LEAVE_BOUND_S = 3.5  # "a couple of seconds" to leave, plus the interpreter's exit on a busy 2-core machine
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


# --- state logic, no processes ------------------------------------------------------------------------


def node_state(peer: str, start: int, end: int, health="healthy", state="online", revision="r1", tps=10.0) -> NodeState:
    return NodeState(
        peer_id=peer * 16,
        short_id=peer * 6,
        public_key="00" * 32,
        address="127.0.0.1:1",
        model="m",
        revision=revision,
        start=start,
        end=end,
        state=state,
        health=health,
        throughput=tps,
        rtt_ms=1.0,
        cache_bytes_free=1 << 30,
        version="0.1.0",
        total_blocks=4,
        first_seen=0.0,
        uptime_s=1.0,
        expires_in_s=5.0,
    )


def test_coverage_counts_only_healthy_online_nodes():
    nodes = [
        node_state("aa", 0, 2, tps=5.0),
        node_state("bb", 0, 3, tps=7.0),
        node_state("cc", 2, 4, health="unhealthy"),
        node_state("dd", 3, 4, state="draining"),
        node_state("ee", 3, 4, state="joining", health="starting"),
    ]
    m = build_model_state("m", 4, True, nodes)
    assert [b.coverage for b in m.blocks] == ["replicated", "replicated", "single", "uncovered"]
    assert [b.servers for b in m.blocks] == [2, 2, 1, 0]
    assert (m.ready, m.missing, m.missing_ranges) == (False, [3], "3:4")
    assert m.bottleneck_throughput == 0.0

    m = build_model_state("m", 4, True, [*nodes, node_state("ff", 3, 4, tps=3.0)])
    assert (m.ready, m.ready_revision, m.missing) == (True, "r1", [])
    assert m.bottleneck_throughput == 3.0


def test_ready_needs_one_revision_and_a_known_block_count():
    mixed = [node_state("aa", 0, 2, revision="r1"), node_state("bb", 2, 4, revision="r2")]
    m = build_model_state("m", 4, True, mixed)
    assert not m.missing and not m.ready  # every block served, but no chain of one checkpoint
    assert not build_model_state("m", 4, False, [node_state("aa", 0, 4)]).ready
    assert not build_model_state("m", 0, False, []).ready


def test_block_count_is_voted_by_healthy_nodes():
    monitor = HealthMonitor(dht=None, models=["m"])
    a, b, c, liar = (record_of(Identity.generate(), total_blocks=t) for t in (0, 30, 30, 0))
    probes = {
        a.peer_id: Probe(info_of(a, 30), 0.001, None),  # older node: the count comes from its Info
        b.peer_id: Probe(info_of(b, 30), 0.001, None),
        c.peer_id: Probe(None, None, None),  # unreachable: no vote
        liar.peer_id: Probe(info_of(liar, 1024), 0.001, None),  # outvoted
    }
    records = {r.peer_id: r for r in (a, b, c, liar)}
    assert monitor._learn_total("m", records, probes) == (30, True)
    # no healthy node this scan: the count learned stays
    assert monitor._learn_total("m", {c.peer_id: c}, {c.peer_id: probes[c.peer_id]}) == (30, True)
    fresh = HealthMonitor(dht=None, models=["m"])
    assert fresh._learn_total("m", {c.peer_id: c}, {c.peer_id: probes[c.peer_id]}) == (2, False)  # max end only


def test_info_that_contradicts_the_record_is_unhealthy():
    monitor = HealthMonitor(dht=None, models=["m"])
    record = record_of(Identity.generate(), total_blocks=4)
    ok = monitor._node_state(record, Probe(info_of(record, 4), 0.002, None), time.time(), get_dht_time())
    assert (ok.health, ok.problem, ok.rtt_ms, ok.throughput) == ("healthy", None, 2.0, 2.0)
    for bad_info, words in [
        (info_of(record, 4, start_block=1), "blocks 1:2"),
        (info_of(record, 4, revision="r9"), "revision"),
        (info_of(record, 8), "total_blocks 8"),
        (info_of(record, 4, model="other"), "model"),
    ]:
        state = monitor._node_state(record, Probe(bad_info, 0.002, None), time.time(), get_dht_time())
        assert state.health == "unhealthy" and words in state.problem
        assert state.throughput == record.throughput  # an unhealthy node's Info is not believed


def test_default_model_name_is_what_default_nodes_announce():
    from torchnode.models.checkpoint import default_gguf

    assert default_gguf().name.split(".")[0] == DEFAULT_MODEL_NAME
    assert HealthMonitor(dht=None, models=["default", DEFAULT_MODEL_NAME]).models == [DEFAULT_MODEL_NAME]


def test_app_serves_page_json_schema_and_metrics():
    m = build_model_state("m", 4, True, [node_state("aa", 0, 2), node_state("bb", 2, 4, health="unhealthy")])
    state = SwarmState(
        generated_at=1.0, refresh_s=2.0, scan_duration_s=0.1, monitor_version="0.1.0", dht_maddrs=[], models=[m]
    )
    history = History()
    history.record(state.models, now=1.0)
    client = TestClient(create_app(SimpleNamespace(state=state, history=history, volunteers=VolunteerLedger())))
    assert client.get("/api/v1/links").json() == {"chat_url": None}  # no --chat-url: no chat link
    chat = "http://127.0.0.1:8000/chat"
    linked = TestClient(
        create_app(SimpleNamespace(state=state, history=history, volunteers=VolunteerLedger()), chat_url=chat)
    )
    assert linked.get("/api/v1/links").json() == {"chat_url": chat}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "api/v1/state" in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)  # self-contained: no CDN
    assert "innerHTML" not in page.text  # node-provided strings are set as text only
    assert client.get("/api/v1/state").json() == json.loads(state.model_dump_json())
    samples = client.get("/api/v1/history", params={"model": "m"}).json()["samples"]
    assert [(s["nodes"], s["nodes_online"], s["blocks_covered"]) for s in samples] == [(2, 1, 2)]
    assert client.get("/api/v1/nodes/" + "bb" * 16).json()["node"]["health"] == "unhealthy"
    assert client.get("/api/v1/history", params={"model": "x"}).status_code == 404
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"SwarmState", "ModelState", "NodeState", "BlockState"} <= set(schemas)
    assert "health" in schemas["NodeState"]["properties"]
    metrics = parse_metrics(client.get("/metrics").text)
    assert metrics["torchnode_model_blocks_covered", (("model", "m"),)] == 2
    assert metrics["torchnode_model_ready", (("model", "m"),)] == 0
    assert metrics["torchnode_nodes", (("health", "unhealthy"), ("model", "m"), ("state", "online"))] == 1


def test_dashboard_config_checks_its_values_and_busy_ports_fail_fast():
    assert DashboardConfig(models=("default", "org/m", "default")).models == (DEFAULT_MODEL_NAME, "org/m")
    assert DashboardConfig().models == ()  # no filter: every model in the index
    for bad in [
        dict(models=("bad name",)),
        dict(http_port=70000),
        dict(refresh=0),
        dict(host="localhost"),
        dict(chat_url="javascript:alert(1)"),
    ]:
        with pytest.raises(ValueError):
            DashboardConfig(**bad)
    taken = bind_http("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match="dashboard cannot listen on 127.0.0.1"):
            bind_http("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --- a real swarm ---------------------------------------------------------------------------------------


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def model_state(url: str, model: str) -> dict:
    state = json.loads(get(url + "api/v1/state"))
    return next((m for m in state["models"] if m["name"] == model), {"nodes": [], "name": model})


def wait_model(url: str, model: str, condition: Callable[[dict], bool], timeout: float, what: str) -> dict:
    deadline, m = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        m = model_state(url, model)
        if condition(m):
            return m
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout}s; last state: {json.dumps(m, indent=1)}")


def all_healthy(count: int) -> Callable[[dict], bool]:
    return lambda m: (
        len(m["nodes"]) == count and all(n["health"] == "healthy" and n["state"] == "online" for n in m["nodes"])
    )


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_model

    return save_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module")
def swarm(tiny_llama, tiny_qwen2):
    model = tiny_llama.name
    coordinator = spawn(
        [
            *TORCHNODE,
            "coordinator",
            "--port",
            str(free_port()),
            "--dashboard",
            "--http-port",
            "0",
            "--refresh",
            str(REFRESH),
            "--chat-url",
            "http://127.0.0.1:8000/chat",
        ],
        0,
        None,
    )
    nodes, others = [], []
    try:
        maddr = coordinator.wait_for(r"ready: --initial-peers (\S+)", 60)[1]
        url = coordinator.wait_for(r"dashboard: (http://127\.0\.0\.1:\d+/)", 60)[1]
        args = ("--initial-peers", maddr, "--expiration", str(EXPIRATION))
        others = [start_node(str(tiny_qwen2), "--blocks", "0:4", *args, wait=False)]
        nodes = start_nodes(str(tiny_llama), ["0:2", "0:2", "2:4"], *args)
        wait_ready(others[0])
        wait_model(url, model, all_healthy(3), 60, "three healthy nodes")
        wait_model(url, tiny_qwen2.name, all_healthy(1), 30, "the second model's node")
        yield SimpleNamespace(
            model=model,
            other=tiny_qwen2.name,
            maddr=maddr,
            url=url,
            nodes=nodes,
            other_nodes=others,
            coordinator=coordinator,
        )
    finally:
        stop_all(nodes + others)
        coordinator.stop()


def test_state_matches_what_nodes_announce(swarm):
    m = model_state(swarm.url, swarm.model)
    seen = {(n["peer_id"], n["address"], n["start"], n["end"], n["state"]) for n in m["nodes"]}
    assert seen == {(n.peer_id, n.address, n.start, n.end, "online") for n in swarm.nodes}
    assert (m["total_blocks"], m["total_blocks_known"], m["ready"], m["missing"]) == (4, True, True, [])
    assert [b["coverage"] for b in m["blocks"]] == ["replicated", "replicated", "single", "single"]
    for n in m["nodes"]:
        assert n["short_id"] == n["peer_id"][:12] and n["version"] == "0.1.0"
        assert n["rtt_ms"] is not None and 0 < n["rtt_ms"] < 3000
        assert n["throughput"] > 0 and n["cache_bytes_free"] > 0 and n["uptime_s"] >= 0
        assert 0 < n["expires_in_s"] <= EXPIRATION + 1


def test_metrics_of_the_live_swarm(swarm):
    metrics = parse_metrics(get(swarm.url + "metrics").decode())
    model = (("model", swarm.model),)
    assert metrics["torchnode_model_blocks", model] == 4
    assert metrics["torchnode_model_blocks_covered", model] == 4
    assert metrics["torchnode_model_blocks_replicated", model] == 2
    assert metrics["torchnode_model_ready", model] == 1
    assert metrics["torchnode_nodes", (("health", "healthy"), ("model", swarm.model), ("state", "online"))] == 3
    for n in swarm.nodes:
        labels = (("address", n.address), ("model", swarm.model), ("peer_id", n.peer_id))
        assert metrics["torchnode_node_tokens_per_second", labels] > 0
        assert metrics["torchnode_node_healthy", labels] == 1


def test_every_model_in_the_index_shows_without_a_model_flag(swarm):
    by_name = {m["name"]: m for m in json.loads(get(swarm.url + "api/v1/state"))["models"]}
    assert set(by_name) == {swarm.model, swarm.other}
    llama, qwen = by_name[swarm.model], by_name[swarm.other]
    assert (llama["family"], llama["indexed_nodes"], llama["ready"], llama["adapters"]) == ("llama", 3, True, [])
    assert (qwen["family"], qwen["indexed_nodes"], qwen["ready"], qwen["total_blocks"]) == ("qwen2", 1, True, 4)
    assert llama["revisions"] == sorted({n["revision"] for n in llama["nodes"]})
    metrics = parse_metrics(get(swarm.url + "metrics").decode())
    assert metrics["torchnode_model_ready", (("model", swarm.other),)] == 1


def test_models_command_lists_every_model(swarm):
    result = run_cli("models", "--initial-peers", swarm.maddr, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {
        cells[0]: cells[1:]
        for line in result.stdout.splitlines()
        if len(cells := [c.strip() for c in line.strip("│┃ ").split("│")]) == 6
    }
    assert rows[swarm.model] == ["llama", "4/4", "3/3", rows[swarm.model][3], "ready"], result.stdout
    assert rows[swarm.other][:3] == ["qwen2", "4/4", "1/1"] and rows[swarm.other][4] == "ready"
    assert float(rows[swarm.model][3]) > 0
    missing = run_cli("models", timeout=60)
    assert missing.returncode == 2 and "--initial-peers" in missing.stderr


def get_json(url: str) -> dict:
    return json.loads(get(url))


def test_history_and_node_detail(swarm):
    history_url = swarm.url + "api/v1/history?model=" + urllib.parse.quote(swarm.model)
    deadline = time.monotonic() + 10
    while len(get_json(history_url)["samples"]) < 3 and time.monotonic() < deadline:
        time.sleep(REFRESH)
    history = get_json(history_url)
    assert history["model"] == swarm.model and history["window_s"] == 3600
    samples = history["samples"]
    assert len(samples) >= 3 and [s["t"] for s in samples] == sorted({s["t"] for s in samples})
    last = samples[-1]
    assert (last["nodes"], last["nodes_online"], last["blocks_covered"], last["total_blocks"], last["ready"]) == (
        3,
        3,
        4,
        4,
        True,
    )
    assert last["tokens_per_s"] > 0 and last["sessions_free"] > 0
    node = swarm.nodes[0]
    detail = get_json(swarm.url + "api/v1/nodes/" + node.peer_id)
    assert (detail["node"]["peer_id"], detail["node"]["address"]) == (node.peer_id, node.address)
    recent = detail["samples"][-3:]  # earlier ones may show it starting
    assert len(recent) == 3 and all(s["health"] == "healthy" and s["rtt_ms"] > 0 for s in recent)
    for missing in ("api/v1/nodes/" + "0" * 32, "api/v1/history?model=no-such-model"):
        with pytest.raises(urllib.error.HTTPError) as e:
            get(swarm.url + missing)
        assert e.value.code == 404


def chromium() -> str:
    for candidate in (os.environ.get("TORCHNODE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    pytest.skip("no Chromium found (apt-get install -y chromium, or set TORCHNODE_CHROMIUM)")


def test_page_in_a_real_browser(swarm, tmp_path):
    executable = chromium()
    import playwright.sync_api as playwright  # a dev dependency: missing, the test errors

    requested = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.on("request", lambda r: requested.append(r.url))
            page.goto(swarm.url)
            card = page.locator(f'section.model[data-model="{swarm.model}"]')
            blocks = card.locator(".block-bar .block")
            blocks.nth(3).wait_for(timeout=15_000)
            assert [blocks.nth(i).get_attribute("data-coverage") for i in range(4)] == [
                "replicated",
                "replicated",
                "single",
                "single",
            ]
            assert card.locator('.badge[data-ready="true"]').inner_text() == "Ready to generate"
            chat = card.locator("a.chat-link")  # --chat-url: each ready model links to the API's chat page
            assert chat.get_attribute("href") == "http://127.0.0.1:8000/chat?model=" + urllib.parse.quote(swarm.model)
            rows = card.locator("tbody tr[data-peer-id]")
            assert sorted(rows.nth(i).get_attribute("data-peer-id") for i in range(rows.count())) == sorted(
                n.peer_id for n in swarm.nodes
            )
            assert any(n.address in card.locator("tbody").inner_text() for n in swarm.nodes)

            def column(index: int) -> list[str]:
                return [rows.nth(i).locator("td").nth(index).inner_text() for i in range(rows.count())]

            card.locator('th[data-key="short_id"]').click()  # sort by peer, then reverse
            assert column(0) == sorted(n.peer_id[:12] for n in swarm.nodes)
            card.locator('th[data-key="short_id"]').click()
            assert column(0) == sorted((n.peer_id[:12] for n in swarm.nodes), reverse=True)

            before = len([u for u in requested if "api/v1/state" in u])  # it refreshes by itself, no reload
            polls = "performance.getEntriesByType('resource').filter(e => e.name.includes('api/v1/state')).length"
            page.wait_for_function(f"{polls} > {before}", timeout=15_000)
            assert column(0) == sorted((n.peer_id[:12] for n in swarm.nodes), reverse=True)  # sort survives
            assert page.locator(f'section.model[data-model="{swarm.other}"]').count() == 1  # every model
            page.screenshot(path=tmp_path / "dashboard.png", full_page=True)

            page.locator(f'a.model-name[href="#/model/{swarm.model}"]').click()  # a page per model, with charts
            line = page.locator('.chart[data-chart="nodes_online"] path.line')
            line.wait_for(state="attached", timeout=15_000)  # a flat line has no height: "hidden" to Playwright
            points = int(line.get_attribute("data-points"))  # the line exists only from 2 samples on
            assert line.get_attribute("d").count("L") == points - 1  # one vertex per sample of the history
            now = page.locator('.chart[data-chart="nodes_online"] h3 b').inner_text()
            assert now == str(len(swarm.nodes)), f"the chart's latest value {now!r}, not the swarm's online nodes"
            assert page.locator(".charts .chart").count() >= 4
            assert page.locator("section.model").count() == 1
            assert page.locator(f'section.model[data-model="{swarm.other}"]').count() == 0
            page.screenshot(path=tmp_path / "model.png", full_page=True)

            peer = swarm.nodes[0].peer_id
            page.locator(f'a[href="#/node/{peer}"]').click()  # a node's detail
            page.locator('[data-testid="node-fields"] tr[data-field="peer_id"]').wait_for(timeout=15_000)
            fields = page.locator('[data-testid="node-fields"]').inner_text()
            assert peer in fields and swarm.nodes[0].address in fields
            page.locator('.chart[data-chart="throughput"] path.line').wait_for(state="attached", timeout=15_000)
            assert swarm.model in page.locator("#crumbs").inner_text()
            page.screenshot(path=tmp_path / "node.png", full_page=True)
        finally:
            browser.close()
    assert all((tmp_path / f"{name}.png").stat().st_size > 10_000 for name in ("dashboard", "model", "node"))
    assert all(u.startswith(swarm.url) for u in requested), requested  # nothing from outside


def test_standalone_dashboard_sees_the_same_swarm_and_exits_on_sigterm(swarm):
    dashboard = spawn(
        [
            *TORCHNODE,
            "dashboard",
            "--initial-peers",
            swarm.maddr,
            "--http-port",
            "0",
            "--model",
            swarm.model,
            "--refresh",
            str(REFRESH),
            "--chat-url",
            "http://127.0.0.1:8000/chat",
        ],
        0,
        None,
    )
    try:
        url = dashboard.wait_for(r"dashboard: (http://127\.0\.0\.1:\d+/)", 60)[1]
        m = wait_model(url, swarm.model, all_healthy(3), 30, "standalone dashboard sees three healthy nodes")
        assert {n["peer_id"] for n in m["nodes"]} == {n.peer_id for n in swarm.nodes} and m["ready"]
        assert [m["name"] for m in json.loads(get(url + "api/v1/state"))["models"]] == [swarm.model]  # a filter
        dashboard.proc.send_signal(signal.SIGTERM)
        assert dashboard.proc.wait(20) == 0
        assert "stopped" in dashboard.log
    finally:
        dashboard.stop()


def test_node_signing_with_another_key_than_its_record_is_unhealthy(swarm):
    """A record validly signed by key B claims the address of a real node that holds key A."""
    m = model_state(swarm.url, swarm.model)
    real = next(n for n in m["nodes"] if n["start"] == 0)
    forger = Identity.generate()
    record = ServerRecord(
        peer_id=forger.peer_id,
        public_key=forger.public_key,
        address=real["address"],
        model=swarm.model,
        revision=real["revision"],
        start=0,
        end=2,
        state="online",
        throughput=1000.0,
        cache_bytes_free=1 << 40,
        version="0.1.0",
        expiration=get_dht_time() + EXPIRATION,
    )
    dht = start_dht([swarm.maddr], client_mode=True)
    try:
        assert all(announce(dht, forger, record).values())
    finally:
        dht.shutdown()
    m = wait_model(
        swarm.url,
        swarm.model,
        lambda m: any(n["peer_id"] == forger.peer_id for n in m["nodes"]),
        15,
        "the forged record shows",
    )
    forged = next(n for n in m["nodes"] if n["peer_id"] == forger.peer_id)
    assert forged["health"] == "unhealthy", forged  # the reply (or, over TLS, the channel) is not bound to its key
    assert re.search("rejected reply|not bound to the expected key", forged["problem"]), forged
    assert forged["throughput"] == 1000.0  # shown as announced, but...
    assert [b["servers"] for b in m["blocks"]] == [2, 2, 1, 1]  # ...it counts for nothing
    assert len(m["nodes"]) == 4 and m["ready"]
    wait_model(swarm.url, swarm.model, all_healthy(3), EXPIRATION + 3 * REFRESH + 5, "the forged record expires")


def test_killed_node_leaves_a_gap_then_vanishes(swarm):
    victim = next(n for n in swarm.nodes if (n.start, n.end) == (2, 4))
    killed = time.monotonic()
    victim.stop(signal.SIGKILL)
    m = wait_model(swarm.url, swarm.model, lambda m: not m["ready"], 2 * REFRESH + 5, "the gap shows")
    assert m["missing"] == [2, 3] and m["missing_ranges"] == "2:4"
    assert [b["coverage"] for b in m["blocks"]] == ["replicated", "replicated", "uncovered", "uncovered"]
    dead = [n for n in m["nodes"] if n["peer_id"] == victim.peer_id]
    assert not dead or dead[0]["health"] == "unhealthy"  # until its record expires, it shows as unhealthy
    m = wait_model(
        swarm.url, swarm.model, lambda m: len(m["nodes"]) == 2, EXPIRATION + 3 * REFRESH + 5, "the killed node vanishes"
    )
    vanished_after = time.monotonic() - killed
    assert victim.peer_id not in {n["peer_id"] for n in m["nodes"]}
    assert m["total_blocks"] == 4 and not m["ready"]  # the block count is remembered: the bar stays red
    assert vanished_after <= EXPIRATION + 3 * REFRESH + 5


def test_a_node_leaves_within_seconds_when_the_dht_is_gone(swarm):
    """Issue 16, point 5: SIGTERM to a node with no session open while its coordinator stops too."""
    last = next(n for n in swarm.nodes if n.proc.poll() is None)
    for node in [*swarm.nodes, *swarm.other_nodes]:
        if node is not last:
            node.stop(signal.SIGKILL)
    swarm.coordinator.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    last.proc.send_signal(signal.SIGTERM)
    code = last.proc.wait(20)
    took = time.monotonic() - started
    assert code == 0 and "stopped" in last.log, last.log
    assert took < LEAVE_BOUND_S, f"leaving took {took:.1f}s:\n{last.log}"
