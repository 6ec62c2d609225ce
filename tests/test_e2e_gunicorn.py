"""End to end: `strategy-host run` under gunicorn, as a new user runs it, with curl-like requests."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import wait_for
from serverproc import ServerProcess, free_port

pytestmark = pytest.mark.slow


def _alert(secret, strategy="e2e", symbol="NIFTY28APR26C24500", alert_id=None, execution="ENTRY", **leg):
    fields = {"tradingsymbol": symbol, "direction": "BUY", "qty": "75", "order_type": "LMT", "price": "42.5",
              "product_type": "M"}
    body = {"secret_key": secret, "execution_type": execution, "strategy_name": strategy, "exchange": "NFO",
            "legs": [{**fields, **leg}]}
    if alert_id:
        body["alert_id"] = alert_id
    return body


@pytest.fixture
def server(tmp_path):
    started = []

    def make(*args, **kw):
        s = ServerProcess(tmp_path, *args, **kw)
        started.append(s)
        return s
    yield make
    for s in started:
        s.stop()


def test_first_run_prints_secrets_once_and_trades(server, tmp_path):
    s = server().start()
    out = s.output()
    secrets = s.secrets()
    assert stat.S_IMODE((tmp_path / "var" / "secrets.env").stat().st_mode) == 0o600
    assert f"WEBHOOK_SECRET={secrets['WEBHOOK_SECRET']}" in out and "/webhook" in out
    assert '"secret_key": "' + secrets["WEBHOOK_SECRET"] in out  # the ready TradingView message
    assert f"dashboard   {s.url}/" in out and f"DASHBOARD_PASSWORD={secrets['DASHBOARD_PASSWORD']}" in out
    r = s.webhook(_alert(secrets["WEBHOOK_SECRET"]))
    assert r.status_code == 200, r.text
    oid = r.json()["orders"][0]["id"]
    wait_for(lambda: s.api("/api/orders").json()["items"][0]["status"] == "FILLED")
    assert s.api("/api/positions").json()["items"][0]["net_qty"] == 75
    assert s.terminate() == 0
    # second run: the secrets are not printed again, and the data is still there
    s2 = server().start()
    assert secrets["WEBHOOK_SECRET"] not in s2.output()
    assert s2.api("/api/orders").json()["items"][0]["id"] == oid


def test_a_second_run_on_the_same_data_dir_refuses(server):
    first = server().start()
    second = server()
    second.start(wait=False)
    assert second.proc.wait(20) != 0
    assert "already running" in second.output()
    assert requests.get(first.url + "/healthz", timeout=2).status_code == 200


def test_sigterm_finishes_in_flight_work_and_exits_cleanly(server):
    s = server().start()
    secret = s.secrets()["WEBHOOK_SECRET"]
    codes = [s.webhook(_alert(secret, strategy=f"t{i}")).status_code for i in range(5)]
    assert codes == [200] * 5
    assert s.terminate() == 0
    assert "Traceback" not in s.output()
    s2 = server().start()
    orders = s2.api("/api/orders").json()["items"]
    assert len(orders) == 5 and {o["status"] for o in orders} == {"FILLED"}


def test_kill_9_loses_nothing_accepted_and_runs_nothing_twice(server):
    s = server().start()
    secret = s.secrets()["WEBHOOK_SECRET"]
    bodies = [_alert(secret, strategy=f"k{i}", alert_id=f"kill-{i}") for i in range(200)]
    answers: dict[int, int] = {}

    def send(i):
        try:
            answers[i] = s.webhook(bodies[i]).status_code
        except requests.RequestException:
            answers[i] = 0
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(send, i) for i in range(len(bodies))]
        while list(answers.values()).count(200) < 60:  # (a copy: the senders add to it meanwhile)
            time.sleep(0.005)
        s.kill9()
        for f in futures:
            f.result()
    accepted = {i for i, c in answers.items() if c == 200}
    assert 60 <= len(accepted) < len(bodies)
    s2 = server().start()
    # the sender resends every alert (as a worried user would); what was accepted is a duplicate now
    for i in range(len(bodies)):
        r = s2.webhook(bodies[i])
        assert r.status_code == 200, r.text
        if i in accepted:
            assert r.json()["status"] == "duplicate", (i, r.json())

    def all_filled():
        items = s2.api("/api/orders", params={"limit": 1000}).json()["items"]
        return len(items) == len(bodies) and all(o["status"] == "FILLED" for o in items) and items
    try:
        orders = wait_for(all_filled, timeout=20)
    except AssertionError:
        items = s2.api("/api/orders", params={"limit": 1000}).json()["items"]
        stuck = [(o["id"], o["strategy"], o["status"], o["reason"]) for o in items if o["status"] != "FILLED"]
        raise AssertionError(f"{len(items)} orders for {len(bodies)} alerts; not filled: {stuck}") from None
    assert sorted(o["strategy"] for o in orders) == sorted(f"k{i}" for i in range(len(bodies)))
    positions = s2.api("/api/positions").json()["items"]
    assert len(positions) == len(bodies) and {p["net_qty"] for p in positions} == {75}


def _client_connections(pid: int, port: int) -> int:
    """Established TCP connections on the server's port held open by this process (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count


