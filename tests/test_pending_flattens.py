"""Flattens decided and not yet done (a strategy's stop, the square-off, a strategy's MTM stop): kept until done."""
from __future__ import annotations

from conftest import alert, wait_for
from host import pending_flattens
from host.storage import Storage


def _said(storage, kind: str) -> list[str]:
    return [r["message"] for r in storage.rows("select message from events where kind = ? order by id", (kind,))]


def test_a_flatten_waiting_from_an_earlier_day_is_dropped_and_said_not_done(host):
    """A stop decided yesterday whose flatten never ran (the host was down since) is not sent today unasked: it is
    dropped, with an error naming it, and the position is left to the trader."""
    storage = host.runtime.storage
    host.tick("43")
    assert host.post(alert(direction="BUY", qty=75, price="43")).status_code == 200
    wait_for(lambda: host.net() == 75)
    old = pending_flattens.Pending("risk: strategy s1 max loss", "2020-01-06", strategy="s1")
    storage.write(lambda db: pending_flattens.add(db, [old]))
    wait_for(lambda: _said(storage, "risk_flatten_dropped"), timeout=5)
    [said] = _said(storage, "risk_flatten_dropped")
    assert "risk: strategy s1 max loss (decided on 2020-01-06)" in said and "check those positions" in said
    assert storage.get_state(pending_flattens.KEY) is None
    host.settle()
    assert host.net() == 75


def test_a_flatten_waiting_from_today_is_done_once_and_taken_off(host):
    """What a restart finds waiting from today is done on risk's next beat, and taken off in the same transaction."""
    storage = host.runtime.storage
    host.tick("43")
    assert host.post(alert(direction="BUY", qty=75, price="43")).status_code == 200
    wait_for(lambda: host.net() == 75)
    today = host.runtime.engine.risk.gate.clock.day(host.runtime.engine.risk.now()).isoformat()
    storage.write(lambda db: pending_flattens.add(db, [pending_flattens.Pending("risk: strategy s1 max loss", today,
                                                                                strategy="s1")]))
    wait_for(lambda: host.net() == 0, timeout=5)
    assert storage.get_state(pending_flattens.KEY) is None
    host.settle()
    assert len([o for o in host.orders() if o["action"] == "EXIT"]) == 1


def test_an_unreadable_list_of_flattens_is_dropped_and_said(host):
    storage = host.runtime.storage
    storage.write(lambda db: Storage.put_state(db, pending_flattens.KEY, "{not json"))
    wait_for(lambda: _said(storage, "risk_flatten_dropped"), timeout=5)
    [said] = _said(storage, "risk_flatten_dropped")
    assert "unreadable" in said and "none was done" in said
    assert storage.get_state(pending_flattens.KEY) is None
