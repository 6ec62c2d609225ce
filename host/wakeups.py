"""Wake-ups between the processes on one DATA_DIR: a worker without the engine tells the engine's process
that it stored an alert or a command, and the engine tells that worker once it has decided.

Without them the engine finds what another process stored by polling (ALERT_POLL_S, 0.1 s) and that
process finds the decision by polling the database, so with `--workers 2` half the webhooks waited
about 100 ms. Linux abstract Unix datagram sockets: nothing on disk to be left behind by kill -9, and
the name is free again the moment its process is gone. Best effort on purpose: a datagram lost,
refused or forged costs at most the polls' delay (it only makes the engine look at the inbox, or a
worker read a row again); the database stays the only record, and nothing is sent on the word of one.
"""
from __future__ import annotations

import hashlib
import logging
import socket
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)
TABLES = ("alerts", "commands")
MAX_DATAGRAM = 128  # "commands:" and an id fit many times over: anything longer is not ours
ASKERS_KEPT = 10_000  # keys whose asker the engine remembers until it decides them (oldest forgotten)
Notify = Callable[[str, str], None]


def engine_address(data_dir: Path | str) -> Optional[bytes]:
    """The engine's abstract socket name for this data folder, or None where there are none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:32]
    return b"\0strategy-host-" + digest.encode() + b"-engine"


def parse(data: bytes) -> Optional[tuple[str, str]]:
    """(table, key) from a datagram, or None for anything that is not one of ours."""
    if len(data) > MAX_DATAGRAM:
        return None
    try:
        table, sep, key = data.decode("ascii").partition(":")
    except UnicodeDecodeError:
        return None
    if not sep or table not in TABLES or not key or not key.isprintable():
        return None
    return table, key


class _Socket:
    """A bound datagram socket and the daemon thread that reads it."""

    def __init__(self, address: bytes, on_message: Callable[[str, str, Any], None], name: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind(address)  # b"": the kernel picks a free abstract name (a worker's reply address)
        except OSError:
            self.sock.close()
            raise
        self._on_message = on_message
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data, sender = self.sock.recvfrom(MAX_DATAGRAM + 1)
            except OSError:
                return
            if self._closed:
                return
            found = parse(data)
            if found is None:
                continue
            try:
                self._on_message(found[0], found[1], sender)
            except Exception:  # a wake-up must never end its thread
                log.exception("wake-up %s:%s not handled", *found)

    def send(self, address: Any, table: str, key: str) -> bool:
        """Send without ever blocking; False if it could not go (no listener, its buffer full)."""
        try:
            self.sock.sendto(f"{table}:{key}".encode("ascii"), socket.MSG_DONTWAIT, address)
            return True
        except (OSError, UnicodeEncodeError):
            return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reading thread
        except OSError:
            pass
        self._thread.join(2.0)
        self.sock.close()


class EngineWakeups:
    """In the engine's process: wake the engine for what others stored; tell each asker its decision."""

    def __init__(self, data_dir: Path | str, stored_elsewhere: Callable[[str], None]):
        self._stored_elsewhere = stored_elsewhere
        self._askers: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._socket: Optional[_Socket] = None
        address = engine_address(data_dir)
        if address is None:
            return
        try:
            self._socket = _Socket(address, self._on_message, "wakeups-engine")
        except OSError as e:  # taken (by whom? the engine lock says we are the engine): the polls still work
            log.warning("engine wake-ups are off (%s): other workers' alerts are found by polling, within 0.1 s", e)

    def _on_message(self, table: str, key: str, sender: Any) -> None:
        if sender:
            with self._lock:
                self._askers[f"{table}:{key}"] = sender
                self._askers.move_to_end(f"{table}:{key}")
                while len(self._askers) > ASKERS_KEPT:
                    self._askers.popitem(last=False)
        self._stored_elsewhere(table)

    def decided(self, table: str, key: str) -> None:
        """The engine committed its decision on this key: tell the process that asked, if one did."""
        with self._lock:
            sender = self._askers.pop(f"{table}:{key}", None)
        if sender is not None and self._socket is not None:
            self._socket.send(sender, table, key)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()


class WorkerWakeups:
    """In a process without the engine: tell the engine what was stored, and hear back when it decided."""

    def __init__(self, data_dir: Path | str, decided: Notify):
        self._engine = engine_address(data_dir)
        self._decided = decided
        self._socket: Optional[_Socket] = None
        self._lock = threading.Lock()

    def tell(self, table: str, key: str) -> None:
        """Tell the engine's process that this key is stored (and committed)."""
        with self._lock:
            if self._engine is None:
                return
            if self._socket is None:
                try:
                    self._socket = _Socket(b"", lambda t, k, _sender: self._decided(t, k), "wakeups-worker")
                except OSError as e:
                    log.warning("wake-ups are off (%s): decisions are found by polling", e)
                    self._engine = None
                    return
            sock, engine = self._socket, self._engine
        sock.send(engine, table, key)

    def close(self) -> None:
        """For good: a runtime that has stopped tells nobody anything again."""
        with self._lock:
            self._engine = None
            if self._socket is not None:
                self._socket.close()
                self._socket = None
