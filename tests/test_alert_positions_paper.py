"""What TradingView believes in paper mode, where nothing happens outside the host: the ordinary flows are as they
were, and a halt's flatten is the one thing TradingView's strategy does not see. Found from outside."""
from __future__ import annotations

import time

from conftest import SYMBOL, alert, wait_for


def post(h, expect: int = 200, **kw) -> dict:
    r = h.post(alert(**kw))
    assert r.status_code == expect, r.get_json()
    return r.get_json()


def mode(h, m: str) -> None:
    assert h.api("/api/halt", "POST", json={"mode": m}).status_code == 200
    time.sleep(0.3)


def market(execution_type: str, direction: str, qty: int, alert_id: str, **kw) -> dict:
    return dict(execution_type=execution_type, direction=direction, qty=qty, order_type="MKT", price=None,
                alert_id=alert_id, **kw)


def test_an_entry_and_a_trim_sent_back_to_back_end_at_the_trim(host):
    """The trim is decided while the entry's order still works: it counts as held."""
    host.tick("42.5")
    post(host, **market("ENTRY", "BUY", 150, "e"))
    trim = post(host, **market("ADJUST", "SELL", 75, "trim"))
    assert [o["qty"] for o in trim["orders"]] == [75], trim
    host.settle()
    assert host.net() == 75


def _long(h) -> None:
    """At 42.5, s1 enters long 75 at market (TradingView +75)."""
    h.tick("42.5")
    post(h, **market("ENTRY", "BUY", 75, "e"))
    h.settle()


def _trim_then_fill(h) -> None:
    """ADJUST SELL 75 while a BUY limit at 42 works; then the price comes to the limit: the account ends at 75."""
    post(h, **market("ADJUST", "SELL", 75, "trim"))
    h.settle()
    h.tick("41.9")
    h.settle()
    wait_for(lambda: h.net() == 75, timeout=5)
    time.sleep(0.5)
    assert h.net() == 75


def test_a_trim_while_the_entry_still_rests_ends_at_the_trim(host):
    host.tick("42.5")
    post(host, execution_type="ENTRY", direction="BUY", qty=150, order_type="LMT", price="42", alert_id="e")
    _trim_then_fill(host)


def test_a_trim_right_after_an_add_still_working(host):
    _long(host)
    post(host, execution_type="ADJUST", direction="BUY", qty=75, order_type="LMT", price="42", alert_id="add")
    _trim_then_fill(host)


def test_one_alert_adding_and_trimming_the_same_instrument(host):
    _long(host)
    body = alert(**market("ADJUST", "BUY", 75, "both", product_type="I"))
    body["legs"].append({"tradingsymbol": SYMBOL, "direction": "SELL", "qty": 75, "order_type": "MKT",
                         "product_type": "M"})
    r = host.post(body)
    assert r.status_code == 200, r.get_json()
    host.settle()
    total = sum(p["net_qty"] for p in host.positions() if p["strategy"] == "s1" and p["symbol"] == SYMBOL)
    assert total == 75, (total, r.get_json())


def test_after_a_halt_flattened_everything_tradingviews_scale_out_opens_no_short(host):
    """ENTRY BUY 75; halted and exited (as a breach does); TradingView's ADJUST BUY 75 is refused, but its strategy
    believes +150. After the resume it scales out with two ADJUST SELL 75: both find nothing to sell (they used to
    leave a naked short of 75, and before the belief was kept, of 150)."""
    _long(host)
    mode(host, "halted")
    assert host.api("/api/exit-all", "POST").status_code in (200, 202)
    wait_for(lambda: host.net() == 0, timeout=6)
    host.settle()
    post(host, expect=423, **market("ADJUST", "BUY", 75, "add"))
    mode(host, "active")
    for n in (1, 2):
        assert post(host, **market("ADJUST", "SELL", 75, f"t{n}"))["orders"] == []
        host.settle()
    assert host.net() == 0


def test_ordinary_flows_are_as_before(host):
    """ENTRY, an add, a trim, an EXIT, then a short built by ADJUSTs and covered: every order as asked."""
    host.tick("42.5")
    steps = [market("ENTRY", "BUY", 75, "a"), market("ADJUST", "BUY", 75, "b"), market("ADJUST", "SELL", 75, "c"),
             market("EXIT", "SELL", 75, "d"), market("ADJUST", "SELL", 75, "e"), market("ADJUST", "SELL", 75, "f"),
             market("ADJUST", "BUY", 150, "g")]
    nets = [75, 150, 75, 0, -75, -150, 0]
    for step, want in zip(steps, nets):
        answer = post(host, **step)
        assert len(answer["orders"]) == 1 and not answer.get("reason"), answer
        host.settle()
        wait_for(lambda: host.net() == want, timeout=5)


