"""Soak: 2,000 TradingView alerts in live mode (the real NorenRestApiPy against the Noren simulator on loopback),
from several threads, across strategies and exchange segments, while a seeded RNG injects the broker's faults.

Afterwards, with the host settled:
- every order the broker booked with one of our ids (remarks) is ours, booked once, and recorded as the broker
  has it (broker order id, status, fill count); nothing of ours that the broker booked is missing, nothing is
  doubled, and an order we marked LOST (or that never left) is really absent from the broker's book;
- each accepted alert's orders are the ones it was answered with, and they are at the broker exactly once,
  with the side, quantity, symbol and product we recorded;
- for every (exchange, symbol, product) the positions of all strategies plus `manual` sum to the broker's
  PositionBook netqty.

SOAK_SEED (default 12) changes the run; SOAK_ALERTS (default 2000) and SOAK_RATE (alerts/s) its size. The counts
are printed (alerts by outcome, orders by status, fills, faults injected by kind, UNKNOWN/LOST/EXPIRED).
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter, defaultdict
from decimal import Decimal
from typing import Any, Optional
from urllib.parse import parse_qs, urlparse

import pytest
import requests

from conftest import SECRET, TOKEN, Host, make_settings, noren_login

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("SOAK_SEED", "12"))
ALERTS = int(os.environ.get("SOAK_ALERTS", "2000"))
RATE = float(os.environ.get("SOAK_RATE", "22"))  # alerts per second, all threads together
THREADS = 4
STRATEGIES = ("soak_a", "soak_b", "soak_c", "soak_d")
BROKER_TIMEOUT_S = 1.5
LOST_AFTER_S = 5.0
SETTLE_S = 60.0

# (exchange, symbol, lot, tick, first price); BSE is added to the simulator here (the host's BSE file is empty)
INSTRUMENTS = [
    ("NFO", "NIFTY28APR26C24500", 75, Decimal("0.05"), Decimal("42.5")),
    ("NFO", "NIFTY28APR26P24500", 75, Decimal("0.05"), Decimal("61.2")),
    ("NFO", "BANKNIFTY28APR26P50000", 35, Decimal("0.05"), Decimal("100")),
    ("NSE", "ACC-EQ", 1, Decimal("0.05"), Decimal("2100")),
    ("NSE", "RELIANCE-EQ", 1, Decimal("0.05"), Decimal("2900")),
    ("NSE", "NIFTYBEES-EQ", 1, Decimal("0.01"), Decimal("270.5")),
    ("BSE", "RELIANCE", 1, Decimal("0.05"), Decimal("2901")),
    ("BSE", "SBIN", 1, Decimal("0.05"), Decimal("810")),
    ("MCX", "CRUDEOIL19MAY26", 1, Decimal("1"), Decimal("6500")),
]
BSE_EXTRA = [("BSE", "500325", "RELIANCE"), ("BSE", "500112", "SBIN")]
TERMINAL_NOT_BOOKED = ("REJECTED", "CANCELLED")
TRANSIENT = ("NEW", "SUBMITTED", "UNKNOWN")


def _on_tick(price: Decimal, tick: Decimal) -> Decimal:
    return (price / tick).to_integral_value() * tick


class Market:
    """The test's view of the last prices; ticks go to the simulator through /sim/control."""

    def __init__(self, control: "Control"):
        self.control = control
        self.spec = {(ex, sym): (lot, tick) for ex, sym, lot, tick, _ in INSTRUMENTS}
        self.ltp = {(ex, sym): p for ex, sym, _, _, p in INSTRUMENTS}
        self.lock = threading.Lock()

    def price(self, key: tuple[str, str]) -> Decimal:
        with self.lock:
            return self.ltp[key]

    def move(self, rng: random.Random) -> None:
        key = rng.choice(list(self.ltp))
        lot, tick = self.spec[key]
        with self.lock:
            base = self.ltp[key]
            step = max(_on_tick(base * Decimal("0.002"), tick), tick)
            new = max(base + step * rng.choice((-2, -1, -1, 1, 1, 2)), tick * 20)
            self.ltp[key] = new
        self.control.send({"action": "tick", "exchange": key[0], "symbol": key[1], "ltp": str(new)}, count=False)


