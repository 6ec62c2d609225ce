"""A real `strategy-host run` in a subprocess on a free loopback port, for end-to-end tests."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Runs the host in its own session, so kill -9 can take the master and its workers at once."""

    def __init__(self, workdir: Path, *args: str, env: Optional[dict] = None, port: Optional[int] = None):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.args = args
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK", "API_TOKEN", "DATA_DIR"))}
        self.env.update(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.workdir / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "ServerProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "host", "run", "--port", str(self.port), *self.args],
                                     cwd=self.workdir, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not healthy within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def secrets(self) -> dict[str, str]:
        text = (self.workdir / "var" / "secrets.env").read_text()
        return dict(re.findall(r"^(\w+)=(.*)$", text, re.M))

    def terminate(self, timeout: float = 30.0) -> int:
        os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.terminate(15)
            except subprocess.TimeoutExpired:
                self.kill9()
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # any worker left behind
            except ProcessLookupError:
                pass
        if getattr(self, "_log", None):
            self._log.close()

    def api(self, path: str, method: str = "GET", **kw: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.secrets()['API_TOKEN']}"}
        return requests.request(method, self.url + path, headers=headers, timeout=10, **kw)

    def explain(self) -> str:
        """The host's orders, latest events and log tail: what a failed wait needs to say."""
        parts = []
        for path in ("/api/orders", "/api/events"):
            try:
                parts.append(f"{path}: {self.api(path, params={'limit': 20}).json().get('items')}")
            except (requests.RequestException, ValueError) as exc:
                parts.append(f"{path}: unavailable ({exc})")
        return "\n".join(parts + ["log tail:", self.output()[-4000:]])

    def webhook(self, body: dict) -> requests.Response:
        return requests.post(self.url + "/webhook", json=body, timeout=10)
