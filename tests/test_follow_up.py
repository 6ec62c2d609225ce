"""Risk's follow-up of oversized exits being cancelled (exit-all, a breach): its stored form, its clock, its upgrade."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from conftest import SYMBOL, alert, open_order, wait_for
from host import risk_actions as ra
from host.storage import Storage


def _store(storage, value: dict) -> None:
    storage.write(lambda db: Storage.put_state(db, ra.EXIT_ALL_AFTER_KEY, json.dumps(value)))


def _dropped(storage) -> list[str]:
    return [r["message"] for r in storage.rows("select message from events where kind = 'exit_all_dropped'")]


def test_a_later_cancel_merged_in_does_not_restart_an_older_ones_clock(host):
    """Review 17: merging a later exit-all's cancel set one time for the whole follow-up: the older cancel's 10
    minutes started again at each merge, and its position could be sold at the market long after the trader asked.
    Each cancel keeps its own time: the old one is dropped (said), the new one waits on."""
    storage = host.runtime.storage
    old, new = open_order(storage, side="SELL", action="EXIT"), open_order(storage, side="SELL", action="EXIT",
                                                                             broker_id="B2")
    eleven = (datetime.now(timezone.utc) - timedelta(minutes=11)).isoformat(timespec="milliseconds")
    _store(storage, {"why": "exit-all by api", "entries": [
        {"id": old, "key": ["s1", "NFO", "OLDSYM", "M"], "cap": 75, "at": eleven}]})
    storage.write(lambda db: ra._follow_up_later(db, [{"id": new, "strategy": "s2", "exchange": "NFO",
                                                       "symbol": "NEWSYM", "product": "M", "net_qty": 50,
                                                       "side": "SELL", "remaining": 100}], "exit-all"))
    host.runtime.engine.risk.follow_up()
    [said] = _dropped(storage)
    assert old in said and "OLDSYM" in said and new not in said and "NEWSYM" not in said, said
    _, left, _ = ra._follow_ups(storage.get_state(ra.EXIT_ALL_AFTER_KEY))
    assert [(e["id"], e["key"], e["held"]) for e in left] == [(new, ("s2", "NFO", "NEWSYM", "M"), 50)]


def test_a_follow_up_stored_in_the_first_releases_form_is_read_not_dropped(host):
    """Review 17: the first release stored `after` ids and `keys` without caps or a time; the next read that as
    unreadable and dropped it, leaving the positions open. It is read: it waits for its cancel as before."""
    storage = host.runtime.storage
    working = open_order(storage, side="SELL", action="EXIT")
    _store(storage, {"why": "exit-all by api", "after": [working], "keys": [["s1", "NFO", "SYM", "M"]]})
    host.runtime.engine.risk.follow_up()
    assert _dropped(storage) == []
    why, entries, older = ra._follow_ups(storage.get_state(ra.EXIT_ALL_AFTER_KEY))
    assert why == "exit-all by api" and {e["id"] for e in entries} == {working, None} and not older  # stored anew
    assert [e["held"] for e in entries if e["key"]] == [None]  # the position as it is, when the cancel ends


def test_an_unreadable_follow_up_is_dropped_and_said(host):
    storage = host.runtime.storage
    storage.write(lambda db: Storage.put_state(db, ra.EXIT_ALL_AFTER_KEY, "{not json"))
    host.runtime.engine.risk.follow_up()
    [said] = _dropped(storage)
    assert "unreadable" in said and storage.get_state(ra.EXIT_ALL_AFTER_KEY) is None


def test_a_follow_up_in_an_earlier_form_whose_cancel_never_ends_is_dropped_too(host, monkeypatch):
    """Review 18: an earlier release's follow-up has no time of its own; read as "now" at every read, its cancel was
    never late, and it would have fired whenever the order ended (days later, at the market, with no bound). It is
    stored anew at the first read, so its clock runs from then."""
    monkeypatch.setattr(ra, "FOLLOW_UP_MAX_S", 0.5)
    storage = host.runtime.storage
    working = open_order(storage, side="SELL", action="EXIT")
    _store(storage, {"why": "exit-all by api", "after": [working], "keys": [["s1", "NFO", "SYM", "M"]]})
    wait_for(lambda: _dropped(storage), timeout=5)
    assert storage.get_state(ra.EXIT_ALL_AFTER_KEY) is None


def test_a_position_whose_own_cancel_ended_does_not_wait_for_another_positions(host):
    """Review 18: a position whose own cancel had ended waited for every cancel merged in later (another exit-all's,
    a breach's), up to 10 minutes each, a chain of them for ever, and was then sold at the market long after."""
    storage = host.runtime.storage
    host.tick("100")
    assert host.post(alert(direction="BUY", qty=75, price="100")).status_code == 200
    wait_for(lambda: host.net() == 75)
    other = open_order(storage, qty=1, side="BUY", action="ENTRY", broker_id="B9")  # another position's, cancelling
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    _store(storage, {"why": "exit-all by api", "entries": [
        {"id": "o-ended", "key": ["s1", "NFO", SYMBOL, "M"], "side": "SELL", "held": 75, "over": 75, "at": now},
        {"id": other, "key": ["s2", "NFO", "OTHERSYM", "M"], "side": "SELL", "held": 50, "over": 0, "at": now}]})
    wait_for(lambda: host.net() == 0, timeout=5)
    _, left, _ = ra._follow_ups(storage.get_state(ra.EXIT_ALL_AFTER_KEY))
    assert [e["id"] for e in left] == [other]  # still waits for its own cancel


def test_a_protect_exit_made_oversized_after_a_move_is_cancelled_and_followed_up(host):
    """Review 19: protect's exits (a target's, a hit stop's, an overshoot's) were marked like the day's breach's;
    with no breach standing, one an app sale made oversized after it had been moved was cancelled with "send the
    EXIT for the position", and the rest of the position stayed open. They carry risk's healed mark now: cancelled,
    and the follow-up exits the rest."""
    from host.flatten import HEALED
    storage = host.runtime.storage
    host.tick("43")
    assert host.post(alert(direction="BUY", qty=150, price="43")).status_code == 200
    wait_for(lambda: host.net() == 150)
    oid = open_order(storage, qty=150, side="SELL", action="EXIT", broker_id="B7")
    storage.write(lambda db: db.execute("update orders set escalate = ?, reprices = 1 where id = ?", (HEALED, oid)))
    storage.write(lambda db: db.execute("update positions set net_qty = 75 where strategy = 's1'"))  # an app sale
    said = wait_for(lambda: [r["message"] for r in storage.rows("select message from events where kind = "
                                                                 "'exit_not_moved'")], timeout=5)
    assert oid in said[0] and "send the EXIT" not in said[0], said
    [entry] = json.loads(storage.get_state(ra.EXIT_ALL_AFTER_KEY))["entries"]
    assert entry["id"] == oid and entry["held"] == 75 and entry["over"] == 75


def test_a_strategys_stop_heals_no_exit_of_what_risk_leaves_alone_nor_of_another_strategy(host):
    """Review 19: a strategy's stop re-marked the scope's exits being moved as healed without asking what risk leaves
    alone: a CNC exit (risk never sells CNC) became one that, made oversized, is cancelled and its position sold by
    the follow-up. Another strategy's exit stays as it was."""
    from decimal import Decimal
    from host.models import Side
    from host.watcher import move_position
    storage = host.runtime.storage
    risk = host.runtime.engine.risk
    storage.write(lambda db: move_position(db, ("s1", "NFO", SYMBOL, "C"), Side.BUY, 75, Decimal("43")))
    cnc = open_order(storage, qty=75, side="SELL", action="EXIT", broker_id="B8")
    other = open_order(storage, qty=75, side="SELL", action="EXIT", broker_id="B9")
    storage.write(lambda db: db.execute("update orders set product = 'C', escalate = 1 where id = ?", (cnc,)))
    storage.write(lambda db: db.execute("update orders set strategy = 's2', escalate = 1 where id = ?", (other,)))
    storage.write(lambda db: risk._escalate(db, (), "s1", None, "risk: strategy s1 max loss", True, risk._left_alone,
                                            ra.EXIT_ALL_MARK))
    marks = {r["id"]: r["escalate"] for r in storage.rows("select id, escalate from orders")}
    assert marks[other] == 1 and marks[cnc] == 1, marks


def _refused(host, mark: int) -> tuple[str, list[dict]]:
    """A working exit of s1 (150 held) marked `mark` to move, whose move the broker refused; its id and events."""
    storage = host.runtime.storage
    storage.write(lambda db: db.execute("insert into positions (strategy, exchange, symbol, product, net_qty, "
                                        "avg_price, realized_pnl) values ('s1', 'NFO', ?, 'M', 150, '43', '0')",
                                        (SYMBOL,)))
    oid = open_order(storage, side="SELL", action="EXIT")
    storage.write(lambda db: db.execute("update orders set escalate = ? where id = ?", (mark, oid)))
    host.runtime.engine.risk.exit_unmovable(oid, "order type cannot be changed")
    return oid, storage.rows("select message from events where kind = 'exit_not_moved'")


def test_an_exit_risk_heals_whose_move_the_broker_refused_is_cancelled_and_its_position_followed_up(host):
    oid, [told] = _refused(host, ra.EXIT_ALL_MARK)
    row = host.runtime.storage.one("select escalate, cancel_requested from orders where id = ?", (oid,))
    assert row["escalate"] is None and row["cancel_requested"], row
    _, [entry], _ = ra._follow_ups(host.runtime.storage.get_state(ra.EXIT_ALL_AFTER_KEY))
    assert (entry["id"], entry["key"], entry["held"], entry["over"]) == (oid, ("s1", "NFO", SYMBOL, "M"), 150, 0)
    assert "order type cannot be changed" in told["message"] and "cancelled" in told["message"], told


def test_a_breach_exit_after_an_override_whose_move_the_broker_refused_is_left_where_it_is(host):
    """No breach stands (overridden, or another day): the breach's exit is the trader's; moved no further, said."""
    oid, [told] = _refused(host, 1)
    row = host.runtime.storage.one("select escalate, cancel_requested, status from orders where id = ?", (oid,))
    assert (row["escalate"], row["cancel_requested"], row["status"]) == (None, None, "OPEN"), row
    assert host.runtime.storage.get_state(ra.EXIT_ALL_AFTER_KEY) is None
    assert "left where it is" in told["message"], told
    host.runtime.engine.risk.exit_unmovable(oid, "again")  # a second refusal of a move asked before: nothing more
    assert len(host.runtime.storage.rows("select id from events where kind = 'exit_not_moved'")) == 1


def test_a_limit_exit_whose_move_is_refused_for_another_reason_is_not_cancelled_and_replaced(host_factory):
    """Review 33: any refused move cancelled the exit and placed another, again and again: at a rate limit, or a
    price band, a limit exit lost its place in the queue every EXIT_REPRICE_S and each cycle added two order
    messages. Only a stop's move (a change of order type) is answered by cancelling it; a limit's is tried again."""
    from host.brokers.base import Rejected
    from host.models import Side
    h = host_factory(EXIT_REPRICE_S="0.5")
    h.tick("42.5")
    assert h.post(alert("ENTRY", direction="BUY", qty=75, price="42.5")).status_code == 200
    wait_for(lambda: h.net() == 75)
    h.tick("40")
    engine, match = h.broker.engine, h.broker.engine._match
    engine._match = lambda o: False if o.req.side is Side.SELL else match(o)  # no buyers: nothing sells
    refused = []

    def modify(broker_id, req):
        refused.append(req.price)
        raise Rejected("Rejected : order rate limit exceeded: at most 10 orders a second")
    h.broker.modify = modify
    assert h.api("/api/exit-all", "POST").status_code == 200
    wait_for(lambda: len(refused) >= 3, timeout=8)
    exits = h.runtime.storage.rows("select status, cancel_requested from orders where action = 'EXIT'")
    assert exits == [{"status": "OPEN", "cancel_requested": None}], exits
    assert not h.runtime.storage.rows("select id from events where kind = 'exit_not_moved'")
