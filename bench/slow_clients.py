"""Webhook latency while slow clients trickle headers or bodies at 1 byte/s, or never read their answers,
directly on the host's port.

Usage: python bench/slow_clients.py [--slow 20] [--seconds 30] [--flood 200] [--readers 16]
                                    [--worker-class CLASS] [--short]
Prints p50/p99 of a normal webhook (sequential, one keep-alive connection, 20 a second) alone, then
while --slow clients send headers at 1 byte/s, while --slow clients send bodies at 1 byte/s, while
--flood clients do both (half each), and while --readers clients each pipeline ~140 KB of GETs of the
dashboard's stylesheet and read none of the answers, every phase --seconds long, with ratios to the
baseline. A client the host closes reconnects at once, as an attacker would. `--worker-class gthread`
measures plain gunicorn gthread for comparison. --short (for CI) runs short phases and asserts nothing.
"""
from __future__ import annotations

import argparse
import http.client
import selectors
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from webhook_latency import body, free_port, pct, start_host, wait_up

PACE = 0.05  # seconds between normal webhooks
HEAD = b"POST /webhook HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"


class Attack:
    """`count` hostile connections, run by a thread of their own while in a `with` block.

    Every `interval` each open connection takes its next step; a connection the host closes is opened
    again when `reopen` (as an attacker would); `closes` records each close.
    """

    def __init__(self, port: int, count: int, interval: float, reopen: bool):
        self.port = port
        self.interval = interval
        self.reopen = reopen
        self.socks: list = [None] * count
        self.opened_at = [0.0] * count
        self.closes: list = []
        self.connected = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self) -> "Attack":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        for s in self.socks:
            if s:
                s.close()

    def run(self) -> None:
        while not self.stop.is_set():
            for i, s in enumerate(self.socks):
                if s is None:
                    try:
                        self.socks[i] = self.open(i)
                    except OSError:
                        continue
                    self.opened_at[i] = time.monotonic()
                elif s:
                    self.step(i)
            self.connected.set()
            self.pause()

    def drop(self, i: int) -> float:
        """Close connection i (the host closed it); the seconds it was open."""
        self.socks[i].close()
        self.socks[i] = None if self.reopen else False
        return time.monotonic() - self.opened_at[i]

    def open(self, i: int) -> socket.socket:
        raise NotImplementedError

    def step(self, i: int) -> None:
        raise NotImplementedError

    def pause(self) -> None:
        self.stop.wait(self.interval)


