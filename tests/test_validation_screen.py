"""The body's text is screened in one look when it is clean (issue 17: the per-character walk was a third of
the webhook's own time); whatever it finds is named exactly as the careful walk names it."""
from __future__ import annotations

import unicodedata
from decimal import Decimal
from typing import Any, Optional

from hypothesis import given, settings, strategies as st

from conftest import alert
from host.validation import CONTROL_RE, SURROGATE_RE, screen, screen_each, strings, unencodable


def _unencodable_by_encoding(value: Any) -> Optional[str]:
    for where, text in strings(value):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
    return None


def test_the_control_and_surrogate_patterns_are_exactly_unicodes_classes():
    for c in range(0x110000):
        ch = chr(c)
        assert bool(CONTROL_RE.search(ch)) == (unicodedata.category(ch) == "Cc"), hex(c)
        try:
            ch.encode("utf-8")
            lone = False
        except UnicodeEncodeError:
            lone = True
        assert bool(SURROGATE_RE.search(ch)) == lone, hex(c)


text = st.one_of(st.text(max_size=8), st.sampled_from(["{{", "}}", "{{close}}", "{", "}", "\x7f", "\x85", "\ud800",
                                                       "\U0001f600", "\n", "\x00"]))
json_value = st.recursive(st.one_of(text, st.integers(), st.booleans(), st.none(),
                                    st.decimals(allow_nan=False, allow_infinity=False, places=2)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(text, inner, max_size=3)), max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(extra=st.dictionaries(text, json_value, max_size=4), leg_extra=st.dictionaries(text, json_value, max_size=3))
def test_the_one_look_screen_names_what_the_careful_walk_names(extra, leg_extra):
    body = alert()
    body["legs"][0].update(leg_extra)
    body.update(extra)  # after the leg's: an extra "legs" key replaces them (it failed on the leg's update)
    assert screen(body) == screen_each(body)  # the quick look never passes over what the careful one names
    assert unencodable(body) == _unencodable_by_encoding(body)


def test_a_placeholder_split_across_two_values_is_not_one():
    body = alert()
    body["comment"], body["legs"][0]["note"] = "ends with {{", "}} starts here"
    assert screen(body) == []  # the quick look saw "{{ ... }}" across them; the careful walk finds none
    body["legs"][0]["note"] = "{{close}}"
    assert [p.field for p in screen(body)] == ["legs[0].note"]
    assert unencodable({"a": ["fine", {"b": "x\udc00"}]}) == "a[1].b"
    assert unencodable({"a": Decimal("1.5")}) is None


def test_a_clean_body_is_screened_without_walking_its_paths(monkeypatch):
    import host.validation as validation

    def walked(*_: Any) -> Any:
        raise AssertionError("a clean body's paths were built one by one")
    monkeypatch.setattr(validation, "strings", walked)
    body = alert(order_type="SL-LMT", trigger_price="43")
    assert validation.screen(body) == [] and validation.unencodable(body) is None
    request, problems = validation.parse_alert(body)
    assert problems == [] and request is not None