def test_two_workers_share_one_engine(server, tmp_path):
    s = server("--workers", "2").start()
    secret = s.secrets()["WEBHOOK_SECRET"]
    sessions = [requests.Session() for _ in range(8)]  # kept alive: each connection stays with its worker
    send = lambda i: sessions[i % 8].post(s.url + "/webhook", json=_alert(secret, strategy=f"w{i}"), timeout=10)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(40)))
    # every alert is decided while its request waits: the engine is woken, not found by its 0.1 s poll
    assert [a.status_code for a in answers] == [200] * 40, [a.json() for a in answers if a.status_code != 200]
    assert all(a.elapsed.total_seconds() < 1.5 for a in answers), max(a.elapsed for a in answers)
    # the engine's worker serves none of them: the other worker holds every client connection
    engine_pid = int((tmp_path / "var" / "engine.lock").read_text())
    other = _other_worker(s.proc.pid, engine_pid)
    assert _client_connections(engine_pid, s.port) == 0 and _client_connections(other, s.port) >= 8
    for session in sessions:
        session.close()
    orders = wait_for(lambda: (items := s.api("/api/orders", params={"limit": 100}).json()["items"])
                      and len(items) == 40 and all(o["status"] == "FILLED" for o in items) and items, timeout=15)
    assert len({o["strategy"] for o in orders}) == 40
    assert s.output().count("engine started") == 1 and s.output().count("takes no connections") == 1


def _other_worker(master: int, engine_pid: int) -> int:
    children = open(f"/proc/{master}/task/{master}/children").read().split()
    workers = [int(c) for c in children if int(c) != engine_pid]
    assert len(workers) == 1, children
    return workers[0]


def test_one_worker_fewer_after_the_engine_worker_died_still_serves(server, tmp_path):
    """kill -9 of the engine's worker: its replacement takes the engine (and no connections), the older
    worker serves. SIGTTOU then stops the oldest worker: the engine's worker must take the connections."""
    s = server("--workers", "2").start()
    secret = s.secrets()["WEBHOOK_SECRET"]
    lock = tmp_path / "var" / "engine.lock"
    dead = int(lock.read_text())
    os.kill(dead, signal.SIGKILL)
    engine = wait_for(lambda: (pid := int(lock.read_text() or 0)) not in (0, dead) and _children(s.proc.pid)[-1:] == [pid]
                      and len(_children(s.proc.pid)) == 2 and pid, timeout=20)
    os.kill(s.proc.pid, signal.SIGTTOU)  # gunicorn stops the oldest worker: the one that served
    wait_for(lambda: _children(s.proc.pid) == [engine], timeout=20)
    assert requests.get(s.url + "/healthz", timeout=5).status_code == 200
    r = requests.post(s.url + "/webhook", json=_alert(secret, strategy="ttou"), timeout=10)
    assert r.status_code == 200, r.text
    os.kill(s.proc.pid, signal.SIGTTIN)  # one more again: it serves, and the engine's worker stops taking any
    wait_for(lambda: s.output().count("this worker accepts webhooks and stands by") == 2, timeout=20)
    time.sleep(3.5)  # the engine's worker looks every 0.5 s (after its select, up to 1 s)
    sessions = [requests.Session() for _ in range(4)]
    for i in range(8):
        assert sessions[i % 4].get(s.url + "/healthz", timeout=5).status_code == 200
    assert _client_connections(_other_worker(s.proc.pid, engine), s.port) == 4  # each session's, none with the engine
    for session in sessions:
        session.close()


