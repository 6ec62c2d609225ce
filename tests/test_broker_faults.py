"""What the real broker does that a kind simulator hides: dropped replies, stale updates, cover and
bracket rows, SEBI's per-segment order rate and algo id. The real NorenRestApiPy talks to the Noren
simulator through a small HTTP proxy on loopback that can drop a reply or add rows to one."""
from __future__ import annotations

import json
import logging
import threading
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import unquote_plus

import pytest
import requests

from host.brokers.base import UnknownOutcome, Unreachable
from host.models import BrokerOrder, OrderRequest, OrderStatus, OrderType, Product, Side
from host.storage import Storage

from conftest import SYMBOL, Host, alert, make_settings, open_order, wait_for

UID = "FA12345"


class NorenProxy:
    """Forwards Noren REST calls to the simulator; can drop the reply after forwarding, or edit it."""

    def __init__(self, sim: Any):
        self.upstream = f"http://127.0.0.1:{sim.port}"
        self.drop_next: dict[str, int] = {}  # route -> replies to drop after the simulator has the request
        self.rewrite: dict[str, Callable[[Any], Any]] = {}  # route -> edits the JSON reply
        self.seen: list[tuple[float, str, dict]] = []  # (monotonic arrival, route, jData)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                route = self.path.rstrip("/").split("/")[-1]
                proxy._record(route, body)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                reply = requests.post(proxy.upstream + self.path, data=body, headers=headers, timeout=5)
                if proxy._take_drop(route):
                    self.close_connection = True  # the request was delivered; its answer never comes back
                    return
                content = reply.content
                if route in proxy.rewrite:
                    content = json.dumps(proxy.rewrite[route](reply.json())).encode()
                self.send_response(reply.status_code)
                self.send_header("Content-Type", reply.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.api_url = f"http://127.0.0.1:{self.server.server_address[1]}/NorenWClientAPI/"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="noren-proxy", daemon=True)

    def _record(self, route: str, body: bytes) -> None:
        form = dict(part.split("=", 1) for part in body.decode().split("&") if "=" in part)
        try:
            data = json.loads(unquote_plus(form.get("jData", "{}")))
        except ValueError:
            data = {}
        with self._lock:
            self.seen.append((time.monotonic(), route, data))

    def _take_drop(self, route: str) -> bool:
        with self._lock:
            if self.drop_next.get(route, 0) > 0:
                self.drop_next[route] -= 1
                return True
        return False

    def sent(self, route: str) -> list[tuple[float, dict]]:
        with self._lock:
            return [(at, data) for at, r, data in self.seen if r == route]

    def start(self) -> "NorenProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def proxy(sim):
    p = NorenProxy(sim).start()
    yield p
    p.stop()


def adapter(sim: Any, api_url: str, **kw: Any):
    """A logged-in ShoonyaBroker on the real library, pointed at api_url."""
    from host.brokers.shoonya import ShoonyaBroker
    from host.instruments import Instruments
    broker = ShoonyaBroker(api_url, sim.ws_url, Instruments.sample(), Decimal("2"), timeout_s=2, **kw)
    broker.use_token(sim.sim.new_session(UID), UID)
    return broker


def request(remarks: str, exchange: str = "NFO", symbol: str = SYMBOL, qty: int = 75, price: str = "43") -> OrderRequest:
    return OrderRequest(exchange, symbol, Side.BUY, qty, OrderType.LMT, Product.NRML, Decimal(price), remarks=remarks)


def live_host_via(sim: Any, proxy: NorenProxy, data_dir: Any) -> Host:
    settings = make_settings(data_dir, BROKER="shoonya", SHOONYA_AUTH="oauth", USER_ID=UID,
                             OAUTH_CLIENT_ID=sim.sim.client_id, OAUTH_SECRET=sim.sim.client_secret,
                             SHOONYA_API_URL=proxy.api_url, SHOONYA_WS_URL=sim.ws_url,
                             SHOONYA_OAUTH_URL=sim.oauth_url, SHOONYA_SYMBOLS_URL=f"http://127.0.0.1:{sim.port}/")
    return Host(settings, broker_timeout_s=2.0, unknown_grace_s=5.0).start()


