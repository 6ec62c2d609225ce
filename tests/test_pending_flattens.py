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


def test_a_flatten_that_keeps_failing_backs_off_is_said_once_and_holds_up_no_other(host):
    """Review 20: a flatten to do whose flatten raised every time (here the decider raises for s1's exit) was tried
    on every 0.25 s beat, each time with a read of the broker's books and a traceback, nothing told the trader, and
    it stopped every flatten behind it (s2's max loss): s2 stayed open. Now each is tried on its own, one that
    fails waits 1, 2, 4 ... 60 s before the next try, and its first failure is said."""
    import time
    storage = host.runtime.storage
    risk = host.runtime.engine.risk
    _two_held(host)
    real_eval, reads = risk.decider.evaluate, []
    real_read = risk.outside.read_for_exits

    def evaluate(db, name, intents, **kw):  # type: ignore[no-untyped-def]
        if name == "s1":
            raise RuntimeError("s1's exit cannot be decided")
        return real_eval(db, name, intents, **kw)

    def read():  # type: ignore[no-untyped-def]
        reads.append(time.monotonic())
        return real_read()
    risk.decider.evaluate, risk.outside.read_for_exits = evaluate, read
    try:
        today = risk.gate.clock.day(risk.now()).isoformat()
        storage.write(lambda db: pending_flattens.add(db, [
            pending_flattens.Pending("risk: strategy s1 max loss", today, strategy="s1"),
            pending_flattens.Pending("risk: strategy s2 max loss", today, strategy="s2")]))
        wait_for(lambda: host.net("s2") == 0, timeout=5)
        time.sleep(2.5)
        assert len(reads) <= 4, f"{len(reads)} broker reads in about 3 s for one failing flatten"
        [said] = _said(storage, "risk_flatten_failed")
        assert "risk: strategy s1 max loss failed" in said and "check those positions" in said
        assert [p.strategy for p in storage.read(pending_flattens.read)] == ["s1"]  # it stays to do
    finally:
        risk.decider.evaluate, risk.outside.read_for_exits = real_eval, real_read
    wait_for(lambda: host.net("s1") == 0, timeout=10)  # done once it can be, after its back-off
    assert storage.get_state(pending_flattens.KEY) is None


def _two_held(h) -> None:  # type: ignore[no-untyped-def]
    """s1 and s2 each hold 75 (NRML)."""
    h.tick("43")
    for s in ("s1", "s2"):
        assert h.post(alert(strategy=s, direction="BUY", qty=75, price="43")).status_code == 200
        wait_for(lambda s=s: h.net(s) == 75)


def _s1_exit_fails(risk):  # type: ignore[no-untyped-def]
    """The decider raises for s1's exit (a bad row, a bug); it is restored by the returned function."""
    real = risk.decider.evaluate

    def evaluate(db, name, intents, **kw):  # type: ignore[no-untyped-def]
        if name == "s1":
            raise RuntimeError("s1's exit cannot be decided")
        return real(db, name, intents, **kw)
    risk.decider.evaluate = evaluate
    return lambda: setattr(risk.decider, "evaluate", real)


def test_one_position_whose_exit_fails_holds_up_no_other_position_of_the_square_off(host):
    """Review 21: the square-off is one flatten for every strategy's MIS positions, in one transaction: one position
    whose exit raised undid every exit of it, and s2's MIS position was never squared off. Each position is now
    exited on its own; the one that failed is said and the flatten stays to do, for it."""
    storage = host.runtime.storage
    risk = host.runtime.engine.risk
    host.tick("43")
    for s in ("s1", "s2"):
        assert host.post(alert(strategy=s, direction="BUY", qty=75, price="43", product_type="I")).status_code == 200
        wait_for(lambda s=s: host.net(s) == 75)
    restore = _s1_exit_fails(risk)
    try:
        today = risk.gate.clock.day(risk.now()).isoformat()
        storage.write(lambda db: pending_flattens.add(db, [
            pending_flattens.Pending("risk: intraday square-off", today, product="I")]))
        wait_for(lambda: host.net("s2") == 0, timeout=5)
        [said] = wait_for(lambda: _said(storage, "risk_flatten_failed"), timeout=5)
        assert "s1 NFO:" in said and "could not be made" in said, said
        assert host.net("s1") == 75 and storage.get_state(pending_flattens.KEY) is not None
    finally:
        restore()
    wait_for(lambda: host.net("s1") == 0, timeout=10)  # tried again after its back-off: done
    assert storage.get_state(pending_flattens.KEY) is None
    host.settle()
    assert sorted(o["strategy"] for o in host.orders() if o["action"] == "EXIT") == ["s1", "s2"]  # each once


def test_the_days_breach_exits_the_other_positions_and_backs_off_the_one_whose_exit_fails(host_factory):
    """Review 21: the same at the day's breach: nothing was exited, and the check after the breach flattened again
    on every 0.25 s beat, each time with a read of the broker's books and a traceback. The other positions are
    exited; the one that failed is tried again after 1, 2, 4 ... 60 s."""
    import time
    h = host_factory(RISK_BASE_MAX_LOSS="-100")
    risk = h.runtime.engine.risk
    _two_held(h)
    real_read, reads = risk.outside.read_for_exits, []

    def read():  # type: ignore[no-untyped-def]
        reads.append(time.monotonic())
        return real_read()
    risk.outside.read_for_exits = read
    restore = _s1_exit_fails(risk)
    try:
        h.tick("41")  # 150 x -2 = -300: the breach
        wait_for(lambda: _said(h.runtime.storage, "risk_breach"), timeout=5)
        wait_for(lambda: h.net("s2") == 0, timeout=5)
        time.sleep(2.5)
        assert h.net("s1") == 75 and len(reads) <= 4, (h.net("s1"), len(reads))
        assert any("FAILED, tried again" in m and "s1 NFO:" in m for m in _said(h.runtime.storage, "exit_all"))
    finally:
        restore()
        risk.outside.read_for_exits = real_read
    wait_for(lambda: h.net("s1") == 0, timeout=10)  # the check after the breach, once its back-off ends
