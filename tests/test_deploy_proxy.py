"""End to end behind real nginx and Caddy, configured by `strategy-host deploy`: HTTPS, login, slow clients, allowlist."""
from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import statistics
import threading
import time

import pytest

from conftest import alert
from host import deploy
from proxyproc import Caddy, Nginx, https, request, self_signed
from serverproc import ServerProcess, free_port

pytestmark = pytest.mark.slow
ALLOWED = "127.0.0.2"  # stands in for a TradingView sender: the whole of 127/8 is loopback
FLOODER = "127.0.0.8"  # also allowed, so that its flood is limited by rate only


@pytest.fixture(scope="module", params=["nginx", "caddy"])
def front(request, tmp_path_factory):
    """The host under `strategy-host run` with deploy's host.env, and the proxy with deploy's config."""
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    host_port, http_port, https_port = free_port(), free_port(), free_port()
    common = {"domain": "localhost", "proxy": kind, "port": host_port, "tradingview_only": True,
              "webhook_ips": (ALLOWED, FLOODER), "listen_address": "127.0.0.1", "http_port": http_port,
              "https_port": https_port, "webhook_burst": 50}  # the default 500 would take long to use up
    if kind == "nginx":
        cert, key = self_signed(folder)
        opts = deploy.DeployOptions(**common, cert=str(cert), key=str(key))
        proxy = Nginx(folder, deploy.render(opts, "nginx.conf"))
    else:
        opts = deploy.DeployOptions(**common, tls_internal=True, caddy_admin_off=True,
                                    caddy_request_buffers=deploy.caddy_has_request_buffers())
        proxy = Caddy(folder, deploy.render(opts, "Caddyfile"))
    secrets = deploy.new_secrets()
    env_file = folder / "host.env"
    env_file.write_text(deploy.render(opts, "host.env", secrets))
    env_file.chmod(0o600)
    host = ServerProcess(folder, "--env", str(env_file), port=host_port,
                         env={"DATA_DIR": str(folder / "var"), "PLUGINS_DIR": str(folder / "plugins"),
                              "SQUARE_OFF_TIME": "off"})
    try:
        host.start()
        proxy.start((http_port, https_port))
        yield {"kind": kind, "host": host, "proxy": proxy, "cert": cert if kind == "nginx" else proxy.cafile,
               "https_port": https_port, "http_port": http_port, "secrets": secrets}
    finally:
        proxy.stop()
        host.stop()


def _body(front, **kw) -> bytes:
    return json.dumps({**alert(**kw), "secret_key": front["secrets"]["WEBHOOK_SECRET"]}).encode()


def _webhook(front, source: str = ALLOWED, headers: dict = None, **kw) -> tuple[int, dict]:
    conn = https(front["https_port"], front["cert"], source)
    try:
        status, _, body = request(conn, "POST", "/webhook", _body(front, **kw),
                                  {"Content-Type": "application/json", **(headers or {})})
    finally:
        conn.close()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {"raw": body.decode(errors="replace")}


def _alerts(front) -> list:
    conn = https(front["https_port"], front["cert"])
    status, _, body = request(conn, "GET", "/api/alerts",
                              headers={"Authorization": f"Bearer {front['secrets']['API_TOKEN']}"})
    conn.close()
    assert status == 200, body
    return json.loads(body)["items"]


def test_webhook_over_https_names_the_real_client(front):
    status, reply = _webhook(front, alert_id="https-1", headers={"X-Forwarded-For": "52.89.214.238"})
    assert status == 200 and reply["status"] == "accepted", reply
    # nginx replaced the client's own X-Forwarded-For; the host believed nginx (TRUSTED_PROXIES)
    assert _alerts(front)[0]["source_ip"] == ALLOWED


def test_plain_http_only_redirects_to_https(front):
    conn = http.client.HTTPConnection("localhost", front["http_port"], timeout=10, source_address=("127.0.0.1", 0))
    status, headers, _ = request(conn, "POST", "/webhook", _body(front), {"Content-Type": "application/json"})
    conn.close()
    assert status in (301, 308) and re.match(rf"https://localhost(:{front['https_port']})?/webhook$",
                                             headers["location"]), (status, headers)


def test_the_allowlist_refuses_other_addresses_at_the_proxy_and_in_the_host(front):
    status, reply = _webhook(front, source="127.0.0.3", alert_id="refused-1", headers={"X-Forwarded-For": ALLOWED})
    assert status == 403 and "raw" in reply, reply  # the proxy's own answer, not the host's JSON
    # straight to the host's port from an address that is not a trusted proxy: its X-Forwarded-For is not believed
    conn = http.client.HTTPConnection("127.0.0.1", front["host"].port, timeout=10, source_address=("127.0.0.3", 0))
    status, _, body = request(conn, "POST", "/webhook", _body(front, alert_id="refused-2"),
                              {"Content-Type": "application/json", "X-Forwarded-For": ALLOWED, "X-Real-IP": ALLOWED})
    conn.close()
    assert status == 403 and "caller 127.0.0.3 is not in WEBHOOK_ALLOWED_IPS" in json.loads(body)["error"]
    # from the trusted proxy's address the header is believed: the allowlist judges the client it names
    conn = http.client.HTTPConnection("127.0.0.1", front["host"].port, timeout=10)
    status, _, body = request(conn, "POST", "/webhook", _body(front, alert_id="refused-3"),
                              {"Content-Type": "application/json", "X-Forwarded-For": "127.0.0.9"})
    conn.close()
    assert status == 403 and "caller 127.0.0.9" in json.loads(body)["error"]
    assert not [a for a in _alerts(front) if a.get("client_alert_id", "").startswith("refused")]


