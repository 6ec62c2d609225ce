"""Shared fixtures: settings in a temp DATA_DIR, a running runtime, the Flask client, alert builders."""
from __future__ import annotations

import os
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from host.config import Settings, load
from host.runtime import Runtime
from host.web import create_app

SECRET = "test-webhook-secret"
TOKEN = "test-api-token-0123456789"
SYMBOL = "NIFTY28APR26C24500"


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    env = {"DATA_DIR": str(data_dir), "PLUGINS_DIR": str(data_dir.parent / "plugins"),
           "WEBHOOK_SECRET": SECRET, "API_TOKEN": TOKEN,
           "DASHBOARD_PASSWORD": "test-dashboard-pw", "SQUARE_OFF_TIME": "off",
           "DAILY_SUMMARY_TIME": "off",  # by the wall clock, a host started after 15:40 on a trading day sums up at once
           **{k: str(v) for k, v in overrides.items()}}
    return load(None, environ=env)


def alert(execution_type: str = "ENTRY", strategy: str = "s1", alert_id: Optional[str] = None, **leg: Any) -> dict:
    """A valid webhook body with one leg; leg fields override the defaults."""
    body_leg = {"tradingsymbol": SYMBOL, "direction": "SELL", "qty": 75, "order_type": "LMT",
                "price": "42.5", "product_type": "M"}
    body_leg.update(leg)
    body = {"secret_key": SECRET, "execution_type": execution_type, "strategy_name": strategy,
            "exchange": "NFO", "legs": [body_leg]}
    if alert_id is not None:
        body["alert_id"] = alert_id
    return body


def wait_for(check: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll until check() returns something truthy; fail with the last value otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last value {value!r})")
        time.sleep(interval)


