"""Orders through the paper broker: matching, rejections, partial fills, timeouts, restart recovery."""
from __future__ import annotations

import pytest

import threading
import time
from typing import Any
from decimal import Decimal

from host.models import ExecutionType, Intent, OrderStatus, OrderType, Product, Side
from host.orders import insert_order, transition

from conftest import SYMBOL, alert, failing_sender_write, hold_sender, wait_for


def _status(host, oid):
    return next(o for o in host.orders() if o["id"] == oid)


def _one_order(r):
    assert r.status_code == 200, r.get_json()
    return r.get_json()["orders"][0]["id"]


def test_limit_order_rests_then_fills_when_the_price_crosses(host):
    host.tick("50")
    oid = _one_order(host.post(alert(direction="BUY", price="45", qty=50)))
    wait_for(lambda: _status(host, oid)["status"] == "OPEN")
    host.tick("46")
    assert _status(host, oid)["status"] == "OPEN"
    host.tick("44.95")
    o = wait_for(lambda: (o := _status(host, oid))["status"] == "FILLED" and o)
    assert o["avg_price"] == "44.95"
    assert host.net() == 50


def test_market_order_becomes_a_protected_limit_and_fills_at_ltp(host):
    host.tick("100")
    oid = _one_order(host.post(alert(direction="BUY", order_type="MKT", price=None, qty=75)))
    o = wait_for(lambda: (o := _status(host, oid))["status"] == "FILLED" and o)
    assert o["avg_price"] == "100"
    sim = host.broker.engine.find(oid)
    assert sim is not None
    placed = host.broker.engine._orders[sim.broker_order_id].req
    assert placed.order_type.value == "LMT" and placed.price == Decimal("102.00")  # 2 % protection, on the tick


def test_market_order_without_any_price_is_rejected_with_a_clear_reason(host):
    oid = _one_order(host.post(alert(direction="BUY", order_type="MKT", price=None, tradingsymbol="UNPRICED")))
    o = wait_for(lambda: (o := _status(host, oid))["status"] == "REJECTED" and o)
    assert "no price for NFO:UNPRICED" in o["reason"] and "/api/paper/ticks" in o["reason"]


def test_stop_orders_trigger(host):
    host.tick("100")
    host.tick("100", symbol="OTHER")
    sl_lmt = _one_order(host.post(alert(direction="BUY", order_type="SL-LMT", price="106", trigger_price="105", qty=10)))
    sl_mkt = _one_order(host.post(alert(direction="SELL", order_type="SL-MKT", price=None, trigger_price="95",
                                        qty=10, tradingsymbol="OTHER", strategy="s2")))
    # the webhook's answer means decided, not placed: the ticks below must reach orders resting at the broker
    wait_for(lambda: _status(host, sl_lmt)["status"] == _status(host, sl_mkt)["status"] == "OPEN")
    host.tick("104")
    host.settle()
    assert _status(host, sl_lmt)["status"] == "OPEN"
    host.tick("105.5")
    wait_for(lambda: _status(host, sl_lmt)["status"] == "FILLED")
    host.tick("94", symbol="OTHER")
    o = wait_for(lambda: (o := _status(host, sl_mkt))["status"] == "FILLED" and o)
    assert o["avg_price"] == "94"


def test_stop_order_without_a_market_price_is_rejected(host):
    oid = _one_order(host.post(alert(direction="BUY", order_type="SL-LMT", price="106", trigger_price="105",
                                     tradingsymbol="UNPRICED")))
    o = wait_for(lambda: (o := _status(host, oid))["status"] == "REJECTED" and o)
    assert "no price for NFO:UNPRICED" in o["reason"]


def test_broker_rejection_carries_its_reason(host):
    host.broker.engine.reject_next = "RED:Margin Shortfall:INR 12,345.00 Available:INR 0.00"
    oid = _one_order(host.post(alert()))
    o = wait_for(lambda: (o := _status(host, oid))["status"] == "REJECTED" and o)
    assert "Margin Shortfall" in o["reason"]
    assert host.net() == 0
    events = host.api("/api/events").get_json()["items"]
    assert any(e["kind"] == "order_rejected" and oid in e["message"] for e in events)


