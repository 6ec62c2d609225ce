"""Slow clients cannot starve the host: a real `strategy-host run`, slow connections straight on its port."""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import wait_for
from serverproc import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from slow_clients import NonReaders, Trickle  # noqa: E402  (the bench's slow clients, so test and bench agree)

pytestmark = pytest.mark.slow
TIMEOUTS = {"HTTP_HEADER_TIMEOUT_S": "2", "HTTP_BODY_TIMEOUT_S": "2", "HTTP_SEND_TIMEOUT_S": "2"}


@pytest.fixture
def server(tmp_path):
    started = []

    def make(*args, **env):
        s = ServerProcess(tmp_path / f"host{len(started)}", *args, env={**TIMEOUTS, **env}).start()
        started.append(s)
        return s
    yield make
    for s in started:
        s.stop()


def _alert(secret: str, n: int) -> dict:
    return {"secret_key": secret, "execution_type": "ENTRY", "strategy_name": f"slow{n}", "exchange": "NFO",
            "legs": [{"tradingsymbol": "NIFTY28APR26C24500", "direction": "BUY", "qty": "75", "order_type": "LMT",
                      "price": "42.5", "product_type": "M"}]}


def _timed_webhook(url: str, secret: str, n: int) -> float:
    t0 = time.monotonic()
    r = requests.post(url + "/webhook", json=_alert(secret, n), timeout=5)
    assert r.status_code == 200, r.text
    return time.monotonic() - t0


def test_a_webhook_answers_at_once_while_slow_clients_hold_forty_connections(server):
    s = server()
    secret = s.secrets()["WEBHOOK_SECRET"]
    with Trickle(s.port, headers=20, bodies=20, interval=0.25, reopen=False) as slow:
        assert slow.connected.wait(5)
        time.sleep(0.6)  # every slow connection has sent bytes: plain gthread has given all its threads away
        took = [_timed_webhook(s.url, secret, n) for n in range(3)]
        assert not slow.closes  # they were all still open meanwhile
    assert max(took) < 1.0, took


def test_slow_connections_are_answered_408_and_closed_after_the_configured_timeout(server):
    s = server()
    with Trickle(s.port, headers=20, bodies=20, interval=0.25, reopen=False) as slow:
        wait_for(lambda: len(slow.closes) == 40, timeout=8)
    for kind, seconds, reply in slow.closes:
        assert 1.5 < seconds < 4.5, (kind, seconds)
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        setting = "HTTP_HEADER_TIMEOUT_S" if kind == "headers" else "HTTP_BODY_TIMEOUT_S"
        assert setting in json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]


@pytest.mark.parametrize("limit, bound", [(None, 1.0), (50, 3.0)])
def test_two_hundred_slow_connections_do_not_take_it_down(server, limit, bound):
    """Under the connection limit nothing waits; over it (50 here), unfinished requests older than 0.25 s are
    shed to make room, and a new connection waits its turn in the listen backlog behind the attacker's."""
    s = server(**({"GUNICORN_CMD_ARGS": f"--worker-connections {limit}"} if limit else {}))
    secret = s.secrets()["WEBHOOK_SECRET"]
    with Trickle(s.port, headers=100, bodies=100, interval=0.5, reopen=True) as slow:
        assert slow.connected.wait(10)
        time.sleep(1.0)
        took = [_timed_webhook(s.url, secret, n) for n in range(3)]
        assert requests.get(s.url + "/healthz", timeout=5).status_code == 200
        if limit:
            assert len(slow.closes) >= 150  # shed to make room; each reconnected
    assert max(took) < bound, took
    assert "Traceback" not in s.output()


def test_clients_that_never_close_after_connection_close_do_not_stall_the_host(server):
    """gunicorn 27's gthread lingers up to 2 s per such connection in its main loop before closing it."""
    s = server()
    secret = s.secrets()["WEBHOOK_SECRET"]
    idle = []
    for _ in range(10):
        c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        idle.append(c)
    try:
        for c in idle:
            assert c.recv(4096).startswith(b"HTTP/1.1 200")
        took = [_timed_webhook(s.url, secret, n) for n in range(3)]
    finally:
        for c in idle:
            c.close()
    assert max(took) < 1.0, took


