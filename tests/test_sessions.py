"""Revocable dashboard sessions, and a login lockout that slows everyone down but never locks the owner out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from conftest import SECRET, TOKEN
from test_dashboard import PASSWORD, csrf_of

COOKIE = "strategy_host_session"
REPO = Path(__file__).resolve().parent.parent
OWNER, ATTACKER = "198.51.100.7", "203.0.113.66"


def attempt(client, password: str = PASSWORD, address: str = OWNER, forwarded: str | None = None):
    """One login from `address` (and an X-Forwarded-For, when given)."""
    env = {"REMOTE_ADDR": address}
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    token = csrf_of(client.get("/login", environ_base=env, headers=headers).get_data(as_text=True))
    return client.post("/login", data={"password": password, "csrf_token": token}, environ_base=env, headers=headers)


def copy_of(h, client):
    """Another browser holding a copy of `client`'s session cookie."""
    thief = h.app.test_client()
    thief.set_cookie(COOKIE, client.get_cookie(COOKIE).value)
    return thief


def post(client, path: str):
    token = csrf_of(client.get("/risk").get_data(as_text=True))
    return client.post(path, data={"csrf_token": token})


def signed_in(client) -> bool:
    page, feed, api = client.get("/"), client.get("/panel/status"), client.get("/api/status")
    assert (page.status_code == 200) == (feed.status_code == 200) == (api.status_code == 200)
    return page.status_code == 200


def session_rows(h) -> int:
    return h.runtime.storage.one("select count(*) n from dashboard_sessions")["n"]


def failures(h) -> int:
    return h.runtime.storage.one("select count(*) n from login_failures")["n"]


def age_failures(h, seconds: float) -> None:
    """Move every recorded failed login `seconds` into the past (time passing, without sleeping)."""
    h.runtime.storage.write(lambda db: db.execute(
        "update login_failures set at = strftime('%Y-%m-%dT%H:%M:%f+00:00', at, ?)", (f"-{seconds} seconds",)))


