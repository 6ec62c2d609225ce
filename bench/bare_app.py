"""The floors, served by the same gunicorn settings as the host.

/webhook: a bare Flask route that parses the same JSON body.
/webhook-contract: the same route doing only what the contract asks of every alert, in the fewest steps:
the alert committed durably (synchronous=FULL, one fsync each), then a decision made on one thread and
committed (an order row, the alert's status), then the answer. No checks, no order life: what an alert
must cost at the least, to tell the host's own cost from the disk's and the hand-off's.
/webhook-order-floor: the least that keeps the contract's promises with an order life, still without a check
other than the duplicate one: one thread takes every alert waiting, and in ONE durable commit per batch stores
them (a body seen in the last 10 s is a duplicate, not run again), decides them and persists their orders
SUBMITTED; only then are they answered and sent (to a broker that only hands back an id); the acks and the fills
(order, fill, position) are committed per batch on one sender thread. What any host keeping the promises must
spend per alert, in Python on one GIL; an outside review found this shape 25-30 % cheaper than a stage per
commit (a durable alert commit, a decision, a durable SUBMITTED mark, each on its own thread).
/webhook-checked-floor: the order-life floor's shape with the host's own checks added, as the host runs them: the
request's screening and validation (host/web/webhook.py, host/validation.py) on the request thread; on the one
deciding thread, in the batch's one durable commit, the host's schema and records (the alert row, its duplicate
check, the belief of alert_positions.py, the Decider: guard, risk, order checks, NEW order rows and their history,
the day's count) and the SUBMITTED marks. What the host's checks cost on top of the least order life, in the best
shape found: if it misses an aim, no reshaping of the host's threads or commits can meet it with those checks.
/webhook-records-floor: the checked floor's records without any of its checks (see RecordsFloor).
"""
import hashlib
import json
import os
import queue
import sqlite3
import tempfile
import threading
import time
from datetime import datetime, timezone
from typing import Optional

from host.ids import new_id

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/webhook")
def webhook():
    body = request.get_json(force=True)
    return jsonify({"status": "accepted", "strategy": body.get("strategy_name")})


@app.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


class Contract:
    """A SQLite file in WAL mode (BARE_DB), one writer at a time, and one thread that decides."""

    def __init__(self, path: str):
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("create table if not exists alerts (id integer primary key, body text, status text)")
        self.conn.execute("create table if not exists orders (id integer primary key, alert_id integer, body text)")
        self.lock = threading.Lock()
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._decide, daemon=True).start()

    def store(self, raw: bytes) -> int:
        with self.lock:  # durable: synchronous=FULL syncs the WAL at this commit
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("BEGIN IMMEDIATE")
            rowid = self.conn.execute("insert into alerts (body, status) values (?, 'received')", (raw,)).lastrowid
            self.conn.execute("COMMIT")
            self.conn.execute("PRAGMA synchronous=NORMAL")
        return rowid

    def _decide(self) -> None:
        while True:
            rowid, done = self.todo.get()
            with self.lock:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.execute("insert into orders (alert_id, body) values (?, 'NEW')", (rowid,))
                self.conn.execute("update alerts set status = 'accepted' where id = ?", (rowid,))
                self.conn.execute("COMMIT")
            done.set()

    def decided(self, rowid: int) -> bool:
        done = threading.Event()
        self.todo.put((rowid, done))
        return done.wait(2.0)


class Stopped(Exception):
    """A floor's thread was asked to end (a test's floor, stopped with it)."""


def _drain(q: queue.SimpleQueue) -> list:
    """Everything waiting on a queue, waiting for the first item; Stopped at the stop's mark (None)."""
    items = [q.get()]
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            if None in items:
                raise Stopped
            return items