def test_dashboard_login_over_https(front):
    base = f"https://localhost:{front['https_port']}"
    conn = https(front["https_port"], front["cert"], "127.0.0.7")
    status, headers, page = request(conn, "GET", "/login")
    assert status == 200
    cookie = headers["set-cookie"].split(";")[0]
    token = re.search(rb'name="csrf_token" value="([^"]+)"', page).group(1).decode()
    form = f"csrf_token={token}&password={front['secrets']['DASHBOARD_PASSWORD']}"
    status, headers, _ = request(conn, "POST", "/login", form.encode(), {
        "Cookie": cookie, "Origin": base, "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 302, headers
    assert "secure" in headers["set-cookie"].lower() and "httponly" in headers["set-cookie"].lower()
    status, _, page = request(conn, "GET", "/", headers={"Cookie": headers["set-cookie"].split(";")[0]})
    conn.close()
    assert status == 200 and b"Log in" not in page


def test_login_and_webhook_are_rate_limited_per_address(front):
    if front["kind"] == "caddy":
        assert "no rate limiter" in (front["proxy"].folder / "Caddyfile").read_text()
        return  # Debian's Caddy has none: the Caddyfile says so (and `deploy` prints it)
    conn = https(front["https_port"], front["cert"], "127.0.0.4")
    codes = [request(conn, "GET", "/login")[0] for _ in range(40)]
    conn.close()
    assert 200 in codes and codes[-1] == 429, codes
    assert codes.count(200) <= 25  # burst 20, 30 a minute
    conn = https(front["https_port"], front["cert"], "127.0.0.5")  # another address is not affected
    assert request(conn, "GET", "/login")[0] == 200
    conn.close()
    conn = https(front["https_port"], front["cert"], FLOODER)
    codes = [request(conn, "POST", "/webhook", b"{}", {"Content-Type": "application/json"})[0] for _ in range(100)]
    conn.close()
    assert codes[0] == 401 and codes[-1] == 429 and codes.count(429) >= 20, codes


class SlowClient(threading.Thread):
    """A TLS connection that sends a webhook request one byte a second: headers, or the body after them."""

    def __init__(self, port: int, cafile, body: bool, stop: threading.Event):
        super().__init__(daemon=True)
        self.port, self.cafile, self.body, self.stop = port, cafile, body, stop
        self.sent, self.error = 0, None

    def run(self) -> None:
        try:
            ctx = ssl.create_default_context(cafile=str(self.cafile))
            with socket.create_connection(("127.0.0.1", self.port), timeout=5,
                                          source_address=("127.0.0.6", 0)) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    head = b"POST /webhook HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    if self.body:
                        s.sendall(head + b"Content-Length: 5000\r\n\r\n")
                        trickle = b"{" + b" " * 4999
                    else:
                        trickle = head
                    for byte in trickle:
                        if self.stop.wait(1.0):
                            return
                        s.sendall(bytes([byte]))
                        self.sent += 1
        except OSError as e:
            self.error = e


def test_slow_clients_through_the_proxy_do_not_slow_a_webhook(front):
    def timed(n: int, tag: str) -> list[float]:
        times = []
        for i in range(n):
            t = time.monotonic()
            status, reply = _webhook(front, alert_id=f"{tag}-{i}", strategy=f"slow-{tag}-{i}")
            times.append(time.monotonic() - t)
            assert status == 200, reply
        return times

    timed(2, "warm")
    baseline = timed(5, "base")
    stop = threading.Event()
    attackers = [SlowClient(front["https_port"], front["cert"], body=i % 2 == 1, stop=stop) for i in range(20)]
    try:
        for a in attackers:
            a.start()
        time.sleep(3)  # every attacker is connected and trickling
        attacked = timed(8, "attack")
        alive = [a for a in attackers if a.error is None and a.sent >= 3 and a.is_alive()]
    finally:
        stop.set()
        for a in attackers:
            a.join(5)
    print(f"webhook via {front['kind']}: baseline p50 {statistics.median(baseline) * 1000:.0f} ms, "
          f"with 20 slow clients p50 {statistics.median(attacked) * 1000:.0f} ms, max {max(attacked) * 1000:.0f} ms")
    assert len(alive) == 20, [(a.sent, a.error) for a in attackers]  # the attack was really going on
    assert statistics.median(attacked) <= 3 * statistics.median(baseline) + 0.1
    assert max(attacked) < 2.0
