"""Credit for volunteers: names in signed records, the monitor's ledger (caps, restarts, windows, persistence), and a
real swarm whose nodes join with --public-name and get credited for a generation, on the dashboard's volunteers view."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from node_records import record_of
from prometheus_client.parser import text_string_to_metric_families
from swarm import free_port, run_cli, spawn, start_nodes, stop_all

from torchnode.coordinator.state_schema import NodeState
from torchnode.coordinator.volunteers import VolunteerLedger
from torchnode.protocol.dht.credit import validate_contact, validate_public_name
from torchnode.protocol.dht.records import RecordError, decode_record, encode_record
from torchnode.protocol.wire.identity import Identity

TORCHNODE = [sys.executable, "-m", "torchnode"]
HOUR = 3600.0


def node(
    peer: str, tokens: int, sessions: int = 0, name: str = "", health="healthy", tps=10.0, start=0, end=2, measured=None
):
    return NodeState(
        peer_id=peer * 16,
        short_id=peer * 6,
        public_key="00" * 32,
        address="127.0.0.1:1",
        model="m",
        revision="r",
        start=start,
        end=end,
        state="online",
        health=health,
        throughput=tps,
        cache_bytes_free=0,
        version="0",
        total_blocks=4,
        first_seen=0.0,
        uptime_s=0.0,
        expires_in_s=5.0,
        public_name=name,
        served_tokens=tokens,
        served_sessions=sessions,
        measured_throughput=measured,
    )


# ---- names in signed records


def test_names_and_contacts_are_checked():
    for good in ("Ada Lovelace", "grace_h.", "Zoë-42", "O'Neil", "李小龙", ""):
        assert validate_public_name(good) == good
    for bad in ("x" * 33, " Ada", "Ada ", "Ada  L", "<script>", "a\nb", "tab\t", "Ada!"):
        with pytest.raises(ValueError):
            validate_public_name(bad)
    for good in ("https://example.org/me", "http://a.b", "mailto:ada@example.org", "ada@example.org", ""):
        assert validate_contact(good) == good
    for bad in ("javascript:alert(1)", "ftp://x", "data:text/html,x", "ada", "https://" + "a" * 130, "@ada"):
        with pytest.raises(ValueError):
            validate_contact(bad)


def test_record_carries_name_contact_and_counters_signed():
    me = Identity.generate()
    record = record_of(
        me,
        public_name="Ada Lovelace",
        contact="https://ada.example",
        served_tokens=1234,
        served_sessions=5,
        uptime=60.5,
    )
    assert decode_record(encode_record(me, record)) == record
    assert decode_record(encode_record(me, record_of(me))).public_name == ""  # optional: older records
    with pytest.raises(RecordError, match="public name"):
        encode_record(me, record_of(me, public_name="<b>x</b>"))
    with pytest.raises(RecordError, match="served_tokens"):
        encode_record(me, record_of(me, served_tokens=-1))


# ---- the ledger


def test_only_growth_seen_while_healthy_is_credited_within_the_cap():
    ledger = VolunteerLedger(cap_factor=2.0)
    ledger.record([node("a", 5000, 3, name="Ada")], now=0.0)  # first sight: its past is not credited
    assert ledger.nodes["a" * 16].tokens == 0
    ledger.record([node("a", 5100, 4, name="Ada")], now=10.0)  # +100 in 10 s, cap 2 x 10 tokens/s x 10 s = 200
    t = ledger.nodes["a" * 16]
    assert (t.tokens, t.sessions, t.capped_tokens, t.uptime_s) == (100, 1, 0, 10.0)
    ledger.record([node("a", 9100, name="Ada")], now=20.0)  # +4000 claimed in 10 s: 200 credited, 3800 capped
    assert (t.tokens, t.capped_tokens) == (300, 3800)
    ledger.record([node("a", 9200, name="Ada", health="unhealthy")], now=30.0)  # not credited while unhealthy
    assert t.tokens == 300 and not t.online
    ledger.record([node("a", 50, name="Ada")], now=40.0)  # the counter went down: restarted, +50
    assert t.tokens == 350
    ledger.record([], now=50.0)  # gone: offline, totals kept
    assert not t.online and t.tokens == 350


def test_the_cap_uses_the_speed_the_monitor_measured_over_the_claim():
    ledger = VolunteerLedger(cap_factor=1.0)
    ledger.record([node("a", 0, tps=1000.0, measured=2.0)], now=0.0)
    ledger.record([node("a", 5000, tps=1000.0, measured=2.0)], now=10.0)  # claims 1000 tokens/s, measured 2
    t = ledger.nodes["a" * 16]
    assert (t.tokens, t.capped_tokens, t.throughput) == (20, 4980, 2.0)


def test_totals_per_name_windows_series_and_anonymous_rows():
    ledger = VolunteerLedger()
    now = 10 * 24 * HOUR
    for step, at in enumerate((now - 2 * HOUR, now - 2 * HOUR + 30, now - 60, now)):
        grown = 100 * step
        ledger.record(
            [
                node("a", grown, name="Ada"),
                node("b", 2 * grown, name="Ada", start=2, end=4),
                node("c", grown),
                node("d", grown),
            ],
            now=at,
        )
    state = ledger.state(now)
    ada = next(v for v in state.volunteers if v.name == "Ada")
    assert [n.peer_id[0] for n in ada.nodes] == ["a", "b"] and ada.nodes_online == 2 and ada.blocks == 4
    assert ada.tokens == 900 and ada.tokens_hour == 600  # the first increase was two hours ago
    assert ada.tokens_day == 900 and ada.throughput == 20.0
    anonymous = [v for v in state.volunteers if not v.name]
    assert len(anonymous) == 2 and all(len(v.nodes) == 1 for v in anonymous)  # one row per unnamed node
    assert state.tokens == 900 + 2 * 300 and sum(v for _, v in state.series) == state.tokens
    assert state.volunteers[0].name == "Ada"  # most tokens first


def test_the_ledger_persists_across_a_restart(tmp_path):
    path = tmp_path / "volunteers.json"
    ledger = VolunteerLedger(path)
    ledger.record([node("a", 0, name="Ada")], now=100.0)
    ledger.record([node("a", 70, 2, name="Ada")], now=110.0)
    again = VolunteerLedger(path)
    assert again.nodes["a" * 16].tokens == 70 and again.state(110.0).series == [[60.0, 70.0]]
    again.record([node("a", 90, 2, name="Ada")], now=120.0)  # the baseline survived too
    assert again.nodes["a" * 16].tokens == 90
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the volunteers ledger"):
        VolunteerLedger(path)


# ---- a real swarm: named nodes, a generation, the dashboard's volunteers view


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def wait_volunteers(url: str, ok, timeout: float, what: str) -> dict:
    deadline, state = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        state = get_json(url + "api/v1/volunteers")
        if ok(state):
            return state
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout}s: {state}")


def by_name(state: dict) -> dict:
    return {v["name"]: v for v in state["volunteers"] if v["name"]}


def start_monitor(ledger) -> tuple:
    cmd = [*TORCHNODE, "coordinator", "--port", str(free_port()), "--dashboard", "--http-port", "0", "--refresh", "1"]
    coordinator = spawn([*cmd, "--volunteers-file", str(ledger)], 0, None)
    maddr = coordinator.wait_for(r"ready: --initial-peers (\S+)", 60)[1]
    return coordinator, maddr, coordinator.wait_for(r"dashboard: (http://127\.0\.0\.1:\d+/)", 60)[1]


@pytest.mark.swarm
def test_named_nodes_are_credited_for_a_generation(tiny_llama, tmp_path):
    bad = run_cli("join", str(tiny_llama), "--new-swarm", "--public-name", "<b>Ada</b>")
    assert bad.returncode != 0 and "--public-name" in bad.stderr
    ledger = tmp_path / "volunteers.json"
    coordinator, maddr, url = start_monitor(ledger)
    nodes = []
    try:
        args = ("--initial-peers", maddr, "--expiration", "6")
        nodes = start_nodes(
            str(tiny_llama), ["0:2"], *args, "--public-name", "Ada Lovelace", "--contact", "https://ada.example"
        )
        nodes += start_nodes(str(tiny_llama), ["2:4"], *args, "--public-name", "Grace")

        def seen(s: dict) -> bool:
            named = by_name(s)
            return {"Ada Lovelace", "Grace"} <= set(named) and all(v["nodes_online"] == 1 for v in named.values())

        before = by_name(wait_volunteers(url, seen, 60, "both named nodes online"))
        out = run_cli("generate", str(tiny_llama), "--initial-peers", maddr, "--max-new-tokens", "16", "Hello there")
        assert out.returncode == 0, out.stderr
        grew = lambda s: all(v["tokens"] > before[n]["tokens"] for n, v in by_name(s).items())  # noqa: E731
        after = by_name(wait_volunteers(url, grew, 30, "credit for the generation"))
        ada, grace = after["Ada Lovelace"], after["Grace"]
        served = ada["tokens"] - before["Ada Lovelace"]["tokens"]
        assert served >= 16 and served == grace["tokens"] - before["Grace"]["tokens"]  # the same tokens, both spans
        assert ada["contact"] == "https://ada.example" and ada["blocks"] == 2 and ada["sessions"] >= 1
        assert ada["tokens_hour"] == ada["tokens_day"] == ada["tokens"] and ada["nodes"][0]["capped_tokens"] == 0
        with urllib.request.urlopen(url + "metrics", timeout=10) as r:
            metrics = {
                (s.name, s.labels.get("name")): s.value
                for family in text_string_to_metric_families(r.read().decode())
                for s in family.samples
            }
        assert metrics["torchnode_volunteer_served_tokens_total", "Ada Lovelace"] >= ada["tokens"]

        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(url + "#/volunteers")
                rows = page.locator('[data-testid="volunteer-table"] tbody tr[data-volunteer]')
                rows.nth(1).wait_for(timeout=15_000)
                names = lambda: [rows.nth(i).get_attribute("data-volunteer") for i in range(rows.count())]  # noqa: E731
                assert set(names()) == {"Ada Lovelace", "Grace"}
                page.locator('[data-testid="volunteers"] th[data-key="name"]').click()
                assert names() == ["Ada Lovelace", "Grace"]
                page.locator('[data-testid="volunteers"] th[data-key="name"]').click()
                assert names() == ["Grace", "Ada Lovelace"]
                assert page.locator('a.contact[href="https://ada.example"]').count() == 1
                page.locator('.chart[data-chart="served_tokens"]').wait_for(timeout=15_000)
                shots = Path(os.environ.get("TORCHNODE_SCREENSHOT_DIR", tmp_path))  # docs/ was made that way
                page.screenshot(path=shots / "dashboard-volunteers.png", full_page=True)
            finally:
                browser.close()
    finally:
        stop_all(nodes)
        coordinator.stop()
    coordinator, _, url = start_monitor(ledger)  # a restart keeps the credit
    try:
        kept = by_name(wait_volunteers(url, lambda s: "Ada Lovelace" in by_name(s), 30, "the saved ledger"))
        assert kept["Ada Lovelace"]["tokens"] == ada["tokens"] and kept["Ada Lovelace"]["nodes_online"] == 0
    finally:
        coordinator.stop()