class Trickle(Attack):
    """`headers` + `bodies` connections each sending one byte per `interval`, of headers or of a body;
    `closes` holds, for each close, the kind, the seconds it was open and the first bytes the host answered.
    """

    def __init__(self, port: int, headers: int, bodies: int, interval: float = 1.0, reopen: bool = True):
        self.kinds = ["headers"] * headers + ["body"] * bodies
        self.sel = selectors.DefaultSelector()
        super().__init__(port, len(self.kinds), interval, reopen)

    @property
    def answered_408(self) -> int:
        return sum(reply.startswith(b"HTTP/1.1 408") for _, _, reply in self.closes)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.sel.close()

    def open(self, i: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.setblocking(False)
        if self.kinds[i] == "body":  # the whole head at once, then the body a byte at a time
            s.send(HEAD + b"Content-Length: 10000\r\n\r\n")
        else:
            s.send(HEAD + b"X-Pad: ")
        self.sel.register(s, selectors.EVENT_READ, i)
        return s

    def step(self, i: int) -> None:
        try:
            self.socks[i].send(b"a")
        except OSError:
            self.closed(i, b"")

    def pause(self) -> None:
        """Read what the host answers until the next step."""
        deadline = time.monotonic() + self.interval
        while not self.stop.is_set() and (left := deadline - time.monotonic()) > 0:
            for key, _ in self.sel.select(min(left, 0.1)):
                self.read(key.data)

    def read(self, i: int) -> None:
        try:
            data = self.socks[i].recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.closed(i, data)

    def closed(self, i: int, reply: bytes) -> None:
        self.sel.unregister(self.socks[i])
        self.closes.append((self.kinds[i], self.drop(i), reply))


TCP_ESTABLISHED = 1  # tcpi_state, the first byte of Linux's struct tcp_info


class NonReaders(Attack):
    """`count` connections that each pipeline `pipelined` GETs of the dashboard's stylesheet and read no answer;
    `closes` holds the seconds each was open. That the host closed one is seen in the socket's TCP state
    (Linux), without reading.
    """

    REQUEST = b"GET /static/dashboard.css HTTP/1.1\r\nHost: bench\r\n\r\n"

    def __init__(self, port: int, count: int, pipelined: int = 3000, reopen: bool = True, interval: float = 0.1):
        super().__init__(port, count, interval, reopen)
        self.unsent = [b""] * count
        self.requests = self.REQUEST * pipelined

    def open(self, i: int) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # take as little of the answers as TCP lets us
        s.settimeout(5)
        s.connect(("127.0.0.1", self.port))
        s.setblocking(False)
        self.unsent[i] = self.requests
        return s

    def step(self, i: int) -> None:
        if not self.push(i):
            self.closes.append(self.drop(i))

    def push(self, i: int) -> bool:
        """Send what the host will take of the requests; False once the host has closed the connection."""
        s = self.socks[i]
        if s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED:
            return False
        try:
            sent = s.send(self.unsent[i]) if self.unsent[i] else 0
        except BlockingIOError:
            return True
        except OSError:
            return False
        self.unsent[i] = self.unsent[i][sent:]
        return True


def webhooks(port: int, seconds: float, tag: str) -> tuple[list[float], int]:
    """Normal webhooks one after another over keep-alive for `seconds`; latencies and failures."""
    latencies: list[float] = []
    failures = 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=seconds + 10)
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/webhook", body(i, tag), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            ok = resp.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()
        dt = time.perf_counter() - t0
        latencies.append(dt)
        failures += not ok
        time.sleep(max(0.0, PACE - dt))
    conn.close()
    return latencies, failures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slow", type=int, default=20, help="slow clients in the headers and the body phase")
    ap.add_argument("--flood", type=int, default=200, help="slow clients in the flood phase (0: skip it)")
    ap.add_argument("--readers", type=int, default=16, help="clients in the phase that reads no answer (0: skip)")
    ap.add_argument("--seconds", type=float, default=30, help="length of each phase")
    ap.add_argument("--worker-class", help="a gunicorn worker class instead of the host's (e.g. gthread)")
    ap.add_argument("--short", action="store_true", help="4 s phases, 40 clients in the flood (for CI)")
    args = ap.parse_args()
    if args.short:
        args.seconds, args.flood = 4, min(args.flood, 40)
    env = {"GUNICORN_CMD_ARGS": f"--worker-class {args.worker_class}"} if args.worker_class else {}
    work = Path(tempfile.mkdtemp(prefix="bench-slow-"))
    port = free_port()
    host = start_host(work, port, **env)
    phases = [("alone", lambda: Trickle(port, 0, 0)),
              (f"{args.slow} slow headers", lambda: Trickle(port, args.slow, 0)),
              (f"{args.slow} slow bodies", lambda: Trickle(port, 0, args.slow))]
    if args.flood:
        phases.append((f"{args.flood} slow, half each",
                       lambda: Trickle(port, args.flood // 2, args.flood - args.flood // 2)))
    if args.readers:
        phases.append((f"{args.readers} never reading", lambda: NonReaders(port, args.readers)))
    rows = []
    try:
        wait_up(port)
        webhooks(port, 1.0, "warm")
        for n, (name, clients) in enumerate(phases):
            with clients() as slow:
                slow.connected.wait(10)
                time.sleep(1.0 if n else 0)  # let them start trickling, or be answered until they take no more
                latencies, failures = webhooks(port, args.seconds, f"p{n}-")
            rows.append((name, latencies, failures, len(slow.closes), getattr(slow, "answered_408", "-")))
    finally:
        host.terminate()
        host.wait(40)
        shutil.rmtree(work, ignore_errors=True)
    ms = 1000
    base = pct(rows[0][1], 50)
    print(f"worker: {args.worker_class or 'host default'}; {args.seconds:g} s per phase; webhooks sequential over "
          f"keep-alive, one every {PACE * ms:.0f} ms; slow clients send 1 byte/s (or read nothing) and "
          f"reconnect when closed")
    print(f"{'phase':28}{'sent':>6}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}{'p50 ratio':>11}{'closed':>8}{'408s':>6}")
    for name, lat, failures, closed, answered in rows:
        p50 = pct(lat, 50)
        print(f"{name:28}{len(lat):6}{failures:8}{p50 * ms:9.2f}{pct(lat, 99) * ms:9.2f}{p50 / base:10.2f}x"
              f"{closed:8}{answered!s:>6}")


if __name__ == "__main__":
    main()