def test_clients_that_never_read_their_answers_hold_no_thread_and_are_closed_after_the_send_timeout(server):
    """Ten connections pipeline ~140 KB of GETs each and read nothing: their answers wait in the worker's
    memory, not in a thread blocked writing, and each connection is closed once an answer is stuck for 2 s."""
    s = server()
    secret = s.secrets()["WEBHOOK_SECRET"]
    with NonReaders(s.port, 10, reopen=False) as hogs:
        assert hogs.connected.wait(5)
        time.sleep(1.0)  # every one has been answered until its socket took no more
        took = [_timed_webhook(s.url, secret, n) for n in range(3)]
        assert requests.get(s.url + "/healthz", timeout=5).status_code == 200
        assert not hogs.closes  # still open meanwhile
        wait_for(lambda: len(hogs.closes) == 10, timeout=10)
    assert max(took) < 1.0, took
    assert all(1.5 < t < 6 for t in hogs.closes), hogs.closes
    assert "Traceback" not in s.output()


def test_a_client_that_reads_late_gets_every_pipelined_answer_whole_and_in_order(server):
    s = server()
    css = requests.get(s.url + "/static/dashboard.css", timeout=5).content
    with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
        c.sendall(b"GET /static/dashboard.css HTTP/1.1\r\nHost: h\r\n\r\n" * 80
                  + b"GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        time.sleep(1.0)  # half the send timeout: the answers (880 KB, more than both sockets hold) wait for us
        replies = _read_all(c)
    assert replies.count(css) == 80 and len(css) > 10000
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", replies) == [b"200"] * 81
    assert replies.rindex(css) < replies.rindex(b"HTTP/1.1 200")  # the health check's answer comes last


def test_expect_100_continue_gets_one_interim_answer(server):
    s = server()
    body = json.dumps(_alert(s.secrets()["WEBHOOK_SECRET"], 7)).encode()
    with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
        c.sendall(b"POST /webhook HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert c.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        c.sendall(body)
        replies = _read_all(c)
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", replies) == [b"200"], replies


def test_keep_alive_pipelining_and_the_refusals_a_thread_never_sees(server):
    s = server()
    secret = s.secrets()["WEBHOOK_SECRET"]
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
    socks = set()
    for n in range(3):
        conn.request("POST", "/webhook", json.dumps(_alert(secret, n)), {"Content-Type": "application/json"})
        assert conn.getresponse().read() and conn.sock is not None
        socks.add(id(conn.sock))
    assert len(socks) == 1  # one connection for all three
    conn.close()
    with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\nPOST /healthz HTTP/1.1\r\nHost: h\r\nContent-Length: 2"
                  b"\r\n\r\nokGET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        replies = _read_all(c)
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", replies) == [b"200", b"405", b"200"]
    chunked = requests.post(s.url + "/webhook", data=iter([b'{"a": 1}']), timeout=5)
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]
    big = requests.post(s.url + "/webhook", data=b"x" * 70000, timeout=5)
    assert big.status_code == 413 and big.json()["error"].endswith("found Content-Length 70000")
    huge_head = requests.get(s.url + "/healthz", headers={"X-Pad": "a" * 40000}, timeout=5)
    assert huge_head.status_code == 431
    expect = requests.post(s.url + "/webhook", json=_alert(secret, 9), headers={"Expect": "100-continue"}, timeout=5)
    assert expect.status_code == 200, expect.text


def test_sigterm_with_slow_clients_connected_exits_cleanly_within_seconds(server):
    s = server()
    with Trickle(s.port, headers=10, bodies=10, interval=0.25, reopen=False) as slow:
        assert slow.connected.wait(5)
        time.sleep(0.5)
        t0 = time.monotonic()
        assert s.terminate(30) == 0
        took = time.monotonic() - t0
    assert took < 10, took
    assert "Traceback" not in s.output()


def test_plain_gunicorn_with_our_config_uses_the_buffering_worker(tmp_path):
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(tmp_path / "var"), "PLUGINS_DIR": str(tmp_path / "plugins"),
           "WEBHOOK_SECRET": "plain-gunicorn-secret", "API_TOKEN": "plain-gunicorn-api-token",
           "DASHBOARD_PASSWORD": "plain-gunicorn-pw", "PYTHONPATH": str(ROOT), **TIMEOUTS}
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:host.gunicorn_conf", "--bind",
                                 f"127.0.0.1:{port}", "wsgi:app"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_for(lambda: _healthy(port), timeout=40)
        except AssertionError:
            raise AssertionError(f"gunicorn not healthy in 40 s:\n{log.read_text(errors='replace')[-3000:]}") from None
        with Trickle(port, headers=10, bodies=10, interval=0.25, reopen=False) as slow:
            assert slow.connected.wait(5)
            time.sleep(0.6)
            took = _timed_webhook(f"http://127.0.0.1:{port}", "plain-gunicorn-secret", 0)
        assert took < 1.0
    finally:
        os.killpg(proc.pid, 15)
        assert proc.wait(30) == 0
    assert "Using worker: host.http_worker.BufferingThreadWorker" in log.read_text()


def _read_all(c: socket.socket) -> bytes:
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    return data


def _healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False
