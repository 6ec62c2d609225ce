"""Serve the Noren simulator on loopback: REST (werkzeug, threaded) and, when asked, the WebSocket feed."""
from __future__ import annotations

import threading
from typing import Optional

from werkzeug.serving import WSGIRequestHandler, make_server


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs) -> None:  # the simulator is noisy enough
        pass

from .feed import FeedServer
from .server import NorenSim, create_sim_app


class SimServer:
    """Starts and stops the simulator's servers on background threads."""

    def __init__(self, sim: Optional[NorenSim] = None, host: str = "127.0.0.1", port: int = 0, ws_port: int = 0):
        self.sim = sim or NorenSim()
        self.feed = FeedServer(self.sim, host, ws_port)
        self._http = make_server(host, port, create_sim_app(self.sim), threaded=True, request_handler=_QuietHandler)
        self.host, self.port = host, self._http.server_port
        self._threads: list[threading.Thread] = []

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/NorenWClientAPI/"

    @property
    def ws_url(self) -> str:
        return self.feed.url

    @property
    def oauth_url(self) -> str:
        return f"http://{self.host}:{self.port}/authorize"

    def start(self) -> "SimServer":
        t = threading.Thread(target=self._http.serve_forever, name="noren-sim-http", daemon=True)
        t.start()
        self._threads.append(t)
        self.feed.start()
        return self

    def stop(self) -> None:
        self.sim.cancel_timers()
        self.feed.stop()
        self._http.shutdown()
        for t in self._threads:
            t.join(5)