class OrderFloor:
    """Alerts stored, decided and their orders persisted SUBMITTED in one durable commit per batch; then the life."""

    def __init__(self, path: str):
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("create table if not exists alerts (id integer primary key, body text, status text, "
                          "body_hash text, received_at real)")
        self.conn.execute("create index if not exists alerts_hash on alerts (body_hash, received_at)")
        self.conn.execute("create table if not exists book (id integer primary key, alert_id integer, status text, "
                          "broker_id text, filled integer)")
        self.conn.execute("create table if not exists fills (id integer primary key, order_id integer, qty integer, "
                          "price text)")
        self.conn.execute("create table if not exists positions (symbol text primary key, qty integer)")
        self.lock = threading.Lock()
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.to_send: queue.SimpleQueue = queue.SimpleQueue()
        self.broker_ids = 0
        self.threads = [threading.Thread(target=self._until_stopped, args=(work,), daemon=True)
                        for work in (self._decide, self._send)]
        for t in self.threads:
            t.start()

    @staticmethod
    def _until_stopped(work) -> None:
        try:
            work()
        except Stopped:
            pass

    def stop(self) -> None:
        """End both threads (the bench's server never stops them; a test does)."""
        self.todo.put(None)
        self.to_send.put(None)
        for t in self.threads:
            t.join(5)

    def take(self, raw: bytes) -> Optional[int]:
        """The alert's id once it is durable and decided (its order durable too); None if not within 2 s."""
        done, box = threading.Event(), []
        self.todo.put((raw, done, box))
        return box[0] if done.wait(2.0) else None

    def _decide(self) -> None:
        c = self.conn
        while True:
            batch = _drain(self.todo)
            made = []
            with self.lock:
                c.execute("PRAGMA synchronous=FULL")  # durable: the alerts before their answer, orders before sending
                c.execute("BEGIN IMMEDIATE")
                for raw, _, _ in batch:
                    now, digest = time.time(), hashlib.sha256(raw).hexdigest()
                    seen = c.execute("select 1 from alerts where body_hash = ? and received_at >= ? limit 1",
                                     (digest, now - DEDUPE_S)).fetchone()
                    aid = c.execute("insert into alerts (body, status, body_hash, received_at) values (?, ?, ?, ?)",
                                    (raw, "duplicate" if seen else "accepted", digest, now)).lastrowid
                    oid = None if seen else c.execute(
                        "insert into book (alert_id, status, filled) values (?, 'SUBMITTED', 0)", (aid,)).lastrowid
                    made.append((aid, oid))
                c.execute("COMMIT")
                c.execute("PRAGMA synchronous=NORMAL")
            for (_, done, box), (aid, oid) in zip(batch, made):
                box.append(aid)
                done.set()
                if oid is not None:
                    self.to_send.put(oid)

    def _commit(self, statements: list[tuple[str, tuple]]) -> None:
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            for sql, args in statements:
                self.conn.execute(sql, args)
            self.conn.execute("COMMIT")

    def _send(self) -> None:
        while True:
            acks = []
            for order_id in _drain(self.to_send):  # sent: the broker only hands back an id
                self.broker_ids += 1
                acks.append((order_id, str(self.broker_ids)))
            self._commit([("update book set status = 'OPEN', broker_id = ? where id = ?", (b, o)) for o, b in acks])
            self._commit([st for order_id, _ in acks for st in (
                ("update book set status = 'COMPLETE', filled = 75 where id = ?", (order_id,)),
                ("insert into fills (order_id, qty, price) values (?, 75, '42.5')", (order_id,)),
                ("insert into positions (symbol, qty) values ('NIFTY', 75) "
                 "on conflict (symbol) do update set qty = qty + 75", ()))])