def test_a_refused_add_sent_again_with_its_alert_id_moves_the_belief_once(host):
    """Found from outside: a refused alert may be sent again with its alert_id (README); the belief moved at the
    refusal and again at the resend, and the next trim was cut to nothing (long 150 where TradingView meant 75)."""
    _long(host)
    mode(host, "reduce_only")
    post(host, expect=423, **market("ADJUST", "BUY", 75, "add"))
    mode(host, "active")
    again = post(host, **market("ADJUST", "BUY", 75, "add"))
    assert len(again["orders"]) == 1, again
    host.settle()
    wait_for(lambda: host.net() == 150, timeout=5)
    trim = post(host, **market("ADJUST", "SELL", 75, "trim"))
    assert [o["qty"] for o in trim["orders"]] == [75], trim
    wait_for(lambda: host.net() == 75, timeout=5)
    assert host.runtime.storage.rows("select * from alert_moves") == []


def test_a_rejected_add_sent_again_corrected_moves_the_belief_once(host):
    _long(host)
    bad = post(host, expect=422, **market("ADJUST", "BUY", 75, "add", stop_loss="43"))  # decided by the engine
    assert bad["status"] == "rejected", bad
    post(host, **market("ADJUST", "BUY", 75, "add", stop_loss="40"))
    host.settle()
    wait_for(lambda: host.net() == 150, timeout=5)
    post(host, **market("ADJUST", "SELL", 75, "trim"))
    host.settle()
    wait_for(lambda: host.net() == 75, timeout=5)
    time.sleep(0.5)
    assert host.net() == 75


def test_a_refused_alert_never_sent_again_still_counts(host):
    """The other side of the same rule: TradingView never sends an alert again, so a refused add (not resent) still
    counts, and the later trim finds the position TradingView believes in."""
    _long(host)
    mode(host, "reduce_only")
    post(host, expect=423, **market("ADJUST", "BUY", 75, "add"))
    mode(host, "active")
    assert post(host, **market("ADJUST", "SELL", 75, "trim"))["orders"] == []  # TradingView: 150 -> 75; held 75
    host.settle()
    assert host.net() == 75


SIZER = '''
from decimal import Decimal
from host import hookimpl, ExecutionType, Intent, OrderType, Product, Side


@hookimpl
def strategy_meta():
    return {"name": "sizer", "version": "1.0", "api_version": 1, "symbols": ["NFO:SYMBOL"]}


@hookimpl
def strategy_on_tick(ctx, tick):
    held = ctx.position(tick.exchange, tick.symbol)
    if held >= 150 and tick.ltp >= Decimal("45") and not ctx.state.get("took"):
        ctx.state["took"] = True
        return [Intent(tick.exchange, tick.symbol, Side.SELL, held // 2, OrderType.MKT, Product.NRML,
                       action=ExecutionType.ADJUST)]


@hookimpl
def strategy_on_alert(ctx, alert):
    out = []
    for l in alert.legs:
        qty = l.qty
        if alert.execution_type is ExecutionType.ADJUST and ctx.position(l.exchange, l.symbol) > 0 \\
                and l.side is Side.SELL:
            qty = min(qty, ctx.position(l.exchange, l.symbol))  # never sell more than held
        if qty:
            out.append(Intent(l.exchange, l.symbol, l.side, qty, l.order_type, l.product, l.price,
                              action=alert.execution_type))
    return out
'''.replace("SYMBOL", SYMBOL)


def test_a_plugin_that_sizes_its_own_intents_is_not_cut(host_factory, data_dir):
    """Found from outside: a strategy plugin's strategy_on_alert sizes from ctx.position; its intents were cut again
    against the alerts' belief and the position stayed long 75."""
    plugins = data_dir.parent / "plugins" / "strategies"
    plugins.mkdir(parents=True, exist_ok=True)
    (plugins / "sizer.py").write_text(SIZER)
    h = host_factory()
    wait_for(lambda: any(s["name"] == "sizer" and s["status"] == "running"
                         for s in h.api("/api/strategies").get_json()["items"]), timeout=5)
    h.tick("42.5")
    post(h, strategy="sizer", **market("ENTRY", "BUY", 150, "e"))
    h.settle()
    wait_for(lambda: h.net("sizer") == 150, timeout=5)
    h.tick("45")
    wait_for(lambda: h.net("sizer") == 75, timeout=5)
    h.settle()
    out = post(h, strategy="sizer", **market("ADJUST", "SELL", 150, "out"))
    assert [o["qty"] for o in out["orders"]] == [75], out
    wait_for(lambda: h.net("sizer") == 0, timeout=5)


def _belief(h, symbol: str = SYMBOL, strategy: str = "s1"):
    rows = h.runtime.storage.rows("select believed from alert_positions where strategy = ? and symbol = ?",
                                  (strategy, symbol))
    return rows[0]["believed"] if rows else None


