"""A thread's answer never waits for the client: what the socket does not take is kept for the loop
(host/http_outbox.py)."""
from __future__ import annotations

import io
import socket
import time

import pytest

from host.http_outbox import Outbox

BIG = bytes(range(256)) * 4096  # 1 MiB, more than a socket pair's buffers hold


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(2)
    yield ours, theirs
    ours.close()
    theirs.close()


def _drain(outbox: Outbox, peer: socket.socket, want: int) -> bytes:
    """Read as the client would while the loop flushes; bounded in rounds."""
    got = bytearray()
    for _ in range(10000):
        if len(got) >= want:
            break
        outbox.flush()
        got += peer.recv(65536)
    return bytes(got)


def test_an_answer_the_client_does_not_read_is_kept_without_waiting(pair):
    ours, _ = pair
    outbox = Outbox(ours)
    t0 = time.monotonic()
    outbox.sendall(BIG)
    outbox.sendall(b"and the end")
    assert time.monotonic() - t0 < 0.5
    assert 0 < len(outbox.data) < len(BIG) + 11  # the socket took some, the rest waits
    assert outbox.data.endswith(b"and the end")


def test_what_was_kept_goes_out_after_what_was_sent_in_order(pair):
    ours, theirs = pair
    outbox = Outbox(ours)
    outbox.sendall(BIG)
    outbox.sendall(b"tail")
    assert outbox.send(memoryview(b"+more")) == 5
    assert _drain(outbox, theirs, len(BIG) + 9) == BIG + b"tail+more"
    assert not outbox.data


def test_a_file_answer_is_read_from_its_offset_for_its_count(pair):
    ours, theirs = pair
    outbox = Outbox(ours)
    assert outbox.sendfile(io.BytesIO(BIG), offset=10, count=200000) == 200000
    assert _drain(outbox, theirs, 200000) == BIG[10:200010]


def test_a_client_that_is_gone_is_an_error_for_the_thread_and_the_loop(pair):
    ours, theirs = pair
    outbox = Outbox(ours)
    outbox.sendall(BIG)
    theirs.close()
    with pytest.raises(OSError):
        for _ in range(100):
            outbox.flush()
    with pytest.raises(OSError):
        Outbox(ours).sendall(b"x")


def test_gunicorn_cannot_block_or_close_the_socket_through_it(pair):
    ours, _ = pair
    outbox = Outbox(ours)
    outbox.setblocking(True)
    outbox.settimeout(5)
    outbox.shutdown(socket.SHUT_WR)
    outbox.close()
    assert ours.gettimeout() == 0.0 and outbox.gettimeout() == 0.0 and outbox.recv(10) == b""
    assert ours.send(b"still open") == 10