class CheckedFloor(OrderFloor):
    """The order-life floor with the host's checks and records (see the module's docstring)."""

    def __init__(self, path: str):
        from host.decide import Decider
        from host.risk import RiskGate
        from host.storage import Storage
        self.storage = Storage(path)
        self.decider = Decider(RiskGate(self.storage), lambda name: {})
        self.storage.write(lambda db: db.execute("create table if not exists floor_positions (symbol text primary "
                                                 "key, qty integer)"))
        super().__init__(path)

    def _one(self, db, req, digest: str) -> tuple:
        """One alert as the host keeps and decides it: (its id, its status, the orders marked SUBMITTED)."""
        from host import alert_positions
        from host.builtin import passthrough
        from host.inbox import RUNS
        from host.models import AlertStatus
        since = datetime.fromtimestamp(time.time() - DEDUPE_S, timezone.utc).isoformat(timespec="milliseconds")
        seen = db.execute(f"select 1 from alerts where body_hash = ? and received_at >= ? and status in "
                          f"({','.join('?' * len(RUNS))}) limit 1", (digest, since, *RUNS)).fetchone()
        aid = self._alert_row(db, req, digest, AlertStatus.DUPLICATE.value if seen else AlertStatus.RECEIVED.value)
        if seen:
            return aid, AlertStatus.DUPLICATE.value, []
        intents = list(passthrough.strategy_on_alert(None, req))
        planned = alert_positions.plan(db, req.strategy, intents, req.client_alert_id, since)
        d = self.decider.evaluate(db, req.strategy, planned.intents, alert_id=aid, out_now=True, legs=intents)
        alert_positions.store(db, req.strategy, planned, d.status is AlertStatus.ACCEPTED)
        return self._decided(db, aid, d.status.value, d.reason, d.orders)

    @staticmethod
    def _alert_row(db, req, digest: str, status: str) -> str:
        from host.inbox import request_to_json
        from host.storage import utcnow
        aid = new_id("a")
        db.execute("insert into alerts (id, received_at, strategy, execution_type, body_hash, body, status, orders) "
                   "values (?, ?, ?, ?, ?, ?, ?, '[]')", (aid, utcnow(), req.strategy, req.execution_type.value,
                                                          digest, request_to_json(req), status))
        return aid

    @staticmethod
    def _decided(db, aid: str, status: str, reason, orders) -> tuple:
        from host.orders import mark_submitted
        from host.storage import utcnow
        db.execute("update alerts set status = ?, reason = ?, orders = ?, decided_at = ? where id = ?",
                   (status, reason, json.dumps(list(orders)), utcnow(), aid))
        return aid, status, [r["id"] for r in (mark_submitted(db, oid) for oid in orders) if r]

    def _decide(self) -> None:
        while True:
            batch = _drain(self.todo)
            try:
                made = self.storage.write(lambda db: [self._one(db, *item) for item, _, _ in batch], durable=True)
            except Exception as e:  # the bench counts the non-200 answers
                made = [(None, repr(e), [])] * len(batch)
            for (_, done, box), (aid, status, orders) in zip(batch, made):
                box.append((aid, status))
                done.set()
                for oid in orders:
                    self.to_send.put(oid)

    def _commit(self, statements: list[tuple[str, tuple]]) -> None:
        self.storage.write(lambda db: [db.execute(sql, args) for sql, args in statements])

    def _send(self) -> None:
        """The least order life of the floor, on the host's order rows: acks, then fills, each batch one commit."""
        while True:
            acks = []
            for order_id in _drain(self.to_send):
                self.broker_ids += 1
                acks.append((order_id, str(self.broker_ids)))
            self._commit([("update orders set status = 'OPEN', broker_order_id = ? where id = ?", (b, o))
                          for o, b in acks])
            self._commit([st for order_id, _ in acks for st in (
                ("update orders set status = 'FILLED', filled_qty = qty where id = ?", (order_id,)),
                ("insert into fills (order_id, qty, price) values (?, 75, '42.5')", (order_id,)),
                ("insert into floor_positions (symbol, qty) values ('NIFTY', 75) "
                 "on conflict (symbol) do update set qty = qty + 75", ()))])


class RecordsFloor(CheckedFloor):
    """The checked floor's records without its checks: the same rows (the alert, its order and the order's history,
    the day's count, the belief, the SUBMITTED mark), with no screening, validation, duplicate check, guard, risk
    or order check. What the records cost alone: the part of the checked floor that is not the checks."""

    def _one(self, db, req, digest: str) -> tuple:
        from host import alert_positions
        from host.builtin import passthrough
        from host.orders import insert_order
        aid = self._alert_row(db, req, digest, "received")
        intents = list(passthrough.strategy_on_alert(None, req))
        orders = tuple(insert_order(db, i, req.strategy, aid) for i in intents)
        alert_positions.set_beliefs(db, req.strategy, {(i.exchange, i.symbol): i.qty for i in intents})
        return self._decided(db, aid, "accepted", None, orders)


