"""The client's address behind a proxy: TRUSTED_PROXIES, right-most untrusted X-Forwarded-For, hostile headers."""
from __future__ import annotations

import ipaddress

import pytest

from conftest import alert, make_settings
from host.config import ConfigError
from host.web.client_address import resolve

LOCAL = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
CHAIN = LOCAL + (ipaddress.ip_network("10.0.0.0/8"),)
TV = "52.89.214.238"


def test_trusted_proxies_default_is_loopback_only(tmp_path):
    s = make_settings(tmp_path / "var")
    assert set(s.TRUSTED_PROXIES) == set(LOCAL)
    assert s.TRUST_PROXY_HEADERS is False


def test_trusted_proxies_takes_addresses_and_networks(tmp_path):
    s = make_settings(tmp_path / "var", TRUSTED_PROXIES=" 10.0.0.0/8, 192.168.1.5 ,fd00::/8")
    assert [str(n) for n in s.TRUSTED_PROXIES] == ["10.0.0.0/8", "192.168.1.5/32", "fd00::/8"]


def test_trusted_proxies_rejects_nonsense_naming_the_variable(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_settings(tmp_path / "var", TRUSTED_PROXIES="127.0.0.1,my-proxy")
    (problem,) = [p for p in e.value.problems if p.field == "TRUSTED_PROXIES"]
    assert "CIDR" in problem.expected and "my-proxy" in problem.found


@pytest.mark.parametrize("peer, xff, real_ip, proxies, expected", [
    # an untrusted direct peer: its headers are never believed
    ("203.0.113.9", [TV], None, LOCAL, "203.0.113.9"),
    ("203.0.113.9", [], TV, LOCAL, "203.0.113.9"),
    # nothing is trusted (TRUST_PROXY_HEADERS=false)
    ("127.0.0.1", [TV], TV, (), "127.0.0.1"),
    # our proxy passes the client
    ("127.0.0.1", [TV], None, LOCAL, TV),
    ("::1", [TV], None, LOCAL, TV),
    ("::ffff:127.0.0.1", [TV], None, LOCAL, TV),
    ("127.0.0.1", [], TV, LOCAL, TV),
    # a client writes the left end; the proxy appends the address it saw: the right-most untrusted one counts
    ("127.0.0.1", [f"{TV}, 198.51.100.7"], None, LOCAL, "198.51.100.7"),
    ("127.0.0.1", [TV, "198.51.100.7"], None, LOCAL, "198.51.100.7"),  # two headers are one list
    # a client that names a trusted address gets no further than its own
    ("127.0.0.1", [f"{TV}, 127.0.0.1, 198.51.100.7"], None, LOCAL, "198.51.100.7"),
    # a chain of trusted proxies is walked back to the first untrusted hop
    ("127.0.0.1", [f"1.1.1.1, {TV}, 10.0.0.5"], None, CHAIN, TV),
    ("127.0.0.1", ["10.0.0.7, 10.0.0.5"], None, CHAIN, "10.0.0.7"),
    # X-Forwarded-For wins over X-Real-IP
    ("127.0.0.1", ["198.51.100.7"], TV, LOCAL, "198.51.100.7"),
    # hostile or broken entries end the walk at the last address checked, never a made-up string
    ("127.0.0.1", ["unknown"], None, LOCAL, "127.0.0.1"),
    ("127.0.0.1", [f"{TV}, <script>"], None, LOCAL, "127.0.0.1"),
    ("127.0.0.1", [f"{TV}:443"], None, LOCAL, "127.0.0.1"),
    ("127.0.0.1", [""], None, LOCAL, "127.0.0.1"),
    ("127.0.0.1", [f"{TV},"], None, LOCAL, "127.0.0.1"),
    ("127.0.0.1", [], "not an address", LOCAL, "127.0.0.1"),
    ("127.0.0.1", ["[2001:db8::1]"], None, LOCAL, "2001:db8::1"),
    ("127.0.0.1", [" 2001:DB8::1 "], None, LOCAL, "2001:db8::1"),
    ("127.0.0.1", ["::ffff:52.89.214.238"], None, LOCAL, TV),
    # a peer that is not an IP (a unix socket) stays as it is
    ("", [TV], None, LOCAL, ""),
])
def test_resolve(peer, xff, real_ip, proxies, expected):
    assert resolve(peer, xff, real_ip, proxies) == expected


def test_resolve_bounds_a_long_chain_of_trusted_hops():
    xff = ", ".join(["9.9.9.9"] + ["10.0.0.1"] * 5000)
    assert resolve("127.0.0.1", [xff], None, CHAIN) == "10.0.0.1"


def test_forged_forwarded_for_from_an_untrusted_peer_is_not_believed(host_factory):
    h = host_factory(WEBHOOK_ALLOWED_IPS=TV, TRUST_PROXY_HEADERS="true")
    r = h.post(alert(), environ_base={"REMOTE_ADDR": "203.0.113.9"}, headers={"X-Forwarded-For": TV})
    assert r.status_code == 403 and r.get_json()["error"] == (
        "caller 203.0.113.9 is not in WEBHOOK_ALLOWED_IPS (its X-Forwarded-For/X-Real-IP are not believed: "
        "the peer 203.0.113.9 is not in TRUSTED_PROXIES)")
    r = h.post(alert(), environ_base={"REMOTE_ADDR": "203.0.113.9"}, headers={"X-Real-IP": TV})
    assert r.status_code == 403


def test_the_allowlist_sees_the_client_behind_a_chain_of_trusted_proxies(host_factory):
    h = host_factory(WEBHOOK_ALLOWED_IPS=TV, TRUST_PROXY_HEADERS="true", TRUSTED_PROXIES="127.0.0.1,10.0.0.0/8")
    r = h.post(alert(), environ_base={"REMOTE_ADDR": "127.0.0.1"},
               headers={"X-Forwarded-For": f"203.0.113.66, {TV}, 10.0.0.5"})
    assert r.status_code == 200, r.get_json()
    assert h.api("/api/alerts").get_json()["items"][0]["source_ip"] == TV
    r = h.post(alert(alert_id="second"), environ_base={"REMOTE_ADDR": "127.0.0.1"},
               headers={"X-Forwarded-For": f"{TV}, 203.0.113.66, 10.0.0.5"})
    assert r.status_code == 403 and "203.0.113.66" in r.get_json()["error"]


def test_x_real_ip_from_the_trusted_proxy_names_the_client(host_factory):
    h = host_factory(WEBHOOK_ALLOWED_IPS=TV, TRUST_PROXY_HEADERS="true")
    r = h.post(alert(), environ_base={"REMOTE_ADDR": "127.0.0.1"}, headers={"X-Real-IP": TV})
    assert r.status_code == 200, r.get_json()


@pytest.mark.parametrize("trusted, code", [("127.0.0.1,::1", 403), ("192.0.2.10", 200)])
def test_a_proxy_elsewhere_is_believed_only_once_listed(host_factory, trusted, code):
    h = host_factory(WEBHOOK_ALLOWED_IPS=TV, TRUST_PROXY_HEADERS="true", TRUSTED_PROXIES=trusted)
    r = h.post(alert(), environ_base={"REMOTE_ADDR": "192.0.2.10"}, headers={"X-Forwarded-For": TV})
    assert r.status_code == code, r.get_json()
