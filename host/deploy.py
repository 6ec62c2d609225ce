"""`strategy-host deploy`: the systemd unit, the settings and an HTTPS proxy config for a server, explained."""
from __future__ import annotations

import io
import ipaddress
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Optional

from dotenv import dotenv_values
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from . import __version__
from .config import SECRET_NAMES
from .web import MAX_BODY

TRADINGVIEW_IPS = ("52.89.214.238", "34.212.75.30", "54.218.53.128", "52.32.178.7")
UNIT_NAME = "strategy-host"
ENV_PATH = "/etc/strategy-host/host.env"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}.service"
HIDDEN_FROM_SERVICE = ("/home/", "/root/", "/run/user/")  # ProtectHome=yes hides them from the unit
PROXY_PATHS = {"nginx": "/etc/nginx/sites-available/strategy-host.conf", "caddy": "/etc/caddy/Caddyfile"}
PROXY_TEMPLATES = {"nginx": "nginx.conf", "caddy": "Caddyfile"}
SECRET_PLACEHOLDER = "<generated when the file is written>"
_TEMPLATES = Environment(loader=FileSystemLoader(str(Path(__file__).with_name("deploy_templates"))),
                         undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                         autoescape=False)


class DeployError(ValueError):
    """An option that cannot make a working deployment; the message names it."""


@dataclass(frozen=True)
class DeployOptions:
    """What the user chose; every value is checked before anything is rendered."""

    domain: str
    proxy: str = "nginx"
    user: str = "strategy-host"
    data_dir: str = "/var/lib/strategy-host"
    exec_path: str = "/opt/strategy-host/venv/bin/strategy-host"
    port: int = 8000
    tradingview_only: bool = False
    webhook_ips: tuple[str, ...] = ()
    tls_internal: bool = False
    cert: str = ""
    key: str = ""
    listen_address: str = ""
    http_port: int = 80
    https_port: int = 443
    header_timeout: int = 10
    body_timeout: int = 10
    webhook_rate: int = 50
    webhook_burst: int = 500
    login_rate: int = 30
    login_burst: int = 20
    caddy_request_buffers: bool = False
    caddy_admin_off: bool = False


@dataclass(frozen=True)
class DeployFile:
    """One file to write: its absolute path on the server, mode, text, and why it exists."""

    path: str
    mode: int
    text: str
    about: str
    keep_existing: bool = False


@dataclass(frozen=True)
class Plan:
    """Every file, and the commands that put them to work."""

    files: tuple[DeployFile, ...]
    steps: tuple[str, ...] = field(default=())


_DOMAIN = re.compile(r"(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+-]*")


def _check_path(name: str, value: str) -> str:
    if not _SAFE_PATH.fullmatch(value) or "/../" in value + "/" or "//" in value:
        raise DeployError(f"{name}: expected an absolute path of letters, digits and . _ - + /, found {value!r}")
    return value.rstrip("/") or "/"


def check(opts: DeployOptions) -> DeployOptions:
    """Raise DeployError naming the first option that is wrong (nothing reaches a config file unchecked)."""
    if opts.proxy not in PROXY_TEMPLATES:
        raise DeployError(f"--proxy: expected one of {', '.join(PROXY_TEMPLATES)}, found {opts.proxy!r}")
    if not _DOMAIN.fullmatch(opts.domain) or opts.domain.replace(".", "").isdigit():
        raise DeployError(f"--domain: expected a DNS name such as trade.example.com, found {opts.domain!r}")
    if not _USER.fullmatch(opts.user) or opts.user == "root":
        raise DeployError(f"--user: expected a system user name other than root (a-z, 0-9, _ -), found {opts.user!r}")
    data_dir = _check_path("--data-dir", opts.data_dir)
    if not data_dir.startswith("/var/lib/") or data_dir.count("/") < 3:
        raise DeployError(f"--data-dir: expected a folder under /var/lib/ (systemd's StateDirectory creates it "
                          f"for --user), found {opts.data_dir!r}")
    exec_path = _check_path("--exec", opts.exec_path)
    if exec_path.startswith(HIDDEN_FROM_SERVICE):
        raise DeployError(f"--exec: expected a path outside /home, /root and /run/user (the service runs with "
                          f"ProtectHome=yes and cannot see them), found {opts.exec_path!r}; install into a "
                          f"virtualenv such as /opt/strategy-host/venv")
    for name, value in (("--cert", opts.cert), ("--key", opts.key)):
        if value:
            _check_path(name, value)
    if opts.tls_internal and opts.proxy != "caddy":
        raise DeployError("--tls-internal: expected --proxy caddy (for nginx give a certificate with --cert/--key), "
                          f"found --proxy {opts.proxy}")
    if (opts.cert or opts.key) and opts.proxy != "nginx":
        raise DeployError(f"--cert/--key: expected --proxy nginx (Caddy gets its own certificates), "
                          f"found --proxy {opts.proxy}")
    if bool(opts.cert) != bool(opts.key):
        raise DeployError("--cert/--key: expected both, found only " + ("--cert" if opts.cert else "--key"))
    for ip in opts.webhook_ips:
        try:
            ipaddress.ip_network(ip, strict=False)
        except ValueError:
            raise DeployError(f"--webhook-ip: expected an IP address or CIDR network, found {ip!r}") from None
    if opts.listen_address:
        try:
            ipaddress.ip_address(opts.listen_address)
        except ValueError:
            raise DeployError(f"--listen: expected an IP address, found {opts.listen_address!r}") from None
    for name, value in (("--port", opts.port), ("--http-port", opts.http_port), ("--https-port", opts.https_port)):
        if not 1 <= value <= 65535:
            raise DeployError(f"{name}: expected a port from 1 to 65535, found {value}")
    if len({opts.port, opts.http_port, opts.https_port}) < 3:
        raise DeployError(f"--port, --http-port, --https-port: expected three different ports, found "
                          f"{opts.port}, {opts.http_port}, {opts.https_port}")
    return opts


