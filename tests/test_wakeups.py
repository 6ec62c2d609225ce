"""Wake-ups between processes on one DATA_DIR: a worker without the engine is answered at once, not at the poll."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from host import engine as engine_module
from conftest import TOKEN, alert, make_settings, wait_for
from host.runtime import Runtime
from host.wakeups import ASKERS_KEPT, EngineWakeups, WorkerWakeups, engine_address, parse
from host.web import create_app


@pytest.fixture
def slow_poll(monkeypatch):
    """The engine looks for alerts stored elsewhere only every 30 s: only a wake-up can be quick."""
    monkeypatch.setattr(engine_module, "ALERT_POLL_S", 30.0)


def _standby(host) -> tuple[Runtime, object]:
    """A second runtime on the same data folder, without the engine: another gunicorn worker."""
    rt = Runtime(host.settings, market_hours=False)
    return rt, create_app(host.settings, runtime=rt).test_client()


def test_a_worker_without_the_engine_gets_its_decision_at_once(host, slow_poll):
    time.sleep(0.3)  # past the engine's first look at the inbox, at its start
    rt, client = _standby(host)
    try:
        for i in range(5):
            t0 = time.monotonic()
            r = client.post("/webhook", json=alert("ENTRY", strategy=f"w{i}"))
            took = time.monotonic() - t0
            assert r.status_code == 200 and r.get_json()["status"] == "accepted", r.get_json()
            assert took < 1.0, took  # without the wake-up: 202 queued after DECISION_WAIT_S (2 s)
        wait_for(lambda: len([o for o in host.orders() if o["status"] == "FILLED"]) == 5)
        # a command too (halt is one): answered by the engine, not left pending
        t0 = time.monotonic()
        r = client.post("/api/halt", headers={"Authorization": f"Bearer {TOKEN}"}, json={"mode": "halted", "reason": "test"})
        took = time.monotonic() - t0
        assert r.status_code == 200 and r.get_json()["status"] == "ok", r.get_json()
        assert took < 1.0, took
    finally:
        rt.stop(timeout=5)


def test_without_wake_ups_the_poll_still_finds_the_alert(host, monkeypatch):
    monkeypatch.setattr(engine_module, "ALERT_POLL_S", 0.1)
    rt, client = _standby(host)
    rt.inbox.tell = None  # as if every datagram were lost
    try:
        r = client.post("/webhook", json=alert("ENTRY", strategy="lost"))
        assert r.status_code == 200 and r.get_json()["status"] == "accepted", r.get_json()
    finally:
        rt.stop(timeout=5)


def test_forged_and_foreign_datagrams_do_nothing_but_wake(tmp_path):
    woken = []
    ew = EngineWakeups(tmp_path, woken.append)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for junk in (b"", b"x" * 500, b"\xff\xfe", b"orders:1", b"alerts:", b"alerts:a\nb", b"alerts:ok"):
            s.sendto(junk, engine_address(tmp_path))
        wait_for(lambda: woken)
        time.sleep(0.1)
        assert woken == ["alerts"]  # only the well-formed one
    finally:
        ew.close()
    assert parse(b"commands:17") == ("commands", "17") and parse(b"alerts:a\tb") is None


def test_the_engine_remembers_a_bounded_number_of_askers(tmp_path):
    ew = EngineWakeups(tmp_path, lambda table: None)
    try:
        for i in range(ASKERS_KEPT + 50):
            ew._on_message("alerts", f"a{i}", b"\0nobody")
        assert len(ew._askers) == ASKERS_KEPT and "alerts:a0" not in ew._askers
    finally:
        ew.close()


def test_a_worker_hears_the_decision_for_its_key(tmp_path):
    heard = []
    ew = EngineWakeups(tmp_path, lambda table: None)
    ww = WorkerWakeups(tmp_path, lambda t, k: heard.append((t, k)))
    try:
        ww.tell("alerts", "a1")
        wait_for(lambda: "alerts:a1" in ew._askers)
        ew.decided("alerts", "a1")
        ew.decided("alerts", "a2")  # nobody asked: nothing sent
        wait_for(lambda: heard)
        time.sleep(0.05)
        assert heard == [("alerts", "a1")]
    finally:
        ww.close()
        ew.close()


def test_alerts_of_one_strategy_are_decided_in_stored_order_across_workers(host, slow_poll, monkeypatch):
    """An alert stored by another worker (its wake-up lost) is decided before a later one stored here."""
    time.sleep(0.3)  # past the engine's first look at the inbox, at its start
    decided, inbox = [], host.runtime.inbox
    real = inbox.decided
    monkeypatch.setattr(inbox, "decided", lambda t, k, *row: (decided.append(k), real(t, k, *row)))
    rt, client = _standby(host)
    rt.inbox.tell = None  # the datagram lost (best effort): only the database says it is there
    try:
        other = threading.Thread(target=client.post, args=("/webhook",), kwargs={"json": alert("ENTRY", strategy="ord", price="41")})
        other.start()
        first = wait_for(lambda: host.runtime.storage.one("select id from alerts where strategy = 'ord'"))["id"]
        r = host.post(alert("ENTRY", strategy="ord", price="43"))
        other.join(5)
        assert first in decided and decided.index(first) < decided.index(r.get_json()["alert_id"]), decided
    finally:
        rt.stop(timeout=5)
