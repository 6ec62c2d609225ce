"""The gunicorn worker: gthread, but a thread only ever sees a request that is already whole in memory,
and never waits for a client to take its answer.

gunicorn's gthread worker gives a connection to a thread as soon as its first byte arrives; the thread
then blocks reading the rest, so eight clients sending a byte a second hold all eight threads; and it
blocks writing the answer, so eight clients that do not read hold them too.
Here the worker's own selector loop reads every request (head, then Content-Length body) without
blocking, under a header and a body deadline, and submits it to the thread pool only when it is
complete. A thread never reads the socket: its parser reads the buffered bytes. It writes its answer
to an Outbox (host/http_outbox.py): what the socket does not take at once, the loop sends, under a
send deadline; the connection's next request is read only once the answer is out (pipelined answers
stay in order, and a client that does not read gets nothing more done). Slow connections cost a
little memory and a file descriptor, both bounded; late requests are answered 408, late readers closed.
Written against gunicorn 27's gthread (setup.py pins it).
"""
from __future__ import annotations

import errno
import resource
import selectors
import socket
import time
from collections import Counter
from concurrent import futures
from functools import partial
from typing import Any, Callable, Optional

from gunicorn.http.parser import RequestParser
from gunicorn.workers.gthread import TConn, ThreadWorker

from .http_intake import CONTINUE, HttpLimits, Intake, Ready, Refusal
from .http_outbox import Outbox

FD_RESERVE = 256  # descriptors kept for the engine, SQLite, the broker and Telegram, whatever clients do
EXPIRY_EVERY = 0.1  # seconds between passes over the connections being read
REPORT_EVERY = 60.0  # seconds between log lines that count refused connections
DRAIN_MAX = 64 * 1024  # bytes read and dropped from a closing connection before it is cut
SERVING_CHECK_S = 0.5  # seconds between looks, in a worker that takes no connections, at whether another serves
SERVING_GRACE_S = 3.0  # ...and how long none may serve before it does (the others boot within it at a start)
MIN_AGE = 0.25  # seconds a connection is read before the connection limit may shed it (a fast request is in)
SEND_BUFFER = 128 * 1024  # kernel send buffer of a client socket (Linux doubles it); its autotuning would let
#                           each client that reads nothing pin ~4 MB of kernel memory, all TCP's on pressure


class Released:
    """What a thread's parser reads from: the bytes of requests already whole; never the socket."""

    def __init__(self) -> None:
        self.data = bytearray()

    def recv(self, size: int) -> bytes:
        chunk = bytes(self.data[:size])
        del self.data[:size]
        return chunk


def _address(conn: TConn) -> Any:
    return conn.client[0] if isinstance(conn.client, tuple) else conn.client


def unsupported(cfg: Any) -> Optional[str]:
    """Why this worker cannot buffer requests under this gunicorn config, or None."""
    if cfg.is_ssl:
        return "TLS (certfile) is configured"
    if getattr(cfg, "protocol", "http") != "http":
        return f"protocol is {cfg.protocol}"
    if getattr(cfg, "proxy_protocol", "off") not in ("off", False, None):
        return "proxy_protocol is on"
    if "h2" in (getattr(cfg, "http_protocols", None) or ()):
        return "HTTP/2 is enabled"
    return None