# ---- #5: a reply lost after the request was written is an unknown outcome, never a rejection ----

def test_a_connection_dropped_after_placeorder_is_an_unknown_outcome(sim, proxy):
    broker = adapter(sim, proxy.api_url)
    proxy.drop_next["PlaceOrder"] = 1
    with pytest.raises(UnknownOutcome):
        broker.place(request("drop-1"))
    assert [o.remarks for o in sim.sim.engine.order_book()] == ["drop-1"]  # the broker did book it


def test_a_refused_connection_is_still_unreachable(sim):
    from serverproc import free_port
    broker = adapter(sim, f"http://127.0.0.1:{free_port()}/NorenWClientAPI/")
    with pytest.raises(Unreachable):
        broker.place(request("refused-1"))


def test_the_gateway_classifies_what_an_adapter_lets_through():
    from host.orders import BrokerGateway
    from serverproc import free_port

    class Raw:
        name = "raw"

    def reset() -> None:
        raise ConnectionResetError(104, "Connection reset by peer")
    gateway = BrokerGateway(Raw(), timeout_s=3)  # type: ignore[arg-type]
    try:
        with pytest.raises(Unreachable):
            gateway.call("place_order", lambda: requests.post(f"http://127.0.0.1:{free_port()}/", timeout=1))
        with pytest.raises(UnknownOutcome):
            gateway.call("place_order", reset)
    finally:
        gateway.shutdown()


def test_slow_reads_of_the_books_never_keep_an_order_waiting_in_the_gateways_queue():
    """A slow broker: four reads of the books hang, each past its timeout. A PlaceOrder queued behind them waited
    its whole timeout without being sent, and was then UNKNOWN (and sent later, when a thread came free). Calls
    that place, change or cancel orders have threads of their own."""
    from host.orders import BrokerGateway

    class Slow:
        name = "slow"

    release = threading.Event()
    gateway = BrokerGateway(Slow(), timeout_s=0.5)  # type: ignore[arg-type]
    hung: list[threading.Thread] = []
    try:
        hung += [threading.Thread(target=lambda: pytest.raises(UnknownOutcome, gateway.call, "order_book", release.wait))
                for _ in range(4)]
        for t in hung:
            t.start()
        time.sleep(0.1)  # the four reads hold every thread of the reads
        started = time.monotonic()
        for what in ("place_order", "prepare_order", "modify_order", "cancel_order"):
            assert gateway.call(what, lambda: "B1") == "B1"
        assert time.monotonic() - started < 0.4
        with pytest.raises(Unreachable, match="was not sent"):  # a fifth read waits behind the four: said in time
            gateway.call("positions", lambda: [])
        hung += [threading.Thread(target=lambda: pytest.raises(UnknownOutcome, gateway.call, "modify_order",
                                                               release.wait)) for _ in range(4)]
        for t in hung[4:]:
            t.start()
        time.sleep(0.1)  # four ModifyOrders hang now: a PlaceOrder behind them is not sent, then or later
        sent: list[str] = []
        with pytest.raises(Unreachable, match="was not sent"):
            gateway.call("place_order", lambda: sent.append("B2"))
        release.set()
        time.sleep(0.3)
        assert sent == []
    finally:
        release.set()
        for t in hung:
            t.join(2)
        gateway.shutdown()