DEDUPE_S = 10  # a body seen this recently is a duplicate
_contract = None
_order_floor = None
_checked_floor = None
_records_floor = None
_contract_lock = threading.Lock()


def _made(name: str, cls: type, suffix: str):
    """The floor kept in the module global `name`, made on its first request, its database beside BARE_DB's."""
    with _contract_lock:
        if globals()[name] is None:
            path = os.environ.get("BARE_DB") or os.path.join(tempfile.mkdtemp(), "bare.sqlite")
            globals()[name] = cls(path.replace(".sqlite", suffix))
        return globals()[name]


@app.post("/webhook-contract")
def webhook_contract():
    global _contract
    with _contract_lock:
        if _contract is None:
            _contract = Contract(os.environ.get("BARE_DB") or os.path.join(tempfile.mkdtemp(), "bare.sqlite"))
    raw = request.get_data()
    body = request.get_json(force=True)
    rowid = _contract.store(raw)
    if not _contract.decided(rowid):
        return jsonify({"status": "failed", "reason": "not decided within 2 s"}), 503
    return jsonify({"status": "accepted", "strategy": body.get("strategy_name"), "alert_id": rowid})


@app.post("/webhook-checked-floor")
def webhook_checked_floor():
    """The host's screening and validation on this thread; the rest on the checked floor's deciding thread."""
    from host.inbox import body_hash
    from host.validation import parse_alert, unencodable
    from host.web.webhook import _decode, _secret_ok, _without_secret
    floor = _made("_checked_floor", CheckedFloor, "-checked.sqlite")
    secret = os.environ.get("BENCH_SECRET", "")
    body, why = _decode(request.get_data(cache=False))
    if why or not isinstance(body, dict) or not _secret_ok(body.pop("secret_key", None), secret):
        return jsonify({"status": "bad_request"}), 400
    body = _without_secret(body, secret)
    req, problems = parse_alert(body) if not unencodable(body) else (None, ["unencodable"])
    if problems:
        return jsonify({"status": "rejected", "errors": [str(p) for p in problems]}), 422
    decided = floor.take((req, body_hash(body)))
    if decided is None:
        return jsonify({"status": "failed", "reason": "not decided within 2 s"}), 503
    aid, status = decided  # anything but accepted is a non-200 answer, counted by the bench
    return jsonify({"status": status, "strategy": req.strategy, "alert_id": aid}), 200 if status == "accepted" else 409


@app.post("/webhook-records-floor")
def webhook_records_floor():
    """The alert taken as it comes (no screening, no validation: the legs read as they are), then the records."""
    from decimal import Decimal
    from host.models import AlertRequest, ExecutionType, Leg, OrderType, Product, Side
    floor = _made("_records_floor", RecordsFloor, "-records.sqlite")
    raw = request.get_data()
    b = request.get_json(force=True)
    legs = tuple(Leg(b["exchange"], l["tradingsymbol"], Side(l["direction"]), int(l["qty"]), OrderType(l["order_type"]),
                     Product(l["product_type"]), Decimal(l["price"]), None) for l in b["legs"])
    req = AlertRequest(b["strategy_name"], ExecutionType(b["execution_type"]), legs)
    decided = floor.take((req, hashlib.sha256(raw).hexdigest()))
    if decided is None:
        return jsonify({"status": "failed", "reason": "not decided within 2 s"}), 503
    return jsonify({"status": decided[1], "strategy": req.strategy, "alert_id": decided[0]})


@app.post("/webhook-order-floor")
def webhook_order_floor():
    floor = _made("_order_floor", OrderFloor, "-orders.sqlite")
    raw = request.get_data()
    body = request.get_json(force=True)
    rowid = floor.take(raw)
    if rowid is None:
        return jsonify({"status": "failed", "reason": "not decided within 2 s"}), 503
    return jsonify({"status": "accepted", "strategy": body.get("strategy_name"), "alert_id": rowid})