class Control:
    """POST /sim/control, counting what was injected by kind."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/sim/control"
        self.counts: Counter = Counter()
        self.local = threading.local()

    def send(self, body: dict, kind: Optional[str] = None, count: bool = True) -> dict:
        s = getattr(self.local, "session", None) or requests.Session()
        self.local.session = s
        r = s.post(self.url, json=body, timeout=10)
        assert r.status_code == 200, (body, r.text)
        if count:
            self.counts[kind or body["action"]] += 1
        return r.json()


def broker_login(h: Host, sim: Any) -> None:
    """The daily login through the host's own /broker/login -> authorize -> /broker/callback, in its own client."""
    client = h.app.test_client()
    r = client.get(f"/broker/login?token={TOKEN}")
    assert r.status_code == 302, r.get_data(as_text=True)
    back = requests.get(r.headers["Location"], allow_redirects=False, timeout=10)
    code = parse_qs(urlparse(back.headers["Location"]).query)["code"][0]
    r = client.get(f"/broker/callback?code={code}")
    assert r.status_code == 200 and r.get_json()["engine"] == "updated", r.get_json()
    return r.get_json()["broker_session"]  # "expired" here although the login worked: see the test at the end


def make_alert(i: int, rng: random.Random, market: Market) -> dict:
    """One alert of a seeded mix: ENTRY / EXIT / ADJUST / POSITION, one or two legs, across segments."""
    kind = rng.choices(("ENTRY", "EXIT", "ADJUST", "POSITION"), (30, 25, 27, 18))[0]
    strategy = rng.choice(STRATEGIES)
    keys = rng.sample(list(market.spec), 2 if rng.random() < 0.2 else 1)
    legs = []
    for ex, sym in keys:
        lot, tick = market.spec[(ex, sym)]
        ltp = market.price((ex, sym))
        product = "M" if rng.random() < 0.7 else "I"
        leg: dict[str, Any] = {"exchange": ex, "tradingsymbol": sym, "product_type": product}
        if kind == "POSITION":
            leg["position"] = lot * rng.randint(-3, 3)
            if rng.random() < 0.7:
                leg["order_type"] = "MKT"
            else:
                leg.update(order_type="LMT", price=str(ltp))
        else:
            side = rng.choice(("BUY", "SELL"))
            qty = lot * rng.randint(1, 4 if kind == "EXIT" else 3)
            leg.update(direction=side, qty=str(qty))
            style = rng.random()
            if style < 0.3:
                leg["order_type"] = "MKT"
            else:  # marketable (fills now) or resting (fills if the market comes to it)
                ticks = rng.randint(1, 3) if style < 0.75 else -rng.randint(2, 12)
                sign = 1 if side == "BUY" else -1
                price = max(ltp + sign * ticks * tick * max(1, int(ltp * Decimal("0.001") / tick)), tick)
                leg.update(order_type="LMT", price=str(_on_tick(price, tick)))
        legs.append(leg)
    return {"secret_key": SECRET, "execution_type": kind, "strategy_name": strategy, "alert_id": f"soak-{i}",
            "legs": legs}


def _live_host(sim: Any, data_dir: Any) -> Host:
    settings = make_settings(
        data_dir, BROKER="shoonya", SHOONYA_AUTH="oauth", USER_ID="FA12345",
        OAUTH_CLIENT_ID=sim.sim.client_id, OAUTH_SECRET=sim.sim.client_secret,
        SHOONYA_API_URL=sim.api_url, SHOONYA_WS_URL=sim.ws_url, SHOONYA_OAUTH_URL=sim.oauth_url,
        SHOONYA_SYMBOLS_URL=f"http://127.0.0.1:{sim.port}/",
        RISK_BASE_MAX_LOSS="-1000000000", RISK_MAX_CONSECUTIVE_LOSS_DAYS="0", RISK_POLL_S="1",
        FEED_STALL_S="2", ORDER_LOST_AFTER_S=str(int(LOST_AFTER_S)))
    return Host(settings, broker_timeout_s=BROKER_TIMEOUT_S, unknown_grace_s=LOST_AFTER_S, watch_plugins=False)


