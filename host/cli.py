"""The command line: strategy-host run | check | sim | unlock | deploy | backup | restore."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import TYPE_CHECKING, Optional

from . import __version__, backup_cli, deploy_cli
from .config import SECRET_NAMES, ConfigError, Settings, load
from .locks import FileLock
from .tradingview import WHY_POSITION, messages

if TYPE_CHECKING:
    from .sim.runner import SimServer


def _load(env: Optional[str], generate: bool = False) -> Settings:
    try:
        if generate:  # a config with problems writes no secrets.env: that file marks a host that has run
            try:
                load(env)
            except ConfigError as e:
                if any(p.field not in SECRET_NAMES or not p.found.startswith("nothing") for p in e.problems):
                    raise
        return load(env, generate_secrets=generate)
    except ConfigError as e:
        print(f"configuration problems ({len(e.problems)}):", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        for w in e.warnings:
            print(f"warning: {w}", file=sys.stderr)
        print("run `strategy-host check --env FILE` after fixing them", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_check(args: argparse.Namespace) -> int:
    try:
        settings = load(args.env, strict=True)  # unknown names and empty values too: `run` only warns of most
    except ConfigError as e:
        print(f"{args.env or 'environment'}: {len(e.problems)} problem(s)")
        for p in e.problems:
            print(f"  {p}")
        for w in e.warnings:
            print(f"warning: {w}")
        return 1
    from .broker_mode import mode_problem
    mixed = mode_problem(settings.BROKER, settings.db_path, settings.data_dir)
    if mixed:
        print(f"{args.env or 'environment'}: 1 problem(s)\n  {mixed}")
        return 1
    for w in settings.warnings:
        print(f"warning: {w}")
    for note in _sebi_notes(settings):
        print(f"note: {note}")
    print(f"{args.env or 'environment'}: OK (broker {settings.BROKER}, data in {settings.data_dir})")
    return 0


def _sebi_notes(settings: Settings) -> list[str]:
    """What SEBI's retail-algo rules need from a live setup."""
    live = "" if settings.BROKER == "shoonya" else " (when BROKER=shoonya)"
    algo = (f"ALGO_ID={settings.ALGO_ID} is sent with every order" if settings.ALGO_ID
            else "ALGO_ID is empty: no algo id is sent, orders go out without one")
    return [f"static IP{live}: Shoonya accepts API orders only from a static IP registered for this account; "
            f"register this server's public IP with Shoonya before going live",
            f"{algo}; orders are kept under 10 per second per exchange segment"]


def _banner(settings: Settings) -> None:
    base = f"http://{settings.HOST}:{settings.PORT}"
    print(f"strategy-host {__version__}: {settings.BROKER} mode, data in {settings.data_dir.resolve()}")
    print(f"  dashboard   {base}/  (log in with DASHBOARD_PASSWORD)")
    print(f"  webhook     {base}/webhook")
    print(f"  API         {base}/api/status  (Authorization: Bearer <API_TOKEN>)")
    print(f"  health      {base}/healthz")
    if settings.generated_secrets:
        print(f"\nFirst run: generated {', '.join(settings.generated_secrets)} into "
              f"{settings.data_dir / 'secrets.env'} (mode 0600). They are shown this once:")
        for name in settings.generated_secrets:
            print(f"  {name}={getattr(settings, name)}")
        if "WEBHOOK_SECRET" in settings.generated_secrets:
            print("\nTradingView alert messages (paste one into the alert's Message box):")
            for title, text in messages(settings.WEBHOOK_SECRET):
                print(f"  {title}:\n    {text}")
            print(f"  {WHY_POSITION}")
    else:
        print(f"  secrets     {settings.source or settings.data_dir / 'secrets.env'}")
    for w in settings.warnings:
        print(f"warning: {w}")
    sys.stdout.flush()