def test_partial_fills_accumulate_into_the_position(host):
    host.tick("100")
    host.broker.engine.max_fill_qty = 30
    oid = _one_order(host.post(alert(direction="BUY", price="101", qty=75)))
    o = wait_for(lambda: (o := _status(host, oid))["status"] == "PARTIAL" and o)
    assert o["filled_qty"] == 30 and host.net() == 30
    host.tick("100.5")
    wait_for(lambda: _status(host, oid)["filled_qty"] == 60)
    host.tick("99")
    o = wait_for(lambda: (o := _status(host, oid))["status"] == "FILLED" and o)
    assert o["filled_qty"] == 75 and host.net() == 75
    assert Decimal(o["avg_price"]) == (Decimal(30) * 100 + Decimal(30) * Decimal("100.5") + Decimal(15) * 99) / 75
    detail = host.api(f"/api/orders/{oid}").get_json()
    # the broker's ack (OPEN) may land before or after the first fill; it never follows a fill
    history = [h["status"] for h in detail["history"]]
    assert [s for s in history if s != "OPEN"] == ["NEW", "SUBMITTED", "PARTIAL", "PARTIAL", "FILLED"]
    assert history.index("OPEN") == 2 if "OPEN" in history else True
    assert len(detail["fills"]) == 3


def test_broker_timeout_leaves_unknown_then_resolves_to_one_order(host_factory):
    h = host_factory(broker_timeout_s=0.3)
    h.broker.engine.delay_next_s = 1.0
    oid = _one_order(h.post(alert()))
    o = wait_for(lambda: (o := _status(h, oid))["status"] == "UNKNOWN" and o)
    assert "not resent" in o["reason"]
    o = wait_for(lambda: (o := _status(h, oid))["status"] == "FILLED" and o, timeout=10)
    placed = [b for b in h.broker.order_book() if b.remarks == oid]
    assert len(placed) == 1 and o["broker_order_id"] == placed[0].broker_order_id


def test_unknown_order_is_resolved_from_the_book_by_our_id(host_factory):
    h = host_factory(broker_timeout_s=0.3)
    h.broker.engine._listeners.clear()  # the broker never pushes an update: only the book can tell
    h.broker.engine.delay_next_s = 0.6
    oid = _one_order(h.post(alert()))
    wait_for(lambda: _status(h, oid)["status"] == "UNKNOWN")
    wait_for(lambda: h.broker.engine.find(oid))  # the late order reached the broker
    h.runtime.engine._last_reconcile = 0  # reconcile now rather than in 5 s
    o = wait_for(lambda: (o := _status(h, oid))["status"] == "FILLED" and o)
    assert o["broker_order_id"] == h.broker.engine.find(oid).broker_order_id
    assert len(h.broker.order_book()) == 1


def _submitted_but_never_placed(h, age_s: float = 0) -> str:
    """An order marked SUBMITTED whose broker call died with the process: the broker never saw it."""
    intent = Intent("NFO", "OTHER", Side.BUY, 10, OrderType.LMT, Product.NRML, Decimal("5"), action=ExecutionType.ENTRY)
    storage = h.runtime.storage
    oid = storage.write(lambda db: insert_order(db, intent, "s9", None))
    storage.write(lambda db: transition(db, oid, OrderStatus.SUBMITTED))
    if age_s:
        storage.write(lambda db: db.execute("update orders set created_at = datetime(created_at, ?) where id = ?",
                                            (f"-{age_s} seconds", oid)))
    return oid


@pytest.fixture
def late_booking_broker(monkeypatch):
    """The paper broker, but judged like a real one: its book may not show an order yet (late booking)."""
    from host.brokers.paper import PaperBroker
    monkeypatch.setattr(PaperBroker, "book_is_synchronous", False)


