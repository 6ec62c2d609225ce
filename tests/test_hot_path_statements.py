"""Less work per order on the hot path (issue 17): an order's row is read once per step, and the row the
step hands on (to the engine, risk and the strategies) is the row as stored, whatever the broker sends."""
from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import SYMBOL
from host.models import BrokerOrder, ExecutionType, FillReport, Intent, OrderStatus, OrderType, Product, Side
from host.orders import insert_order, mark_submitted, transition
from host.storage import Storage
from host.watcher import Watcher

ORDER_READ = "select * from orders where id"


@pytest.fixture
def storage(tmp_path):
    s = Storage(tmp_path / "h.sqlite")
    yield s
    s.close()


def _order(storage: Storage, qty: int = 150, ack: bool = True) -> str:
    intent = Intent("NFO", SYMBOL, Side.BUY, qty, OrderType.LMT, Product.NRML, Decimal("43"), action=ExecutionType.ENTRY)
    oid = storage.write(lambda db: insert_order(db, intent, "s1", None))
    if ack:
        storage.write(lambda db: transition(db, oid, OrderStatus.OPEN, None, broker_order_id="B1"))
    return oid


def _traced(storage: Storage, fn):
    """fn's result and the statements the write connection ran for it."""
    seen: list[str] = []
    storage.conn.set_trace_callback(lambda sql: seen.append(" ".join(sql.split())))
    try:
        return fn(), seen
    finally:
        storage.conn.set_trace_callback(None)


def _stored(storage: Storage, oid: str) -> dict:
    return storage.one("select * from orders where id = ?", (oid,))


def _typed(row: dict) -> dict:
    """A row whose values compare by type as well as value."""
    return {k: (type(v).__name__, v) for k, v in row.items()}


def test_a_fill_reads_its_order_once_and_hands_on_the_row_as_stored(storage):
    oid = _order(storage)
    w = Watcher(storage)
    fill = BrokerOrder("B1", oid, OrderStatus.FILLED, 150, Decimal("42.75"),
                       fills=(FillReport("F1", 100, Decimal("42.5")), FillReport("F2", 50, Decimal("43.25"))))
    changed, seen = _traced(storage, lambda: w.apply([fill]))
    reads = [s for s in seen if s.startswith(ORDER_READ)]
    assert len(reads) == 1, seen  # it was read four times: before the fill, in transition, for the event, after
    assert changed == [_stored(storage, oid)]
    assert (changed[0]["status"], changed[0]["filled_qty"], changed[0]["applied_qty"]) == ("FILLED", 150, 150)


def test_marking_an_order_submitted_is_one_statement_and_its_history(storage):
    oid = _order(storage, ack=False)
    row, seen = _traced(storage, lambda: storage.write(lambda db: mark_submitted(db, oid)))
    assert row == _stored(storage, oid) and row["status"] == "SUBMITTED"
    assert [s.split()[0].lower() for s in seen] == ["begin", "update", "insert", "commit"], seen
    again, _ = _traced(storage, lambda: storage.write(lambda db: mark_submitted(db, oid)))
    assert again is None  # not NEW any more: never sent twice


def test_a_late_ack_after_the_fill_keeps_the_broker_id_in_the_row_handed_on(storage):
    oid = _order(storage, ack=False)
    w = Watcher(storage)
    w.apply([BrokerOrder("", oid, OrderStatus.FILLED, 150, Decimal("43"))])  # the fill came without the id
    changed = w.apply([BrokerOrder("B9", oid, OrderStatus.OPEN, 0, None)])  # the ack, late: status stays FILLED
    stored = _stored(storage, oid)
    assert (stored["status"], stored["broker_order_id"]) == ("FILLED", "B9")
    assert changed == []  # nothing a strategy must hear: the status and fill did not move


STATUSES = [OrderStatus.OPEN, OrderStatus.PARTIAL, OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.REJECTED,
            OrderStatus.UNKNOWN]