class BufferingThreadWorker(ThreadWorker):
    """gthread whose selector loop reads whole requests under deadlines before any thread sees them."""

    limits = HttpLimits()
    takes_connections = True  # False in the engine's worker while other workers serve (server.post_worker_init)
    others_serve: Callable[[], bool] = staticmethod(lambda: True)  # another worker takes connections now
    _serving_checked = float("-inf")
    _alone_since: Optional[float] = None  # no other worker has taken connections since then

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reason_plain = unsupported(self.cfg)
        self.reading: dict[TConn, None] = {}  # connections being read (or drained), oldest first
        self.writing: dict[TConn, None] = {}  # connections whose answer the loop is sending, oldest first
        self.buffered = 0  # bytes of requests held, all connections together
        self.unsent = 0  # bytes of answers held for the loop to send, all connections together
        self.refused: Counter = Counter()
        self.next_expiry = 0.0
        self.next_report = time.monotonic() + REPORT_EVERY
        self.stop_deadline = float("inf")

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        super().check_config(cfg, log)
        reason = unsupported(cfg)
        if reason:
            log.warning("%s: %s, so requests are read by threads as in plain gthread; slow clients can "
                        "hold every thread. Terminate TLS in a reverse proxy instead.", cls.__name__, reason)

    def configure(self, limits: HttpLimits) -> None:
        """Use these limits (the host's settings); called from post_worker_init."""
        self.limits = limits

    def set_accept_enabled(self, enabled: bool) -> None:
        """gthread's switch for its listeners, held off in a worker that takes no connections while another serves."""
        super().set_accept_enabled(enabled and (self.takes_connections or not self._others_serve_now()))

    def _others_serve_now(self) -> bool:
        now = time.monotonic()
        if now >= self._serving_checked + SERVING_CHECK_S:
            self._serving_checked = now
            self._alone_since = None if self.others_serve() else (self._alone_since or now)
        return self._alone_since is None or now - self._alone_since < SERVING_GRACE_S

    def _review_accepting(self) -> None:
        """The engine's worker takes connections while no other worker does (one fewer after SIGTTOU, or one
        being replaced), and stops again once one does; gthread itself asks only when its limit is crossed."""
        if not self.takes_connections and self.alive and self.nr_conns < self.worker_connections:
            self.set_accept_enabled(True)

    def init_process(self) -> None:
        self.worker_connections = self._connection_limit()
        self.max_keepalived = max(0, self.worker_connections - self.cfg.threads)
        super().init_process()

    def _connection_limit(self) -> int:
        """worker_connections, lowered if needed so clients can never take the last file descriptors."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = self.cfg.worker_connections + FD_RESERVE
        if soft != resource.RLIM_INFINITY and soft < wanted:
            new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                soft = new
            except (ValueError, OSError):
                pass
        if soft == resource.RLIM_INFINITY:
            return self.cfg.worker_connections
        limit = max(16, min(self.cfg.worker_connections, soft - FD_RESERVE))
        if limit < self.cfg.worker_connections:
            self.log.warning("serving at most %d connections: the open-file limit is %d", limit, soft)
        return limit

    # connections come in ---------------------------------------------------------------------------

    def accept(self, listener: socket.socket) -> None:
        if self.reason_plain:
            return super().accept(listener)
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.refused["no file descriptor left"] += 1
                if not self._evict(min_age=0.0):
                    time.sleep(0.05)  # nothing to shed: do not spin on a listener we cannot accept from
                return
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        try:
            client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass  # best effort: the answers are bounded in our memory all the same
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        conn.intake = Intake(self.cfg, client_addr, self.limits)
        conn.released = Released()
        conn.parser = RequestParser(self.cfg, conn.released, client_addr)
        conn.outbox = Outbox(client_sock)
        conn.data_ready = True  # the thread must not wait on the socket: its parser reads `released`
        self._read_next(conn)
        self._make_room()

    def _make_room(self) -> None:
        """At the connection limit, shed requests that are still unfinished after MIN_AGE; otherwise gthread
        stops accepting until there is room (new connections wait in the listen backlog)."""
        while self.nr_conns >= self.worker_connections and (self._evict(min_age=MIN_AGE)
                                                            or self._evict(min_age=MIN_AGE, writers=True)):
            self.refused["connection limit"] += 1

    def enqueue_req(self, conn: TConn) -> None:
        """Called by gthread when a kept-alive connection turns readable: read the request first."""
        if self.reason_plain or conn.released.data or conn.parser.unreader.buf.getvalue():
            return super().enqueue_req(conn)
        self._read_next(conn)

    def _read_next(self, conn: TConn) -> None:
        intake = conn.intake
        intake.begin(time.monotonic())
        intake.deadline = min(intake.deadline, self.stop_deadline)
        conn.sock.setblocking(False)
        self._watch(conn)
        if intake.pending:  # the next request came with the last one
            self._advance(conn)

    def _watch(self, conn: TConn) -> None:
        self.reading.pop(conn, None)
        self.reading[conn] = None
        try:
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        except KeyError:
            pass  # already registered

    def _unwatch(self, conn: TConn) -> None:
        self.reading.pop(conn, None)
        self.writing.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _on_readable(self, conn: TConn, _fileobj: Any) -> None:
        intake = conn.intake
        try:
            data = conn.sock.recv(DRAIN_MAX if intake.closing else intake.wants())
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return self._close(conn)
        if intake.closing:
            intake.drained += len(data)
            if intake.drained >= DRAIN_MAX:
                self._close(conn)
            return
        intake.feed(data)
        self.buffered += len(data)
        while self.buffered > self.limits.max_buffered and self._evict(min_age=0.0):
            self.refused["memory limit"] += 1
        if conn in self.reading:
            self._advance(conn)

    def _advance(self, conn: TConn) -> None:
        intake = conn.intake
        outcome = intake.step()
        if isinstance(outcome, Refusal):
            self.refused[f"{outcome.status} {outcome.reason}"] += 1
            self._refuse(conn, outcome)
        elif isinstance(outcome, Ready):
            self._unwatch(conn)
            self.buffered -= outcome.length
            conn.released.data += intake.take(outcome.length)
            conn.trusted = outcome.trusted
            super().enqueue_req(conn)
        elif intake.continue_due:
            intake.continue_due = False
            self._send(conn, CONTINUE)

    # a thread serves the request -------------------------------------------------------------------

    def handle(self, conn: TConn) -> Any:
        """gthread's handle, with the connection's Outbox standing in for its socket while the thread runs."""
        if self.reason_plain:
            return super().handle(conn)
        conn.sock.setblocking(False)  # already so; the Outbox must never wait on it
        sock, conn.sock = conn.sock, conn.outbox
        try:
            return super().handle(conn)
        finally:
            conn.sock = sock

    def handle_request(self, req: Any, conn: TConn) -> Any:
        if not self.reason_plain:
            req._expected_100_continue = False  # the loop sent "100 Continue" while it waited for the body
        return super().handle_request(req, conn)

    # answers go out ---------------------------------------------------------------------------------

    def finish_request(self, conn: TConn, fs: futures.Future) -> None:
        if self.reason_plain:
            return super().finish_request(conn, fs)
        try:
            keep = not fs.cancelled() and fs.result() is True and conn.trusted
        except Exception:
            keep = False
        outbox = conn.outbox
        if not outbox.data:
            return self._answered(conn, fs, keep)
        now = time.monotonic()
        outbox.started = now
        outbox.deadline = min(now + self.limits.send_timeout, max(self.stop_deadline, now + self.limits.linger))
        self.unsent += len(outbox.data)
        self.writing[conn] = None
        conn.sock.setblocking(False)
        self.poller.register(conn.sock, selectors.EVENT_WRITE, partial(self._on_writable, conn, fs, keep))
        while self.unsent > self.limits.max_unsent and self._evict(min_age=0.0, writers=True):
            self.refused["answer memory limit"] += 1

    def _on_writable(self, conn: TConn, fs: futures.Future, keep: bool, _fileobj: Any) -> None:
        try:
            sent = conn.outbox.flush()
        except OSError:
            return self._close(conn)
        self.unsent -= sent
        if not conn.outbox.data:
            self._unwatch(conn)
            self._answered(conn, fs, keep)

    def _answered(self, conn: TConn, fs: futures.Future, keep: bool) -> None:
        """The answer is out: read the next request, keep the connection alive, or close it."""
        if not keep:
            self._linger(conn)  # gthread's graceful close would block this loop for up to 2 s
        elif conn.intake.pending:
            self._read_next(conn)
        else:
            super().finish_request(conn, fs)

    def _refuse(self, conn: TConn, refusal: Refusal) -> None:
        self._send(conn, refusal.response())
        self._linger(conn)

    def _send(self, conn: TConn, data: bytes) -> None:
        """Best effort and never blocking: our replies are a few hundred bytes."""
        try:
            conn.sock.send(data)
        except OSError:
            pass

    def _linger(self, conn: TConn) -> None:
        """Half-close, then drop what the client still sends until it closes or `linger` runs out."""
        intake = conn.intake
        self.buffered -= len(intake.pending)
        intake.pending.clear()
        intake.closing = True
        intake.deadline = time.monotonic() + self.limits.linger
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self._close(conn)
        self._watch(conn)

    def _close(self, conn: TConn) -> None:
        self._unwatch(conn)
        self.buffered -= len(conn.intake.pending)
        conn.intake.pending.clear()
        self.unsent -= len(conn.outbox.data)
        conn.outbox.data.clear()
        self.nr_conns -= 1
        conn.close()

    def _evict(self, min_age: float, writers: bool = False) -> bool:
        """Close one connection still being read (with `writers`: whose answer is still being sent): one
        already closing, else the oldest read (or sent to) for at least `min_age` s, from the address that
        holds the most (a fast client's request is in within ms, and it takes its answer as fast)."""
        pool = self.writing if writers else self.reading
        since = (lambda c: c.outbox.started) if writers else (lambda c: c.intake.started)
        now = time.monotonic()
        counts: Counter = Counter()
        for conn in pool:
            if conn.intake.closing:
                self._close(conn)
                return True
            counts[_address(conn)] += 1
        aged = [c for c in pool if now - since(c) >= min_age]
        if not aged:
            return False
        self._close(max(aged, key=lambda c: counts[_address(c)]))  # max() keeps the oldest among equals
        return True

    # deadlines -------------------------------------------------------------------------------------

    def murder_pending(self) -> None:
        super().murder_pending()
        self._review_accepting()
        now = time.monotonic()
        if not self.alive and self.stop_deadline == float("inf"):
            self.stop_deadline = now + self.limits.linger
            for conn in self.reading:
                conn.intake.deadline = min(conn.intake.deadline, self.stop_deadline)
            for conn in self.writing:
                conn.outbox.deadline = min(conn.outbox.deadline, self.stop_deadline)
        if now >= self.next_expiry:
            self.next_expiry = now + EXPIRY_EVERY
            self._expire(now)
            self._make_room()
        if now >= self.next_report:
            self.next_report = now + REPORT_EVERY
            self._report()

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.writing if c.outbox.deadline <= now]:
            self.refused["answer not taken in time"] += 1
            self._close(conn)  # mid-answer: nothing more can be said on this connection
        for conn in [c for c in self.reading if c.intake.deadline <= now]:
            intake = conn.intake
            if intake.closing or (intake.head_len is None and not intake.pending):
                self._close(conn)  # an idle connection, or one that had its reply: no answer due
                continue
            self.refused["408 timeout"] += 1
            self._refuse(conn, intake.expired())

    def _report(self) -> None:
        if self.refused:
            counts = ", ".join(f"{n} {why}" for why, n in self.refused.most_common())
            self.log.warning("slow or oversized requests, or answers not taken, in the last %d s: %s",
                             REPORT_EVERY, counts)
            self.refused.clear()