def webhook_allowlist(opts: DeployOptions) -> tuple[str, ...]:
    """The addresses allowed to call /webhook: TradingView's when asked, and any given; empty means everyone."""
    return (TRADINGVIEW_IPS if opts.tradingview_only else ()) + tuple(opts.webhook_ips)


def _context(opts: DeployOptions, secret_values: dict[str, str]) -> dict:
    data_dir = opts.data_dir.rstrip("/")
    public_port = "" if opts.https_port == 443 else f":{opts.https_port}"
    return {
        **{k: getattr(opts, k) for k in opts.__dataclass_fields__},
        "version": __version__, "unit_name": UNIT_NAME, "unit_path": UNIT_PATH, "env_path": ENV_PATH,
        "env_file": ENV_PATH, "proxy_path": PROXY_PATHS[opts.proxy], "data_dir": data_dir,
        "plugins_dir": f"{data_dir}/plugins", "state_directory": data_dir[len("/var/lib/"):],
        "webhook_ips": webhook_allowlist(opts),
        "allow_note": " and ".join(n for n, on in (("TradingView's senders", opts.tradingview_only),
                                                    ("the addresses given with --webhook-ip", bool(opts.webhook_ips)))
                                   if on),
        "cert": opts.cert or f"/etc/letsencrypt/live/{opts.domain}/fullchain.pem",
        "key": opts.key or f"/etc/letsencrypt/live/{opts.domain}/privkey.pem",
        "listen_prefix": (f"[{opts.listen_address}]:" if ":" in opts.listen_address else f"{opts.listen_address}:")
        if opts.listen_address else "",
        "max_body_kb": MAX_BODY // 1024, "public_port": public_port, "admin_off": opts.caddy_admin_off,
        "secrets": secret_values,
    }


def render(opts: DeployOptions, name: str, secret_values: Optional[dict[str, str]] = None) -> str:
    """One template rendered with the checked options."""
    values = secret_values or dict.fromkeys(SECRET_NAMES, SECRET_PLACEHOLDER)
    return _TEMPLATES.get_template(name).render(_context(check(opts), values))


def new_secrets() -> dict[str, str]:
    """Fresh secrets for host.env (URL-safe: no quoting needed in systemd's EnvironmentFile)."""
    return {n: secrets.token_urlsafe(24) for n in SECRET_NAMES}


def plan(opts: DeployOptions, secret_values: Optional[dict[str, str]] = None,
         plugins_source: Optional[str] = None) -> Plan:
    """The files to write and the steps after, for these options."""
    check(opts)
    proxy_path = PROXY_PATHS[opts.proxy]
    files = (
        DeployFile(UNIT_PATH, 0o644, render(opts, "strategy-host.service"),
                   f"systemd unit: runs `{opts.exec_path} run` as user {opts.user}, restarts it when it fails, "
                   f"and lets it write {opts.data_dir} only"),
        DeployFile(ENV_PATH, 0o600, render(opts, "host.env", secret_values),
                   "the host's settings and generated secrets (root-only; kept if it exists, never overwritten)",
                   keep_existing=True),
        DeployFile(proxy_path, 0o644, render(opts, PROXY_TEMPLATES[opts.proxy]),
                   f"{opts.proxy}: HTTPS for {opts.domain}, whole requests buffered, timeouts, a "
                   f"{MAX_BODY // 1024} KB body limit, "
                   + ("per-address rate limits on /webhook and /login, " if opts.proxy == "nginx" else "")
                   + ("an address allowlist on /webhook, " if webhook_allowlist(opts) else "")
                   + "the client's address passed to the host"),
    )
    return Plan(files, tuple(_steps(opts, plugins_source)))


