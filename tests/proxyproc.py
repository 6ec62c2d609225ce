"""Real nginx and Caddy from Debian's packages, run as the test user on loopback with configs `strategy-host deploy` wrote."""
from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Optional


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, and its key (openssl)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


class Proxy:
    """A proxy process in the foreground, in its own session, with its files in a test folder."""

    log_name = "proxy.log"

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc: Optional[subprocess.Popen] = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> Optional[dict]:
        return None

    def start(self, ports: tuple[int, ...], timeout: float = 15.0) -> "Proxy":
        log = open(self.folder / "proxy.out", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        for port in ports:
            while True:
                assert self.proc.poll() is None, self.log()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"not listening on {port}:\n{self.log()}"
                    time.sleep(0.05)
        return self

    def log(self) -> str:
        text = ""
        for name in (self.log_name, "proxy.out"):
            p = self.folder / name
            if p.exists():
                text += p.read_text(errors="replace")[-4000:]
        return text

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)


class Caddy(Proxy):
    """Caddy with its data (the `tls internal` CA) in a test folder."""

    def __init__(self, folder: Path, caddyfile: str):
        super().__init__(folder)
        self.binary = shutil.which("caddy")
        assert self.binary, "caddy is not installed: apt-get install -y caddy (.ci/run installs it)"
        (folder / "Caddyfile").write_text(caddyfile)

    def command(self) -> list[str]:
        return [self.binary, "run", "--adapter", "caddyfile", "--config", str(self.folder / "Caddyfile")]

    def env(self) -> dict:
        home = str(self.folder / "caddy-home")
        return {**os.environ, "HOME": home, "XDG_DATA_HOME": home, "XDG_CONFIG_HOME": home}

    @property
    def cafile(self) -> Path:
        return self.folder / "caddy-home" / "caddy" / "pki" / "authorities" / "local" / "root.crt"


class Nginx(Proxy):
    """nginx in the foreground with its pid, logs and temp files in a test folder."""

    log_name = "error.log"

    def __init__(self, folder: Path, site_conf: str):
        super().__init__(folder)
        self.binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
        assert self.binary, "nginx is not installed: apt-get install -y nginx (.ci/run installs it)"
        (folder / "site.conf").write_text(site_conf)
        temp = "\n".join(f"    {kind}_temp_path {folder}/{kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                              "uwsgi", "scgi"))
        user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would otherwise become nobody
        (folder / "nginx.conf").write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log info;\n"
            f"events {{ worker_connections 512; }}\n"
            f"http {{\n    access_log {folder}/access.log;\n{temp}\n    include {folder}/site.conf;\n}}\n")

    def command(self) -> list[str]:
        return [self.binary, "-p", str(self.folder), "-e", str(self.folder / "error.log"),
                "-c", str(self.folder / "nginx.conf")]


def https(port: int, cafile: Path, source: str = "127.0.0.1") -> http.client.HTTPSConnection:
    """A connection to the proxy from a chosen loopback address, checking its certificate."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    return http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10, source_address=(source, 0))


def request(conn: http.client.HTTPConnection, method: str, path: str, body: Optional[bytes] = None,
            headers: Optional[dict] = None) -> tuple[int, dict, bytes]:
    """One request on a (kept-alive) connection: status, headers, body."""
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
