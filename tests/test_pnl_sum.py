"""The risk loop's PnL sum (views.pnl_by_strategy, read lean) equals the Positions page's rows added up."""
from __future__ import annotations

from decimal import Decimal

from hypothesis import HealthCheck, given, settings, strategies as st

from host import views
from host.storage import Storage

money = st.decimals(min_value=Decimal("-99999"), max_value=Decimal("99999"), places=2)
position = st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["X", "Y", "Z"]),
                     st.sampled_from(["M", "I", "C"]), st.integers(-300, 300), money, money)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(positions=st.lists(position, max_size=12), quotes=st.dictionaries(st.sampled_from(["X", "Y"]), money))
def test_the_risk_sum_equals_the_positions_added_up(tmp_path_factory, positions, quotes):
    storage = Storage(tmp_path_factory.mktemp("pnl") / "h.sqlite")
    storage.migrate()

    def fill(db) -> None:
        for strategy, symbol, product, net, avg, realized in positions:
            db.execute("insert or replace into positions (strategy, exchange, symbol, product, net_qty, avg_price, "
                       "realized_pnl, updated_at) values (?, 'NFO', ?, ?, ?, ?, ?, 'x')",
                       (strategy, symbol, product, net, str(avg), str(realized)))
        for symbol, ltp in quotes.items():
            db.execute("insert into quotes (exchange, symbol, ltp, at) values ('NFO', ?, ?, 'x')", (symbol, str(ltp)))
    storage.write(fill)
    expected: dict[str, Decimal] = {}
    for p in views.positions(storage, protections=False):
        if p["product"] != "C":  # CNC holdings are not the day's PnL
            expected[p["strategy"]] = expected.get(p["strategy"], Decimal("0")) + p["realized_pnl"] + p["unrealized_pnl"]
    total, by = views.pnl_by_strategy(storage)
    assert by == expected and total == sum(expected.values(), Decimal("0"))
    assert all(isinstance(v, Decimal) for v in by.values())
