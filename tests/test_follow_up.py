"""Risk's follow-up of oversized exits being cancelled (exit-all, a breach): its stored form, its clock, its upgrade."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from conftest import open_order
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
                                                       "symbol": "NEWSYM", "product": "M", "net_qty": 50}], "exit-all"))
    host.runtime.engine.risk.follow_up()
    [said] = _dropped(storage)
    assert old in said and "OLDSYM" in said and new not in said and "NEWSYM" not in said, said
    _, left = ra._follow_ups(storage.get_state(ra.EXIT_ALL_AFTER_KEY))
    assert [(e["id"], e["key"], e["cap"]) for e in left] == [(new, ("s2", "NFO", "NEWSYM", "M"), 50)]


def test_a_follow_up_stored_in_the_first_releases_form_is_read_not_dropped(host):
    """Review 17: the first release stored `after` ids and `keys` without caps or a time; the next read that as
    unreadable and dropped it, leaving the positions open. It is read: it waits for its cancel as before."""
    storage = host.runtime.storage
    working = open_order(storage, side="SELL", action="EXIT")
    _store(storage, {"why": "exit-all by api", "after": [working], "keys": [["s1", "NFO", "SYM", "M"]]})
    host.runtime.engine.risk.follow_up()
    assert _dropped(storage) == []
    why, entries = ra._follow_ups(storage.get_state(ra.EXIT_ALL_AFTER_KEY))
    assert why == "exit-all by api" and {e["id"] for e in entries} == {working, None}
    assert [e["cap"] for e in entries if e["key"]] == [None]  # the position as it is, when the cancel ends


def test_an_unreadable_follow_up_is_dropped_and_said(host):
    storage = host.runtime.storage
    storage.write(lambda db: Storage.put_state(db, ra.EXIT_ALL_AFTER_KEY, "{not json"))
    host.runtime.engine.risk.follow_up()
    [said] = _dropped(storage)
    assert "unreadable" in said and storage.get_state(ra.EXIT_ALL_AFTER_KEY) is None
