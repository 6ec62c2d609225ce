"""A fill the broker reports after our order row has ended (cancelled first, the fill after; or a row
without its fill count beside trades that show one): the order's filled count and price follow the same
truth the position does, the status stays, and the trader is told once."""
from __future__ import annotations

from decimal import Decimal

import pytest

from conftest import open_order
from host.models import BrokerOrder, FillReport, OrderStatus
from host.storage import Storage
from host.watcher import Watcher


@pytest.fixture
def storage(tmp_path):
    s = Storage(tmp_path / "h.sqlite")
    yield s
    s.close()


def _order(storage: Storage, oid: str) -> dict:
    return storage.one("select * from orders where id = ?", (oid,))


def _net(storage: Storage) -> int:
    row = storage.one("select net_qty from positions where strategy = 's1'")
    return row["net_qty"] if row else 0


def _events(storage: Storage, kind: str) -> list[dict]:
    return storage.rows("select * from events where kind = ? order by rowid", (kind,))


def test_a_fill_reported_after_the_cancel_is_counted_on_the_order_too(storage):
    oid = open_order(storage)
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
    oid = open_order(storage)
    w = Watcher(storage)
    # a cancelled row whose fill count is blank (0) while the trade book shows 50 filled
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 0, None, "cancelled at the broker",
                         fills=(FillReport("F1", 30, Decimal("42")), FillReport("F2", 20, Decimal("43"))))])
    o = _order(storage, oid)
    assert _net(storage) == 50
    assert (o["status"], o["filled_qty"], Decimal(o["avg_price"])) == ("CANCELLED", 50, Decimal("42.4"))


def test_a_late_fill_never_lowers_a_count_or_moves_a_filled_order(storage):
    oid = open_order(storage)
    w = Watcher(storage)
    w.apply([BrokerOrder("B1", oid, OrderStatus.FILLED, 150, Decimal("42.6"))])
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 100, Decimal("42.5"))])  # older, and lower
    o = _order(storage, oid)
    assert (o["status"], o["filled_qty"], o["avg_price"]) == ("FILLED", 150, "42.6")
    assert _net(storage) == 150 and not _events(storage, "order_late_fill")


# ---- from the hostile review of the first version ----

def test_a_late_count_without_a_price_never_keeps_the_old_price_and_takes_the_brokers_later(storage):
    """CANCELLED 30 @ 100 (fill F1), then a cancelled row saying 50 filled with no average (its trades not
    yet in), then the full view: 50 @ 76 (F1 30 @ 100, F2 20 @ 40). The order must end at 76."""
    oid = open_order(storage)
    w = Watcher(storage)
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 30, Decimal("100"), "x",
                         fills=(FillReport("F1", 30, Decimal("100")),))])
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 50, None, "x")])
    late = _events(storage, "order_late_fill")
    assert len(late) == 1
    # HEAD says "reports 50 filled @ 100": a price the broker never gave for 50 (30 were at 100)
    assert "@ 100" not in late[0]["message"], late[0]["message"]
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 50, Decimal("76"), "x",
                         fills=(FillReport("F1", 30, Decimal("100")), FillReport("F2", 20, Decimal("40"))))])
    o = _order(storage, oid)
    assert (o["filled_qty"], o["applied_qty"]) == (50, 50)
    assert Decimal(o["avg_price"]) == Decimal("76"), o["avg_price"]  # HEAD: 100, never corrected


def test_a_late_count_with_no_price_is_priced_when_the_broker_gives_it(storage):
    """CANCELLED 0, then CANCELLED 50 with a blank average, then CANCELLED 50 @ 42.5: avg_price stays None."""
    oid = open_order(storage)
    w = Watcher(storage)
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 0, None, "x")])
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 50, None, "x")])
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 50, Decimal("42.5"), "x",
                         fills=(FillReport("F1", 50, Decimal("42.5")),))])
    o = _order(storage, oid)
    assert o["filled_qty"] == 50
    assert o["avg_price"] == "42.5", o["avg_price"]  # HEAD: None for good


def test_a_hostile_count_above_the_quantity_never_lands_on_a_finished_order(storage):
    """qty 150, CANCELLED 0, then the feed says CANCELLED 500 filled, then 900: the position is capped at 150;
    the order's count must not pass qty (and not differ from the position's applied_qty)."""
    oid = open_order(storage, qty=150)
    w = Watcher(storage)
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 0, None, "x")])
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 500, Decimal("42"), "x")])
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 900, Decimal("42"), "x")])
    o = _order(storage, oid)
    assert o["applied_qty"] == 150
    assert o["filled_qty"] <= o["qty"], (o["filled_qty"], o["qty"])  # HEAD: 900 of 150
    assert len(_events(storage, "order_late_fill")) <= 1  # HEAD: 2 (500, then 900)


def test_fill_follower_places_one_stop_for_an_entry_whose_fill_count_grows_after_filled(host):
    """The shipped fill_follower places a stop for `filled_qty` on FILLED. A FILLED view with a lagging count
    (30 of 50), then the late count (50, via order_late_fill): strategies are now told FILLED twice and it asks
    for stops of 30 and then 50. PASSES on HEAD: the host caps the second exit at the uncovered 20 (decide.py)."""
    from conftest import alert, wait_for
    from plugin_files import wait_strategy
    from test_examples import install
    install(host, "strategies", "fill_follower")
    wait_strategy(host, "fill_follower", status="running")
    host.tick("100")
    r = host.post(alert(strategy="fill_follower", direction="BUY", qty=50, order_type="LMT", price="90"))
    assert r.status_code == 200
    entry = wait_for(lambda: next((o for o in host.orders(strategy="fill_follower")
                                   if o["status"] == "OPEN" and o["broker_order_id"]), None))
    engine = host.runtime.engine
    engine.on_broker_update(BrokerOrder(entry["broker_order_id"], entry["id"], OrderStatus.FILLED, 30, Decimal("90")))
    wait_for(lambda: [o for o in host.orders(strategy="fill_follower") if o["order_type"] == "SL-MKT"])
    engine.on_broker_update(BrokerOrder(entry["broker_order_id"], entry["id"], OrderStatus.FILLED, 50, Decimal("90"),
                                        fills=(FillReport("T1", 50, Decimal("90")),)))
    wait_for(lambda: host.orders(strategy="fill_follower", status="FILLED")[0]["filled_qty"] == 50
             if host.orders(strategy="fill_follower", status="FILLED") else False)
    host.settle()
    stops = [o for o in host.orders(strategy="fill_follower") if o["order_type"] == "SL-MKT"]
    assert host.net("fill_follower") == 50
    assert sum(o["qty"] for o in stops) <= 50, [(o["qty"], o["status"]) for o in stops]


def test_a_late_fill_of_an_exit_is_an_error_that_says_check_the_position(storage):
    oid = open_order(storage, qty=75, side="SELL", action="EXIT", broker_id="B7")
    w = Watcher(storage)
    w.apply([BrokerOrder("B7", oid, OrderStatus.CANCELLED, 0, None, "x")])
    w.apply([BrokerOrder("B7", oid, OrderStatus.CANCELLED, 75, Decimal("41"), "x")])
    (late,) = _events(storage, "order_late_fill")
    assert late["severity"] == "error" and "check the position" in late["message"]