update = st.builds(
    lambda status, filled, price, bid, reason, fills: (status, filled, price, bid, reason, fills),
    st.sampled_from(STATUSES), st.integers(0, 150),
    st.one_of(st.none(), st.decimals(min_value=Decimal("0.05"), max_value=Decimal("500"), places=2)),
    st.sampled_from(["B1", "", "B2"]), st.one_of(st.none(), st.sampled_from(["rms: margin", "cancelled by user"])),
    st.lists(st.tuples(st.sampled_from(["F1", "F2", "F3"]), st.integers(1, 75),
                       st.decimals(min_value=Decimal("1"), max_value=Decimal("99"), places=2)), max_size=2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(updates=st.lists(update, min_size=1, max_size=6))
def test_any_run_of_broker_updates_hands_on_only_rows_as_stored(tmp_path_factory, updates):
    storage = Storage(tmp_path_factory.mktemp("db") / "h.sqlite")
    try:
        oid = _order(storage)
        w = Watcher(storage)
        for status, filled, price, bid, reason, fills in updates:
            reports = tuple(FillReport(f, q, p) for f, q, p in fills)
            changed = w.apply([BrokerOrder(bid, oid, status, filled, price, reason, reports)])
            if changed:  # typed: 150 == Decimal("150") == 150.0 in Python, not in the engine's arithmetic or JSON
                assert [_typed(r) for r in changed] == [_typed(_stored(storage, oid))]
    finally:
        storage.close()


def test_an_older_sqlite_without_returning_still_marks_and_hands_on_the_stored_row(storage, monkeypatch):
    """SQLite before 3.35 (Ubuntu 20.04's 3.31, a pyenv Python built there) has no UPDATE ... RETURNING: every
    send failed with a syntax error, and the orders (exits too) stayed NEW with only a log line."""
    import sqlite3

    import sqlite_utils
    execute = sqlite_utils.Database.execute

    def old_sqlite(db, sql, parameters=None):
        if "returning" in sql.lower():
            raise sqlite3.OperationalError('near "returning": syntax error')
        return execute(db, sql, parameters)
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite_utils.Database, "execute", old_sqlite)
    oid = _order(storage, ack=False)
    row = storage.write(lambda db: mark_submitted(db, oid), durable=True)
    assert row == _stored(storage, oid) and row["status"] == "SUBMITTED"
    assert storage.one("select count(*) n from order_history where order_id = ? and status = 'SUBMITTED'",
                       (oid,))["n"] == 1
    assert storage.write(lambda db: mark_submitted(db, oid)) is None  # not NEW any more: never sent twice


def test_a_blank_broker_id_in_an_update_never_hides_the_known_one(storage):
    oid = _order(storage)  # OPEN as B1
    w = Watcher(storage)
    w.apply([BrokerOrder("", oid, OrderStatus.PARTIAL, 50, Decimal("43"))])
    stored = _stored(storage, oid)
    assert (stored["status"], stored["filled_qty"], stored["broker_order_id"]) == ("PARTIAL", 50, "B1")


def test_an_order_that_could_not_be_marked_submitted_is_never_sent_and_the_trader_is_told(storage):
    import sqlite3
    from host.orders import BrokerGateway, OrderSender
    oid = _order(storage, ack=False)
    placed: list[str] = []

    class Broker:
        name = "watching"

        def prepare(self, req):
            return req

        def place(self, req):
            placed.append(req.remarks)
            return "B1"
    real = storage.write

    def failing(fn, durable=False, on_commit=None):
        if durable:
            raise sqlite3.OperationalError("disk I/O error")
        return real(fn, durable, on_commit)
    storage.write = failing
    gateway = BrokerGateway(Broker())
    try:
        with pytest.raises(sqlite3.OperationalError):
            OrderSender(storage, gateway).send_batch(oid, [oid])
    finally:
        gateway.shutdown()
        storage.write = real
    assert placed == [] and _stored(storage, oid)["status"] == "NEW"  # never at the broker
    events = storage.rows("select kind, severity, message from events where kind = 'order_not_sent'")
    assert len(events) == 1 and events[0]["severity"] == "error", events
    assert oid in events[0]["message"] and "disk I/O error" in events[0]["message"]


def test_a_submitted_mark_the_disk_did_not_confirm_is_reported_as_not_sent_too(storage):
    from host.group_sync import NotDurable
    from host.orders import BrokerGateway, OrderSender
    oid = _order(storage, ack=False)
    real = storage.write

    def unconfirmed(fn, durable=False, on_commit=None):
        result = real(fn, False, on_commit)  # committed, then the fsync fails
        if durable:
            raise NotDurable("the disk did not confirm the write (EIO)")
        return result
    storage.write = unconfirmed
    class Unplaceable:
        name = "unplaceable"

        def prepare(self, req):
            return req
    gateway = BrokerGateway(Unplaceable())  # no place(): nothing may be placed
    try:
        with pytest.raises(NotDurable):
            OrderSender(storage, gateway).send_batch(oid, [oid])
    finally:
        gateway.shutdown()
        storage.write = real
    assert _stored(storage, oid)["status"] == "SUBMITTED"
    [event] = storage.rows("select message from events where kind = 'order_not_sent'")
    assert oid in event["message"] and "LOST" in event["message"]


def test_a_webhook_answer_takes_the_decision_from_the_engine_not_from_a_read_of_its_row(host):
    """The engine hands the waiting request the row it committed (issue 17): no read of the alert after it."""
    from conftest import alert
    assert host.post(alert(strategy="warm")).status_code == 200  # this thread's read connection exists now
    seen: list[str] = []
    # this thread's reader only (the request runs here, the waiter reads here): a callback set on a connection
    # another thread is inside would wait for its mutex holding the GIL, and deadlock (test_flat_cost)
    readers = [host.runtime.storage._reader().conn]
    for conn in readers:
        conn.set_trace_callback(lambda sql: seen.append(" ".join(sql.split())))
    try:
        r = host.post({**alert(strategy="s1", alert_id="one"), "comment": "go long"})
    finally:
        for conn in readers:
            conn.set_trace_callback(None)
    body = r.get_json()
    assert r.status_code == 200 and body["status"] == "accepted", body
    assert not [s for s in seen if s.startswith("select * from alerts")], seen
    stored = host.api(f"/api/alerts", query_string={"status": "accepted"}).get_json()["items"]
    row = next(a for a in stored if a["id"] == body["alert_id"])
    assert [o["id"] for o in body["orders"]] == row["orders"] and body["client_alert_id"] == "one"
    assert body["notes"] == ["comment ignored: not a field this host reads"], body  # kept from the stored body


def test_a_decision_committed_before_the_turn_fails_stands_and_its_order_is_sent(host):
    """Review 16: a failure after the decision's commit (handing its orders to the sender) recorded FAILED over
    the ACCEPTED decision, with its order left NEW for good, while the webhook answered "accepted". The committed
    decision stands, the answer says it, and the recovery sends the order."""
    from conftest import alert, wait_for
    engine, calls = host.runtime.engine, []
    real = engine._dispatch

    def failing_once(decision, why=""):
        calls.append(decision)
        if len(calls) == 1:
            raise RuntimeError("the sender's queue failed (test)")
        return real(decision, why)
    engine._dispatch = failing_once
    try:
        r = host.post(alert(strategy="s1", alert_id="c1"))
    finally:
        engine._dispatch = real
    body = r.get_json()
    assert r.status_code == 200 and body["status"] == "accepted", body
    stored = host.runtime.storage.one("select status, orders from alerts where id = ?", (body["alert_id"],))
    assert stored["status"] == "accepted" and body["orders"] and body["orders"][0]["id"] in stored["orders"]
    oid = body["orders"][0]["id"]
    wait_for(lambda: host.runtime.storage.one("select status from orders where id = ?", (oid,))["status"] == "FILLED",
             timeout=8)
