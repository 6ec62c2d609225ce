"""The floors, served by the same gunicorn settings as the host.

/webhook: a bare Flask route that parses the same JSON body.
/webhook-contract: the same route doing only what the contract asks of every alert, in the fewest steps:
the alert committed durably (synchronous=FULL, one fsync each), then a decision made on one thread and
committed (an order row, the alert's status), then the answer. No checks, no order life: what an alert
must cost at the least, to tell the host's own cost from the disk's and the hand-off's.
"""
import os
import queue
import sqlite3
import tempfile
import threading

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

    def decided(self, rowid: int) -> None:
        done = threading.Event()
        self.todo.put((rowid, done))
        done.wait(2.0)


_contract = None
_contract_lock = threading.Lock()


@app.post("/webhook-contract")
def webhook_contract():
    global _contract
    with _contract_lock:
        if _contract is None:
            _contract = Contract(os.environ.get("BARE_DB") or os.path.join(tempfile.mkdtemp(), "bare.sqlite"))
    raw = request.get_data()
    body = request.get_json(force=True)
    rowid = _contract.store(raw)
    _contract.decided(rowid)
    return jsonify({"status": "accepted", "strategy": body.get("strategy_name"), "alert_id": rowid})
