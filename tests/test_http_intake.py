"""Where a request ends, as the worker's selector loop sees it before a thread does (host/http_intake.py)."""
from __future__ import annotations

import json

from gunicorn.config import Config

from host.http_intake import HttpLimits, Intake, Ready, Refusal

CLIENT = ("127.0.0.1", 50000)
LIMITS = HttpLimits(header_timeout=10, body_timeout=20, max_head=1024, max_body=100)


def intake(limits: HttpLimits = LIMITS) -> Intake:
    i = Intake(Config(), CLIENT, limits)
    i.begin(now=0.0)
    return i


def feed(i: Intake, data: bytes, now: float = 1.0):
    i.feed(data)
    return i.step(now)


def refusal_json(r: Refusal) -> dict:
    return json.loads(r.response().split(b"\r\n\r\n", 1)[1])


def test_a_head_and_body_arriving_a_byte_at_a_time_are_one_request_only_when_whole():
    request = b"POST /webhook HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    i = intake()
    outcomes = [feed(i, request[n:n + 1]) for n in range(len(request))]
    assert outcomes[:-1] == [None] * (len(request) - 1)
    assert outcomes[-1] == Ready(len(request))
    assert i.take(len(request)) == request and not i.pending


def test_only_the_first_of_pipelined_requests_is_released_and_the_rest_stays_buffered():
    first = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
    second = b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok"
    i = intake()
    assert feed(i, first + second) == Ready(len(first))
    i.take(len(first))
    i.begin(now=2.0)
    assert i.step(3.0) == Ready(len(second))


def test_the_body_deadline_starts_when_the_head_is_in_and_reads_stop_at_the_body_end():
    i = intake()
    assert feed(i, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc", now=4.0) is None
    assert i.deadline == 24.0
    assert i.wants() == 7  # never past this request's last byte
    assert "3 of 10 bytes came" in refusal_json(i.expired())["error"]
    assert "HTTP_BODY_TIMEOUT_S" in refusal_json(i.expired())["error"]


def test_headers_that_never_end_are_refused_with_431_and_a_timeout_names_the_header_setting():
    i = intake()
    assert i.deadline == 10.0
    assert feed(i, b"GET / HTTP/1.1\r\nX-Pad: ") is None
    assert "HTTP_HEADER_TIMEOUT_S" in refusal_json(i.expired())["error"]
    r = feed(i, b"a" * 1100)
    assert isinstance(r, Refusal) and r.status == 431


def test_chunked_bodies_are_refused_with_411_and_oversized_ones_with_413_naming_the_limit():
    r = feed(intake(), b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert isinstance(r, Refusal) and r.status == 411 and "Content-Length" in refusal_json(r)["error"]
    r = feed(intake(), b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n")
    assert isinstance(r, Refusal) and r.status == 413
    assert refusal_json(r) == {"status": "error", "code": 413,
                               "error": "body too large: expected at most 100 bytes, found Content-Length 101"}
    assert b"Connection: close" in r.response()


def test_a_head_gunicorn_rejects_goes_to_a_thread_as_is_and_the_connection_is_not_kept():
    for bad in (b"GARBAGE\r\n\r\n", b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
                b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"):
        i = intake()
        head_len = bad.index(b"\r\n\r\n") + 4
        assert feed(i, bad) == Ready(head_len, trusted=False), bad


def test_expect_100_continue_is_due_only_while_the_body_is_missing():
    head = b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    i = intake()
    assert feed(i, head) is None and i.continue_due
    i = intake()
    assert feed(i, head + b"abc") == Ready(len(head) + 3) and not i.continue_due


def test_expect_100_continue_from_an_http_1_0_client_is_ignored():
    """RFC 9110 section 10.1.1: a 100-continue expectation in an HTTP/1.0 request MUST be ignored."""
    head = b"POST / HTTP/1.0\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    i = intake()
    assert feed(i, head) is None and not i.continue_due
