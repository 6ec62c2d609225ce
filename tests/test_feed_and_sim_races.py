"""Races found by breaking 16d0bba (kept SimOrder views) and 3404cc1 (the feed's socket shutdown) from outside."""
from __future__ import annotations

import threading
import time
from decimal import Decimal
from types import SimpleNamespace

from host.brokers.shoonya_feed import ShoonyaFeed
from host.models import OrderRequest, OrderStatus, OrderType, Product, Side
from host.sim import matching
from host.sim.matching import MatchingEngine, SimOrder

from feed_network import BrokerNetwork


class _PausingFills(list):
    """The order's fill list: after the engine appends a fill (its lock held, the order half-updated), let a
    reader run, as any thread switch can."""

    def __init__(self, items, torn: threading.Event, reader_built: threading.Event):
        super().__init__(items)
        self.torn, self.reader_built = torn, reader_built

    def append(self, item) -> None:
        super().append(item)
        self.torn.set()
        assert self.reader_built.wait(5)


def test_a_view_read_outside_the_lock_never_leaves_a_stale_view_cached(monkeypatch):
    """The Noren simulator reads SimOrder.view() outside the engine's lock (noren_order for OrderBook,
    SingleOrdHist, TradeBook and every `om` message: engine.get(...) then o.view()). Before 16d0bba such a read
    could at worst return one torn dict; now its write of (_view, _view_of) can interleave with the
    lock-holder's, and the cache keeps a view of the old state under the key of the new one - for good,
    since a filled order's key never changes again. The thread switches are pinned here; the GIL makes the
    same ones between any two bytecodes."""
    engine = MatchingEngine()
    engine.set_ltp("NFO", "X", Decimal("100"))
    oid = engine.place(OrderRequest("NFO", "X", Side.BUY, 5, OrderType.LMT, Product.MIS, Decimal("99"), None,
                                    remarks="buy"))
    o = engine.get(oid)
    assert o.view().status is OrderStatus.OPEN

    torn, reader_built, go_reader = threading.Event(), threading.Event(), threading.Event()
    o.fills = _PausingFills(o.fills, torn, reader_built)
    main = threading.get_ident()
    real_order = matching.BrokerOrder

    def order(*a, **k):
        made = real_order(*a, **k)
        if threading.get_ident() != main:  # the reader has made its view: it is about to store it
            reader_built.set()
            assert go_reader.wait(5)
        return made
    monkeypatch.setattr(matching, "BrokerOrder", order)

    reader = threading.Thread(target=lambda: (torn.wait(5), o.view()))
    state = {"stored": False}

    def setattr_(self, name, value):
        object.__setattr__(self, name, value)
        if name == "_view" and threading.get_ident() == main and not state["stored"] and reader.is_alive():
            state["stored"] = True
            go_reader.set()      # the lock-holder stored its view; the reader stores its own now
            reader.join(5)
    monkeypatch.setattr(SimOrder, "__setattr__", setattr_)

    reader.start()
    engine.set_ltp("NFO", "X", Decimal("98"))  # the order fills (lock held; the reader reads meanwhile)
    reader.join(5)
    monkeypatch.undo()

    assert o.status is OrderStatus.FILLED and o.filled_qty == 5
    view = next(v for v in engine.order_book() if v.broker_order_id == oid)
    # the broker's own book, read under the lock, long after: it must show the fill
    assert (view.status, view.filled_qty, view.avg_price) == (OrderStatus.FILLED, 5, Decimal("98")), view


def _library_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "ws_run_forever" in t.name and t.is_alive()}