def test_after_a_restart_a_paper_order_missing_from_its_book_is_sent_once(host):
    """The paper broker writes its book with the order: an order it lacks was never placed."""
    oid = _submitted_but_never_placed(host)
    host.restart()
    wait_for(lambda: _status(host, oid)["status"] == "FILLED" or _status(host, oid)["status"] == "OPEN")
    host.restart()
    host.settle()
    assert [b.remarks for b in host.broker.order_book()] == [oid]


def test_after_a_restart_a_submitted_order_is_never_sent_again_and_ends_lost(host_factory, late_booking_broker):
    """SUBMITTED means the request may have left: only the broker's books can say it was not booked."""
    h = host_factory(unknown_grace_s=1.0)
    oid = _submitted_but_never_placed(h)
    h.restart()
    o = wait_for(lambda: (h.runtime.engine.__setattr__("_last_reconcile", 0),
                          (o := _status(h, oid))["status"] == "LOST" and o)[1], timeout=8)
    assert "NOT sent again" in o["reason"] and "check the broker" in o["reason"]
    assert h.broker.order_book() == []
    assert any(e["kind"] == "order_lost" and e["severity"] == "error" for e in h.api("/api/events").get_json()["items"])


def test_after_a_restart_an_old_never_sent_order_is_not_sent_late(host_factory):
    h = host_factory(ALERT_MAX_AGE_S=60)
    h.runtime.sender.stop(timeout=1)  # decided, never handed to the broker
    oid = _one_order(h.post(alert()))
    h.runtime.storage.write(lambda db: db.execute(
        "update orders set created_at = ? where id = ?", ("2020-01-01T00:00:00.000+00:00", oid)))
    h.restart()
    o = wait_for(lambda: (o := _status(h, oid))["status"] == "REJECTED" and o)
    assert "older than ALERT_MAX_AGE_S=60" in o["reason"]
    assert h.broker.engine.find(oid) is None


def test_a_lost_order_booked_late_is_found_by_its_remarks(host_factory, late_booking_broker):
    h = host_factory(unknown_grace_s=1.0)
    h.tick("42.5")
    oid = _submitted_but_never_placed(h)
    h.restart()
    wait_for(lambda: (h.runtime.engine.__setattr__("_last_reconcile", 0), _status(h, oid)["status"] == "LOST")[1],
             timeout=8)
    row = h.runtime.storage.one("select * from orders where id = ?", (oid,))
    from host.orders import request_for
    h.broker.place(request_for(row))  # the broker books it after all, very late
    o = wait_for(lambda: (h.runtime.engine.__setattr__("_last_reconcile", 0),
                          (o := _status(h, oid))["status"] in ("OPEN", "FILLED") and o)[1], timeout=8)
    assert o["broker_order_id"] and len(h.broker.order_book()) == 1


def test_while_running_a_timed_out_order_missing_from_the_book_is_not_resent(host_factory):
    h = host_factory(broker_timeout_s=0.2, unknown_grace_s=0.3)
    calls = []

    def vanishing_place(req):  # the request is lost on the way: no answer, and the broker never has it
        calls.append(req.remarks)
        time.sleep(0.5)
        raise ConnectionResetError("connection reset")
    h.broker.place = vanishing_place
    oid = _one_order(h.post(alert()))
    wait_for(lambda: _status(h, oid)["status"] == "UNKNOWN")
    h.runtime.engine._last_reconcile = 0
    o = wait_for(lambda: (h.runtime.engine.__setattr__("_last_reconcile", 0),
                          (o := _status(h, oid))["status"] == "LOST" and o)[1], timeout=5)
    assert "no trace in the broker's books" in o["reason"] and "NOT sent again" in o["reason"]
    assert calls == [oid]


def test_orders_decided_before_a_crash_are_sent_once_after_restart(host):
    # stop the sender so the decided order stays NEW, as if the process died right after deciding
    host.runtime.sender.stop(timeout=1)
    r = host.post(alert())
    oid = _one_order(r)
    assert _status(host, oid)["status"] == "NEW"
    host.restart()
    wait_for(lambda: _status(host, oid)["status"] == "FILLED")
    host.restart()
    host.settle()
    assert [b.remarks for b in host.broker.order_book()] == [oid]
    assert host.net() == -75


