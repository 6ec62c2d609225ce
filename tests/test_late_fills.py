"""A fill the broker reports after our order row has ended (cancelled first, the fill after; or a row
without its fill count beside trades that show one): the order's filled count and price follow the same
truth the position does, the status stays, and the trader is told once."""
from __future__ import annotations

from decimal import Decimal

import pytest

from conftest import SYMBOL
from host.models import BrokerOrder, ExecutionType, FillReport, Intent, OrderStatus, OrderType, Product, Side
from host.orders import insert_order, transition
from host.storage import Storage
from host.watcher import Watcher


@pytest.fixture
def storage(tmp_path):
    s = Storage(tmp_path / "h.sqlite")
    yield s
    s.close()


def _open_order(storage: Storage, qty: int = 150) -> str:
    intent = Intent("NFO", SYMBOL, Side.BUY, qty, OrderType.LMT, Product.NRML, Decimal("43"), action=ExecutionType.ENTRY)
    oid = storage.write(lambda db: insert_order(db, intent, "s1", None))
    storage.write(lambda db: transition(db, oid, OrderStatus.OPEN, None, broker_order_id="B1"))
    return oid


def _order(storage: Storage, oid: str) -> dict:
    return storage.one("select * from orders where id = ?", (oid,))


def _net(storage: Storage) -> int:
    row = storage.one("select net_qty from positions where strategy = 's1'")
    return row["net_qty"] if row else 0


def _events(storage: Storage, kind: str) -> list[dict]:
    return storage.rows("select * from events where kind = ?", (kind,))


def test_a_fill_reported_after_the_cancel_is_counted_on_the_order_too(storage):
    oid = _open_order(storage)
    w = Watcher(storage)
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 0, None, "cancelled at the broker")])
    assert (_order(storage, oid)["status"], _order(storage, oid)["filled_qty"]) == ("CANCELLED", 0)
    late = BrokerOrder("B1", oid, OrderStatus.CANCELLED, 50, Decimal("42.5"), "cancelled at the broker",
                       fills=(FillReport("F1", 50, Decimal("42.5")),))
    changed = w.apply([late])
    o = _order(storage, oid)
    assert _net(storage) == 50  # the position took the fill before this change as well
    assert (o["status"], o["filled_qty"], o["avg_price"]) == ("CANCELLED", 50, "42.5")  # was 0 and None
    assert [r["filled_qty"] for r in changed] == [50]  # the row strategies and risk are handed
    assert len(_events(storage, "order_late_fill")) == 1
    assert "50" in _events(storage, "order_late_fill")[0]["message"]
    assert len(_events(storage, "order_cancelled")) == 1  # the cancel is told once, not again with the fill
    w.apply([late])  # the same view again (feed and book): nothing more
    assert len(_events(storage, "order_late_fill")) == 1
    assert _net(storage) == 50 and _order(storage, oid)["filled_qty"] == 50
    history = storage.rows("select status, detail from order_history where order_id = ?", (oid,))
    assert sum(1 for h in history if "50" in (h["detail"] or "")) == 1


def test_trades_without_a_fill_count_on_the_row_count_on_the_order(storage):
    oid = _open_order(storage)
    w = Watcher(storage)
    # a cancelled row whose fill count is blank (0) while the trade book shows 50 filled
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 0, None, "cancelled at the broker",
                         fills=(FillReport("F1", 30, Decimal("42")), FillReport("F2", 20, Decimal("43"))))])
    o = _order(storage, oid)
    assert _net(storage) == 50
    assert (o["status"], o["filled_qty"], Decimal(o["avg_price"])) == ("CANCELLED", 50, Decimal("42.4"))


def test_a_late_fill_never_lowers_a_count_or_moves_a_filled_order(storage):
    oid = _open_order(storage)
    w = Watcher(storage)
    w.apply([BrokerOrder("B1", oid, OrderStatus.FILLED, 150, Decimal("42.6"))])
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 100, Decimal("42.5"))])  # older, and lower
    o = _order(storage, oid)
    assert (o["status"], o["filled_qty"], o["avg_price"]) == ("FILLED", 150, "42.6")
    assert _net(storage) == 150 and not _events(storage, "order_late_fill")