def _children(master: int) -> list[int]:
    """The master's workers, oldest first."""
    return [int(c) for c in open(f"/proc/{master}/task/{master}/children").read().split()]


def test_importing_wsgi_starts_nothing(tmp_path):
    env = {**os.environ, "DATA_DIR": str(tmp_path / "var"), "WEBHOOK_SECRET": "x" * 12, "API_TOKEN": "t" * 20,
           "DASHBOARD_PASSWORD": "p" * 10}
    code = ("import threading, wsgi; assert threading.active_count() == 1, threading.enumerate(); "
            "print(type(wsgi.app).__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": os.getcwd()},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Flask"
    assert not (tmp_path / "var").exists()


def test_hot_reload_under_gunicorn_while_alerts_and_ticks_flow(server, tmp_path):
    import threading
    from plugin_files import strategy_source, write
    s = server().start()
    secret = s.secrets()["WEBHOOK_SECRET"]
    folder = tmp_path / "plugins" / "strategies"
    body = '''
@hookimpl
def strategy_on_alert(ctx, alert):
    leg = alert.legs[0]
    return Intent(leg.exchange, leg.symbol, leg.side, QTY, leg.order_type, leg.product, leg.price,
                  action=alert.execution_type)
'''
    stop = threading.Event()
    flow_errors = []

    def flow():  # ticks and another strategy's alerts keep coming during every change
        n = 0
        while not stop.is_set():
            n += 1
            try:
                s.api("/api/paper/ticks", "POST", json=[{"exchange": "NFO", "symbol": "FLOW", "ltp": 100 + n % 7}])
                r = s.webhook(_alert(secret, strategy=f"flow{n}", symbol="FLOW"))
                if r.status_code != 200:
                    flow_errors.append(r.text)
            except Exception as e:  # noqa: BLE001 - reported below
                flow_errors.append(repr(e))
            time.sleep(0.05)
    t = threading.Thread(target=flow)
    t.start()

    def strategy(**expected):
        def check():
            rec = {x["name"]: x for x in s.api("/api/strategies").json()["items"]}.get("hot")
            return rec if rec and all(rec[k] == v for k, v in expected.items()) else None
        return wait_for(check, timeout=2.0)

    def order_version(i):
        r = s.webhook(_alert(secret, strategy="hot", symbol=f"HOT{i}", alert_id=f"hot-{i}"))
        assert r.status_code == 200, r.text
        return r.json()["orders"][0]["strategy_version"], r.json()["orders"][0]["qty"]

    try:
        write(folder, "hot", strategy_source("hot", "1.0", "QTY = 11\n" + body))
        strategy(version="1.0", status="running", generation=1, error=None)
        assert order_version(1) == ("1.0", 11)
        write(folder, "hot", strategy_source("hot", "2.0", "QTY = 22\n" + body), atomic=True)
        strategy(version="2.0", status="running", generation=2)
        assert order_version(2) == ("2.0", 22)
        write(folder, "hot", strategy_source("hot", "3.0", "QTY = 33\n" + body) + "\ndef broken(:\n", atomic=True)
        rec = wait_for(lambda: (x := {y["name"]: y for y in s.api("/api/strategies").json()["items"]}["hot"])["error"]
                       and x, timeout=2.0)
        assert "SyntaxError" in rec["error"] and rec["version"] == "2.0" and rec["status"] == "running"
        assert order_version(3) == ("2.0", 22)
        (folder / "hot.py").unlink()
        wait_for(lambda: "hot" not in {x["name"] for x in s.api("/api/strategies").json()["items"]}, timeout=2.0)
        assert order_version(4) == (None, 75)  # no plugin: the built-in passthrough, legs as given
    finally:
        stop.set()
        t.join()
    assert flow_errors == []