def inject(rng: random.Random, control: Control, market: Market, h: Host, sim: Any, progress: list[int],
           stop: threading.Event, problems: list[str]) -> None:
    """Random faults until stopped; a session expiry and re-login at a third and at two thirds of the run."""
    logins_at = [ALERTS // 3, 2 * ALERTS // 3]
    kinds = [("book_late_late", 6), ("book_late_none", 8), ("drop_next", 8), ("delay_next", 5), ("reject_next", 6),
             ("forbid_next", 3), ("partial_on", 4), ("partial_off", 4), ("stall_feed", 3), ("drop_ws", 4),
             ("manual_order", 10), ("square_off_mis", 1)]
    names, weights = zip(*kinds)
    while not stop.wait(rng.uniform(0.3, 1.1)):
        try:
            if logins_at and progress[0] >= logins_at[0]:
                logins_at.pop(0)
                control.send({"action": "expire_session"})
                time.sleep(rng.uniform(1.0, 2.5))
                if broker_login(h, sim) != "valid":
                    control.counts["relogin_answered_expired"] += 1
                control.counts["relogin"] += 1
                continue
            kind = rng.choices(names, weights)[0]
            if kind == "book_late_late":  # answered after our timeout; not in the book until then
                control.send({"action": "book_late", "seconds": round(rng.uniform(BROKER_TIMEOUT_S + 0.3, 3.5), 2),
                              "reply": "late"}, kind)
            elif kind == "book_late_none":  # no answer at all; booked later (sometimes after we gave it up as LOST)
                seconds = rng.uniform(0.5, 3.0) if rng.random() < 0.75 else rng.uniform(LOST_AFTER_S + 1, LOST_AFTER_S + 4)
                control.send({"action": "book_late", "seconds": round(seconds, 2), "reply": "none"}, kind)
            elif kind == "drop_next":
                control.send({"action": "drop_next", "count": 1, "route": "PlaceOrder"}, kind)
            elif kind == "delay_next":  # booked at once, answered beyond the broker timeout
                control.send({"action": "delay_next", "seconds": round(rng.uniform(BROKER_TIMEOUT_S + 0.3, 3.0), 2)}, kind)
            elif kind == "reject_next":
                control.send({"action": "reject_next", "reason": "RMS:Margin Exceeds,Required:55000.00"}, kind)
            elif kind == "forbid_next":
                control.send({"action": "forbid_next", "count": 1, "route": "PlaceOrder"}, kind)
            elif kind == "partial_on":
                control.send({"action": "partial", "max_fill_qty": rng.choice((1, 25, 35, 50))}, kind)
            elif kind == "partial_off":
                control.send({"action": "partial", "max_fill_qty": None}, kind)
            elif kind == "stall_feed":
                control.send({"action": "stall_feed", "on": True}, kind)
                stop.wait(rng.uniform(2.5, 4.0))
                control.send({"action": "stall_feed", "on": False}, count=False)
            elif kind == "drop_ws":
                control.send({"action": "drop_ws"}, kind)
            elif kind == "manual_order":  # the trader in the broker's app: no remarks of ours
                ex, sym = rng.choice(list(market.spec))
                lot, _ = market.spec[(ex, sym)]
                control.send({"action": "manual_order", "exchange": ex, "symbol": sym, "side": rng.choice("BS"),
                              "qty": lot * rng.randint(1, 2), "prctyp": "MKT", "prd": rng.choice("MMI")}, kind)
            elif kind == "square_off_mis" and not control.counts["square_off_mis"]:  # the broker's MIS square-off
                control.send({"action": "square_off", "products": ["I"]}, kind)
        except Exception as e:  # noqa: BLE001 - reported, never silently lost
            problems.append(f"fault injection {kind if 'kind' in locals() else '?'} failed: {type(e).__name__}: {e}")


@pytest.mark.timeout(420)
def test_soak_2000_alerts_with_random_faults(sim, tmp_path, capsys):
    from host.broker_session import session_state
    from host.instruments import Instrument, Instruments
    sim.sim.instruments = Instruments(list(sim.sim.instruments.by_symbol.values())
                                      + [Instrument(ex, tok, sym, 1, Decimal("0.05")) for ex, tok, sym in BSE_EXTRA])
    for ex, sym, _, _, price in INSTRUMENTS:
        sim.sim.tick(ex, sym, price)
    control = Control(sim.port)
    market = Market(control)
    h = _live_host(sim, tmp_path / "var").start()
    started = time.monotonic()
    stop_faults, stop_ticks = threading.Event(), threading.Event()
    problems: list[str] = []
    threads: list[threading.Thread] = []
    try:
        h.runtime.broker.http.timeout_s = BROKER_TIMEOUT_S  # one stand-in per process: ours, whoever installed it
        h.runtime.feed.market_open = lambda: True  # the stall watchdog acts in market hours only
        for _ in range(3):  # a trader presses Connect again when the page says expired
            if broker_login(h, sim) == "valid":
                break
            control.counts["login_answered_expired"] += 1

        answers: dict[int, tuple[int, dict]] = {}
        sent_bodies: list[dict] = []
        resends: list[tuple[int, int]] = []  # (alert index, index of the alert it repeats)
        progress = [0]
        lock = threading.Lock()
        plan = [random.Random(f"{SEED}-{i}") for i in range(ALERTS)]

        def ticker() -> None:
            trng = random.Random(f"{SEED}-ticks")
            while not stop_ticks.wait(0.15):
                try:
                    market.move(trng)
                except Exception as e:  # noqa: BLE001
                    problems.append(f"tick failed: {type(e).__name__}: {e}")

        def worker(n: int) -> None:
            client = h.app.test_client()
            t0 = time.monotonic()
            for i in range(n, ALERTS, THREADS):
                delay = t0 + i / RATE - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                arng = plan[i]
                with lock:
                    repeat = sent_bodies and arng.random() < 0.04
                    if repeat:
                        j, body = arng.choice(sent_bodies)
                        resends.append((i, j))
                if not repeat:
                    j, body = i, make_alert(i, arng, market)
                r = client.post("/webhook", json=body)
                answers[i] = (r.status_code, r.get_json() or {})
                with lock:
                    progress[0] += 1
                    if not repeat and r.status_code in (200, 409, 423):
                        sent_bodies.append((i, body))

        threads = [threading.Thread(target=ticker, name="soak-ticks", daemon=True),
                   threading.Thread(target=inject, name="soak-faults", daemon=True,
                                    args=(random.Random(f"{SEED}-faults"), control, market, h, sim, progress,
                                          stop_faults, problems))]
        threads += [threading.Thread(target=worker, args=(n,), name=f"soak-alerts-{n}", daemon=True)
                    for n in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads[2:]:
            t.join(ALERTS / RATE + 120)
            assert not t.is_alive(), f"{t.name} did not finish"
        sent_done = time.monotonic()
        stop_faults.set()
        threads[1].join(15)
        stop_ticks.set()
        threads[0].join(5)
        # no fault stays on; the session is valid; late bookings land
        control.send({"action": "partial", "max_fill_qty": None}, count=False)
        control.send({"action": "stall_feed", "on": False}, count=False)
        for name in ("reject_next", "delay_next_s", "book_late_s", "drop_next", "forbid_next"):
            setattr(sim.sim.faults, name, type(getattr(sim.sim.faults, name))())
        session_at_end = session_state(h.runtime.storage)["state"]  # before check_session() sets it again
        if not h.runtime.broker.check_session():
            broker_login(h, sim)

        outcome = settle_and_compare(h, sim)
        settled = time.monotonic()
    finally:
        stop_faults.set()
        stop_ticks.set()
        for t in threads:
            t.join(10)
        h.stop()

    report = counts(h, sim, answers, resends, control.counts, outcome, problems,
                    (sent_done - started, settled - sent_done))
    report += f"\nthe host's broker session state after the run: {session_at_end} (the broker's session was valid)"
    with capsys.disabled():
        print("\n" + report)
    failures = outcome["failures"] + problems
    assert not failures, report + "\n\nFAILURES:\n" + "\n".join(failures[:60])


# ---- the comparison ----

def broker_state(sim: Any) -> tuple[dict[str, list], dict[tuple, int], list]:
    """The broker's order book by remarks (ours) and PositionBook netqty, over the wire."""
    book: dict[str, list] = defaultdict(list)
    foreign = []
    for b in sim.sim.engine.order_book():
        o = sim.sim.engine.get(b.broker_order_id)
        (book[b.remarks] if b.remarks else foreign).append((b, o.req))
    api = noren_login(sim, "FA12345")
    rows = api.get_positions() or []
    net = {(r["exch"], r["tsym"], r["prd"]): int(r["netqty"]) for r in rows}
    return book, net, foreign


def compare(h: Host, sim: Any) -> dict:
    storage = h.runtime.storage
    orders = {o["id"]: o for o in storage.rows("select * from orders")}
    book, broker_net, foreign = broker_state(sim)
    failures: list[str] = []
    for remarks, at in book.items():
        if remarks not in orders:
            failures.append(f"LOST RECORD: the broker has {len(at)} order(s) with remarks {remarks!r} that we never "
                            f"recorded: {[(b.broker_order_id, b.status.value) for b, _ in at]}")
    for oid, o in orders.items():
        at = book.get(oid, [])
        if len(at) > 1:
            failures.append(f"DOUBLED: order {oid} ({o['strategy']} {o['side']} {o['qty']} {o['exchange']}:"
                            f"{o['symbol']}, ours {o['status']}) is at the broker {len(at)} times: "
                            f"{[(b.broker_order_id, b.status.value, b.filled_qty) for b, _ in at]}")
            continue
        if not at:
            if o["status"] not in TERMINAL_NOT_BOOKED + ("LOST",):
                failures.append(f"UNRESOLVED: order {oid} ({o['strategy']} {o['side']} {o['qty']} {o['exchange']}:"
                                f"{o['symbol']}) is {o['status']} with broker id {o['broker_order_id']} but the broker "
                                f"has no order with its remarks (reason {o['reason']!r})")
            elif o["broker_order_id"]:
                failures.append(f"PHANTOM: order {oid} is {o['status']} with broker id {o['broker_order_id']}, which "
                                f"the broker's book lacks")
            continue
        b, req = at[0]
        problems = []
        if o["status"] in ("LOST", "UNKNOWN", "SUBMITTED", "NEW"):
            problems.append(f"ours is {o['status']} although the broker booked it as {b.broker_order_id}")
        elif o["status"] != b.status.value:
            problems.append(f"status ours {o['status']} vs broker {b.status.value}")
        if o["broker_order_id"] != b.broker_order_id:
            problems.append(f"broker id ours {o['broker_order_id']} vs {b.broker_order_id}")
        if (o["filled_qty"] or 0) != b.filled_qty:
            problems.append(f"filled ours {o['filled_qty']} vs broker {b.filled_qty}")
        if (o["applied_qty"] or 0) != b.filled_qty:
            problems.append(f"position took {o['applied_qty']} of the broker's {b.filled_qty} filled")
        if (req.exchange, req.symbol, req.side.value, req.qty, req.product.value) != \
                (o["exchange"], o["symbol"], o["side"], o["qty"], o["product"]):
            problems.append(f"sent as {req.exchange}:{req.symbol} {req.side.value} {req.qty} {req.product.value}")
        if problems:
            failures.append(f"MISMATCH: order {oid} ({o['strategy']} {o['side']} {o['qty']} {o['exchange']}:"
                            f"{o['symbol']} {o['product']}): " + "; ".join(problems))

    ours_net: dict[tuple, int] = defaultdict(int)
    for p in storage.rows("select exchange, symbol, product, net_qty from positions"):
        ours_net[(p["exchange"], p["symbol"], p["product"])] += p["net_qty"]
    for key in sorted(set(ours_net) | set(broker_net)):
        if ours_net.get(key, 0) != broker_net.get(key, 0):
            split = storage.rows("select strategy, net_qty from positions where exchange = ? and symbol = ? and "
                                 "product = ? and net_qty != 0", key)
            held = ", ".join(f"{r['strategy']} {r['net_qty']}" for r in split)
            failures.append(f"POSITION {key}: ours {ours_net.get(key, 0)} ({held}) vs broker netqty "
                            f"{broker_net.get(key, 0)}")
    return {"failures": failures, "orders": orders, "book": book, "broker_net": broker_net, "foreign": foreign,
            "ours_net": dict(ours_net)}


def settle_and_compare(h: Host, sim: Any) -> dict:
    """Wait (bounded) for late bookings, the sender and the watcher; compare until equal twice in a row."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline and any(t.is_alive() for t in sim.sim.timers):
        time.sleep(0.2)
    clean = 0
    outcome = compare(h, sim)
    while time.monotonic() < deadline:
        busy = not h.runtime.sender.idle() or h.runtime.storage.one(
            f"select count(*) n from orders where status in ({','.join('?' * len(TRANSIENT))})", TRANSIENT)["n"]
        clean = clean + 1 if not busy and not outcome["failures"] else 0
        if clean >= 2:
            break
        time.sleep(1.0)
        outcome = compare(h, sim)
    outcome["settle_left_s"] = max(deadline - time.monotonic(), 0)
    return outcome


def counts(h: Host, sim: Any, answers: dict, resends: list, faults: Counter, outcome: dict, problems: list,
           times: tuple[float, float]) -> str:
    storage = h.runtime.storage
    alerts = storage.rows("select id, client_alert_id, strategy, execution_type, status, reason, orders from alerts")
    by_status = Counter(a["status"] for a in alerts)
    http = Counter(code for code, _ in answers.values())
    orders = outcome["orders"]
    order_status = Counter(o["status"] for o in orders.values())
    fills = storage.one("select count(*) n, coalesce(sum(qty), 0) q from fills")
    outside = storage.one("select count(*) n from outside_fills")
    events = Counter(r["kind"] for r in storage.rows("select kind from events"))
    history = Counter(r["status"] for r in storage.rows("select distinct order_id, status from order_history"))
    accepted = [a for a in alerts if a["status"] == "accepted"]

    # each accepted alert: its answer's orders == its recorded orders == the rows carrying its id
    failures = outcome["failures"]
    by_alert = defaultdict(set)
    for o in orders.values():
        if o["alert_id"]:
            by_alert[o["alert_id"]].add(o["id"])
    answered = {}
    for i, (code, body) in answers.items():
        if body.get("status") == "accepted":
            answered[body["alert_id"]] = {o["id"] for o in body.get("orders", [])}
    released = defaultdict(int)  # POSITION reversals and EXIT follow-ups: orders added to the alert later
    for t in storage.rows("select alert_id from position_targets where status = 'sent'"):
        released[t["alert_id"]] += 1
    for a in accepted:
        recorded = set(json.loads(a["orders"] or "[]"))
        rows = by_alert.get(a["id"], set())
        if recorded != rows:
            failures.append(f"ALERT {a['id']} ({a['client_alert_id']}): recorded orders {sorted(recorded)} but the "
                            f"orders carrying its id are {sorted(rows)}")
        if a["id"] in answered and not (answered[a["id"]] <= recorded
                                        and (answered[a["id"]] == recorded or released[a["id"]])):
            failures.append(f"ALERT {a['id']} ({a['client_alert_id']}): answered orders {sorted(answered[a['id']])} "
                            f"but recorded {sorted(recorded)} ({released[a['id']]} released later)")
    for a in alerts:
        if a["status"] != "accepted" and by_alert.get(a["id"]):
            failures.append(f"ALERT {a['id']} is {a['status']} but has orders {sorted(by_alert[a['id']])}")
    for i, j in resends:
        code, body = answers[i]
        if answers[j][1].get("status") == "accepted" and body.get("status") != "duplicate":
            failures.append(f"RESEND of soak-{j} (accepted) answered {code} {body.get('status')}: "
                            f"{body.get('reason')}")
    booked = sum(1 for oid in orders if outcome["book"].get(oid))
    alert_orders = sum(len(json.loads(a["orders"] or "[]")) for a in accepted)
    lines = [
        f"SOAK seed={SEED} alerts={ALERTS} threads={THREADS} rate={RATE}/s broker_timeout={BROKER_TIMEOUT_S}s "
        f"lost_after={LOST_AFTER_S}s; sending took {times[0]:.1f} s, settling {times[1]:.1f} s",
        f"alerts sent {len(answers)} (of which resends of an earlier alert_id {len(resends)}); HTTP {dict(sorted(http.items()))}",
        f"alerts by final status {dict(sorted(by_status.items()))}: accepted {by_status['accepted']}, "
        f"duplicate {by_status['duplicate']}, blocked {by_status['blocked']}, rejected {by_status['rejected']}, "
        f"refused {by_status['refused']}, failed {by_status['failed']}",
        f"accepted alerts with orders {sum(1 for a in accepted if json.loads(a['orders'] or '[]'))}, their orders "
        f"{alert_orders}; orders in all {len(orders)} (without an alert: "
        f"{sum(1 for o in orders.values() if not o['alert_id'])}), booked at the broker {booked}",
        f"orders by final status {dict(sorted(order_status.items()))}",
        f"orders that passed through UNKNOWN {history['UNKNOWN']}, LOST {history['LOST']} (LOST now "
        f"{order_status['LOST']}, UNKNOWN now {order_status['UNKNOWN']}, EXPIRED {order_status['EXPIRED']})",
        f"fills recorded {fills['n']} ({fills['q']} units); outside fills adopted {outside['n']}; broker orders without "
        f"our remarks {len(outcome['foreign'])}",
        f"faults injected {dict(sorted(faults.items()))} (total {sum(v for k, v in faults.items() if 'login' not in k)})",
        f"entries refused for an expired session {sum(1 for _, b in answers.values() if 'session expired' in str(b.get('reason')))}",
        "events: " + ", ".join(f"{k} {events[k]}" for k in ("order_unknown", "order_lost", "order_found",
                                                              "order_doubled", "order_rejected", "manual_trade",
                                                              "closed_outside", "feed_stalled",
                                                              "broker_session_expired", "broker_session_valid")),
        f"positions compared {len(set(outcome['ours_net']) | set(outcome['broker_net']))} (exchange, symbol, "
        f"product); non-zero at the broker {sum(1 for v in outcome['broker_net'].values() if v)}",
        f"failures {len(failures) + len(problems)}",
    ]
    for o in [o for o in orders.values() if o["status"] == "LOST"][:10]:  # absent from the broker: say why
        trail = storage.rows("select at, status, detail from order_history where order_id = ? order by id", (o["id"],))
        lines.append(f"  LOST {o['id']} {o['strategy']} {o['side']} {o['qty']} {o['exchange']}:{o['symbol']} "
                     f"{o['order_type']}: " + " -> ".join(f"{t['at'][11:23]} {t['status']} {t['detail'] or ''}".strip()
                                                          for t in trail))
    return "\n".join(lines)


# ---- found by the soak: a late answer to the expired session undoes a new login ----

def test_a_late_answer_to_the_expired_session_does_not_undo_a_new_login(sim, tmp_path):
    """The positions poll asks the broker with the old token; the broker judges it expired on arrival, and its
    answer leaves only after the trader's new login has been checked valid. The host must stay 'valid'."""
    from flask import request
    from host.broker_session import session_state
    h = _live_host(sim, tmp_path / "var").start()
    original = sim.sim.uid_for
    arrived, login_done = threading.Event(), threading.Event()

    def judged_then_slow(token: Optional[str]) -> Optional[str]:
        uid = original(token)
        if uid is None and request.path.endswith("PositionBook") and not arrived.is_set():
            arrived.set()
            login_done.wait(4)  # the answer "Session Expired" leaves after the new login
        return uid

    try:
        h.runtime.broker.http.timeout_s = h.runtime.gateway.timeout_s = 6.0  # a slow answer, not a timeout
        assert broker_login(h, sim) == "valid"
        sim.sim.uid_for = judged_then_slow
        sim.sim.expire_sessions()
        assert arrived.wait(10), "the host never polled the broker's positions with the expired token"
        assert broker_login(h, sim) == "valid"
        login_done.set()
        time.sleep(1.5)  # the late answer lands; the host polls again with the new token
        h.runtime.broker.positions()  # the host's own session works (raises SessionExpired otherwise)
        body = {"secret_key": SECRET, "execution_type": "ENTRY", "strategy_name": "after_login", "alert_id": "race-1",
                "legs": [{"exchange": "NFO", "tradingsymbol": "NIFTY28APR26C24500", "direction": "BUY", "qty": "75",
                          "order_type": "LMT", "price": "40", "product_type": "M"}]}
        r = h.app.test_client().post("/webhook", json=body)
        assert (session_state(h.runtime.storage)["state"], r.status_code) == ("valid", 200), \
            (session_state(h.runtime.storage), r.get_json())
    finally:
        login_done.set()
        sim.sim.uid_for = original
        h.stop()
