"""One connection's bytes until a whole HTTP/1.1 request is in: its head, then its body by Content-Length.

No sockets here: the worker (host/http_worker.py) feeds what it reads and asks where the request ends.
Where the head ends and how long the body is are decided by gunicorn's own parser, so the framing
used here is the one the thread that serves the request will see.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

from gunicorn.http.parser import RequestParser

HEAD_END = b"\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True)
class HttpLimits:
    """How long and how much a request may take to arrive before a thread serves it."""

    header_timeout: float = 10.0  # seconds from the first wait for a request until its head is in
    body_timeout: float = 20.0  # seconds from the end of the head until the whole body is in
    max_head: int = 32 * 1024  # bytes of request line and headers
    max_body: int = 64 * 1024  # bytes of body (the app's MAX_CONTENT_LENGTH)
    max_buffered: int = 16 * 1024 * 1024  # bytes held for unfinished requests, all connections together
    linger: float = 2.0  # seconds a closing connection is drained so the client reads our reply
    send_timeout: float = 30.0  # seconds a client has to take an answer once it is ready
    max_unsent: int = 32 * 1024 * 1024  # bytes of answers held for clients not reading them, all together

    @classmethod
    def from_settings(cls, settings: Any) -> "HttpLimits":
        from .web import MAX_BODY
        return cls(header_timeout=float(settings.HTTP_HEADER_TIMEOUT_S),
                   body_timeout=float(settings.HTTP_BODY_TIMEOUT_S), max_body=MAX_BODY,
                   send_timeout=float(settings.HTTP_SEND_TIMEOUT_S))


@dataclass(frozen=True)
class Refusal:
    """A reply the worker sends itself, before closing, to a request no thread will see."""

    status: int
    reason: str
    error: str

    def response(self) -> bytes:
        body = json.dumps({"status": "error", "error": self.error, "code": self.status}).encode()
        return (f"HTTP/1.1 {self.status} {self.reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


@dataclass(frozen=True)
class Ready:
    """The first `length` buffered bytes are one whole request; `trusted` is False when gunicorn's parser
    rejected its head (the thread will answer the error, and the connection must close after it)."""

    length: int
    trusted: bool = True


Outcome = Union[None, Ready, Refusal]


class Intake:
    """Reads one request at a time: head first (up to max_head), then exactly Content-Length body bytes."""

    def __init__(self, cfg: Any, client: Any, limits: HttpLimits):
        self.cfg = cfg
        self.client = client
        self.limits = limits
        self.pending = bytearray()
        self.head_len: Optional[int] = None
        self.need = 0
        self.started = self.deadline = 0.0
        self.continue_due = False
        self.closing = False
        self.drained = 0
        self._scanned = 0

    def begin(self, now: float) -> None:
        """Start waiting for the next request on this connection."""
        self.head_len, self.need, self._scanned, self.continue_due = None, 0, 0, False
        self.started, self.deadline = now, now + self.limits.header_timeout

    def wants(self) -> int:
        """How many bytes to read next: never past the end of a body whose length is known."""
        if self.head_len is None:
            return max(1, self.limits.max_head + 1 - len(self.pending))
        return max(1, self.head_len + self.need - len(self.pending))

    def feed(self, data: bytes) -> None:
        self.pending += data

    def step(self, now: Optional[float] = None) -> Outcome:
        """None while more bytes are needed; Ready when a whole request is buffered; Refusal to reply and close."""
        if self.head_len is None:
            refusal = self._find_head(time.monotonic() if now is None else now)
            if refusal is not None or self.head_len is None:
                return refusal
            if self.need < 0:  # gunicorn's parser rejected the head: it answers, then the connection closes
                return Ready(self.head_len, trusted=False)
        if len(self.pending) >= self.head_len + self.need:
            return Ready(self.head_len + self.need)
        return None

    def take(self, length: int) -> bytes:
        """Remove and return the first `length` buffered bytes (a whole request)."""
        data = bytes(self.pending[:length])
        del self.pending[:length]
        return data

    def expired(self) -> Refusal:
        """The 408 for a request that did not arrive in time."""
        if self.head_len is None:
            return Refusal(408, "Request Timeout", f"the request's headers did not arrive within "
                                                    f"{self.limits.header_timeout:g} s (HTTP_HEADER_TIMEOUT_S); "
                                                    f"{len(self.pending)} bytes came")
        came = len(self.pending) - self.head_len
        return Refusal(408, "Request Timeout", f"the request body did not arrive within "
                                                f"{self.limits.body_timeout:g} s (HTTP_BODY_TIMEOUT_S); "
                                                f"{came} of {self.need} bytes came")

    def _find_head(self, now: float) -> Optional[Refusal]:
        end = self.pending.find(HEAD_END, max(0, self._scanned - 3))
        if end < 0 or end + 4 > self.limits.max_head:
            self._scanned = len(self.pending)
            if len(self.pending) > self.limits.max_head:
                return Refusal(431, "Request Header Fields Too Large",
                               f"request line and headers: expected at most {self.limits.max_head} bytes, "
                               f"found more")
            return None
        self.head_len = end + 4
        request = self._parse_head(bytes(self.pending[:self.head_len]))
        if request is None:
            self.need = -1
            return None
        headers = {name: value for name, value in request.headers}
        if "TRANSFER-ENCODING" in headers:
            return Refusal(411, "Length Required", "Transfer-Encoding is not accepted: expected a body with a "
                                                   "Content-Length header, found Transfer-Encoding: "
                                                   f"{headers['TRANSFER-ENCODING'][:40]}")
        length = int(headers.get("CONTENT-LENGTH", "0"))  # gunicorn's parser checked it is one whole number
        if length > self.limits.max_body:
            return Refusal(413, "Content Too Large", f"body too large: expected at most {self.limits.max_body} "
                                                     f"bytes, found Content-Length {length}")
        self.need = length
        self.deadline = now + self.limits.body_timeout
        got = len(self.pending) - self.head_len
        self.continue_due = length > got and request._expected_100_continue  # gunicorn's reading (not HTTP/1.0)
        return None

    def _parse_head(self, head: bytes) -> Any:
        """The head as gunicorn's parser reads it (headers with upper-case names), or None if it rejects it."""
        try:
            return next(RequestParser(self.cfg, [head], self.client))
        except Exception:  # any parse error: the thread's parser raises the same one and answers it
            return None