def test_a_breach_survives_kill_9_entries_refused_exits_allowed(server):
    env = {"RISK_BASE_MAX_LOSS": "-1000", "RISK_STATUS_UPDATE_MIN": "0", "SQUARE_OFF_TIME": "off"}
    s = server(env=env).start()
    secret = s.secrets()["WEBHOOK_SECRET"]
    tick = lambda sym, ltp: s.api("/api/paper/ticks", "POST", json=[{"exchange": "NFO", "symbol": sym, "ltp": ltp}])  # noqa: E731
    assert tick("LOSER", 100).status_code == 200
    assert tick("KEEPER", 50).status_code == 200
    assert s.webhook(_alert(secret, strategy="a", symbol="LOSER", price="100", qty="100")).status_code == 200
    wait_for(lambda: s.api("/api/positions").json()["items"])
    tick("LOSER", 89)  # -1100
    wait_for(lambda: s.api("/api/risk").json()["breached"], timeout=5)
    wait_for(lambda: all(p["net_qty"] == 0 for p in s.api("/api/positions").json()["items"]), timeout=5)
    assert s.webhook(_alert(secret, strategy="b", symbol="KEEPER", price="50")).status_code == 423
    s.kill9()
    s2 = server(env=env).start()
    risk = s2.api("/api/risk").json()
    assert risk["state"] == "halted" and risk["breached"] is True
    r = s2.webhook(_alert(secret, strategy="b", symbol="KEEPER", price="50", alert_id="after-restart"))
    assert r.status_code == 423, r.text
    r = s2.webhook(_alert(secret, strategy="a", symbol="LOSER", execution="EXIT", direction="SELL"))
    assert r.status_code == 200, r.text  # exits are allowed (nothing left to exit here)


@pytest.fixture
def noren_sim(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "host", "sim", "--port", str(port), "--ws-port", str(free_port()),
                             "--session", "FA12345:e2e-token"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    urls = {}
    for line in proc.stdout:
        if "=" in line and line.strip().startswith("SHOONYA_"):
            key, _, rest = line.strip().partition("=")
            urls[key] = rest.split()[0]
        if "SHOONYA_SYMBOLS_URL" in urls:  # the last line (before it, a host would ask the real broker for its files)
            break
    control = f"http://127.0.0.1:{port}/sim/control"
    log = tmp_path / "noren-sim.log"  # the rest of its output, read as it comes: a full pipe would stall it

    def copy() -> None:
        with open(log, "a") as out:
            for line in proc.stdout:
                out.write(line)
                out.flush()
    drain = threading.Thread(target=copy, daemon=True)
    drain.start()
    yield urls, lambda **c: requests.post(control, json=c, timeout=5).json()
    os.killpg(proc.pid, 15)
    proc.wait(10)
    drain.join(5)


def test_kill_9_between_place_and_ack_adopts_the_order_after_restart(server, noren_sim):
    urls, control = noren_sim
    env = {"BROKER": "shoonya", "SHOONYA_AUTH": "token", "USER_ID": "FA12345", "SHOONYA_ACCESS_TOKEN": "e2e-token",
           "SQUARE_OFF_TIME": "off", "ALLOW_AMO": "true", **urls}  # any hour: after-market orders when closed
    s = server(env=env).start()
    secret = s.secrets()["WEBHOOK_SECRET"]
    control(action="tick", exchange="NFO", symbol="NIFTY28APR26C24500", ltp="42.5")
    control(action="delay_next", seconds=8)  # the broker places the order, but its answer is late (after our 5 s)
    control(action="stall_feed", on=True)     # and no order update comes over the feed either
    r = s.webhook(_alert(secret, strategy="crash", alert_id="crash-1"))
    assert r.status_code == 200, r.text
    oid = r.json()["orders"][0]["id"]
    # SUBMITTED is marked (durably) before the request leaves, so wait for the broker's book itself: a kill
    # before the request arrives is another case (never placed: LOST after the grace, never resent)
    try:
        wait_for(lambda: [o["remarks"] for o in _broker_book(urls)] == [oid], timeout=4.5)
    except AssertionError:
        raise AssertionError(f"{s.api('/api/orders').json()['items']} {s.api('/api/events').json()['items'][:5]}")
    assert s.api("/api/orders").json()["items"][0]["status"] == "SUBMITTED"  # its answer is still 8 s away
    s.kill9()  # between the broker's placement and its acknowledgement
    control(action="stall_feed", on=False)
    s2 = server(env=env).start()
    order = wait_for(lambda: (o := s2.api("/api/orders").json()["items"][0])["status"] == "FILLED" and o, timeout=20)
    assert order["id"] == oid and order["broker_order_id"]
    time.sleep(1.5)  # give a wrong resend time to happen
    assert [o["remarks"] for o in _broker_book(urls)] == [oid]  # adopted, not resent


def _broker_book(urls: dict) -> list[dict]:
    """The simulator's order book, asked directly (its "no data" answer is an empty book)."""
    book = requests.post(urls["SHOONYA_API_URL"] + "OrderBook", data='jData={"uid":"FA12345"}',
                         headers={"Authorization": "Bearer e2e-token"}, timeout=5).json()
    return book if isinstance(book, list) else []


def test_plain_gunicorn_with_our_config_runs_the_engine(tmp_path):
    """`gunicorn -c python:host.gunicorn_conf wsgi:app`, for those who run gunicorn themselves."""
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(tmp_path / "var"), "PLUGINS_DIR": str(tmp_path / "plugins"),
           "WEBHOOK_SECRET": "plain-gunicorn-secret", "API_TOKEN": "plain-gunicorn-api-token",
           "DASHBOARD_PASSWORD": "plain-gunicorn-pw", "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:host.gunicorn_conf", "--bind",
                             f"127.0.0.1:{port}", "wsgi:app"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: _healthy(port), timeout=20)
        body = _alert("plain-gunicorn-secret", strategy="plain")
        assert requests.post(f"http://127.0.0.1:{port}/webhook", json=body, timeout=5).status_code == 200
    finally:
        os.killpg(proc.pid, 15)
        assert proc.wait(30) == 0