def cmd_run(args: argparse.Namespace) -> int:
    if args.env:
        os.environ["STRATEGY_HOST_ENV"] = os.path.abspath(args.env)
    if args.host:
        os.environ["HOST"] = args.host
    if args.port:
        os.environ["PORT"] = str(args.port)
    settings = _load(args.env, generate=True)
    marks = _earlier_run(settings)  # before our own lock file exists
    instance = FileLock(settings.data_dir / "host.lock")
    if not instance.acquire():
        print(f"strategy-host is already running on {settings.data_dir.resolve()} (pid {instance.holder()}); "
              f"stop it first, or give this one another DATA_DIR", file=sys.stderr)
        return 1
    problem = _database_problem(settings, marks, args.new_database)
    if problem:
        instance.release()
        print(problem, file=sys.stderr)
        return 2
    _banner(settings)
    from .server import HostServer
    from .web import create_app
    HostServer(lambda: create_app(settings), settings, workers=args.workers, threads=args.threads,
               config_file=args.gunicorn_conf).run()
    return 0


def _earlier_run(settings: Settings) -> list:
    """The files in DATA_DIR that an earlier run left; a secrets.env this very start created is not one."""
    from .storage import earlier_run_marks
    ignore = []
    secrets_file = settings.data_dir / "secrets.env"
    if settings.generated_secrets and secrets_file.is_file():
        names = set(re.findall(r"^\s*(?:export\s+)?(\w+)\s*=", secrets_file.read_text(errors="replace"), re.M))
        if names <= set(settings.generated_secrets):
            ignore.append("secrets.env")
    return earlier_run_marks(settings.data_dir, settings.db_path, ignore)


def _database_problem(settings: Settings, marks: list, new_database: bool) -> str:
    """Why the database must not be used (one paragraph), or "" once it is checked and migrated."""
    from .backup import folder_of
    from .broker_mode import mode_problem, record_mode
    from .storage import DatabaseUnusable, Storage, StorageFull, database_is_empty, refuse_lost_database
    mixed = mode_problem(settings.BROKER, settings.db_path, settings.data_dir)
    if mixed:
        return mixed
    try:
        refuse_lost_database(settings.db_path, marks, new_database)
        existed = not database_is_empty(settings.db_path)
        storage = Storage(settings.db_path, folder_of(settings.data_dir),  # PRAGMA quick_check, the schema, then
                          settings.DISK_MIN_FREE_MB)  # a backup of a database with data, and the migrations
        if new_database and marks and not existed:
            storage.write(lambda db: Storage.add_event(
                db, "database", f"started with a new, empty database (--new-database) in {settings.data_dir}",
                "warning"))
        record_mode(storage, settings.BROKER)
        storage.close()
        if new_database and existed:
            print(f"note: {settings.db_path} is in use and intact; --new-database changes nothing", file=sys.stderr)
    except (DatabaseUnusable, StorageFull) as e:
        return str(e)
    return ""


def cmd_sim(args: argparse.Namespace) -> int:
    """Serve the Noren OMS simulator on loopback until interrupted."""
    import signal
    import threading
    from .sim.matching import MatchingEngine
    from .sim.runner import SimServer
    from .sim.server import NorenSim
    engine = MatchingEngine(args.data) if args.data else MatchingEngine()
    sim = NorenSim(engine=engine, client_id=args.client_id, client_secret=args.client_secret,
                   redirect_url=args.redirect_url)
    server = SimServer(sim, args.host, args.port, args.ws_port or (args.port + 1 if args.port else 0)).start()
    for user in args.session or []:
        uid, _, token = user.partition(":")
        with sim.lock:
            sim.sessions[token] = uid
    back = sim.redirect_url or "the dashboard that started the login (any port)"
    banner = [f"Noren simulator (strategy-host {__version__}). A live host needs these in its env file "
              f"(any USER_ID; the simulator's test secrets are not real ones):",
              *(f"  {line}" for line in sim_env(server, sim.client_id, sim.client_secret, args.session)),
              f"Connect broker comes back to {back}.",
              f"Test controls: POST http://{server.host}:{server.port}/sim/control; every control is in "
              f"docs/simulator.md"]
    # one write: its WebSocket thread logs to the same terminal or pipe already, and a log line landing inside
    # a printed line (print writes the text and its newline apart when unbuffered) corrupts the URL a trader
    # pastes, e.g. SHOONYA_API_URL=http://127.0.0.1:9000/NorenWClientTP/2026-11-30
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())  # before the banner: a kill as soon as it is read stops it
    sys.stdout.write("\n".join(banner) + "\n")
    sys.stdout.flush()
    try:  # in short waits: a signal taken by one of the server's threads wakes no blocked main thread
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