def test_paper_market_state_survives_a_restart(host):
    host.tick("123.45")
    _one_order(host.post(alert(direction="BUY", price="120")))
    host.restart()
    assert host.broker.ltp("NFO", SYMBOL) == Decimal("123.45")
    assert len(host.broker.order_book()) == 1
    host.tick("119")
    wait_for(lambda: host.orders(status="FILLED"))


def test_a_failed_cancel_is_reported_not_swallowed(host):
    host.tick("100")
    oid = _one_order(host.post(alert(direction="BUY", price="90")))
    wait_for(lambda: _status(host, oid)["status"] == "OPEN")

    def refuse(broker_order_id, exchange=""):
        from host.brokers.base import Rejected
        raise Rejected("RMS: order is in modification")
    host.broker.cancel = refuse
    host.runtime.sender.enqueue_cancel(oid, "test")
    event = wait_for(lambda: next((e for e in host.api("/api/events").get_json()["items"]
                                   if e["kind"] == "cancel_failed"), None))
    assert oid in event["message"] and "RMS: order is in modification" in event["message"]
    assert _status(host, oid)["status"] == "OPEN"


def test_a_cancel_asked_again_while_one_waits_in_the_queue_is_sent_once(host):
    """Review 24: the reconcile asks again every 5 s for the cancel of an order the broker keeps working, and each
    ask queued another copy. With cancels now spaced under the broker's order rate, a few dozen such orders filled
    the sender's queue faster than it drained, and every exit queued behind them waited longer and longer."""
    host.tick("100")
    oid = _one_order(host.post(alert(direction="BUY", price="90")))
    wait_for(lambda: _status(host, oid)["status"] == "OPEN")
    calls = []

    def refuse(broker_order_id, exchange=""):
        from host.brokers.base import Rejected
        calls.append(broker_order_id)
        raise Rejected("RMS: order is in modification")
    host.broker.cancel = refuse
    gate = hold_sender(host.runtime.sender)
    for _ in range(5):
        host.runtime.sender.enqueue_cancel(oid, "asked again")
    gate.set()
    wait_for(lambda: calls)
    host.settle()
    time.sleep(0.3)
    assert len(calls) == 1, calls
    host.runtime.sender.enqueue_cancel(oid, "asked once its last cancel has been tried")
    wait_for(lambda: len(calls) == 2)


def test_a_death_after_a_batch_is_placed_and_before_its_acks_are_recorded_sends_none_again(host):
    """The acks of a batch of paper orders share one commit after the last is placed (issue 17). A process that
    dies before that commit leaves the batch SUBMITTED, with no broker id and no fill applied: the restart finds
    each in the broker's book by its remarks, and sends none of them again."""
    sender, broker = host.runtime.sender, host.broker
    real_place, gate = broker.place, threading.Event()
    died: list[str] = []

    def place(req: Any) -> Any:
        gate.wait(10)  # the first order is held at the broker while the next ones are decided
        return real_place(req)
    broker.place = place
    sender._record_acks = lambda placed: died.extend(oid for oid, _ in placed)  # the process is gone: no ack
    broker.engine._listeners.clear()  # and no fill is applied either
    oids = [_one_order(host.post(alert(strategy=f"b{i}"))) for i in range(4)]
    gate.set()
    wait_for(lambda: len(died) == 4)
    assert {_status(host, oid)["status"] for oid in oids} == {"SUBMITTED"}
    host.restart()
    wait_for(lambda: {_status(host, oid)["status"] for oid in oids} == {"FILLED"})
    host.restart()
    host.settle()
    book = host.broker.order_book()
    assert sorted(b.remarks for b in book) == sorted(oids)  # each placed once, none again
    assert all(_status(host, oid)["broker_order_id"] == next(b.broker_order_id for b in book if b.remarks == oid)
               for oid in oids)
    assert [host.net(f"b{i}") for i in range(4)] == [-75] * 4