def _healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_kill_9_while_the_orders_of_an_alert_wait_for_their_slots_sends_the_rest_once_after_restart(server, noren_sim):
    """Found from outside: the four orders of one alert were marked SUBMITTED together, then sent 8 a second.
    A kill -9 after the first left the other three marked sent and never sent: LOST a minute later, while an EXIT
    was refused as already covered. Now the unsent ones are still NEW: the restart sends each, once."""
    urls, control = noren_sim
    env = {"BROKER": "shoonya", "SHOONYA_AUTH": "token", "USER_ID": "FA12345", "SHOONYA_ACCESS_TOKEN": "e2e-token",
           "SQUARE_OFF_TIME": "off", "ALLOW_AMO": "true", **urls}
    s = server(env=env).start()
    secret = s.secrets()["WEBHOOK_SECRET"]
    body = _alert(secret, strategy="legs", alert_id="legs-1")
    body["legs"] = [{"tradingsymbol": sym, "direction": "BUY", "qty": qty, "order_type": "LMT", "price": price,
                     "product_type": "M"} for sym, qty, price in (("NIFTY28APR26C24500", 75, "42.5"),
                                                                  ("NIFTY28APR26P24500", 75, "40"),
                                                                  ("NIFTY28APR26F", 75, "24500"),
                                                                  ("BANKNIFTY28APR26P50000", 35, "300"))]
    r = s.webhook(body)
    assert r.status_code == 200, r.text
    oids = [o["id"] for o in r.json()["orders"]]
    assert len(oids) == 4
    wait_for(lambda: _broker_book(urls), timeout=4, interval=0.005)  # the first is at the broker...
    s.kill9()  # ...and the next ones wait for their slots (8 a second)
    sent_before = {o["remarks"] for o in _broker_book(urls)}
    assert len(sent_before) < 4, "all four were sent before the kill: the test did not hit the gap"
    s2 = server(env=env).start()
    try:
        wait_for(lambda: sorted(o["remarks"] for o in _broker_book(urls)) == sorted(oids), timeout=15)
    except AssertionError:
        raise AssertionError(f"broker book {[o['remarks'] for o in _broker_book(urls)]}, ours {oids}\n{s2.explain()}")
    time.sleep(1.5)  # give a wrong resend time to happen
    assert sorted(o["remarks"] for o in _broker_book(urls)) == sorted(oids)  # each once
    statuses = {o["id"]: o["status"] for o in s2.api("/api/orders").json()["items"]}
    assert all(statuses[oid] in ("OPEN", "PARTIAL", "FILLED") for oid in oids), statuses


