"""Settings: load `config_env/*.env` (the environment overrides the file), validate, explain."""
from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from datetime import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from dotenv import dotenv_values

from .models import Problem

SECRET_NAMES = ("WEBHOOK_SECRET", "DASHBOARD_PASSWORD", "API_TOKEN")
MAKE_SECRET = "`python3 -c 'import secrets; print(secrets.token_urlsafe(24))'`"  # how to make one, in problems


class ConfigError(Exception):
    """The configuration has problems; each one names the variable."""

    def __init__(self, problems: list[Problem], warnings: tuple[str, ...] = ()):
        self.problems = problems
        self.warnings = warnings  # shown with the problems, so fixing them reveals nothing new
        super().__init__("; ".join(str(p) for p in problems))


# ---- value parsers: each returns the parsed value or raises ValueError(expected) ----

def _str(v: str) -> str:
    return v


def _bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def _choice(*options: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        low = v.strip().lower()
        if low not in options:
            raise ValueError(" | ".join(options))
        return low
    return parse


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(v: str) -> int:
        try:
            n = int(v.strip())
        except ValueError:
            raise ValueError(f"an integer from {lo} to {hi}") from None
        if not lo <= n <= hi:
            raise ValueError(f"an integer from {lo} to {hi}")
        return n
    return parse


def _decimal(lo: Optional[Decimal] = None, hi: Optional[Decimal] = None, what: str = "a number") -> Callable[[str], Decimal]:
    def parse(v: str) -> Decimal:
        try:
            d = Decimal(v.strip())
        except InvalidOperation:
            raise ValueError(what) from None
        if not d.is_finite() or (lo is not None and d < lo) or (hi is not None and d > hi):
            raise ValueError(what)
        return d
    return parse


def _hhmm_or_off(v: str) -> Optional[time]:
    if v.strip().lower() in ("off", "none", "-"):
        return None
    try:
        return _hhmm(v)
    except ValueError:
        raise ValueError("a time HH:MM (24 h, Asia/Kolkata), or off") from None


def _hhmm(v: str) -> time:
    m = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", v.strip())
    if not m:
        raise ValueError("a time HH:MM (24 h, Asia/Kolkata)")
    return time(int(m.group(1)), int(m.group(2)))


def _ip_list(v: str) -> tuple:
    nets = []
    for part in filter(None, (p.strip() for p in v.split(","))):
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError("a comma-separated list of IP addresses or CIDR networks") from None
    return tuple(nets)


def _int_list(v: str) -> tuple:
    try:
        return tuple(int(p) for p in (x.strip() for x in v.split(",")) if p)
    except ValueError:
        raise ValueError("a comma-separated list of numeric Telegram user ids") from None


TELEGRAM_CATEGORIES = ("system", "broker", "alerts", "orders", "risk", "plugins", "summary")


def _categories(v: str) -> frozenset:
    given = {p.strip().lower() for p in v.split(",") if p.strip()}
    if not given or given - set(TELEGRAM_CATEGORIES):
        raise ValueError("a comma-separated list of " + ", ".join(TELEGRAM_CATEGORIES))
    return frozenset(given)


def _secret(min_len: int) -> Callable[[str], str]:
    def parse(v: str) -> str:
        if len(v) < min_len:
            raise ValueError(f"at least {min_len} characters")
        return v
    return parse


def _dates(v: str) -> frozenset:
    from datetime import date
    days = []
    for n, part in enumerate((p.strip() for p in v.split(",")), 1):
        if not part:
            continue
        try:
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", part):
                raise ValueError
            days.append(date.fromisoformat(part))
        except ValueError:
            raise ValueError(f"a comma-separated list of dates YYYY-MM-DD (entry {n}, {part!r}, is not one)") from None
    return frozenset(days)


def _url(v: str) -> str:
    if not re.match(r"^(https?|wss?)://[^\s/]+", v.strip()):
        raise ValueError("an http(s):// or ws(s):// URL")
    return v.strip()


@dataclass(frozen=True)
class Var:
    """One configuration variable: its name, old aliases, parser, default and meaning."""

    name: str
    parse: Callable[[str], Any]
    default: Optional[str]
    doc: str
    aliases: tuple[str, ...] = ()
    secret: bool = False
    live_required: bool = False


VARS: tuple[Var, ...] = (
    Var("BROKER", _choice("paper", "shoonya"), "paper", "paper (simulated) or shoonya (live money)"),
    Var("DATA_DIR", _str, "var", "folder for the database, secrets and locks"),
    Var("ORDERS_DB_PATH", _str, "", "SQLite database file (default DATA_DIR/host.sqlite)"),
    Var("PLUGINS_DIR", _str, "plugins", "folder with strategies/ and notifiers/"),
    Var("HOST", _str, "127.0.0.1", "address the server binds"),
    Var("PORT", _int(1, 65535), "8000", "port the server binds"),
    Var("HTTP_HEADER_TIMEOUT_S", _int(1, 300), "10", "a request's headers must arrive within this many seconds, "
        "or the connection is answered 408 and closed (slow clients hold no thread meanwhile)"),
    Var("HTTP_BODY_TIMEOUT_S", _int(1, 600), "20", "a request's body must arrive within this many seconds "
        "after its headers, or the connection is answered 408 and closed"),
    Var("HTTP_SEND_TIMEOUT_S", _int(1, 600), "30", "a client must take each answer within this many seconds "
        "of it being ready, or the connection is closed (answers wait in memory, not in a thread)"),
    Var("WEBHOOK_SECRET", _secret(8), None, "secret_key every alert must carry", aliases=("WEBHOOK_SECRET_KEY",), secret=True),
    Var("DASHBOARD_PASSWORD", _secret(8), None, "dashboard login password", secret=True),
    Var("API_TOKEN", _secret(16), None, "Bearer token for /api", secret=True),
    Var("WEBHOOK_ALLOWED_IPS", _ip_list, "", "if set, only these peers may call /webhook (TradingView: 52.89.214.238,34.212.75.30,54.218.53.128,52.32.178.7)"),
    Var("WEBHOOK_REQUIRE_SIGNATURE", _bool, "false", "require an X-Signature HMAC-SHA256 header"),
    Var("TRUST_PROXY_HEADERS", _bool, "false", "take the client address from X-Forwarded-For (only behind your own proxy)"),
    Var("TRUSTED_PROXIES", _ip_list, "127.0.0.1,::1", "with TRUST_PROXY_HEADERS=true, X-Forwarded-For/X-Real-IP are "
        "believed only from these peers (your proxy's address; IPs or CIDR networks)"),
    Var("DEDUPE_WINDOW_S", _int(0, 3600), "10", "an identical alert body inside this many seconds is a duplicate"),
    Var("ALERT_MAX_AGE_S", _int(1, 86400), "300", "an alert still waiting this many seconds after arrival is not executed (stale)"),
    Var("ORDER_LOST_AFTER_S", _int(5, 3600), "60", "an order sent but not found in the broker's books after this many seconds is marked LOST (never resent)"),
    Var("ALERT_ID_TTL_S", _int(1, 30 * 86400), "86400", "a strategy's alert_id is a duplicate within this many seconds; after that it runs again"),
    Var("REQUIRE_KNOWN_STRATEGY", _bool, "false", "reject alerts whose strategy has no plugin"),
    Var("DASHBOARD_COOKIE_SECURE", _bool, "false", "mark the session cookie Secure (serve over HTTPS)"),
    Var("DASHBOARD_SESSION_HOURS", _int(1, 720), "12", "hours a dashboard login lasts"),
    Var("DASHBOARD_LOGIN_ATTEMPTS", _int(1, 100), "5", "failed logins (from any address) within DASHBOARD_LOCKOUT_S before each further one must wait 1, 2, 4 ... s"),
    Var("DASHBOARD_LOCKOUT_S", _int(1, 86400), "900", "seconds in which failed logins slow logins down, and a locked-out address must wait"),
    # revocable sessions and a lockout that cannot be turned against the owner (host/web/lockout.py)
    Var("DASHBOARD_LOGIN_DELAY_MAX_S", _int(1, 3600), "60", "the longest wait between failed logins (from any address)"),
    Var("DASHBOARD_ADDRESS_LOCK_ATTEMPTS", _int(1, 100000), "50", "failed logins from one address within 24 h before it is locked out for DASHBOARD_LOCKOUT_S (`strategy-host unlock` ends it)"),
    Var("MARKET_PROTECTION_PCT", _decimal(Decimal("0.1"), Decimal("20"), "a percentage from 0.1 to 20"), "2", "market orders become limit orders this far through the LTP"),
    Var("LTP_MAX_AGE_S", _int(1, 60), "5", "a feed price older than this many seconds is not used to protect a market order (GetQuotes is asked instead)"),
    Var("SQUARE_OFF_TIME", _hhmm_or_off, "15:15", "intraday (MIS) square-off time, Asia/Kolkata, or off"),
    Var("RISK_BASE_MAX_LOSS", _decimal(None, Decimal("-1"), "a negative amount in rupees, e.g. -5000"), "-5000", "daily max loss before trailing"),
    Var("RISK_TRAIL_STEP", _decimal(Decimal("0"), None, "an amount >= 0 in rupees"), "0", "the limit rises by this step for every step of peak profit (0: no trailing)"),
    Var("RISK_WARNING_THRESHOLD", _decimal(Decimal("0"), Decimal("1"), "a fraction from 0 to 1, e.g. 0.8"), "0.8", "warn when the loss reaches this fraction of the limit"),
    Var("RISK_MAX_CONSECUTIVE_LOSS_DAYS", _int(0, 30), "3", "breach days in a row before a cooldown (0: never)"),
    Var("RISK_STATUS_UPDATE_MIN", _int(0, 1440), "30", "minutes between risk status notifications (0: never)"),
    Var("RISK_MAX_ORDERS_PER_DAY", _int(0, 100000), "0", "orders per strategy per day (0: no limit)"),
    Var("RISK_MAX_QTY_PER_ORDER", _int(0, 10_000_000), "0", "quantity per order, any strategy (0: no limit)"),
    Var("RISK_MAX_QTY_PER_SYMBOL", _int(0, 10_000_000), "0", "open quantity per strategy and symbol (0: no limit)"),
    Var("RISK_STRATEGY_MAX_LOSS", _decimal(None, Decimal("0"), "an amount <= 0 in rupees (0: no limit)"), "0",
        "a strategy losing this much today is exited and stopped for the day"),
    Var("RISK_COOLDOWN_DAYS", _int(0, 30), "0", "cooldown length in trading days after the loss streak "
                                                 "(0: until the next week's first trading day)"),
    Var("RISK_POLL_S", _int(1, 300), "5", "seconds between reads of the broker's positions"),
    Var("RISK_FLATTEN_SCOPE", _choice("strategies", "strategies+manual"), "strategies+manual", "what a breach exits: strategy-owned positions, and (strategies+manual) today's manual intraday/NRML ones; never CNC"),
    Var("TICK_JUMP_PCT", _decimal(Decimal("0"), Decimal("100"), "a percentage from 0 to 100 (0: off)"), "20", "a feed tick this far from the last one is held until a second tick confirms it"),
    Var("TRAIL_MIN_INTERVAL_S", _decimal(Decimal("0"), Decimal("600"), "seconds from 0 to 600"), "1", "a trailing stop resting at the broker is moved (ModifyOrder) at most once in this many seconds"),
    Var("EXIT_REPRICE_S", _decimal(Decimal("0.5"), Decimal("60"), "seconds from 0.5 to 60"), "3", "a breach or square-off exit not filled after this long is moved towards the market, a step at a time"),
    Var("DISK_MIN_FREE_MB", _int(1, 1_000_000), "200", "/healthz answers 503 when DATA_DIR's disk has less free space than this"),
    Var("FEED_STALL_S", _int(2, 600), "30", "reconnect the broker feed after this many silent seconds in market hours"),
    Var("MARKET_HOLIDAYS", _dates, "", "exchange holidays, e.g. 2026-01-26,2026-03-03"),
    Var("SHOONYA_AUTH", _choice("oauth", "token"), "oauth", "how the live broker session is obtained"),
    Var("SHOONYA_API_URL", _url, "https://api.shoonya.com/NorenWClientAPI/", "Noren REST base URL"),
    Var("SHOONYA_WS_URL", _url, "wss://api.shoonya.com/NorenWSAPI/", "Noren WebSocket URL"),
    Var("SHOONYA_OAUTH_URL", _url, "https://api.shoonya.com/", "the broker's OAuth authorize page"),
    Var("SHOONYA_PREOPEN_CHECK", _hhmm_or_off, "09:00", "daily check of the broker session before the open "
                                                         "(Asia/Kolkata), or off"),
    Var("SHOONYA_SYMBOLS_URL", _url, "https://api.shoonya.com/", "where the daily <EXCH>_symbols.txt.zip files are"),
    Var("ALGO_ID", _str, "", "SEBI algo id sent as algo_id with every order (live; empty: none is sent)"),
    Var("OAUTH_CLIENT_ID", _str, "", "OAuth client id (live, SHOONYA_AUTH=oauth)", live_required=True),
    Var("OAUTH_SECRET", _str, "", "OAuth client secret", secret=True),
    Var("SHOONYA_ACCESS_TOKEN", _str, "", "access token (live, SHOONYA_AUTH=token)", secret=True),
    Var("USER_NAME", _str, "", "broker user name"),
    Var("USER_ID", _str, "", "broker user id (live)", live_required=True),
    Var("PASSWORD", _str, "", "broker password (old login)", secret=True),
    Var("TOKEN", _str, "", "TOTP base32 secret (old login)", secret=True),
    Var("VC", _str, "", "vendor code"),
    Var("APP_KEY", _str, "", "app key", secret=True),
    Var("IMEI", _str, "", "device id"),
    Var("TELEGRAM_BOT_TOKEN", _str, "", "Telegram bot token", aliases=("TELEGRAM_TOKEN",), secret=True),
    Var("TELEGRAM_CHAT_ID", _str, "", "Telegram chat for notifications"),
    Var("TELEGRAM_ALLOWED_USERS", _int_list, "", "Telegram user ids allowed to give commands"),
    Var("TELEGRAM_API_URL", _url, "https://api.telegram.org", "Bot API server"),
    Var("TELEGRAM_CATEGORIES", _categories, ",".join(TELEGRAM_CATEGORIES), "which events go to Telegram: "
        + ", ".join(TELEGRAM_CATEGORIES)),
    Var("TELEGRAM_MIN_SEVERITY", _choice("info", "warning", "error"), "info", "the least severe event sent to Telegram"),
    Var("TELEGRAM_CONFIRM_S", _int(5, 600), "60", "seconds an /exitall confirmation button stays valid"),
    Var("TELEGRAM_MODE", _choice("polling", "webhook"), "polling", "how commands arrive: long polling, or a webhook "
        "at PUBLIC_URL/telegram/webhook"),
    Var("TELEGRAM_WEBHOOK_SECRET", _str, "", "webhook mode: the X-Telegram-Bot-Api-Secret-Token Telegram must send",
        secret=True),
    Var("PUBLIC_URL", _str, "", "the address people open the dashboard at, for links in notifications "
        "(default http://HOST:PORT)"),
    Var("DAILY_SUMMARY_TIME", _hhmm_or_off, "15:40", "when the day's summary goes out (Asia/Kolkata, trading days), "
        "or off"),
    # market hours for entries (live): outside its exchange's session an entry is refused (423), unless this
    Var("ALLOW_AMO", _bool, "false", "live: an order sent while its exchange is closed goes as an after-market order "
        "(AMO) instead of an entry being refused with 423"),
)
VARS_BY_NAME = {v.name: v for v in VARS}


@dataclass(frozen=True)
class Settings:
    """Validated configuration; `values` maps each variable name to its parsed value."""

    values: Mapping[str, Any]
    source: Optional[str] = None
    warnings: tuple[str, ...] = ()
    generated_secrets: tuple[str, ...] = field(default=(), compare=False)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def data_dir(self) -> Path:
        return Path(self.values["DATA_DIR"])

    @property
    def db_path(self) -> Path:
        return Path(self.values["ORDERS_DB_PATH"] or self.data_dir / "host.sqlite")

    @property
    def paper(self) -> bool:
        return self.values["BROKER"] == "paper"

    def secrets(self) -> list[str]:
        """Every secret value that must never be shown."""
        return [str(self.values[v.name]) for v in VARS if v.secret and self.values.get(v.name)]


def _raw_values(env_file: Optional[str], environ: Mapping[str, str]) -> dict[str, str]:
    """Merge the file and the environment (environment wins), resolving old aliases."""
    merged: dict[str, str] = {}
    if env_file:
        for k, v in dotenv_values(env_file).items():
            if v is not None:
                merged[k] = v
    for k, v in environ.items():
        merged[k] = v
    out: dict[str, str] = {}
    for var in VARS:
        for key in (var.name, *var.aliases):
            if key in merged and merged[key].strip() != "":
                out[var.name] = merged[key]
                break
    return out


def file_permission_warning(path: Path) -> Optional[str]:
    """Warn when a file that may hold secrets is readable by group or others."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}); run: chmod 600 {path}"
    return None


def load(env_file: Optional[str] = None, environ: Optional[Mapping[str, str]] = None,
         generate_secrets: bool = False, strict: bool = False) -> Settings:
    """Load and validate settings; raise ConfigError listing every problem.

    Names the host does not know and empty values are problems when `strict` (`check`) or for RISK_*
    names (`run` refuses them); otherwise they are warnings."""
    environ = os.environ if environ is None else environ
    problems: list[Problem] = []
    warnings: list[str] = []
    for finding, consequence in doubtful_names(env_file, environ):
        if strict or finding.field.startswith(REFUSED_PREFIX):
            problems.append(finding)
        else:
            warnings.append(f"{finding}; {consequence}")
    for finding, consequence in env_overrides(env_file, environ):
        if finding.field.startswith(REFUSED_PREFIX):
            problems.append(finding)
        else:
            warnings.append(f"{finding}; {consequence}")
    if env_file:
        p = Path(env_file)
        if not p.is_file():
            raise ConfigError([Problem("--env", "an existing .env file", repr(env_file))])
        w = file_permission_warning(p)
        if w:
            warnings.append(w)
    raw = _raw_values(env_file, environ)
    data_dir = Path(raw.get("DATA_DIR", "var"))
    secrets_file = data_dir / "secrets.env"
    generated: list[str] = []
    missing = [n for n in SECRET_NAMES if n not in raw]
    if missing and secrets_file.is_file():
        stored = {k: v for k, v in dotenv_values(secrets_file).items() if v}
        for n in missing:
            if n in stored:
                raw[n] = stored[n]
        w = file_permission_warning(secrets_file)
        if w:
            warnings.append(w)
    missing = [n for n in SECRET_NAMES if n not in raw]
    if missing and generate_secrets:
        for n in missing:
            raw[n] = secrets.token_urlsafe(24)
        _write_secrets(secrets_file, {n: raw[n] for n in missing})
        generated = missing
    values: dict[str, Any] = {}
    later = [n for n in missing if strict and not generate_secrets]  # `check`: `run` makes them, not a problem
    warnings += [f"{n} is not set: `run` generates one into {secrets_file} (mode 0600) on its first start"
                 for n in later]
    for var in VARS:
        if var.name in later:
            values[var.name] = ""
            continue
        text = raw.get(var.name, var.default)
        if text is None:
            problems.append(Problem(var.name, f"a value ({var.doc})", "nothing (variable not set)"))
            continue
        if text == "" and var.default == "":
            values[var.name] = var.parse("") if var.parse in (_ip_list, _int_list, _dates) else ""
            continue
        try:
            values[var.name] = var.parse(text)
        except ValueError as e:
            found = "a value that is hidden because it is secret" if var.secret else repr(text)
            problems.append(Problem(var.name, str(e), found))
    warnings += [w for w in map(file_permission_warning, private_files(values)) if w]
    if values.get("BROKER") == "shoonya":
        problems += _live_problems(values)
    problems += _telegram_problems(values)
    findings = [Problem(name, f"a secret of your own ({MAKE_SECRET})", "an example placeholder from the docs, which "
                                                                        "anyone can read")
                for name in placeholder_secrets(values)] + shared_secrets(values)
    for finding in findings:
        if strict or values.get("BROKER") == "shoonya":
            problems.append(finding)
        else:
            warnings.append(f"{finding}; paper mode runs with it, live mode refuses it")
    if problems:
        raise ConfigError(problems, tuple(warnings))
    return Settings(values=values, source=env_file, warnings=tuple(warnings), generated_secrets=tuple(generated))


def _live_problems(values: Mapping[str, Any]) -> list[Problem]:
    """The variables live trading needs, depending on SHOONYA_AUTH."""
    need = ["USER_ID"]
    need += ["OAUTH_CLIENT_ID", "OAUTH_SECRET"] if values.get("SHOONYA_AUTH") == "oauth" else ["SHOONYA_ACCESS_TOKEN"]
    return [Problem(n, f"a value when BROKER=shoonya and SHOONYA_AUTH={values.get('SHOONYA_AUTH')}",
                    "nothing (variable not set)") for n in need if not values.get(n)]


def _telegram_problems(values: Mapping[str, Any]) -> list[Problem]:
    """Telegram's variables belong together; webhook mode needs its secret and a public https address."""
    problems = []
    token, chat = values.get("TELEGRAM_BOT_TOKEN"), values.get("TELEGRAM_CHAT_ID")
    if token and not chat:
        problems.append(Problem("TELEGRAM_CHAT_ID", "the chat to notify when TELEGRAM_BOT_TOKEN is set",
                                "nothing (variable not set)"))
    if chat and not re.fullmatch(r"-?\d+|@\w{5,}", str(chat)):
        problems.append(Problem("TELEGRAM_CHAT_ID", "a numeric chat id (groups are negative) or @channelname", repr(chat)))
    if values.get("TELEGRAM_MODE") == "webhook":
        if not re.fullmatch(r"[A-Za-z0-9_-]{16,256}", values.get("TELEGRAM_WEBHOOK_SECRET") or ""):
            problems.append(Problem("TELEGRAM_WEBHOOK_SECRET", "16 to 256 characters A-Z, a-z, 0-9, _ or - when "
                                    "TELEGRAM_MODE=webhook", "a value that is hidden because it is secret"
                                    if values.get("TELEGRAM_WEBHOOK_SECRET") else "nothing (variable not set)"))
        if not str(values.get("PUBLIC_URL") or "").startswith("https://"):
            problems.append(Problem("PUBLIC_URL", "the https:// address Telegram can reach when TELEGRAM_MODE=webhook",
                                    repr(values.get("PUBLIC_URL") or "")))
    return problems


def _write_secrets(path: Path, new: Mapping[str, str]) -> None:
    """Append generated secrets to DATA_DIR/secrets.env, created with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        for k, v in new.items():
            f.write(f"{k}={v}\n")
    os.chmod(path, 0o600)


# ---- names the host does not know, and empty values: what would silently weaken protection ----

# Environment variables are checked only under the prefixes of our settings: the environment holds many
# other programs' variables, but systemd's EnvironmentFile (strategy-host deploy) hands the whole host.env
# to the host this way, so a typo there must be caught as it would be in an --env file.
ENV_PREFIXES = ("RISK_", "SHOONYA_", "DASHBOARD_", "WEBHOOK_", "TELEGRAM_", "OAUTH_")
REFUSED_PREFIX = "RISK_"  # `run` refuses to start with these unknown or empty: a risk limit would be lost


@dataclass(frozen=True)
class UnknownSetting(Problem):
    """A variable the host does not know: it has no effect, so a typo would silently drop a setting."""

    suggestion: str = ""

    def __str__(self) -> str:
        hint = f"did you mean `{self.suggestion}`?" if self.suggestion else "remove it, or check its spelling"
        return f"`{self.field}` is not a setting ({self.found}); {hint}"


def doubtful_names(env_file: Optional[str], environ: Mapping[str, str]) -> list[tuple[Problem, str]]:
    """Unknown names (in the file, or prefixed like ours in the environment) and empty values of settings
    that have a default, each with what `run` does about it when it is only a warning."""
    import difflib
    in_file = dotenv_values(env_file) if env_file else {}
    known = {key for var in VARS for key in (var.name, *var.aliases)}
    found: list[tuple[Problem, str]] = []
    names = [(k, f"in {env_file}") for k in in_file] + \
            [(k, "in the environment") for k in sorted(environ) if k.startswith(ENV_PREFIXES) and k not in in_file]
    for name, where in names:
        if name not in known:
            close = [name.upper()] if name.upper() in known else \
                difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.75)
            found.append((UnknownSetting(name, "a setting the host knows", where, close[0] if close else ""),
                          "it is ignored"))
    for name, lines in duplicate_keys(env_file).items():
        found.append((Problem(name, "one line per setting", f"lines {', '.join(map(str, lines[:-1]))} and {lines[-1]} of {env_file}"),
                      f"the last one (line {lines[-1]}) is used"))
    merged = {**{k: (v or "") for k, v in in_file.items()}, **environ}
    for var in VARS:
        keys = [k for k in (var.name, *var.aliases) if k in merged]
        if keys and var.default and all(not merged[k].strip() for k in keys):
            where = "in the environment" if keys[0] in environ else f"in {env_file}"
            found.append((Problem(var.name, f"a value ({var.doc}), or no line at all for the default {var.default}",
                                  f"an empty value {where}"), f"the default {var.default} is used"))
    return found


def private_files(values: Mapping[str, Any]) -> list[Path]:
    """The host's files that hold orders, positions or the broker token: only their owner may read them."""
    data_dir = Path(values.get("DATA_DIR") or "var")
    db = Path(values.get("ORDERS_DB_PATH") or data_dir / "host.sqlite")
    paper = data_dir / "paper.sqlite"
    return [f.with_name(f.name + s) for f in (db, paper) for s in ("", "-wal", "-shm")] + [data_dir / "shoonya_token.json"]


# ---- what the file says is not what runs: the same name twice, the environment over the file, placeholders ----

def duplicate_keys(env_file: Optional[str]) -> dict[str, list[int]]:
    """Each name given on more than one line of the file, with its line numbers."""
    if not env_file or not Path(env_file).is_file():
        return {}
    lines: dict[str, list[int]] = {}
    for n, line in enumerate(Path(env_file).read_text(errors="replace").splitlines(), 1):
        m = re.match(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=", line)
        if m:
            lines.setdefault(m.group(1), []).append(n)
    return {k: v for k, v in lines.items() if len(v) > 1}


def env_overrides(env_file: Optional[str], environ: Mapping[str, str]) -> list[tuple[Problem, str]]:
    """Settings set in both the environment and the file to different values (the environment wins)."""
    in_file = dotenv_values(env_file) if env_file and Path(env_file).is_file() else {}
    found = []
    for var in VARS:
        for key in (var.name, *var.aliases):
            mine, theirs = in_file.get(key), environ.get(key)
            if mine is None or not (theirs or "").strip() or mine.strip() == theirs.strip():  # an empty one is unused
                continue
            shown = ("(hidden: secret)", "(hidden: secret)") if var.secret else (repr(theirs), repr(mine))
            found.append((Problem(key, f"one value (set it in {env_file} or in the environment, not both)",
                                  f"{shown[0]} in the environment and {shown[1]} in {env_file}; the environment's "
                                  f"value {shown[0]} wins"), "the environment's value is used"))
    return found


PLACEHOLDER_MARKS = ("change-me", "changeme", "example", "placeholder")
ONLY_XS = re.compile(r"[x*._ -]*x{3}[x*._ -]*")  # "xxxxxxxx", "XXXX-XXXX": a random secret may hold "xxx" (1 in 1,000)


def example_values() -> set[str]:
    """Every value in the shipped config_env/*.example files: published, so never a secret."""
    folder = Path(__file__).resolve().parent.parent / "config_env"
    return {v.strip() for f in sorted(folder.glob("*.example")) for v in dotenv_values(f).values() if v and v.strip()}


def shared_secrets(values: Mapping[str, Any]) -> list[Problem]:
    """Secrets that repeat an earlier one's value: WEBHOOK_SECRET travels in every alert (and sits in TradingView),
    so whoever sees it would also hold the API or the dashboard."""
    out, seen = [], {}
    for name in SECRET_NAMES:
        text = str(values.get(name) or "")
        if text in seen:
            out.append(Problem(name, f"a value of its own ({MAKE_SECRET})", f"the same value as {seen[text]}"))
        elif text:
            seen[text] = name
    return out


def placeholder_secrets(values: Mapping[str, Any]) -> list[str]:
    """The secrets whose value is an example placeholder (or any value from a shipped example file)."""
    published = example_values()
    out = []
    for var in VARS:
        text = str(values.get(var.name) or "") if var.secret else ""
        low = text.lower()
        if text and (any(m in low for m in PLACEHOLDER_MARKS) or ONLY_XS.fullmatch(low) or ("<" in text and ">" in text)
                     or text.strip() in published):
            out.append(var.name)
    return out
