"""A watcher write retried after a full disk (the reserve given up, the transaction run again) still
records what the first, rolled-back attempt wrote: the orders from outside and the doubled orders are
told, once."""
from __future__ import annotations

import sqlite3
import pytest

from conftest import open_order
from host.models import BrokerOrder, OrderStatus
from host.storage import Storage
from host.watcher import Watcher


@pytest.fixture
def storage(tmp_path):
    s = Storage(tmp_path / "h.sqlite")
    s.keep_reserve()
    assert s.reserve.exists()  # the retry below needs the reserve to give up
    yield s
    s.close()


def _fail_once(monkeypatch, kind: str) -> list[int]:
    """The first event of `kind` hits a full disk: its transaction is rolled back and run again."""
    failed: list[int] = []
    real = Storage.add_event

    def add_event(db, k, *args, **kwargs):
        if k == kind and not failed:
            failed.append(1)
            raise sqlite3.OperationalError("database or disk is full")
        return real(db, k, *args, **kwargs)
    monkeypatch.setattr(Storage, "add_event", staticmethod(add_event))
    return failed


def _kinds(storage: Storage, kind: str) -> int:
    return len(storage.rows("select id from events where kind = ?", (kind,)))


def test_an_order_from_outside_is_told_after_a_retried_write(storage, monkeypatch):
    failed = _fail_once(monkeypatch, "manual_order")
    w = Watcher(storage)
    w.apply([BrokerOrder("X1", "placed in the broker's app", OrderStatus.OPEN, 0, None)])
    assert failed and not storage.reserve.exists()  # the first attempt failed, the second ran
    assert _kinds(storage, "manual_order") == 1  # was 0: the first attempt had marked it told
    w.apply([BrokerOrder("X1", "placed in the broker's app", OrderStatus.OPEN, 0, None)])
    assert _kinds(storage, "manual_order") == 1  # still once


def test_a_doubled_order_is_told_after_a_retried_write(storage, monkeypatch):
    oid = open_order(storage, qty=75)
    failed = _fail_once(monkeypatch, "order_doubled")
    w = Watcher(storage)
    book = [BrokerOrder("B1", oid, OrderStatus.OPEN, 0, None), BrokerOrder("B2", oid, OrderStatus.OPEN, 0, None)]
    w.reconcile(book, set())
    assert failed
    assert _kinds(storage, "order_doubled") == 1  # was 0
    w.reconcile(book, set())
    assert _kinds(storage, "order_doubled") == 1