def test_a_dropped_placeorder_reply_leaves_the_order_unknown_until_the_book_shows_it_filled(sim, proxy, tmp_path):
    from test_shoonya import login
    h = live_host_via(sim, proxy, tmp_path / "var")
    try:
        login(h, sim)
        proxy.drop_next["PlaceOrder"] = 1
        oid = h.post(alert(direction="BUY", qty=75, price="40")).get_json()["orders"][0]["id"]  # rests at first
        status = lambda: next(x for x in h.orders() if x["id"] == oid)["status"]  # noqa: E731
        wait_for(lambda: not proxy.drop_next["PlaceOrder"] and status() not in ("NEW", "SUBMITTED"), timeout=5)
        time.sleep(0.3)  # the sender has recorded what the dropped reply meant
        sim.sim.tick("NFO", SYMBOL, Decimal("39.95"))  # then it fills at the broker
        o = wait_for(lambda: (o := next(x for x in h.orders() if x["id"] == oid))["status"] == "FILLED" and o,
                     timeout=8)
        placed = [b for b in sim.sim.engine.order_book() if b.remarks == oid]
        assert len(placed) == 1 and o["broker_order_id"] == placed[0].broker_order_id
        assert len(proxy.sent("PlaceOrder")) == 1  # found in the book, never resent
        history = h.runtime.storage.rows("select status from order_history where order_id = ?", (oid,))
        assert "REJECTED" not in [r["status"] for r in history]
        assert h.net(symbol=SYMBOL) == 75
    finally:
        h.stop()


# ---- #10: an older update never moves filled_qty or the status backwards ----

@pytest.fixture
def storage(tmp_path):
    s = Storage(tmp_path / "h.sqlite")
    yield s
    s.close()


def test_an_older_partial_update_never_lowers_filled_qty(storage):
    from host.watcher import Watcher
    oid = open_order(storage)
    w = Watcher(storage)
    w.apply([BrokerOrder("B1", oid, OrderStatus.PARTIAL, 100, Decimal("42.6"))])
    w.apply([BrokerOrder("B1", oid, OrderStatus.PARTIAL, 50, Decimal("42.5"))])  # older, arrives late
    o = storage.one("select * from orders where id = ?", (oid,))
    assert (o["status"], o["filled_qty"], o["avg_price"]) == ("PARTIAL", 100, "42.6")


def test_a_cancel_carrying_an_older_fill_count_keeps_the_larger_one(storage):
    from host.watcher import Watcher
    oid = open_order(storage)
    w = Watcher(storage)
    w.apply([BrokerOrder("B1", oid, OrderStatus.PARTIAL, 100, Decimal("42.6"))])
    w.apply([BrokerOrder("B1", oid, OrderStatus.CANCELLED, 50, Decimal("42.5"), "cancelled at the broker")])
    o = storage.one("select * from orders where id = ?", (oid,))
    assert (o["status"], o["filled_qty"], o["avg_price"]) == ("CANCELLED", 100, "42.6")
    w.apply([BrokerOrder("B1", oid, OrderStatus.OPEN, 0, None)])
    assert storage.one("select status from orders where id = ?", (oid,))["status"] == "CANCELLED"


# ---- #12: cover and bracket rows are shown and counted, never fatal ----

def _with_rows(extra: list[dict]) -> Callable[[Any], Any]:
    def edit(reply: Any) -> Any:
        return (reply if isinstance(reply, list) else []) + extra
    return edit


COVER = {"stat": "Ok", "exch": "NSE", "tsym": "RELIANCE-EQ", "prd": "H", "netqty": "10", "netavgprc": "2900.00",
         "rpnl": "0.00", "norenordno": "26050100009001", "status": "OPEN", "remarks": "", "fillshares": "0",
         "trantype": "B", "qty": "10"}
BRACKET = {**COVER, "tsym": "ACC-EQ", "prd": "B", "netqty": "-5", "norenordno": "26050100009002", "status": "COMPLETE",
           "fillshares": "5", "avgprc": "2100.00", "flid": "9002", "flqty": "5", "flprc": "2100.00"}


