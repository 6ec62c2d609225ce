"""The Shoonya WebSocket feed: started once, resubscribed on every open, callbacks only enqueue,
a stall watchdog, de-duplicated order updates, sparse updates completed from SingleOrdHist."""
from __future__ import annotations

import copy
import logging
import queue
import socket
import threading
import time
from typing import Any, Callable, Optional

import websocket

from ..models import BrokerOrder, FillReport, Tick
from .shoonya import _dec, _int, broker_order

log = logging.getLogger(__name__)
WS_TIMEOUT_S = 10.0  # connect, handshake and each read of the feed socket (the library sets no timeout)
REOPEN_FIRST_S, REOPEN_MAX_S = 5.0, 60.0  # a feed still down after a close is restarted after 5, 10, 20 ... 60 s
FIND_AGAIN_S = 60.0  # a wanted symbol the broker could not find is looked up again this often
SEND_WAIT_S = 2.0    # how long a subscription may wait for its connection (the library's own wait is endless)


class ShoonyaFeed:
    """Ticks and order updates from the broker's WebSocket, handed on from one worker thread."""

    def __init__(self, broker: Any, wanted: Callable[[], set[tuple[str, str]]],
                 on_ticks: Callable[[list[Tick]], None], on_update: Callable[[BrokerOrder], None],
                 stall_s: float = 30.0, market_open: Callable[[], bool] = lambda: True,
                 emit: Callable[[str, str, str], None] = lambda kind, message, severity: None,
                 on_open: Callable[[], None] = lambda: None):
        self.broker = broker
        self.ws_api: Any = None  # this connection's own copy of the library (see _start_websocket)
        self._generation = 0     # which connection's open/close/error events count: the newest one's only
        self.wanted, self.on_ticks, self.on_update = wanted, on_ticks, on_update
        self.stall_s, self.market_open, self.emit, self.on_open = stall_s, market_open, emit, on_open
        self._queue: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self._stop = threading.Event()
        self._socket_lock = threading.Lock()  # a socket is started, or the feed stopped, never both at once
        self._thread: Optional[threading.Thread] = None
        self.subscribed: set[str] = set()
        self._unfound: dict[tuple[str, str], float] = {}  # wanted symbols with no token: when to ask again
        self.opens = 0
        self.reconnects = 0
        self.last_frame = time.monotonic()
        self._seen: set[tuple] = set()
        self._reopen_by = 0.0  # after a close: the library must reconnect by then, or we restart the socket
        self._reopen_wait = REOPEN_FIRST_S  # doubles with each restart that does not bring the feed back
        self._up = False       # open since the last close: a close while down (a refused reconnect) says nothing new
        self.restarts = 0

    @property
    def api(self) -> Any:
        """The broker's REST client, as it stands now (a login replaces its token)."""
        return self.broker.api

    # the library's callbacks run on its WebSocket thread: they only enqueue
    def _cb_open(self) -> None:
        self._queue.put(("open", None))

    def _cb_tick(self, msg: dict) -> None:
        self._queue.put(("tick", msg))

    def _cb_order(self, msg: dict) -> None:
        self._queue.put(("om", msg))

    def _cb_closed(self) -> None:
        self._queue.put(("closed", None))

    def _cb_error(self, error: Any) -> None:
        self._queue.put(("error", error))

    def start(self) -> None:
        self._start_socket()
        self._thread = threading.Thread(target=self._run, name="shoonya-feed", daemon=True)
        self._thread.start()

    def _start_socket(self) -> None:
        """Start the library's socket, unless the feed is stopped: a restart that comes after the stop (its own
        close queues a 'closed' event) would start a reconnect loop that nothing ends."""
        with self._socket_lock:
            if self._stop.is_set():
                return
            self._start_websocket()

    def _start_websocket(self) -> None:
        """A new connection on its own shallow copy of the library object, with the current token.

        NorenApi's reconnect loop reads its stop event and WebSocketApp from the object each time round, and
        start_websocket() replaces both: a thread of an earlier connection still connecting (its connect cannot
        be interrupted) would otherwise take up the new event and run the new socket too. On its own copy it
        sees only its own, set, event. Its open, close and error events are no longer this feed's business;
        its ticks and order updates are real and still counted.
        """
        websocket.setdefaulttimeout(WS_TIMEOUT_S)  # the library sets none: a connect could hang for minutes
        self._generation += 1
        generation = self._generation

        def current(event: Callable[..., None]) -> Callable[..., None]:
            return lambda *a: event(*a) if generation == self._generation else None
        api = copy.copy(self.broker.api)
        api._NorenApi__ws_send = self._bounded_sender(api)
        self.ws_api = api
        self.ws_api.start_websocket(subscribe_callback=self._cb_tick, order_update_callback=self._cb_order,
                                    socket_open_callback=current(self._cb_open),
                                    socket_close_callback=current(self._cb_closed),
                                    socket_error_callback=current(self._cb_error))

    def _bounded_sender(self, api: Any) -> Callable[..., Any]:
        """The library's __ws_send for one connection's copy, with an end to its wait.

        NorenApi's own waits, with no bound, until its connection is up: on a copy that is never connected
        again (a restart or a stop came first), the waiting thread would poll every 50 ms for good. This one
        gives up after SEND_WAIT_S, or at once when the copy is no longer the feed's connection or the feed
        has stopped.
        """
        def send(*args: Any, **kwargs: Any) -> Any:
            deadline = time.monotonic() + SEND_WAIT_S
            while not getattr(api, "_NorenApi__websocket_connected", False):
                if api is not self.ws_api or self._stop.is_set() or time.monotonic() > deadline:
                    raise ConnectionError("the broker feed is not connected")
                time.sleep(0.05)
            with api._NorenApi__ws_mutex:
                return api._NorenApi__websocket.send(*args, **kwargs)
        return send

    def stop(self, timeout: float = 2.0) -> None:
        """close_websocket() can block for ~10 s inside websocket-client: never wait on it unbounded."""
        with self._socket_lock:  # after this, no socket is started: the one closed below is the last
            self._stop.set()
        closer = threading.Thread(target=self._close_quietly, daemon=True)
        closer.start()
        closer.join(timeout)
        if self._thread:
            self._thread.join(timeout)

    def _close_quietly(self, wait_s: float = 2.0) -> None:
        """End the library's connection and its reconnect loop (bounded by wait_s while it is still connecting).

        close_websocket() returns at once when the socket is down, without setting the stop event, and the
        library's reconnect loop then runs forever: the event is set here first. The socket is then shut down,
        not closed: a thread already waiting in epoll for a frame is woken by the shutdown, while a descriptor
        closed under it would leave it waiting for good (websocket-client's own teardown closes it).
        """
        stop_event = getattr(self.ws_api, "_NorenApi__stop_event", None)
        if stop_event is not None:
            stop_event.set()
        ws = getattr(self.ws_api, "_NorenApi__websocket", None)
        thread = getattr(self.ws_api, "_NorenApi__ws_thread", None)
        if ws is None:
            return
        deadline = time.monotonic() + wait_s
        while True:
            ws.keep_running = False
            raw = getattr(getattr(ws, "sock", None), "sock", None)
            if raw is not None:
                try:
                    raw.shutdown(socket.SHUT_RDWR)
                except OSError:  # not connected (any more)
                    pass
                return
            if thread is None or not thread.is_alive() or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # still connecting: its socket is shut down as soon as it exists
        try:
            ws.close()
        except Exception:  # closing a socket that is already gone
            pass

    def _run(self) -> None:
        last_refresh = 0.0
        while not self._stop.is_set():
            try:
                kind, payload = self._queue.get(timeout=0.5)
            except queue.Empty:
                kind, payload = "idle", None
            try:
                self._handle(kind, payload)
                now = time.monotonic()
                if self.opens and now - last_refresh > 2.0:
                    last_refresh = now
                    self._subscribe(resubscribe=False)
                if self._session_expired():
                    continue  # one event already said so; the feed comes back after the login
                if self.opens and now - self.last_frame > self.stall_s and self.market_open():
                    self._reconnect(f"no frame for {now - self.last_frame:.0f} s")
                elif self._reopen_by and now > self._reopen_by:
                    # the library's own reconnect can stick ("socket is already opened"): at any hour
                    if self._reopen_wait == REOPEN_FIRST_S:  # once per outage; then less and less often
                        self.emit("feed_restarted", "broker feed did not come back by itself: starting a new "
                                                    "connection", "warning")
                    else:
                        log.info("broker feed still down: a new connection (next try in %.0f s)",
                                 min(self._reopen_wait * 2, REOPEN_MAX_S))
                    self._reopen_wait = min(self._reopen_wait * 2, REOPEN_MAX_S)
                    self._restart_socket()
            except Exception:
                log.exception("feed: %s handling failed", kind)

    def _handle(self, kind: str, payload: Any) -> None:
        if kind in ("tick", "om", "open"):
            self.last_frame = time.monotonic()
        if kind == "open":
            self._reopen_by, self._reopen_wait, self._up = 0.0, REOPEN_FIRST_S, True
            self.opens += 1
            self._subscribe(resubscribe=True)
            self.on_open()  # updates sent while we were away are lost: read the order book now
            self.emit("feed_connected", f"broker feed connected (connection {self.opens}); "
                                        f"{len(self.subscribed)} symbols and order updates subscribed", "info")
        elif kind == "tick":
            tick = self._tick(payload)
            if tick is not None:
                self.on_ticks([tick])
        elif kind == "om":
            update = self._order(payload)
            if update is not None:
                self.on_update(update)
        elif kind == "restart":
            self._restart_socket()
        elif kind == "closed":
            if not self._up:  # the library's reconnects failing while the broker is away: said once already
                return
            self._up = False
            self._reopen_by = time.monotonic() + self._reopen_wait
            if self._session_expired():  # the broker ended the session: said once, as broker_session_expired
                log.debug("feed closed while the broker session is expired")
                return
            self.emit("feed_disconnected", "broker feed disconnected; the library reconnects", "warning")

    def _session_expired(self) -> bool:
        """The broker said the session is over: reconnecting cannot work until the trader logs in again."""
        return bool(getattr(self.broker, "session_expired", False))

    def _instrument(self, exchange: str, symbol: str) -> Any:
        find = getattr(self.broker, "instrument", None)  # the symbol file, or found with SearchScrip
        return find(exchange, symbol) if find else self.broker.instruments.get(exchange, symbol)

    def _by_token(self, exchange: str, token: str) -> Any:
        find = getattr(self.broker, "instrument_by_token", None)
        return find(exchange, token) if find else self.broker.instruments.token(exchange, token)

    def _keys(self) -> set[str]:
        """Every symbol `wanted()` names (the runtime's: strategies' symbols, held, with working orders)."""
        keys = set()
        for exchange, symbol in self.wanted():
            inst = self._instrument(exchange, symbol) or self._find(exchange, symbol)
            if inst is not None:
                keys.add(f"{exchange}|{inst.token}")
        return keys

    def _find(self, exchange: str, symbol: str) -> Any:
        """A wanted symbol the symbol file lacks (its download failed, say): its token from the broker, asked at
        most every FIND_AGAIN_S; without one it gets no prices, and that is said once."""
        find = getattr(self.broker, "find_instrument", None)
        key = (exchange, symbol)
        if find is None or time.monotonic() < self._unfound.get(key, 0.0):
            return None
        inst = find(exchange, symbol)
        if inst is not None:
            self._unfound.pop(key, None)
            return inst
        if key not in self._unfound:
            self.emit("feed_symbol_unknown", f"no prices for {exchange}:{symbol}: it is not in the symbol file and "
                                             f"the broker's SearchScrip did not find it or did not answer (asked again every "
                                             f"{FIND_AGAIN_S:g} s). Until then its stop trailing, target, gap "
                                             f"handling and its part of the loss limit have no price to act on: "
                                             f"watch it in the broker terminal", "error")
        self._unfound[key] = time.monotonic() + FIND_AGAIN_S
        return None

    def _subscribe(self, resubscribe: bool) -> None:
        """Send subscriptions; after a (re)connect all of them, since the library does not resend any.
        A subscription that did not go out in time is not counted as sent: the next refresh sends it."""
        keys = self._keys()
        todo = keys if resubscribe else keys - self.subscribed
        if resubscribe:
            self.subscribed = set()
            self._send(lambda api: api.subscribe_orders())
        if todo and self._send(lambda api: api.subscribe(sorted(todo))):
            self.subscribed = self.subscribed | todo

    def _send(self, fn: Callable[[Any], None]) -> bool:
        """Send on the current connection, if it is up; True if it went out in time. Never waits for a
        connection that is down: every open sends all subscriptions again, and the 2 s refresh the rest."""
        api = self.ws_api
        if api is None or not getattr(api, "_NorenApi__websocket_connected", False):
            return False
        done, sent = threading.Event(), []

        def run() -> None:
            try:
                fn(api)
                sent.append(True)
            except Exception as e:  # the connection went down meanwhile: the next open sends it again
                log.debug("feed: a subscription did not go out: %s", e)
            finally:
                done.set()  # a failure ends the wait too: the feed loop is not held for SEND_WAIT_S
        t = threading.Thread(target=run, name="shoonya-feed-send", daemon=True)
        t.start()
        return done.wait(SEND_WAIT_S) and bool(sent)

    def reconnect(self, why: str) -> None:
        """Reconnect (and authenticate with the current token); done on the feed's own thread."""
        self._queue.put(("restart", why))

    def _reconnect(self, why: str) -> None:
        self.reconnects += 1
        self.emit("feed_stalled", f"broker feed stalled ({why}): reconnecting", "warning")
        self._restart_socket()

    def _restart_socket(self) -> None:
        """Stop the library's socket and its reconnect loop for good, then start a new connection.

        Closing its WebSocketApp alone does not always bring the library back: stop its loop first, with a
        bound. A thread that outlives the bound (a connect that hangs) ends by itself: it has its own copy.
        """
        self.last_frame = time.monotonic()
        self._reopen_by = time.monotonic() + self._reopen_wait
        self.restarts += 1
        old_thread = getattr(self.ws_api, "_NorenApi__ws_thread", None)
        self._close_quietly()
        if old_thread is not None:
            old_thread.join(3.0)
        self._start_socket()

    def _tick(self, msg: dict) -> Optional[Tick]:
        inst = self._by_token(msg.get("e", ""), str(msg.get("tk", "")))
        note_limits = getattr(self.broker, "note_limits", None)
        if inst is not None and note_limits is not None and ("lc" in msg or "uc" in msg):
            note_limits(inst.exchange, inst.symbol, msg.get("lc"), msg.get("uc"))  # the subscription's acknowledgement
        ltp = _dec(msg.get("lp"))
        if inst is None or ltp is None or ltp <= 0:
            return None
        return Tick(inst.exchange, inst.symbol, ltp)

    def _order(self, msg: dict) -> Optional[BrokerOrder]:
        key = (msg.get("norenordno"), msg.get("status"), msg.get("fillshares"), msg.get("flid"), msg.get("reporttype"))
        if key in self._seen:
            return None
        self._seen.add(key)
        if not msg.get("remarks"):  # a sparse update: read the order itself
            rows = self.api.single_order_history(msg.get("norenordno"))
            if rows:
                msg = {**rows[0], **{k: v for k, v in msg.items() if v not in (None, "")}}
        fills: tuple[FillReport, ...] = ()
        price = _dec(msg.get("flprc"))
        if msg.get("flid") and price is not None:
            fills = (FillReport(str(msg["flid"]), _int(msg.get("flqty")), price),)
        return broker_order(msg, fills)
