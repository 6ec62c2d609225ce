"""One connection's answer on its way out: what a thread writes goes to the socket only as far as the socket
takes it at once; the rest waits here for the worker's selector loop (host/http_worker.py) to send.

A thread hands this object to gunicorn in place of the socket, so nothing a thread does can block on a
client that does not read. Never touched by two threads at once: the thread owns it while it serves a
request, the loop once the thread is done.
"""
from __future__ import annotations

import socket
from typing import Any, Optional

FILE_CHUNK = 64 * 1024  # bytes read at a time from a file the app answers with


class Outbox:
    """Quacks like the socket as far as gunicorn's response writer and error pages use it; never blocks."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.data = bytearray()
        self.started = self.deadline = 0.0

    def sendall(self, data: Any) -> None:
        """Send what the socket takes now; keep the rest, after anything already kept (order is the wire's)."""
        view = memoryview(data).cast("B")
        if not self.data:
            view = view[self._send(view):]
        self.data += view

    def send(self, data: Any) -> int:
        self.sendall(data)
        return len(memoryview(data).cast("B"))

    def sendfile(self, file: Any, offset: int = 0, count: Optional[int] = None) -> int:
        """The file's bytes, read here: the socket is never handed to the kernel's sendfile, which would wait."""
        file.seek(offset)
        total = 0
        while count is None or total < count:
            chunk = file.read(FILE_CHUNK if count is None else min(FILE_CHUNK, count - total))
            if not chunk:
                break
            self.sendall(chunk)
            total += len(chunk)
        return total

    def flush(self) -> int:
        """Send what the socket takes of what is kept; the bytes sent. OSError when the client is gone."""
        sent = self._send(memoryview(self.data))
        del self.data[:sent]
        return sent

    def _send(self, view: memoryview) -> int:
        try:
            return self.sock.send(view)
        except (BlockingIOError, InterruptedError):
            return 0

    # what else gunicorn calls on "the socket" while a thread serves a request -------------------------

    def setblocking(self, flag: bool) -> None:
        """Ignored: the real socket stays non-blocking."""

    def settimeout(self, value: Optional[float]) -> None:
        """Ignored: the real socket stays non-blocking."""

    def gettimeout(self) -> float:
        return 0.0

    def shutdown(self, how: int) -> None:
        """Ignored: the connection closes once what is kept has been sent (the thread reports it closing)."""

    def recv(self, size: int) -> bytes:
        """Nothing: requests reach a thread through its parser, never from here."""
        return b""

    def close(self) -> None:
        """Ignored: the worker's loop closes the connection after sending what is kept."""
