"""The simulator rehearsal works on any port: `strategy-host sim` prints every variable the host needs, its OAuth
redirect follows the host that started the login, and a Connect broker click that cannot come back says so."""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests

from conftest import TOKEN, Host, alert, make_settings
from host.config import load
from host.web import broker as broker_login

ROOT = Path(__file__).resolve().parent.parent


def test_strategy_host_sim_prints_every_variable_a_live_host_needs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "host", "sim", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    try:
        lines = []
        while not lines or "docs/simulator.md" not in lines[-1]:
            line = proc.stdout.readline()
            assert line, f"the simulator stopped: {lines}"
            lines.append(line.strip())
    finally:
        proc.terminate()
        proc.wait(10)
    printed = [line for line in lines if "=" in line and " " not in line]
    names = [line.split("=", 1)[0] for line in printed]
    assert {"BROKER", "USER_ID", "SHOONYA_AUTH", "OAUTH_CLIENT_ID", "OAUTH_SECRET", "SHOONYA_API_URL", "SHOONYA_WS_URL",
            "SHOONYA_OAUTH_URL", "SHOONYA_SYMBOLS_URL"} <= set(names)
    assert (ROOT / "docs" / "simulator.md").is_file() and "/sim/control" in lines[-1]
    path = tmp_path / "live.env"
    path.write_text("\n".join(printed) + f"\nDATA_DIR={tmp_path / 'var'}\nWEBHOOK_SECRET=wwwwwwwwwwww\n"
                    f"API_TOKEN={'t' * 20}\nDASHBOARD_PASSWORD=pppppppp\n")
    os.chmod(path, 0o600)
    s = load(str(path), environ={}, strict=True)  # `check` finds nothing to say
    assert s.BROKER == "shoonya" and s.SHOONYA_SYMBOLS_URL.startswith("http://127.0.0.1:")


def _live(sim, data_dir):
    settings = make_settings(data_dir, BROKER="shoonya", SHOONYA_AUTH="oauth", USER_ID="FA12345",
                             OAUTH_CLIENT_ID=sim.sim.client_id, OAUTH_SECRET=sim.sim.client_secret,
                             SHOONYA_API_URL=sim.api_url, SHOONYA_WS_URL=sim.ws_url,
                             SHOONYA_OAUTH_URL=sim.oauth_url, SHOONYA_SYMBOLS_URL=f"http://127.0.0.1:{sim.port}/")
    return Host(settings, broker_timeout_s=1.0).start()


def test_the_login_comes_back_to_the_host_that_started_it_whatever_its_port(sim, tmp_path):
    h = _live(sim, tmp_path / "var")
    try:
        for port in (18765, 8000):
            r = h.client.get(f"/broker/login?token={TOKEN}", base_url=f"http://127.0.0.1:{port}")
            back = requests.get(r.headers["Location"], allow_redirects=False, timeout=5)
            assert back.status_code == 302
            assert back.headers["Location"].startswith(f"http://127.0.0.1:{port}/broker/callback?code=")
        query = urlparse(back.headers["Location"]).query
        r = h.client.get(f"/broker/callback?{query}", base_url=f"http://127.0.0.1:{port}")
        assert r.get_json()["broker_session"] == "valid", r.get_json()
        assert h.post(alert()).status_code == 200
    finally:
        h.stop()


def test_the_real_broker_is_never_told_where_to_come_back():
    real = broker_login.authorize_url("https://api.shoonya.com/", "CID", "http://127.0.0.1:8000/broker/callback")
    assert real == "https://api.shoonya.com/?client_id=CID"
    local = parse_qs(urlparse(broker_login.authorize_url("http://127.0.0.1:9100/authorize", "CID", "http://x:1/cb")).query)
    assert local == {"client_id": ["CID"], "redirect_uri": ["http://x:1/cb"]}


def test_a_registered_redirect_url_refuses_another_with_a_reason(sim):
    sim.sim.redirect_url = "http://127.0.0.1:8000/broker/callback"
    r = requests.get(f"{sim.oauth_url}?client_id={sim.sim.client_id}&redirect_uri=http://127.0.0.1:9/broker/callback",
                     allow_redirects=False, timeout=5)
    assert r.status_code == 400 and "not the redirect URL registered" in r.text and "127.0.0.1:8000" in r.text


def test_a_connect_broker_click_that_cannot_come_back_says_so(sim, tmp_path):
    from test_dashboard import PASSWORD, csrf_of
    h = _live(sim, tmp_path / "var")

    def login(base_url: str) -> None:
        token = csrf_of(h.client.get("/login", base_url=base_url).get_data(as_text=True))
        assert h.client.post("/login", data={"password": PASSWORD, "csrf_token": token},
                             base_url=base_url).status_code == 302
    try:
        remote = "http://192.0.2.10:8000"  # the page opened from another machine; the simulator is on loopback
        login(remote)
        login("http://127.0.0.1:8000")
        html = h.client.get("/broker", base_url=remote).get_data(as_text=True)
        assert 'id="connect-broker-problem"' in html and "cannot open it" in html
        html = h.client.get("/broker", base_url="http://127.0.0.1:8000").get_data(as_text=True)
        assert 'id="connect-broker-problem"' not in html
        assert "The simulator sends you back to http://127.0.0.1:8000/broker/callback" in html
    finally:
        h.stop()


RECORDER = """
import json, sys
class Chunks:
    '''stdout that shows each write apart (as JSON lines on stderr), to see how the banner is written.'''
    def write(self, text):
        sys.__stderr__.write(json.dumps(text) + "\\n")
        sys.__stderr__.flush()
        return len(text)
    def flush(self):
        pass
sys.stdout = Chunks()
from host.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_each_line_the_simulator_prints_is_written_whole(tmp_path):
    """Its WebSocket thread logs to the same pipe: a line written in pieces (text, then newline) can take a log
    line inside it, and the URL a trader pastes (or a test reads) ends in the log's date."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", RECORDER, "sim", "--port", "0", "--session", "FA12345:tok"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    chunks: list[str] = []
    try:
        while "docs/simulator.md" not in "".join(chunks):
            line = proc.stderr.readline()
            assert line, f"the simulator stopped: {chunks}"
            if line.startswith('"'):  # a write to stdout; anything else is its log
                chunks.append(json.loads(line))
    finally:  # (what is asserted is the writes, not how fast the simulator stops on a loaded machine)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert any("SHOONYA_API_URL=" in c for c in chunks)
    assert all(c.endswith("\n") for c in chunks), f"lines written in pieces: {chunks}"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="tgkill's number is known for these")
def test_the_simulator_stops_on_sigterm_whichever_thread_the_kernel_hands_it_to(tmp_path):
    """A process-wide SIGTERM goes to any thread that does not block it; one taken by the HTTP or WebSocket thread
    never woke a main thread blocked in Event.wait(), and the simulator ran on (a CI job's `kill` hung)."""
    import ctypes
    tgkill = {"x86_64": 234, "aarch64": 131}[platform.machine()]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "host", "sim", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while "docs/simulator.md" not in proc.stdout.readline():
            assert time.monotonic() < deadline and proc.poll() is None, "the simulator did not start"
        thread = next(int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid)
        assert ctypes.CDLL(None, use_errno=True).syscall(tgkill, proc.pid, thread, signal.SIGTERM) == 0
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