class Host:
    """A runtime with its engine running, and a Flask test client on its app."""

    def __init__(self, settings: Settings, **runtime_kw: Any):
        self.settings = settings
        runtime_kw.setdefault("market_hours", False)  # tests run at any hour (tests/test_market_hours.py: True)
        self.runtime_kw = runtime_kw
        self.runtime = Runtime(settings, **runtime_kw)
        self.app = create_app(settings, runtime=self.runtime)
        self.client = self.app.test_client()

    def start(self) -> "Host":
        self.runtime.start_engine()
        return self

    def restart(self) -> "Host":
        """Stop and build a new runtime on the same DATA_DIR (a process restart)."""
        self.stop()
        self.runtime.storage.close()
        self.__init__(self.settings, **self.runtime_kw)
        return self.start()

    def stop(self) -> None:
        self.runtime.stop(timeout=5)

    @property
    def broker(self) -> Any:
        return self.runtime.broker

    def post(self, body: Any, **kw: Any) -> Any:
        return self.client.post("/webhook", json=body, **kw)

    def api(self, path: str, method: str = "GET", **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {TOKEN}", **kw.pop("headers", {})}
        return self.client.open(path, method=method, headers=headers, **kw)

    def orders(self, **filters: Any) -> list[dict]:
        return self.api("/api/orders", query_string=filters).get_json()["items"]

    def positions(self) -> list[dict]:
        return self.api("/api/positions").get_json()["items"]

    def position(self, strategy: str = "s1", symbol: str = SYMBOL) -> Optional[dict]:
        return next((p for p in self.positions() if p["strategy"] == strategy and p["symbol"] == symbol), None)

    def net(self, strategy: str = "s1", symbol: str = SYMBOL) -> int:
        p = self.position(strategy, symbol)
        return p["net_qty"] if p else 0

    def settle(self) -> None:
        """Wait until nothing is being sent and the engine has applied every broker update it was given."""
        def quiet() -> bool:
            return (self.runtime.sender.idle() and self.runtime.engine._events.empty()
                    and not self.orders(status="NEW") and not self.orders(status="SUBMITTED"))
        wait_for(lambda: quiet() and (time.sleep(0.02) or quiet()))

    def tick(self, ltp: Any, symbol: str = SYMBOL, exchange: str = "NFO") -> Any:
        r = self.api("/api/paper/ticks", "POST", json=[{"exchange": exchange, "symbol": symbol, "ltp": ltp}])
        assert r.status_code == 200, r.get_json()
        return r


@pytest.fixture(autouse=True)
def _environment_restored():
    """A test that runs the CLI in-process (`main(["run", ...])` sets STRATEGY_HOST_ENV, HOST, PORT for its
    gunicorn) must not leave its environment to the hosts later tests start."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "var"


@pytest.fixture
def host_factory(data_dir: Path):
    started: list[Host] = []

    def make(start: bool = True, **kw: Any) -> Host:
        runtime_kw = {k: kw.pop(k) for k in ("broker_timeout_s", "unknown_grace_s", "plugin_budget_s",
                                             "breaker_limit", "watch_plugins") if k in kw}
        h = Host(make_settings(data_dir, **kw), **runtime_kw)
        started.append(h)
        return h.start() if start else h

    yield make
    for h in started:
        h.stop()


@pytest.fixture
def host(host_factory) -> Host:
    return host_factory()


@pytest.fixture
def sim():
    """The Noren simulator on loopback (REST and WebSocket), with a price for SYMBOL."""
    from host.sim.runner import SimServer
    s = SimServer().start()
    s.sim.engine.set_ltp("NFO", SYMBOL, Decimal("42.5"))
    yield s
    s.stop()


def noren_login(sim, uid: str = "FA1"):
    """The real NorenRestApiPy library, logged in to the simulator with a new session."""
    from NorenRestApiPy.NorenApi import NorenApi
    token = sim.sim.new_session(uid)
    a = NorenApi(host=sim.api_url, websocket=sim.ws_url)
    a.injectOAuthHeader(token, uid, uid)
    a.set_credentials(token, uid, uid)
    return a


@pytest.fixture
def noren_api(sim):
    """The real NorenRestApiPy library, logged in to the `sim` simulator."""
    return noren_login(sim)


def D(v: Any) -> Decimal:
    return Decimal(str(v))


def open_order(storage: Any, qty: int = 150, side: str = "BUY", action: str = "ENTRY", broker_id: str = "B1") -> str:
    """A limit order of strategy s1 in SYMBOL, stored and acknowledged (OPEN, broker id `broker_id`): its id."""
    from host.models import ExecutionType, Intent, OrderStatus, OrderType, Product, Side
    from host.orders import insert_order, transition
    intent = Intent("NFO", SYMBOL, Side(side), qty, OrderType.LMT, Product.NRML, Decimal("43"),
                    action=ExecutionType(action))
    oid = storage.write(lambda db: insert_order(db, intent, "s1", None))
    storage.write(lambda db: transition(db, oid, OrderStatus.OPEN, None, broker_order_id=broker_id))
    return oid


def hold_sender(sender: Any) -> threading.Event:
    """Block the order sender until the returned event is set: the sends queued meanwhile go as one batch."""
    gate, running = threading.Event(), threading.Event()

    def blocker(_oid: str, _arg: Any) -> None:
        running.set()
        gate.wait(20)
    sender._queue.put((blocker, "hold", None))
    assert running.wait(5)
    return gate


def failing_sender_write(storage: Any, error: BaseException, times: int = 1) -> tuple[Callable[[], None], list]:
    """The order sender's next `times` plain (not durable) writes raise `error`: a full disk for a moment.
    Returns (restore, failures)."""
    real, failed = storage.write, []

    def write(fn: Any, durable: bool = False, on_commit: Any = None) -> Any:
        if threading.current_thread().name == "order-sender" and not durable and len(failed) < times:
            failed.append(error)
            raise error
        return real(fn, durable, on_commit)
    storage.write = write
    return (lambda: setattr(storage, "write", real)), failed
