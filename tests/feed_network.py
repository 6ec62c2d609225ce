"""The network between the live feed and the broker, failing the way real ones do (for feed tests)."""
from __future__ import annotations

import socket
import threading
import time


class BrokerNetwork:
    """Replaces websocket-client's socket opening: up, refusing, timing out (a lost SYN), or hanging once."""

    def __init__(self, monkeypatch):
        from websocket import _http
        self._real = _http._open_socket
        self.mode = "up"              # "up", "refused" or "timeout"
        self.timeout_s = 2.0          # how long a "timeout" connect takes to fail
        self.hang_next = False        # the next connect hangs: until release, or its own timeout if honour_timeout
        self.honour_timeout = False
        self.hung, self.release = threading.Event(), threading.Event()
        monkeypatch.setattr(_http, "_open_socket", self._open)

    def _open(self, addrinfo_list, sockopt, timeout):
        if self.hang_next:
            self.hang_next = False
            self.hung.set()
            if self.honour_timeout:  # a SYN nobody answers: the connect ends only with its timeout
                self.release.wait(timeout)
                raise socket.timeout("timed out")
            self.release.wait(30)  # the SYN is answered at last
        elif self.mode == "refused":
            raise ConnectionRefusedError(111, "Connection refused")
        elif self.mode == "timeout":
            time.sleep(self.timeout_s)
            raise socket.timeout("timed out")
        return self._real(addrinfo_list, sockopt, timeout)