def test_kill_9_while_a_market_order_waits_for_its_quote_sends_it_once_after_restart(server, noren_sim):
    """Found from outside: the SUBMITTED mark came before GetQuotes, so a kill -9 in the 12-120 ms before PlaceOrder
    left an order marked sent that had never left (LOST, never sent). Now it is NEW until its price is in hand."""
    urls, control = noren_sim
    env = {"BROKER": "shoonya", "SHOONYA_AUTH": "token", "USER_ID": "FA12345", "SHOONYA_ACCESS_TOKEN": "e2e-token",
           "SQUARE_OFF_TIME": "off", "ALLOW_AMO": "true", **urls}
    s = server(env=env).start()
    secret = s.secrets()["WEBHOOK_SECRET"]
    control(action="stall_feed", on=True)  # the broker has a price, the host's feed none: GetQuotes is asked
    control(action="tick", exchange="NFO", symbol="NIFTY28APR26C24500", ltp="42.5")
    control(action="slow_next", seconds=2, route="GetQuotes")
    r = s.webhook(_alert(secret, strategy="quote", alert_id="quote-1", order_type="MKT", price="0"))
    assert r.status_code == 200, r.text
    [oid] = [o["id"] for o in r.json()["orders"]]
    time.sleep(0.5)  # the host waits for GetQuotes
    s.kill9()
    assert _broker_book(urls) == []
    s2 = server(env=env).start()
    try:
        wait_for(lambda: [o["remarks"] for o in _broker_book(urls)] == [oid], timeout=15)
    except AssertionError:
        raise AssertionError(f"broker book {_broker_book(urls)}\n{s2.explain()}")
    time.sleep(1.5)  # give a wrong resend time to happen
    assert [o["remarks"] for o in _broker_book(urls)] == [oid]


def test_kill_9_before_an_exit_left_then_a_close_in_the_app_the_restart_sends_no_short(server, noren_sim):
    """An EXIT still NEW at a kill -9 (its quote was slow), and the trader closes the position in the broker's app
    before the host is back: the restart sends orders late, so the exit is capped at the broker's net (now 0) and
    rejected, never sent: the account is not taken short."""
    urls, control = noren_sim
    env = {"BROKER": "shoonya", "SHOONYA_AUTH": "token", "USER_ID": "FA12345", "SHOONYA_ACCESS_TOKEN": "e2e-token",
           "SQUARE_OFF_TIME": "off", "ALLOW_AMO": "true", **urls}
    s = server(env=env).start()
    secret = s.secrets()["WEBHOOK_SECRET"]
    control(action="tick", exchange="NFO", symbol="NIFTY28APR26C24500", ltp="42.5")
    r = s.webhook(_alert(secret, strategy="late", alert_id="late-in", price="43"))
    assert r.status_code == 200, r.text
    wait_for(lambda: s.api("/api/positions").json()["items"], timeout=10)
    control(action="stall_feed", on=True)  # no fresh feed price: the exit asks GetQuotes, which is slow
    control(action="slow_next", seconds=2, route="GetQuotes")
    r = s.webhook(_alert(secret, strategy="late", alert_id="late-out", execution="EXIT", direction="SELL",
                         order_type="MKT", price="0"))
    assert r.status_code == 200, r.text
    [oid] = [o["id"] for o in r.json()["orders"]]
    time.sleep(0.5)
    s.kill9()
    control(action="manual_order", exchange="NFO", symbol="NIFTY28APR26C24500", side="S", qty=75)
    s2 = server(env=env).start()
    order = wait_for(lambda: (o := s2.api(f"/api/orders/{oid}").json()).get("status") == "REJECTED" and o, timeout=15)
    assert "broker's net" in order["reason"], order
    time.sleep(1.5)
    assert oid not in [o["remarks"] for o in _broker_book(urls)]
    net = [p for p in requests.post(urls["SHOONYA_API_URL"] + "PositionBook", data='jData={"uid":"FA12345"}',
                                    headers={"Authorization": "Bearer e2e-token"}, timeout=5).json()
           if p.get("tsym") == "NIFTY28APR26C24500"]
    assert [int(p["netqty"]) for p in net] == [0], net