def sim_env(server: "SimServer", client_id: str, client_secret: str, sessions: Optional[list] = None) -> list[str]:
    """Every variable a live host needs to trade on this simulator, as env-file lines."""
    base = f"http://{server.host}:{server.port}"
    uid, _, token = (sessions or [""])[0].partition(":")
    auth = ["SHOONYA_AUTH=token", f"SHOONYA_ACCESS_TOKEN={token}"] if token else \
           ["SHOONYA_AUTH=oauth", f"OAUTH_CLIENT_ID={client_id}", f"OAUTH_SECRET={client_secret}"]
    return ["BROKER=shoonya", f"USER_ID={uid or 'FA12345'}", *auth,
            f"SHOONYA_API_URL={server.api_url}", f"SHOONYA_WS_URL={server.ws_url}",
            f"SHOONYA_OAUTH_URL={server.oauth_url}", f"SHOONYA_SYMBOLS_URL={base}/"]


def cmd_unlock(args: argparse.Namespace) -> int:
    """End the dashboard's login lockouts and slow-down (the host may be running: it reads them each attempt)."""
    from .storage import Storage, database_is_empty
    from .web.lockout import unlock
    settings = _load(args.env)
    if database_is_empty(settings.db_path):
        print(f"no database at {settings.db_path}: nothing is locked", file=sys.stderr)
        return 1
    storage = Storage(settings.db_path)
    try:
        n = unlock(storage, "strategy-host unlock")
    finally:
        storage.close()
    print(f"dashboard logins unlocked: {n} failed login{'s' if n != 1 else ''} forgotten, no address is locked "
          f"out and logins are not slowed down")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="strategy-host", description="Strategy host for Shoonya (Noren OMS)")
    parser.add_argument("--version", action="version", version=f"strategy-host {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve the host (paper mode when there is no config)")
    run.add_argument("--env", help="config file, e.g. config_env/live.env (the environment overrides it)")
    run.add_argument("--host", help="bind address (overrides HOST)")
    run.add_argument("--port", type=int, help="port (overrides PORT)")
    run.add_argument("--workers", type=int, default=1, help="gunicorn workers (default 1; the engine runs in one)")
    run.add_argument("--threads", type=int, default=4, help="threads per worker (default 4)")
    run.add_argument("--gunicorn-conf", help="a gunicorn config file whose settings override ours")
    run.add_argument("--new-database", action="store_true",
                     help="start with a new, empty database although DATA_DIR shows an earlier run "
                          "(an intact database is never replaced)")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a config file and list every problem")
    check.add_argument("--env", help="config file to check (default: only the environment)")
    check.set_defaults(func=cmd_check)
    sim = sub.add_parser("sim", help="serve the Noren OMS simulator (REST and WebSocket) on loopback; see docs/simulator.md")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=9100, help="REST port (default 9100)")
    sim.add_argument("--ws-port", type=int, default=0, help="WebSocket port (default: REST port + 1)")
    sim.add_argument("--data", help="SQLite file for the simulator's book (default: in memory)")
    sim.add_argument("--client-id", default="SIM-CLIENT")
    sim.add_argument("--client-secret", default="sim-secret")
    sim.add_argument("--redirect-url", default=None,
                     help="the one redirect URL registered for the client, as at the real broker (default: back to "
                          "the host that started the login, whatever its port)")
    sim.add_argument("--session", action="append", metavar="UID:TOKEN",
                     help="a session that is valid from the start (for SHOONYA_AUTH=token)")
    sim.set_defaults(func=cmd_sim)
    unlock = sub.add_parser("unlock", help="end the dashboard's login lockouts and slow-down")
    unlock.add_argument("--env", help="config file (default: only the environment)")
    unlock.set_defaults(func=cmd_unlock)
    deploy_cli.add_parser(sub)
    backup_cli.register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)
