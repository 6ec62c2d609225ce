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
