"""Hostile input, generated: no malformed body gets a 5xx or creates an order."""
from __future__ import annotations

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import SECRET, alert
from serverproc import ServerProcess

FIELDS = ("qty", "price", "tradingsymbol", "direction", "order_type", "product_type", "trigger_price")
TOP = ("execution_type", "strategy_name", "exchange", "legs")
# values that are wrong for every field they are put in (a non-ASCII character, a control character, a
# placeholder, a boolean, a container, a number out of range, nothing where something is needed)
WRONG = st.one_of(
    st.text(max_size=12).map(lambda t: t + "\u0660"),
    st.text(max_size=12).map(lambda t: "\x07" + t),
    st.text(max_size=12).map(lambda t: "{{" + t + "}}"),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.integers(min_value=10 ** 8),
    st.integers(max_value=-1),
)
NUMBERS = ("qty", "price", "trigger_price")
WRONG_NUMBER = st.one_of(WRONG, st.sampled_from(["1e27", "1e-30", "NaN", "Infinity", "-0", "7_5", "٧٥", "７５", "0x4b",
                                                 "1e99999", "", " ", "42.555", "1" * 100]))


@st.composite
def malformed(draw) -> bytes:
    kind = draw(st.sampled_from(["leg", "top", "surrogate", "bytes", "shape"]))
    body = alert(order_type="SL-LMT", trigger_price="43")
    if kind == "leg":
        name = draw(st.sampled_from(FIELDS))
        body["legs"][0][name] = draw(WRONG_NUMBER if name in NUMBERS else WRONG)
    elif kind == "top":
        name = draw(st.sampled_from(TOP))
        value = draw(WRONG)
        body[name] = value if name != "legs" or not isinstance(value, list) else [value]
    elif kind == "surrogate":
        text = json.dumps(body)
        field = draw(st.sampled_from(['"s1"', '"SELL"', f'"{SECRET}"', '"NFO"']))
        return text.replace(field, '"\\ud83' + draw(st.sampled_from("0123456789abcdef")) + '"', 1).encode()
    elif kind == "bytes":
        return json.dumps(body).encode()[:draw(st.integers(0, 40))] + draw(st.binary(max_size=30))
    else:  # valid JSON of the wrong shape, or a depth bomb
        return draw(st.sampled_from([b"[]", b"null", b"1e999999", b'"x"', b"[" * 5000 + b"]" * 5000,
                                     json.dumps({"legs": [[[]]], "secret_key": SECRET}).encode(),
                                     json.dumps({**body, "legs": []}).encode()]))
    return json.dumps(body).encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=malformed())
def test_malformed_bodies_get_4xx_and_create_nothing(host, data):
    r = host.client.post("/webhook", data=data, content_type="application/json")
    assert 400 <= r.status_code < 500, (data[:200], r.status_code, r.get_data()[:300])
    assert r.get_json().get("error") or r.get_json().get("errors"), r.get_data()[:300]
    assert host.runtime.storage.one("select count(*) n from orders")["n"] == 0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("fuzz")).start()
    yield s, s.secrets()["WEBHOOK_SECRET"]
    s.stop()
    assert "Traceback" not in s.output()


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=malformed())
def test_malformed_bodies_through_gunicorn_get_4xx_and_create_nothing(served, data):
    s, secret = served
    r = requests.post(s.url + "/webhook", data=data.replace(SECRET.encode(), secret.encode()),
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert 400 <= r.status_code < 500, (data[:200], r.status_code, r.text[:300])
    assert s.api("/api/orders").json()["items"] == []