def test_a_new_alert_reusing_an_expired_id_is_not_taken_for_a_resend(host_factory):
    """Found from outside: a refused try's record outlived ALERT_ID_TTL_S, and a later, new alert with the same id
    (TradingView may reuse one, such as {{strategy.order.id}}) was taken for its resend: the belief ended wrong and
    TradingView's next ADJUST BUY 75 was cut to nothing (flat where it believes long 75)."""
    h = host_factory(ALERT_ID_TTL_S=1)
    _long(h)
    mode(h, "halted")
    post(h, expect=423, **market("ADJUST", "BUY", 75, "add"))  # TradingView +150 (refused, never sent again)
    mode(h, "active")
    post(h, **market("ADJUST", "SELL", 75, "trim"))  # TradingView +75: held 75, nothing to sell
    h.settle()
    assert _belief(h) == 75 and h.net() == 75
    time.sleep(1.5)  # "add" is past its TTL: a new alert
    post(h, **market("ADJUST", "BUY", 75, "add"))  # +150
    h.settle()
    wait_for(lambda: h.net() == 150, timeout=5)
    post(h, **market("ADJUST", "SELL", 150, "out"))  # 0
    h.settle()
    wait_for(lambda: h.net() == 0, timeout=5)
    post(h, **market("ADJUST", "BUY", 75, "in"))  # +75
    h.settle()
    wait_for(lambda: h.net() == 75, timeout=5)


def test_a_resend_under_the_same_id_with_another_body_moves_nothing_twice(host):
    """Found from outside: a refused alert sent again by hand naming another symbol, then corrected: each instrument
    must be moved by the first try only (TradingView's), whatever the resends name."""
    other = "NIFTY28APR26P24500"
    host.tick("42.5")
    host.tick("40", symbol=other)
    post(host, **market("ENTRY", "BUY", 75, "e"))
    post(host, **market("ENTRY", "BUY", 75, "e2", tradingsymbol=other))
    host.settle()
    mode(host, "halted")
    post(host, expect=423, **market("ADJUST", "BUY", 75, "x"))  # TradingView's: 75 -> 150
    post(host, expect=423, **market("ADJUST", "BUY", 75, "x", tradingsymbol=other))  # by hand, the wrong symbol
    mode(host, "active")
    post(host, **market("ADJUST", "BUY", 75, "x"))  # corrected
    host.settle()
    assert (_belief(host), _belief(host, other)) == (150, 75)
    wait_for(lambda: host.net() == 150, timeout=5)
    assert host.runtime.storage.rows("select * from alert_moves") == []


def test_a_reversal_by_adjust_stops_at_flat_and_the_next_buys_to_what_tradingview_believes(host):
    """As the README says: long 75, ADJUST SELL 150 stops at flat (a reduction never crosses zero; TradingView
    believes -75); ADJUST BUY 150 then buys 75, to the +75 TradingView believes, and says why."""
    _long(host)
    r1 = post(host, **market("ADJUST", "SELL", 150, "r1"))
    assert [o["qty"] for o in r1["orders"]] == [75], r1
    host.settle()
    wait_for(lambda: host.net() == 0, timeout=5)
    assert _belief(host) == -75
    r2 = post(host, **market("ADJUST", "BUY", 150, "r2"))
    assert [o["qty"] for o in r2["orders"]] == [75] and "capped at zero" in r2["reason"], r2
    host.settle()
    wait_for(lambda: host.net() == 75, timeout=5)
    assert _belief(host) == 75
    assert host.api("/api/positions").get_json()["alerts_add_up_to"] == [
        {"strategy": "s1", "exchange": "NFO", "symbol": SYMBOL, "qty": 75,
         "updated_at": host.runtime.storage.one("select updated_at from alert_positions")["updated_at"]}]


def test_the_positions_page_shows_where_tradingview_believes_otherwise(host):
    """The trader looks at the dashboard, not the API: after a halt's flatten and a refused add, the positions panel
    lists s1's belief (+150) beside what it holds (flat), and says what it means; nothing where they agree."""
    from test_dashboard import login
    _long(host)
    client = host.app.test_client()
    login(client)
    assert "believed-table" not in client.get("/panel/positions").get_data(as_text=True)
    mode(host, "halted")
    assert host.api("/api/exit-all", "POST").status_code in (200, 202)
    wait_for(lambda: host.net() == 0, timeout=6)
    post(host, expect=423, **market("ADJUST", "BUY", 75, "add"))
    html = client.get("/panel/positions").get_data(as_text=True)
    assert 'id="believed-table"' in html and "Where TradingView believes otherwise" in html, html
    row = html[html.index('id="believed-table"'):]
    assert f"NFO:{SYMBOL}" in row and ">150<" in row.replace(" ", "") and "a POSITION alert sets both" in row