def test_a_write_failing_in_the_middle_of_a_batch_still_places_the_rest_of_it(host_factory):
    """Review 14: the rejection of a batch's second order could not be written (a full disk): the third, marked
    SUBMITTED, was then never placed, and a reconcile later called it LOST ("check the broker terminal") though
    the paper book proved it never left. The rest of a batch goes on; the first's ack is kept."""
    from host.brokers.base import Rejected
    from host.storage import StorageFull
    h = host_factory(unknown_grace_s=1)
    h.tick("42.5")
    sender, broker, storage = h.runtime.sender, h.broker, h.runtime.storage
    gate = hold_sender(sender)
    oids = [_one_order(h.post(alert(strategy=f"m{i}", direction="BUY", price="40"))) for i in range(3)]
    wait_for(lambda: sender._queue.qsize() == 3)
    real_place = broker.place

    def place(req: Any) -> Any:
        if req.remarks == oids[1]:
            raise Rejected("RMS: margin exceeds")
        return real_place(req)
    broker.place = place
    restore, failed = failing_sender_write(storage, StorageFull("the disk holding host.sqlite is full (test)"))
    try:
        gate.set()
        wait_for(lambda: failed and sender.idle())
    finally:
        restore()
    assert sorted(b.remarks for b in broker.order_book() if b.remarks in oids) == sorted([oids[0], oids[2]])
    wait_for(lambda: [_status(h, o)["status"] for o in (oids[0], oids[2])] == ["OPEN", "OPEN"])
    assert _status(h, oids[0])["broker_order_id"] and _status(h, oids[2])["broker_order_id"]


class _SegmentsFail:
    """A store whose reads of an order's exchange fail the first `fails` times (a disk I/O error)."""

    def __init__(self, exchanges: dict[str, str], fails: int):
        self.exchanges, self.fails = exchanges, fails

    def one(self, sql: str, params: tuple) -> dict:
        if self.fails:
            self.fails -= 1
            import sqlite3
            raise sqlite3.OperationalError("disk I/O error")
        return {"exchange": self.exchanges.get(params[0], "NSE")}


def _rate_limited_sender(store: _SegmentsFail) -> Any:
    from host.orders import OrderSender

    class Broker:
        def turn_in(self, exchange: str) -> float:
            return 0.0
    gateway = type("Gateway", (), {"broker": Broker()})()
    return OrderSender(store, gateway)


def test_a_failed_read_of_an_orders_segment_never_stops_the_order_sender():
    """Review of the per-segment sender: choosing the next message reads each waiting order's exchange, outside the
    loop's guard; one read failing (a disk error) ended the sender thread, and every later exit, cancel and breach
    flatten stayed queued, unsent, with nothing to say so. Now that pick goes in plain order, and the loop goes on."""
    sender = _rate_limited_sender(_SegmentsFail({"a": "NSE", "b": "NFO", "c": "NFO"}, fails=1))
    done: list[str] = []
    sender.send_batch = lambda _, ids: done.extend(ids)
    sender.cancel = lambda oid, why: done.append(f"cancel {oid}")
    sender.start()
    try:
        gate = hold_sender(sender)
        sender.enqueue("a")
        sender.enqueue_cancel("b", "test")
        sender.enqueue("c")
        gate.set()
        wait_for(lambda: len(done) == 3, timeout=3)
        assert done == ["a", "cancel b", "c"]  # in their order, as the queue had them
        sender.enqueue("later")
        wait_for(lambda: done[-1:] == ["later"], timeout=3)
    finally:
        sender.stop(2)


def test_a_failed_read_while_a_batch_looks_for_another_segment_still_sends_the_rest_of_the_batch():
    """The same read, made before each order of a batch after the first (may another segment go first?): failing, it
    left send_batch with the rest of the batch taken off the waiting list, NEW and unsent until a restart."""
    sender = _rate_limited_sender(_SegmentsFail({"x": "NFO"}, fails=100))
    prepared: list[str] = []
    sender._prepare = lambda oid: prepared.append(oid)  # (None: nothing to place)
    sender._waiting.append((sender.send, "x", None))  # another segment's order waits
    sender.send_batch("", ["a", "b", "c"])
    assert prepared == ["a", "b", "c"]
