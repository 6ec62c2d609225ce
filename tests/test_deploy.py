"""`strategy-host deploy`: the dry run, what it writes and keeps, bad options, systemd-analyze and caddy validate."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from host import deploy
from host.cli import main
from host.config import load

EXEC = sys.executable  # an existing executable, as systemd-analyze verify wants


def _opts(**kw) -> deploy.DeployOptions:
    return deploy.DeployOptions(**{"domain": "trade.example.com", "exec_path": EXEC, **kw})


def test_dry_run_prints_every_file_and_the_steps_and_writes_nothing(capsys, tmp_path):
    out_dir = tmp_path / "root"
    code = main(["deploy", "--domain", "trade.example.com", "--tradingview-only", "--dry-run", "--out", str(out_dir),
                 "--exec", "/opt/strategy-host/venv/bin/strategy-host"])
    out = capsys.readouterr().out
    assert code == 0 and not out_dir.exists()
    for path in ("/etc/systemd/system/strategy-host.service", "/etc/strategy-host/host.env",
                 "/etc/nginx/sites-available/strategy-host.conf"):
        assert f"==> {path} " in out
    assert "ExecStart=/opt/strategy-host/venv/bin/strategy-host run" in out
    assert "Restart=on-failure" in out and "ProtectSystem=strict" in out and "NoNewPrivileges=yes" in out
    assert "ReadWritePaths=/var/lib/strategy-host\n" in out and "StateDirectory=strategy-host\n" in out
    for ip in deploy.TRADINGVIEW_IPS:
        assert f"allow {ip};" in out
    assert "WEBHOOK_ALLOWED_IPS=" + ",".join(deploy.TRADINGVIEW_IPS) in out
    assert "WEBHOOK_SECRET=<generated" in out  # a dry run shows no secret
    assert "sudo systemctl daemon-reload && sudo systemctl enable --now strategy-host" in out
    assert "certbot certonly --standalone -d trade.example.com" in out


def test_caddy_dry_run(capsys):
    assert main(["deploy", "--domain", "localhost", "--proxy", "caddy", "--tls-internal", "--dry-run",
                 "--exec", "/opt/x/strategy-host"]) == 0
    out = capsys.readouterr().out
    assert "==> /etc/caddy/Caddyfile " in out and "tls internal" in out and "max_size 64KB" in out
    assert "read_header 10s" in out and "header_up X-Forwarded-For {remote_host}" in out
    assert "no per-address rate limiter" in out  # said plainly, not left out silently
    assert "@webhook_refused" not in out  # no allowlist unless asked


@pytest.mark.parametrize("argv, field", [
    (["--domain", "x.example.com;\n evil"], "--domain"),
    (["--domain", "1.2.3.4"], "--domain"),
    (["--user", "root"], "--user"),
    (["--data-dir", "/srv/host"], "--data-dir"),
    (["--exec", "/home/me/venv/bin/strategy-host"], "--exec"),
    (["--exec", "/opt/a b/strategy-host"], "--exec"),
    (["--webhook-ip", "not-an-ip"], "--webhook-ip"),
    (["--tls-internal"], "--tls-internal"),
    (["--cert", "/etc/c.pem"], "--cert/--key"),
    (["--port", "443"], "--port, --http-port, --https-port"),
    (["--https-port", "70000"], "--https-port"),
])
def test_bad_options_are_refused_naming_the_option(capsys, argv, field):
    base = {"--domain": "trade.example.com", "--exec": "/opt/x/strategy-host"}
    given = dict(zip(argv[::2], argv[1::2])) if len(argv) % 2 == 0 else {}
    args = [a for k, v in {**base, **given}.items() for a in (k, v)] + ([argv[0]] if len(argv) == 1 else [])
    assert main(["deploy", "--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"strategy-host deploy: {field}: expected"), err


def test_write_creates_files_keeps_secrets_and_refuses_to_clobber(tmp_path, capsys):
    args = ["deploy", "--domain", "trade.example.com", "--out", str(tmp_path), "--exec", "/opt/x/strategy-host"]
    assert main(args) == 0
    env = tmp_path / "etc/strategy-host/host.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    settings = load(str(env), environ={})  # the written settings are valid, secrets included
    assert settings.TRUST_PROXY_HEADERS and [str(n) for n in settings.TRUSTED_PROXIES] == ["127.0.0.1/32", "::1/128"]
    assert settings.HOST == "127.0.0.1" and settings.DASHBOARD_COOKIE_SECURE and len(settings.WEBHOOK_SECRET) >= 32
    assert settings.WEBHOOK_SECRET not in capsys.readouterr().out
    first = env.read_text()
    assert main(args) == 0  # again: the same files, the secrets kept
    assert env.read_text() == first and "kept" in capsys.readouterr().out
    site = tmp_path / "etc/nginx/sites-available/strategy-host.conf"
    site.write_text(site.read_text() + "# my own edit\n")
    assert main(args + ["--port", "8100"]) == 1
    assert "exists with other contents" in capsys.readouterr().err and "my own edit" in site.read_text()
    assert main(args + ["--port", "8100", "--force"]) == 0
    assert "keeps other settings than these options: PORT='8000' (these options: '8100')" in capsys.readouterr().out
    assert "127.0.0.1:8100" in site.read_text() and "my own edit" in site.with_name(site.name + ".bak").read_text()
    assert env.read_text() == first  # --force never replaces the secrets


def _verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: apt-get install -y systemd (.ci/run)"
    unit = tmp_path / "strategy-host.service"
    unit.write_text(deploy.render(_opts(), "strategy-host.service"))
    r = _verify(unit)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    # the check is real: a misspelt setting or a missing program is reported
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    assert "ProtectSystm" in _verify(unit).stderr
    unit.write_text(deploy.render(_opts(exec_path="/opt/none/strategy-host"), "strategy-host.service"))
    assert _verify(unit).returncode != 0


def test_an_ipv6_listen_address_is_bracketed_for_nginx():
    text = deploy.render(_opts(listen_address="::1", https_port=8443, http_port=8080), "nginx.conf")
    assert "listen [::1]:8443 ssl;" in text and "listen [::1]:8080;" in text


def test_the_unit_allows_writes_to_the_data_folder_only():
    text = deploy.render(_opts(data_dir="/var/lib/trader"), "strategy-host.service")
    assert re.findall(r"^ReadWritePaths=(.*)$", text, re.M) == ["/var/lib/trader"]
    assert "StateDirectory=trader\n" in text and "User=strategy-host\n" in text
    assert "EnvironmentFile=/etc/strategy-host/host.env\n" in text


@pytest.mark.parametrize("kw", [
    {"tls_internal": True, "tradingview_only": True, "listen_address": "127.0.0.1", "http_port": 18080,
     "https_port": 18443, "caddy_admin_off": True},
    {"tradingview_only": False},
    {"caddy_request_buffers": True},
])
def test_the_caddyfile_passes_caddy_validate(tmp_path, kw):
    caddy = shutil.which("caddy")
    assert caddy, "caddy is missing: apt-get install -y caddy (.ci/run)"
    opts = _opts(proxy="caddy", **kw)
    if opts.caddy_request_buffers and not deploy.caddy_has_request_buffers():
        text = deploy.render(opts, "Caddyfile")
        assert "request_buffers unlimited" in text and "buffer_requests" not in text
        return  # Debian 12's Caddy 2.6.2 knows only buffer_requests
    (tmp_path / "Caddyfile").write_text(deploy.render(opts, "Caddyfile"))
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    r = subprocess.run([caddy, "validate", "--adapter", "caddyfile", "--config", str(tmp_path / "Caddyfile")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and "Valid configuration" in r.stdout + r.stderr, r.stdout + r.stderr


def test_the_nginx_site_passes_nginx_t(tmp_path):
    from proxyproc import Nginx, self_signed
    cert, key = self_signed(tmp_path)
    site = deploy.render(_opts(cert=str(cert), key=str(key), tradingview_only=True, listen_address="127.0.0.1",
                               http_port=18080, https_port=18443), "nginx.conf")
    nginx = Nginx(tmp_path, site)
    r = subprocess.run([nginx.binary, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c",
                        str(tmp_path / "nginx.conf")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "[warn]" not in r.stderr, r.stderr


def _fake_apt_cache(folder: Path, candidate: str) -> None:
    folder.mkdir(exist_ok=True)
    tool = folder / "apt-cache"
    tool.write_text(f"#!/bin/sh\necho 'caddy:'\necho '  Installed: (none)'\necho '  Candidate: {candidate}'\n")
    tool.chmod(0o755)


@pytest.mark.parametrize("candidate, spelling", [("2.7.6-1", "request_buffers unlimited"),
                                                 ("2.6.2-5", "buffer_requests")])
def test_caddy_not_installed_yet_is_written_for_the_caddy_apt_will_install(tmp_path, monkeypatch, capsys,
                                                                           candidate, spelling):
    """The printed steps install Caddy after deploy: the Caddyfile must suit the one `apt-get install` brings."""
    _fake_apt_cache(tmp_path / "bin", candidate)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no caddy on PATH
    assert main(["deploy", "--domain", "trade.example.com", "--proxy", "caddy", "--dry-run",
                 "--exec", "/opt/x/strategy-host"]) == 0
    out = capsys.readouterr().out
    caddyfile = out.split("==> /etc/caddy/Caddyfile", 1)[1].split("==>", 1)[0].split("strategy-host deploy would", 1)[0]
    other = "buffer_requests" if spelling != "buffer_requests" else "request_buffers"
    assert spelling in caddyfile and other not in caddyfile
    assert f"apt-get would install {candidate}" in out and "Caddy 2.6.4 and later" in out and "2.2 to 2.6" in out


def _script(folder: Path, interpreter: str) -> Path:
    script = folder / "strategy-host"
    script.write_text(f"#!{interpreter}\nimport sys\n")
    script.chmod(0o755)
    return script


def test_an_exec_whose_python_lives_under_root_or_home_is_refused_with_the_fix(tmp_path, capsys):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to("/root/.pyenv/versions/3.11.7/bin/python3.11")  # pyenv, as root
    script = _script(venv / "bin", str(venv / "bin" / "python"))
    assert main(["deploy", "--domain", "trade.example.com", "--dry-run", "--exec", str(script)]) == 2
    err = capsys.readouterr().err
    assert "/root/.pyenv/versions/3.11.7/bin/python3.11" in err and "ProtectHome" in err
    assert "/opt/strategy-host/venv" in err and "python3 -m venv" in err
    copies = tmp_path / "copies"  # a venv made with --copies: its Python's home is still in /home
    (copies / "bin").mkdir(parents=True)
    shutil.copy("/bin/true", copies / "bin" / "python")
    (copies / "pyvenv.cfg").write_text("home = /home/me/.pyenv/versions/3.11.7/bin\ninclude-system-site-packages = false\n")
    problem = deploy.exec_problem(str(_script(copies / "bin", str(copies / "bin" / "python"))))
    assert problem and "/home/me/.pyenv/versions/3.11.7/bin" in problem


def test_an_exec_the_service_user_can_run_is_accepted_and_a_closed_folder_is_named():
    import tempfile
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        folder = Path(d)
        folder.chmod(0o755)
        system = shutil.which("python3", path="/usr/bin:/bin")
        assert system, "a system python3 is needed"
        assert deploy.exec_problem(str(_script(folder, system))) is None
        closed = folder / "closed"
        closed.mkdir(mode=0o700)
        os.symlink(system, closed / "python")
        problem = deploy.exec_problem(str(_script(folder, str(closed / "python"))))
        assert problem and f"{closed} is closed to other users (mode 0700)" in problem
