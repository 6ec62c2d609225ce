"""The simulator's WebSocket side: Noren's connect/ack, touchline and depth, order updates, faults."""
from __future__ import annotations

import json
import socket
import logging
import threading
from decimal import Decimal
from typing import Optional

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

from ..models import BrokerOrder
from .server import NorenSim, order_update, quote_fields

log = logging.getLogger(__name__)


class Client:
    """One connected WebSocket client and what it subscribed to."""

    def __init__(self, conn: ServerConnection):
        self.conn = conn
        self.uid: Optional[str] = None
        self.touch: set[tuple[str, str]] = set()   # (exchange, token)
        self.depth: set[tuple[str, str]] = set()
        self.orders = False

    def send(self, msg: dict) -> None:
        try:
            self.conn.send(json.dumps(msg))
        except ConnectionClosed:
            pass


class FeedServer:
    """Serves the Noren WebSocket protocol for the simulator; pushes ticks and order updates."""

    def __init__(self, sim: NorenSim, host: str = "127.0.0.1", port: int = 0):
        self.sim = sim
        self.clients: list[Client] = []
        self._lock = threading.Lock()
        self._server = serve(self._handle, host, port, ping_interval=None)
        self.host, self.port = host, self._server.socket.getsockname()[1]
        self._thread: Optional[threading.Thread] = None
        sim.engine.subscribe(self.push_order)
        sim.ws_hooks.append(self._hook)
        sim.tick_hooks.append(self.push_tick)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/NorenWSAPI/"

    def start(self) -> "FeedServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="noren-sim-ws", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._hook("drop")
        self._server.shutdown()
        if self._thread:
            self._thread.join(5)

    def _hook(self, action: str) -> None:
        if action == "drop":
            with self._lock:
                clients = list(self.clients)
            for c in clients:  # a dropped connection: no closing handshake, as when a network fails
                try:
                    c.conn.socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _handle(self, conn: ServerConnection) -> None:
        client = Client(conn)
        with self._lock:
            self.clients.append(client)
        try:
            for raw in conn:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                self._on_message(client, msg)
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                if client in self.clients:
                    self.clients.remove(client)

    def _on_message(self, client: Client, msg: dict) -> None:
        t = msg.get("t")
        if t in ("a", "c"):
            uid = self.sim.uid_for(msg.get("accesstoken") or msg.get("susertoken"))
            client.uid = uid
            client.send({"t": t + "k", "s": "OK" if uid else "NOT_OK", "uid": msg.get("uid", "")})
            return
        if client.uid is None:
            client.send({"t": "ck", "s": "NOT_OK", "emsg": "not connected"})
            return
        keys = [tuple(k.split("|", 1)) for k in str(msg.get("k", "")).split("#") if "|" in k]
        if t in ("t", "d"):
            (client.touch if t == "t" else client.depth).update(keys)
            for ex, token in keys:
                client.send(self._quote(t + "k", ex, token))
        elif t in ("u", "ud"):
            (client.touch if t == "u" else client.depth).difference_update(keys)
            client.send({"t": t + "k", "k": msg.get("k")})
        elif t == "o":
            client.orders = True
            client.send({"t": "ok"})

    def _quote(self, kind: str, exchange: str, token: str) -> dict:
        """The subscription's acknowledgement: the contract, its circuit limits and previous close when known,
        and its last price only if it has traded today."""
        inst = self.sim.instruments.token(exchange, token)
        ltp = self.sim.engine.ltp(exchange, inst.symbol) if inst else None
        msg = {"t": kind, "e": exchange, "tk": token}
        if inst is not None:
            q = quote_fields(self.sim, inst)
            msg.update(ts=inst.symbol, ls=q["ls"], ti=q["ti"], **{k: q[k] for k in ("c", "lc", "uc") if k in q})
        if ltp is not None:
            msg["lp"] = str(ltp)
        return msg

    def push_tick(self, exchange: str, symbol: str, ltp: Decimal) -> None:
        if self.sim.faults.stall_feed:
            return
        inst = self.sim.instruments.get(exchange, symbol)
        if inst is None:
            return
        key = (exchange, inst.token)
        with self._lock:
            clients = list(self.clients)
        for c in clients:
            if key in c.touch:
                c.send({"t": "tf", "e": exchange, "tk": inst.token, "lp": str(ltp)})
            if key in c.depth:
                c.send({"t": "df", "e": exchange, "tk": inst.token, "lp": str(ltp)})

    def push_order(self, update: BrokerOrder) -> None:
        if self.sim.faults.stall_feed:
            return
        msg = order_update(self.sim, update)
        with self._lock:
            clients = [c for c in self.clients if c.orders]
        for c in clients:
            c.send(msg)