def unlock_cli(data_dir: Path) -> subprocess.CompletedProcess:
    """`strategy-host unlock` in its own process, configured through the environment."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATA_DIR": str(data_dir), "WEBHOOK_SECRET": SECRET,
           "API_TOKEN": TOKEN, "DASHBOARD_PASSWORD": PASSWORD}
    return subprocess.run([sys.executable, "-m", "host", "unlock"], env=env, capture_output=True, text=True,
                          timeout=60)


def events(h, kind: str) -> list[dict]:
    return [{**e, "data": json.loads(e["data"] or "{}")}
            for e in h.runtime.storage.rows("select * from events where kind = ? order by id", (kind,))]


# ---- sessions ----
def test_a_copied_cookie_is_refused_after_logout_and_its_row_is_gone(host):
    assert attempt(host.client).status_code == 302
    thief = copy_of(host, host.client)
    assert signed_in(thief)
    assert post(host.client, "/logout").status_code == 302
    assert not signed_in(host.client) and not signed_in(thief)
    assert session_rows(host) == 0
    # the copy cannot act either: its page token is refused, and nothing changed
    assert thief.post("/risk/state", data={"mode": "halted"}).status_code in (302, 403)
    assert host.api("/api/risk").get_json()["state"] == "active"


def test_log_out_everywhere_ends_every_session_at_once(host):
    phone = host.app.test_client()
    assert attempt(host.client).status_code == 302 and attempt(phone, address="192.0.2.9").status_code == 302
    thief = copy_of(host, host.client)
    assert session_rows(host) == 2 and signed_in(phone) and signed_in(thief)
    assert 'action="/logout-everywhere"' in host.client.get("/").get_data(as_text=True)  # the button is there
    r = post(host.client, "/logout-everywhere")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    assert "2 sessions ended" in host.client.get("/login").get_data(as_text=True)
    assert not signed_in(host.client) and not signed_in(phone) and not signed_in(thief)
    assert session_rows(host) == 0
    ended = events(host, "logout_all")
    assert len(ended) == 1 and ended[0]["data"] == {"address": "127.0.0.1", "sessions": 2}
    assert attempt(phone, address="192.0.2.9").status_code == 302 and signed_in(phone)  # logging in again works


def test_sessions_expire_server_side(host):
    assert attempt(host.client).status_code == 302 and signed_in(host.client)
    host.runtime.storage.write(lambda db: db.execute("update dashboard_sessions set expires_at = '2000-01-01T00:00:00.000+00:00'"))
    assert not signed_in(host.client)


def test_a_shorter_session_lifetime_applies_to_sessions_already_open(host_factory):
    old = host_factory()
    assert attempt(old.client).status_code == 302
    cookie = old.client.get_cookie(COOKIE).value
    old.runtime.storage.write(lambda db: db.execute(
        "update dashboard_sessions set created_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now', '-2 hours')"))
    assert signed_in(old.client)  # 2 h into 12
    old.stop()
    old.runtime.storage.close()
    new = host_factory(DASHBOARD_SESSION_HOURS=1)
    new.client.set_cookie(COOKIE, cookie)
    assert not signed_in(new.client) and session_rows(new) == 0


def test_a_restart_keeps_a_valid_session_but_never_a_logged_out_one(host):
    assert attempt(host.client).status_code == 302
    cookie = host.client.get_cookie(COOKIE).value
    host.restart()
    host.client.set_cookie(COOKIE, cookie)
    assert signed_in(host.client)
    thief = copy_of(host, host.client)
    assert post(host.client, "/logout").status_code == 302
    host.restart()
    thief = copy_of(host, thief)
    assert not signed_in(thief)


def test_a_new_password_ends_every_session(host_factory):
    old = host_factory()
    assert attempt(old.client).status_code == 302
    cookie = old.client.get_cookie(COOKIE).value
    # the server-side check itself: a session opened under another password is refused
    saved = old.runtime.storage.one("select fingerprint from dashboard_sessions")["fingerprint"]
    old.runtime.storage.write(lambda db: db.execute("update dashboard_sessions set fingerprint = 'other'"))
    assert not signed_in(old.client)
    old.runtime.storage.write(lambda db: db.execute("update dashboard_sessions set fingerprint = ?", (saved,)))
    assert signed_in(old.client)
    old.stop()
    old.runtime.storage.close()
    new = host_factory(DASHBOARD_PASSWORD="a-new-dashboard-password")  # the env changed, and a restart
    new.client.set_cookie(COOKIE, cookie)
    assert not signed_in(new.client)
    assert session_rows(new) == 0  # its row is gone, not left to expire
    assert attempt(new.client).status_code == 401
    assert attempt(new.client, "a-new-dashboard-password").status_code == 302


def test_a_login_replaces_the_browsers_earlier_session(host):
    assert attempt(host.client).status_code == 302
    before = copy_of(host, host.client)
    assert attempt(host.client).status_code == 302
    assert session_rows(host) == 1 and not signed_in(before) and signed_in(host.client)


# ---- the slow-down and the lockout ----
def test_five_wrong_passwords_do_not_lock_the_owner_out(host):
    for n in range(4):
        r = attempt(host.client, "wrong-password")
        assert r.status_code == 401 and f"{4 - n} attempt" in r.get_data(as_text=True)
    r = attempt(host.client, "wrong-password")
    assert r.status_code == 401 and "possible in 1 s" in r.get_data(as_text=True) and r.headers["Retry-After"] == "1"
    r = attempt(host.client)  # right, but too soon: not even checked
    assert r.status_code == 429 and "Try again in 1 s" in r.get_data(as_text=True)
    assert r.headers["Retry-After"] == "1" and "Locked out" not in r.get_data(as_text=True)
    age_failures(host, 1.1)
    assert attempt(host.client).status_code == 302 and signed_in(host.client)
    # the events name the real address
    failed = events(host, "login_failed")
    assert len(failed) == 5 and all(e["data"]["address"] == OWNER and OWNER in e["message"] for e in failed)
    assert failed[-1]["data"]["wait_s"] == 1
    assert [e["data"] for e in events(host, "login")] == [{"address": OWNER}]


def test_rotating_addresses_get_no_more_guesses_than_one(host_factory):
    h = host_factory(DASHBOARD_LOGIN_ATTEMPTS=3, TRUST_PROXY_HEADERS="true")
    addresses = (f"203.0.113.{i}" for i in range(1, 200))
    guess = lambda: attempt(h.client, "guess-guess", next(addresses), forwarded=next(addresses))  # noqa: E731
    assert [guess().status_code for _ in range(3)] == [401, 401, 401]
    refused = [guess() for _ in range(10)]
    assert {r.status_code for r in refused} == {429} and {r.headers["Retry-After"] for r in refused} == {"1"}
    assert failures(h) == 3  # ten new addresses, not one more guess
    age_failures(h, 1.1)
    r = guess()
    assert r.status_code == 401 and r.headers["Retry-After"] == "2"  # 1, 2, 4 ... s
    assert guess().status_code == 429 and failures(h) == 4
    age_failures(h, 2.1)
    assert guess().headers["Retry-After"] == "4"
    for _ in range(10):  # up to the cap
        age_failures(h, 61)
        r = guess()
    assert r.status_code == 401 and r.headers["Retry-After"] == "60"


def test_parallel_guesses_pass_one_at_a_time(host_factory):
    h = host_factory(DASHBOARD_LOGIN_ATTEMPTS=1)
    start, codes = threading.Barrier(12), []

    def guess(i: int) -> None:
        client = h.app.test_client()
        token = csrf_of(client.get("/login").get_data(as_text=True))
        start.wait(timeout=10)
        codes.append(client.post("/login", data={"password": f"guess-{i}", "csrf_token": token},
                                 environ_base={"REMOTE_ADDR": f"203.0.113.{i}"}).status_code)
    threads = [threading.Thread(target=guess, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(codes) == [401] + [429] * 11 and failures(h) == 1


def test_an_address_is_locked_only_after_many_failures_and_unlock_clears_it(host_factory, data_dir):
    h = host_factory(DASHBOARD_LOGIN_ATTEMPTS=6, DASHBOARD_ADDRESS_LOCK_ATTEMPTS=6, DASHBOARD_LOCKOUT_S=600)
    for _ in range(5):
        assert attempt(h.client, "wrong-password", ATTACKER).status_code == 401
    r = attempt(h.client, "wrong-password", ATTACKER)
    assert r.status_code == 429 and f"from {ATTACKER}: locked out for 10 min" in r.get_data(as_text=True)
    r = attempt(h.client, address=ATTACKER)  # the right password from the locked address
    assert r.status_code == 429 and "Locked out: try again in 10 min" in r.get_data(as_text=True)
    assert int(r.headers["Retry-After"]) > 590
    # the owner elsewhere is neither locked out nor slowed down by the locked address's failures
    assert attempt(h.app.test_client()).status_code == 302
    locked = events(h, "login_failed")[-1]
    assert locked["data"]["address"] == ATTACKER and locked["data"]["locked_s"] == 600 and ATTACKER in locked["message"]
    out = unlock_cli(data_dir)
    assert out.returncode == 0 and "6 failed logins forgotten" in out.stdout, out.stderr
    assert failures(h) == 0 and len(events(h, "login_unlocked")) == 1
    assert attempt(h.client, address=ATTACKER).status_code == 302  # the running host sees it at once


def test_unlock_without_a_database_says_so(tmp_path):
    out = unlock_cli(tmp_path / "none")
    assert out.returncode == 1 and "nothing is locked" in out.stderr and not (tmp_path / "none" / "host.sqlite").exists()


def test_a_browser_that_logged_in_before_is_kept_out_by_no_stranger(host_factory):
    h = host_factory(DASHBOARD_LOGIN_ATTEMPTS=3, DASHBOARD_ADDRESS_LOCK_ATTEMPTS=4, TRUST_PROXY_HEADERS="true")
    owner, stranger = h.app.test_client(), h.app.test_client()
    assert attempt(owner, address="127.0.0.1").status_code == 302  # through the proxy, like everyone
    cookie = owner.get_cookie("strategy_host_device", path="/login")
    assert cookie is not None and cookie.http_only
    assert post(owner, "/logout").status_code == 302
    for i in range(9):  # guesses through the same proxy address, then from rotating ones, timed to the delay
        age_failures(h, 61)
        assert attempt(stranger, "guess-guess", "127.0.0.1" if i < 4 else f"203.0.113.{i}").status_code in (401, 429)
    assert failures(h) == 9
    assert attempt(stranger, "guess-guess", address="127.0.0.1").status_code == 429  # the proxy address: locked
    assert attempt(stranger, address="203.0.113.99").status_code == 429            # everyone else: slowed down
    assert attempt(owner, address="127.0.0.1").status_code == 302  # the owner's browser: straight in
    # a forged or foreign browser mark is nobody's
    forged = h.app.test_client()
    forged.set_cookie("strategy_host_device", "forged.value", path="/login")
    assert attempt(forged, address="203.0.113.98").status_code == 429
    # the owner's browser has its own slow-down: a stolen mark buys only that
    assert post(owner, "/logout").status_code == 302
    codes = [attempt(owner, "guess-guess", address="203.0.113.97").status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]
    last = events(h, "login_failed")[-1]["data"]
    assert last["known_browser"] is True and last["address"] == "203.0.113.97" and last["wait_s"] == 1


def test_a_new_browser_kept_waiting_by_the_shared_slow_down_is_told_the_ways_out(host_factory):
    """The global slow-down gives its slot to whoever arrives first: the page says what always works."""
    h = host_factory(DASHBOARD_LOGIN_ATTEMPTS=2, TRUST_PROXY_HEADERS="true")
    owner, stranger = h.app.test_client(), h.app.test_client()
    assert attempt(owner, address="127.0.0.1").status_code == 302  # a browser that logged in before
    assert post(owner, "/logout").status_code == 302
    for i in range(2):
        assert attempt(stranger, "guess-guess", address=f"203.0.113.{i}").status_code == 401
    refused = attempt(h.app.test_client(), address="198.51.100.7")  # the owner on a new phone, right password
    page = refused.get_data(as_text=True)
    assert refused.status_code == 429 and "Try again in 1 s" in page
    assert "a browser you logged in from before" in page and "strategy-host unlock" in page
    assert attempt(owner, address="127.0.0.1").status_code == 302  # the way out the page names: straight in