def _steps(opts: DeployOptions, plugins_source: Optional[str]) -> list[str]:
    data, user = opts.data_dir.rstrip("/"), opts.user
    plugins = plugins_source or "path/to/your/plugins"
    steps = [
        f"sudo useradd --system --user-group --home-dir {data} --shell /usr/sbin/nologin {user}",
        f"sudo install -d -o {user} -g {user} -m 0700 {data} && sudo cp -r {plugins} {data}/plugins && "
        f"sudo chown -R {user}:{user} {data}/plugins",
        f"sudo {opts.exec_path} check --env {ENV_PATH}",
    ]
    if opts.proxy == "nginx":
        if not opts.cert:
            steps.append(f"sudo apt-get install -y nginx certbot && sudo certbot certonly --standalone -d {opts.domain} "
                         f"--pre-hook 'systemctl stop nginx' --post-hook 'systemctl start nginx'")
        else:
            steps.append("sudo apt-get install -y nginx")
        steps.append(f"sudo ln -sf {PROXY_PATHS['nginx']} /etc/nginx/sites-enabled/ && sudo nginx -t && "
                     f"sudo systemctl reload nginx")
    else:
        steps += ["sudo apt-get install -y caddy",
                  f"sudo caddy validate --config {PROXY_PATHS['caddy']} && sudo systemctl reload caddy"]
    port = "" if opts.https_port == 443 else f":{opts.https_port}"
    steps += [
        f"sudo systemctl daemon-reload && sudo systemctl enable --now {UNIT_NAME}",
        f"curl -sS https://{opts.domain}{port}/healthz && journalctl -u {UNIT_NAME} -n 20",
        f"sudo grep -E '^(WEBHOOK_SECRET|DASHBOARD_PASSWORD)=' {ENV_PATH}   # the alert's secret_key, the "
        f"dashboard password; TradingView's webhook URL is https://{opts.domain}{port}/webhook",
    ]
    return steps


@dataclass(frozen=True)
class Written:
    """What happened to one file."""

    path: Path
    outcome: str  # written | unchanged | kept | replaced
    note: str = ""


def conflicts(p: Plan, root: Path, force: bool) -> list[str]:
    """Files that exist with other contents and would be replaced without --force (none are touched then)."""
    found = []
    for f in p.files:
        target = _target(root, f.path)
        if target.exists() and not f.keep_existing and not force and target.read_text(errors="replace") != f.text:
            found.append(f"{target} exists with other contents: review it, then run again with --force to "
                         f"replace it (the old one is kept as {target.name}.bak)")
    return found


def write(p: Plan, root: Path, force: bool = False) -> list[Written]:
    """Write the plan under root ("/" on the server); an existing host.env is kept, others need --force."""
    problems = conflicts(p, root, force)
    if problems:
        raise DeployError("; ".join(problems))
    done = []
    for f in p.files:
        target = _target(root, f.path)
        if target.exists() and f.keep_existing:
            done.append(Written(target, "kept", _kept_differences(target, f.text)))
            continue
        if target.exists() and target.read_text(errors="replace") == f.text:
            done.append(Written(target, "unchanged"))
            continue
        outcome = "written"
        if target.exists():
            shutil.copy2(target, target.with_name(target.name + ".bak"))
            outcome = "replaced"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".new")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, f.mode)  # secrets are never readable by others
        with os.fdopen(fd, "w") as out:
            out.write(f.text)
        os.chmod(tmp, f.mode)
        tmp.replace(target)
        done.append(Written(target, outcome))
    return done


def _kept_differences(kept: Path, wanted: str) -> str:
    """The settings (never the secrets) whose kept value differs from what these options would write."""
    old = dotenv_values(kept)
    new = dotenv_values(stream=io.StringIO(wanted))
    names = [k for k, v in new.items() if k not in SECRET_NAMES and old.get(k) != v]
    return ", ".join(f"{k}={old.get(k)!r} (these options: {new[k]!r})" for k in names)


