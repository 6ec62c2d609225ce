"""The JSON API and health: auth, records, validation, paper ticks; the app factory starts nothing."""
from __future__ import annotations

import threading

from host.web import create_app

from conftest import SYMBOL, TOKEN, alert, make_settings

ROUTES = ("/api/status", "/api/orders", "/api/positions", "/api/alerts", "/api/risk", "/api/events")


def test_every_api_route_needs_the_bearer_token(host):
    for path in ROUTES:
        assert host.client.get(path).status_code == 401, path
        assert host.client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert host.api(path).status_code == 200, path
    for path in ("/api/halt", "/api/exit-all", "/api/paper/ticks"):
        assert host.client.post(path, json={"mode": "halted"}).status_code == 401
    assert host.api("/api/risk").get_json()["state"] == "active"  # the unauthenticated halt did nothing
    assert TOKEN not in host.client.get("/api/status").get_data(as_text=True)


def test_records_have_the_contract_fields(host):
    host.post(alert(direction="BUY", qty=50, price="100"))
    host.settle()
    host.tick("110")
    order = host.orders()[0]
    for f in ("id", "alert_id", "strategy", "exchange", "symbol", "side", "qty", "order_type", "price",
              "trigger_price", "product", "status", "filled_qty", "avg_price", "broker_order_id", "reason",
              "created_at", "updated_at"):
        assert f in order, f
    pos = host.position()
    assert (pos["net_qty"], pos["avg_price"], pos["ltp"], pos["unrealized_pnl"]) == (50, "100", "110", "500")
    alert_rec = host.api("/api/alerts").get_json()["items"][0]
    assert alert_rec["orders"] == [order["id"]] and alert_rec["status"] == "accepted"
    risk = host.api("/api/risk").get_json()
    for f in ("state", "day_pnl", "max_loss", "peak_pnl", "breached", "warning", "consecutive_loss_days", "cooldown_until"):
        assert f in risk, f
    assert risk["day_pnl"] == "500"
    status = host.api("/api/status").get_json()
    assert status["engine"] == "running" and status["mode"] == "paper" and status["open_positions"] == 1


def test_orders_filter_and_paginate(host):
    for i, strategy in enumerate(("a", "b", "a")):
        host.post(alert(strategy=strategy, tradingsymbol=f"SYM{i}"))
    host.settle()
    assert len(host.orders(strategy="a")) == 2
    page = host.api("/api/orders", query_string={"limit": 1, "offset": 1}).get_json()
    assert page["total"] == 3 and len(page["items"]) == 1
    assert host.api("/api/orders", query_string={"limit": 0}).status_code == 422
    assert host.api("/api/orders", query_string={"limit": "x"}).status_code == 422
    assert host.api("/api/orders/nope").status_code == 404


def test_paper_ticks_are_validated(host):
    r = host.api("/api/paper/ticks", "POST", json=[{"exchange": "XYZ", "symbol": SYMBOL, "ltp": -1}])
    assert r.status_code == 422
    fields = {e["field"] for e in r.get_json()["errors"]}
    assert fields == {"[0].exchange", "[0].ltp"}
    assert host.api("/api/paper/ticks", "POST", json=[]).status_code == 422
    assert host.api("/api/paper/ticks", "POST", data="nope").status_code == 400


def test_paper_ticks_do_not_exist_in_live_mode(tmp_path):
    s = make_settings(tmp_path, BROKER="shoonya", USER_ID="FA1", OAUTH_CLIENT_ID="c", OAUTH_SECRET="s")
    client = create_app(s).test_client()
    r = client.post("/api/paper/ticks", json=[{"exchange": "NFO", "symbol": "X", "ltp": 1}],
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404


def test_healthz_is_503_until_the_engine_runs(host_factory):
    h = host_factory(start=False)
    r = h.client.get("/healthz")
    assert r.status_code == 503 and r.get_json()["status"] == "unavailable"
    h.start()
    r = h.client.get("/healthz")
    assert r.status_code == 200 and r.get_json()["status"] == "ok"


def test_create_app_starts_nothing(tmp_path):
    before = set(threading.enumerate())
    app = create_app(make_settings(tmp_path / "var"))
    assert app is not None
    assert set(threading.enumerate()) - before == set()  # a thread of an earlier test may end meanwhile
    assert not (tmp_path / "var").exists()  # not even the database is opened


def test_unknown_routes_and_methods_answer_json(host):
    r = host.client.get("/nope")
    assert r.status_code == 404 and r.get_json()["status"] == "error"
    r = host.client.get("/webhook")
    assert r.status_code == 405 and r.get_json()["status"] == "error"


def test_a_second_engine_on_the_same_data_dir_is_refused(host, host_factory):
    from host.runtime import EngineBusy
    import pytest
    other = host_factory(start=False)
    with pytest.raises(EngineBusy) as e:
        other.start()
    assert "already runs the engine" in str(e.value)


def test_events_record_decisions(host):
    host.post(alert())
    host.settle()
    host.post(alert(price="43"))
    kinds = [e["kind"] for e in host.api("/api/events").get_json()["items"]]
    assert "alert_blocked" in kinds and "order_filled" in kinds
    newest = host.api("/api/events").get_json()["items"][0]["id"]
    assert host.api("/api/events", query_string={"after": newest}).get_json()["items"] == []