def test_cover_and_bracket_rows_are_skipped_and_counted_not_fatal(sim, proxy, caplog):
    broker = adapter(sim, proxy.api_url)
    broker.place(request("ours-1"))  # fills at 42.5: one position of ours
    for route in ("PositionBook", "OrderBook", "TradeBook"):
        proxy.rewrite[route] = _with_rows([COVER, BRACKET])
    with caplog.at_level(logging.WARNING, logger="host.brokers.shoonya"):
        for _ in range(2):  # two polls: the warning is said once per symbol, not every poll
            positions = broker.positions()
            book = broker.order_book()
    assert [(p.exchange, p.symbol, p.product, p.net_qty) for p in positions] == [("NFO", SYMBOL, Product.NRML, 75)]
    assert {o.broker_order_id for o in book} >= {"26050100009001", "26050100009002"}  # shown in the book
    assert sorted((r["tsym"], r["prd"]) for r in broker.unknown_products["positions"]) == [("ACC-EQ", "B"), ("RELIANCE-EQ", "H")]
    assert len(broker.unknown_products["orders"]) == 2 and len(broker.unknown_products["trades"]) == 2
    warnings = [r.getMessage() for r in caplog.records if "product" in r.getMessage()]
    assert len([m for m in warnings if "RELIANCE-EQ" in m]) == 1 and len([m for m in warnings if "ACC-EQ" in m]) == 1


# ---- SEBI retail-algo rules ----

def _max_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    return max((sum(1 for t in times if start <= t < start + 1.0) for start in times), default=0)


def test_orders_stay_under_ten_per_second_in_each_segment_and_segments_do_not_wait_for_each_other(sim, proxy):
    sim.sim.engine.set_ltp("NSE", "ACC-EQ", Decimal("2100"))
    broker = adapter(sim, proxy.api_url)
    nfo = [threading.Thread(target=broker.place, args=(request(f"nfo-{i}", price="40"),)) for i in range(12)]
    for t in nfo:
        t.start()
    time.sleep(0.05)
    started = time.monotonic()
    broker.place(request("nse-0", "NSE", "ACC-EQ", 1, "2000"))
    nse_took = time.monotonic() - started
    for t in nfo:
        t.join(10)
    nfo_times = [at for at, data in proxy.sent("PlaceOrder") if data.get("exch") == "NFO"]
    assert len(nfo_times) == 12 and _max_in_one_second(nfo_times) < 10
    assert nse_took < 0.6  # another segment has its own budget (one budget for all would wait over 1 s)


def test_algo_id_goes_with_every_order(sim, proxy):
    broker = adapter(sim, proxy.api_url, algo_id="SIMALGO1")
    broker.place(request("algo-1"))
    broker.place(request("algo-2", price="40"))
    assert [data.get("algo_id") for _, data in proxy.sent("PlaceOrder")] == ["SIMALGO1", "SIMALGO1"]


def test_algo_id_is_a_setting_and_check_shows_the_static_ip_rule(tmp_path, capsys, monkeypatch):
    from host.cli import main
    from host.config import load
    for k in ("BROKER", "PORT", "DATA_DIR", "ALGO_ID"):
        monkeypatch.delenv(k, raising=False)
    base = f"DATA_DIR={tmp_path}\nWEBHOOK_SECRET=wwwwwwwwwwww\nAPI_TOKEN={'t' * 20}\nDASHBOARD_PASSWORD=pppppppp\n"
    environ = {"DATA_DIR": str(tmp_path), "WEBHOOK_SECRET": "w" * 12, "API_TOKEN": "t" * 20, "DASHBOARD_PASSWORD": "p" * 8}
    assert load(None, environ=environ).ALGO_ID == ""
    assert load(None, environ={**environ, "ALGO_ID": "GENERIC42"}).ALGO_ID == "GENERIC42"
    env = tmp_path / "live.env"
    env.write_text(base + "ALGO_ID=GENERIC42\n")
    env.chmod(0o600)
    assert main(["check", "--env", str(env)]) == 0
    out = capsys.readouterr().out
    assert "static IP" in out and "ALGO_ID=GENERIC42" in out
    env.write_text(base)
    assert main(["check", "--env", str(env)]) == 0
    out = capsys.readouterr().out
    assert "ALGO_ID is empty: no algo id is sent" in out