def _target(root: Path, path: str) -> Path:
    return root / PurePosixPath(path).relative_to("/")


REQUEST_BUFFERS_SINCE = (2, 6, 4)  # `request_buffers` arrived in 2.6.4; `buffer_requests` (2.2 on) was later dropped
CADDY_SPELLINGS = ("the Caddyfile's `buffer_requests` works with Caddy 2.2 to 2.6.x; `request_buffers unlimited` "
                   "with Caddy 2.6.4 and later")


def _version(text: str) -> Optional[tuple[int, int, int]]:
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in m.groups()) if m else None  # type: ignore[return-value]


def _output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def caddy_version(caddy: Optional[str] = None) -> tuple[Optional[tuple[int, int, int]], str]:
    """The Caddy the config will meet, and how that was found: the installed one, else the one the printed step
    `apt-get install caddy` would install (apt's candidate), else (None, why not)."""
    binary = caddy or shutil.which("caddy")
    if binary:
        found = _version(_output([binary, "version"]))
        if found:
            return found, f"the installed {binary} is {'.'.join(map(str, found))}"
    apt = shutil.which("apt-cache")
    if apt:
        m = re.search(r"Candidate:\s*(\S+)", _output([apt, "policy", "caddy"]))
        found = _version(m.group(1)) if m else None
        if found:
            return found, f"caddy is not installed; apt-get would install {m.group(1)}"  # type: ignore[union-attr]
    return None, "caddy is not installed and apt knows no caddy package"


def caddy_has_request_buffers(caddy: Optional[str] = None) -> bool:
    """Whether the Caddy found (installed, or the one apt would install) spells request buffering `request_buffers`."""
    found = caddy_version(caddy)[0]
    return found is not None and found >= REQUEST_BUFFERS_SINCE


def exec_problem(exec_path: str) -> Optional[str]:
    """Why the service could not start the --exec program (its interpreter, behind the shebang and its symlinks,
    hidden by ProtectHome or unreadable for another user), or None; nothing is said about a path not here."""
    script = Path(exec_path)
    try:
        first = script.read_bytes()[:256].split(b"\n", 1)[0].decode()
    except (OSError, UnicodeDecodeError):
        return None
    if not first.startswith("#!"):
        return None
    interpreter = first[2:].split()[0] if first[2:].split() else ""
    if not interpreter:
        return None
    chain = [interpreter, os.path.realpath(interpreter)]
    cfg = Path(interpreter).parent.parent / "pyvenv.cfg"  # a venv's Python lives in its `home`
    if cfg.is_file():
        home = (dotenv_values(cfg).get("home") or "").strip()
        if home:
            chain.append(os.path.realpath(home))
    fix = ("install it where a system user can read it, with the system Python: sudo python3 -m venv "
           "/opt/strategy-host/venv && sudo /opt/strategy-host/venv/bin/pip install /path/to/strategy-host, then "
           "deploy --exec /opt/strategy-host/venv/bin/strategy-host")
    for path in chain:
        if path.startswith(HIDDEN_FROM_SERVICE):
            return (f"--exec {exec_path} runs the Python {chain[0]}, which lives in {path}: the service runs with "
                    f"ProtectHome=yes as its own user and cannot see it, so it would not start; {fix}")
    for path in (exec_path, *chain):
        blocked = _closed_to_others(Path(path))
        if blocked:
            return (f"--exec {exec_path} runs the Python {chain[0]}; {blocked} is closed to other users (mode "
                    f"{Path(blocked).stat().st_mode & 0o777:04o}), so the service's user could not run it; {fix}")
    return None


def _closed_to_others(path: Path) -> Optional[str]:
    """The first folder on the way to path that others may not enter (or path itself, if they may not read it)."""
    for folder in reversed(path.parents):
        try:
            if not folder.stat().st_mode & stat.S_IXOTH:
                return str(folder)
        except OSError:
            return None
    try:
        return None if path.stat().st_mode & stat.S_IROTH else str(path)
    except OSError:
        return None


def default_exec_path() -> str:
    """The strategy-host program being run, else the one next to this Python (its virtualenv)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "strategy-host" and argv0.is_file():
        return str(argv0.absolute())
    return str(Path(sys.executable).parent / "strategy-host")


def default_plugins_source() -> Optional[str]:
    """The project's plugins/ folder when running from a checkout."""
    candidate = Path(__file__).resolve().parent.parent / "plugins"
    return str(candidate) if candidate.is_dir() else None