def test_a_restart_while_the_broker_is_slow_to_accept_leaves_one_library_connection(sim, monkeypatch):
    """3404cc1 waits up to 2 s for a connecting library thread's socket, then ws.close() (a no-op while the
    TCP connect is in progress: websocket-client has no connect timeout) and a 3 s join; then a new socket is
    started anyway. start_websocket() replaces the library's stop event and WebSocketApp, so when the old
    connect finally completes its loop reads the NEW, unset event and runs on: two library threads. Its
    teardown also sets the library-wide __websocket_connected = False under the new, healthy connection (every
    subscribe() now blocks) and queues a 'closed' that makes the watchdog restart that healthy connection.
    Steps: connected feed; the broker drops the socket (drop_ws); the library's reconnect hangs in connect()
    (a SYN lost in a network blip: ~2 min of retries); 5 s later the watchdog restarts; the old connect then
    gets through."""
    from types import SimpleNamespace
    from conftest import SYMBOL, noren_login, wait_for
    from host.brokers.shoonya_feed import ShoonyaFeed

    before = _library_threads()
    api = noren_login(sim)
    broker = SimpleNamespace(api=api, session_expired=False,
                             instrument=lambda ex, sym: SimpleNamespace(token="43212") if sym == SYMBOL else None)
    want: set = set()
    feed = ShoonyaFeed(broker, wanted=lambda: set(want), on_ticks=lambda ticks: None, on_update=lambda u: None,
                       stall_s=600)
    net = BrokerNetwork(monkeypatch)
    feed.start()
    try:
        wait_for(lambda: feed.opens >= 1, timeout=5)
        net.hang_next = True
        sim.sim.ws_hooks[0]("drop")        # the broker drops the connection (as /sim/control drop_ws)
        assert net.hung.wait(5)
        wait_for(lambda: feed.restarts >= 1 and feed.opens >= 2, timeout=15)  # the watchdog's new connection
        net.release.set()                   # the old connect completes now
        time.sleep(1.0)
        threads = _library_threads() - before
        connected = feed.ws_api._NorenApi__websocket_connected  # the healthy connection's own copy
        restarts = feed.restarts
        want.add(("NFO", SYMBOL))           # a new position: its ticks (the stop-loss's) must be subscribed
        time.sleep(6.0)                     # the healthy connection must be left alone
        assert len(threads) == 1 and connected and feed.restarts == restarts and "NFO|43212" in feed.subscribed, (
            f"library threads {len(threads)}, library says connected {connected}, "
            f"restarts {restarts} -> {feed.restarts}, subscribed {feed.subscribed}")
    finally:
        net.release.set()
        feed.stop()


def test_a_stop_while_the_library_is_connecting_leaves_no_library_thread_behind(sim, monkeypatch):
    """stop() waits 2 s for a connecting thread's socket, then ws.close() (a no-op while connect() is in
    progress) and returns: the library's thread was left connecting, for as long as the connect hung (the
    library set no timeout: minutes for a lost SYN). The connect now has WS_TIMEOUT_S, and the thread ends
    with it, having seen its own stop event."""
    from host.brokers import shoonya_feed
    monkeypatch.setattr(shoonya_feed, "WS_TIMEOUT_S", 3.0)
    from types import SimpleNamespace
    from conftest import noren_login, wait_for
    from host.brokers.shoonya_feed import ShoonyaFeed

    before = _library_threads()
    api = noren_login(sim)
    feed = ShoonyaFeed(SimpleNamespace(api=api, session_expired=False, instrument=lambda ex, sym: None),
                       wanted=set, on_ticks=lambda ticks: None, on_update=lambda u: None, stall_s=600)
    net = BrokerNetwork(monkeypatch)
    net.honour_timeout = True  # a SYN nobody answers: the connect ends only with its timeout
    feed.start()
    try:
        wait_for(lambda: feed.opens >= 1, timeout=5)
        net.hang_next = True
        sim.sim.ws_hooks[0]("drop")  # the broker drops; the library's reconnect hangs in connect()
        assert net.hung.wait(5)
        started = time.monotonic()
        feed.stop()
        took = time.monotonic() - started
        assert took < 4.5, took       # stop()'s bound holds
        wait_for(lambda: not (_library_threads() - before), timeout=5)
    finally:
        net.release.set()


def test_a_subscription_that_fails_does_not_hold_the_feed_loop():
    """A send that fails at once (the connection dropped between the check and the send) returns at once."""
    feed = ShoonyaFeed(SimpleNamespace(api=None), wanted=lambda: set(), on_ticks=lambda ticks: None,
                       on_update=lambda u: None)
    feed.ws_api = SimpleNamespace(_NorenApi__websocket_connected=True)

    def dropped(api):
        raise ConnectionError("the broker feed is not connected")
    t0 = time.monotonic()
    assert feed._send(dropped) is False
    assert time.monotonic() - t0 < 0.5  # the feed thread goes on handling ticks and updates
