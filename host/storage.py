"""SQLite storage on sqlite-utils: one shared connection, WAL, busy_timeout, migrations, retries."""
from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import urllib.parse
import weakref
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

import sqlite_utils
from sqlite_utils.db import dedupe_keys

from .group_sync import GroupSync, WalFile

from .filemode import create_private

log = logging.getLogger(__name__)
T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
BEGIN_PAUSES_S = (0.0001, 0.0002, 0.0005, 0.001, 0.002)  # waits for another process's write to end (then 2 ms each)
HEARTBEAT_KEY = "engine_heartbeat"
LOCK_RETRIES = 20
RESERVE_NAME = "space.reserve"
RESERVE_BYTES = 2 << 20  # what a breach's flatten, a halt and a day of risk records need, and more


def utcnow() -> str:
    """Now as an ISO-8601 UTC string with milliseconds; strings of this form sort in time order."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def dec(v: Any) -> Optional[Decimal]:
    """A stored decimal text back to Decimal (None stays None)."""
    return None if v is None or v == "" else Decimal(str(v))


def _m1_initial(db: sqlite_utils.Database) -> None:
    db["alerts"].create({
        "id": str, "received_at": str, "strategy": str, "execution_type": str, "client_alert_id": str,
        "dedupe_key": str, "body_hash": str, "body": str, "source_ip": str, "status": str, "reason": str,
        "problems": str, "orders": str, "duplicate_of": str, "decided_at": str,
    }, pk="id")
    db["alerts"].create_index(["dedupe_key"], unique=True)
    db["alerts"].create_index(["status"])
    db["alerts"].create_index(["body_hash", "received_at"])
    db["orders"].create({
        "id": str, "alert_id": str, "strategy": str, "action": str, "exchange": str, "symbol": str,
        "side": str, "qty": int, "order_type": str, "price": str, "trigger_price": str, "product": str,
        "status": str, "filled_qty": int, "avg_price": str, "broker_order_id": str, "reason": str,
        "created_at": str, "updated_at": str,
    }, pk="id")
    db["orders"].create_index(["status"])
    db["orders"].create_index(["strategy", "exchange", "symbol"])
    db["orders"].create_index(["alert_id"])
    db["order_history"].create({"id": int, "order_id": str, "at": str, "status": str, "detail": str}, pk="id")
    db["order_history"].create_index(["order_id"])
    db["fills"].create({"fill_id": str, "order_id": str, "qty": int, "price": str, "at": str}, pk="fill_id")
    db["fills"].create_index(["order_id"])
    db["positions"].create({
        "strategy": str, "exchange": str, "symbol": str, "product": str, "net_qty": int,
        "avg_price": str, "realized_pnl": str, "updated_at": str,
    }, pk=("strategy", "exchange", "symbol", "product"))
    db["quotes"].create({"exchange": str, "symbol": str, "ltp": str, "at": str}, pk=("exchange", "symbol"))
    db["events"].create({"id": int, "at": str, "kind": str, "severity": str, "strategy": str,
                         "message": str, "data": str}, pk="id")
    db["state"].create({"key": str, "value": str, "updated_at": str}, pk="key")
    db["commands"].create({"id": int, "at": str, "kind": str, "args": str, "status": str,
                           "result": str, "done_at": str}, pk="id")
    db["commands"].create_index(["status"])


def _m2_plugins(db: sqlite_utils.Database) -> None:
    db["plugins"].create({"kind": str, "name": str, "version": str, "generation": int, "status": str,
                          "error": str, "detail": str, "file": str, "digest": str, "updated_at": str,
                          "history": str}, pk=("kind", "name"))
    db["orders"].add_column("strategy_version", str)
    db["plugin_state"].create({"kind": str, "name": str, "state": str, "version": str, "updated_at": str},
                              pk=("kind", "name"))


def _m3_risk_days(db: sqlite_utils.Database) -> None:
    db["risk_days"].create({"day": str, "breached": int, "final_pnl": str, "peak_pnl": str, "limit_at_end": str,
                            "updated_at": str}, pk="day")


def _m4_dashboard(db: sqlite_utils.Database) -> None:
    db["pnl_points"].create({"id": int, "day": str, "at": str, "pnl": str}, pk="id")
    db["pnl_points"].create_index(["day"])
    db["login_failures"].create({"id": int, "address": str, "at": str}, pk="id")
    db["login_failures"].create_index(["address"])


def _m5_notifier_inbox(db: sqlite_utils.Database) -> None:
    db["notifier_inbox"].create({"id": int, "notifier": str, "key": str, "body": str, "received_at": str,
                                 "handled_at": str}, pk="id")
    db["notifier_inbox"].create_index(["notifier", "key"], unique=True)


def _m6_position_targets(db: sqlite_utils.Database) -> None:
    # alert_id is unique per strategy now (and only for ALERT_ID_TTL_S)
    db.execute("update alerts set dedupe_key = 'id:' || strategy || ':' || client_alert_id "
               "where dedupe_key is not null and strategy is not null")
    # the entry half of a POSITION reversal, waiting for its exit to fill
    db["position_targets"].create({
        "id": int, "alert_id": str, "strategy": str, "exchange": str, "symbol": str, "product": str,
        "order_type": str, "price": str, "target": int, "kind": str, "after": str, "status": str, "reason": str,
        "created_at": str, "decided_at": str}, pk="id")
    db["position_targets"].create_index(["status"])


def _m7_exactly_once(db: sqlite_utils.Database) -> None:
    # how much of each order's fills the positions have taken (a lost fill message is made up from the totals)
    db["orders"].add_column("applied_qty", int)
    db["orders"].add_column("applied_value", str)
    db["orders"].add_column("cancel_requested", str)  # breach/exit-all/EXIT: cancel once the broker id is known
    db["orders"].add_column("escalate", int)  # a risk exit, moved towards the market until it fills (1 or 2: whose)
    db["orders"].add_column("reprices", int)
    db["orders"].add_column("repriced_at", str)
    # a position carried from an earlier day is valued from the previous close (avg_price); its entry was this
    db["positions"].add_column("carried_qty", int)
    db["positions"].add_column("carried_from", str)
    totals: dict[str, tuple[int, Decimal]] = {}
    for order_id, qty, price in db.execute("select order_id, qty, price from fills").fetchall():
        q, v = totals.get(order_id, (0, Decimal("0")))
        totals[order_id] = (q + qty, v + qty * Decimal(price))  # Decimal: never SQLite's float sum
    db.execute("update orders set applied_qty = 0, applied_value = '0'")
    for order_id, (q, v) in totals.items():
        db.execute("update orders set applied_qty = ?, applied_value = ? where id = ?", (q, str(v), order_id))
    # fills of orders placed outside the host (the broker's app, its square-off), each applied once
    db["outside_fills"].create({"fill_id": str, "broker_order_id": str, "exchange": str, "symbol": str,
                                "product": str, "side": str, "qty": int, "price": str, "at": str,
                                "allocation": str}, pk="fill_id")


def _m8_protections(db: sqlite_utils.Database) -> None:
    # exits that travel with an entry (host/protect.py): one row per position, its stop resting at the broker
    db["protections"].create({
        "strategy": str, "exchange": str, "symbol": str, "product": str, "side": str, "spec": str,
        "entry_orders": str, "alert_id": str, "status": str, "stop": str, "target": str, "best": str,
        "trail_active": int, "last_trail_at": str, "pending_exit": str, "exit_orders": str, "arm_after": str,
        "reason": str, "created_at": str, "updated_at": str}, pk=("strategy", "exchange", "symbol", "product"))
    db["protections"].create_index(["status"])
    db["orders"].add_column("protection", str)  # a protective stop: the position it protects
    db["orders"].add_column("noticed", int)     # its end has been acted on (hit, cancelled by hand, ...)
    db["orders"].create_index(["protection"])
    # a strategy's MTM limits (strategy_stoploss / strategy_target / strategy_trailing_step)
    db["strategy_limits"].create({"strategy": str, "stoploss": str, "target": str, "trailing_step": str,
                                  "base_pnl": str, "peak": str, "status": str, "alert_id": str, "reason": str,
                                  "updated_at": str}, pk="strategy")


def _m9_sessions(db: sqlite_utils.Database) -> None:
    # dashboard sessions kept server-side (host/web/sessions.py): the signed cookie carries only a random id,
    # stored here as its SHA-256; logout, "log out everywhere" and a new password delete the rows
    db["dashboard_sessions"].create({"id": str, "created_at": str, "expires_at": str, "address": str,
                                     "fingerprint": str}, pk="id")
    db["dashboard_sessions"].create_index(["expires_at"])
    db["login_failures"].create_index(["at"])  # the global slow-down counts every address's failures
    db["login_failures"].add_column("device", str)  # a browser that logged in before has its own slow-down


def _m10_flat_cost(db: sqlite_utils.Database) -> None:
    # issue 17: no per-alert query may grow with the day's (or all time's) orders
    db["orders"].create_index(["strategy", "status"])                       # a strategy's book (decide.load_book)
    db["orders"].create_index(["strategy", "exchange", "symbol", "status"])  # working qty (RISK_MAX_QTY_PER_SYMBOL)
    db["orders"].create_index(["strategy", "created_at"])                   # the day's count, once per day (risk)
    db["orders"].create_index(["created_at"])                               # the day's summary


def _m11_unexplained_left(db: sqlite_utils.Database) -> None:
    # a difference found in the broker's positions before its order showed in the books is counted at once; the
    # order's fill, when the books show it, takes off what is left of it here instead of being counted again
    db["outside_fills"].add_column("unexplained_left", int)


def _m12_protection_index(db: sqlite_utils.Database) -> None:
    # issue 17: `protection is null` (every order but a protective stop) chose the protection index over the status
    # one, so the risk beat's and each exit's reads of the working exits walked the whole history; the index now
    # holds only protective stops (`protection = ?` still uses it)
    db.execute("drop index if exists idx_orders_protection")
    db.execute("create index idx_orders_protection on orders (protection) where protection is not null")


def _m13_positions_by_instrument(db: sqlite_utils.Database) -> None:
    # an exit is capped at the broker's net less what the other strategies hold in its instrument (flatten.across)
    db["positions"].create_index(["exchange", "symbol", "product"])
    db["outside_fills"].create_index(["exchange", "symbol", "product", "at"])  # ...unless traded outside the host


def _m14_alert_positions(db: sqlite_utils.Database) -> None:
    # the position each strategy's alerts add up to (what TradingView believes it holds): alert_positions.py
    db["alert_positions"].create({"strategy": str, "exchange": str, "symbol": str, "believed": int,
                                  "updated_at": str}, pk=("strategy", "exchange", "symbol"))


def _m15_alert_moves(db: sqlite_utils.Database) -> None:
    # what a refused or rejected alert moved it by: the same alert_id sent again by hand does not move it again
    db["alert_moves"].create({"strategy": str, "client_alert_id": str, "exchange": str, "symbol": str, "moved": int,
                              "at": str}, pk=("strategy", "client_alert_id", "exchange", "symbol"))


BREACH_ROWS = "breached is not 0 or day is not date(day)"  # the days that breached, and rows that cannot say
OPEN_POSITIONS = "net_qty != 0"
# partial indexes that a check reads instead of its table (the risk gate, a strategy's book): a copy of the file
# taken mid-write can leave one behind its table, where PRAGMA quick_check does not look (check_database)
PARTIAL_INDEXES = (("idx_risk_days_breached", "risk_days", "day", BREACH_ROWS),
                   ("idx_positions_open", "positions", "strategy", OPEN_POSITIONS))
# what a migration made before a later one made it again (the start checks it no further: the migration will)
EARLIER_DEFINITIONS = ("CREATE INDEX idx_risk_days_breached on risk_days (day) where breached is not 0",)


def _m16_breach_days(db: sqlite_utils.Database) -> None:
    # the risk gate reads the days that breached (a loss streak's cooldown), not every trading day ever recorded
    # (as first made: migration 18 makes it again, with the rows that cannot say a date)
    db.execute("create index if not exists idx_risk_days_breached on risk_days (day) where breached is not 0")


def _m17_open_positions(db: sqlite_utils.Database) -> None:
    # a strategy's book (decide.load_book, on every alert) reads its open positions, not every instrument it closed
    # today (a strategy rotating strikes closes hundreds a day; they are deleted only when the next day begins)
    db.execute(f"create index if not exists idx_positions_open on positions (strategy) where {OPEN_POSITIONS}")


def _m18_breach_index_rebuilt(db: sqlite_utils.Database) -> None:
    # a row whose day is not a plain date is read too, so that it still fails entries closed (risk.breach_days)
    db.execute("drop index if exists idx_risk_days_breached")
    db.execute(f"create index idx_risk_days_breached on risk_days (day) where {BREACH_ROWS}")


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_m1_initial, _m2_plugins, _m3_risk_days,
                                                                  _m4_dashboard, _m5_notifier_inbox,
                                                                  _m6_position_targets, _m7_exactly_once,
                                                                  _m8_protections, _m9_sessions,
                                                                  _m10_flat_cost, _m11_unexplained_left,
                                                                  _m12_protection_index,
                                                                  _m13_positions_by_instrument,
                                                                  _m14_alert_positions, _m15_alert_moves,
                                                                  _m16_breach_days, _m17_open_positions,
                                                                  _m18_breach_index_rebuilt)
_BUILTIN_MIGRATIONS = MIGRATIONS  # the reference for the schema check, whatever is appended later


def _drop_reader(readers: set, lock: Any, conn: sqlite3.Connection) -> None:
    """Close a thread's read connection once its thread has ended."""
    with lock:
        readers.discard(conn)
    conn.close()


class StorageFull(sqlite3.OperationalError):
    """The disk holding the database is full (SQLITE_FULL or ENOSPC); the transaction was rolled back."""


class DatabaseUnusable(Exception):
    """The database cannot be used as it is (damaged, of another schema, or missing after an earlier run).

    The message is for the person starting the host: one paragraph naming the file and what to do.
    """


def _is_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    if isinstance(e, sqlite3.OperationalError):
        code = getattr(e, "sqlite_errorcode", None)
        return (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or "database or disk is full" in str(e).lower()
    return False


def _full(path: Path, e: BaseException) -> StorageFull:
    return StorageFull(f"the disk holding {path} is full ({e}): nothing was stored; free space on "
                       f"{path.parent.resolve()} and send it again")


_SCHEMAS: dict[int, tuple[dict[str, set[str]], frozenset[tuple[str, str, str]]]] = {}


def _reference(version: int) -> tuple[dict[str, set[str]], frozenset[tuple[str, str, str]]]:
    """The tables with their columns, and the triggers and views, that the first `version` migrations of this
    module create (on a scratch database)."""
    version = min(version, len(_BUILTIN_MIGRATIONS))
    if version not in _SCHEMAS:
        db = sqlite_utils.Database(memory=True)
        for m in _BUILTIN_MIGRATIONS[:version]:
            m(db)
        _SCHEMAS[version] = (_schema(db.conn), frozenset(_code_objects(db.conn)))
        db.close()
    return _SCHEMAS[version]


def expected_schema(version: int) -> dict[str, set[str]]:
    """The tables and columns the first `version` migrations of this module create."""
    return _reference(version)[0]


def _code_objects(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """(type, name, SQL with its spacing normalised) of every trigger and view: code that runs inside queries."""
    return [(t, name, " ".join((sql or "").split())) for t, name, sql in conn.execute(
        "select type, name, sql from sqlite_master where type in ('trigger', 'view') order by type, name")]


def foreign_code(conn: sqlite3.Connection, version: int) -> list[str]:
    """The triggers and views in the database that the migrations of schema `version` do not define (a trigger
    in a handed-over "backup" could rewrite every order the host stores), e.g. ["trigger t_evil on orders"]."""
    known = _reference(version)[1]
    found = []
    for kind, name, sql in _code_objects(conn):
        if (kind, name, sql) not in known:
            on = conn.execute("select tbl_name from sqlite_master where type = ? and name = ?", (kind, name)).fetchone()
            found.append(f"{kind} {name}" + (f" on {on[0]}" if kind == "trigger" and on else ""))
    return found


def foreign_code_problem(found: list[str], path: Path) -> str:
    """What to say about triggers and views we did not make, and how to get rid of them."""
    drops = " ".join(f"DROP {f.split()[0].upper()} [{f.split()[1]}];" for f in found[:8])
    return (f"it carries SQL {', '.join(found[:8])}{' ...' if len(found) > 8 else ''}, which strategy-host's "
            f"migrations do not define: code that would run inside the host's own writes (it could change every "
            f"order stored). If you made them yourself and want them gone: sqlite3 {path} '{drops}'")


def _schema(conn: sqlite3.Connection) -> dict[str, set[str]]:
    tables = [r[0] for r in conn.execute("select name from sqlite_master where type = 'table' "
                                         "and name not like 'sqlite_%'")]
    return {t: {r[1] for r in conn.execute(f"PRAGMA table_info([{t}])")} for t in tables}


def schema_gaps(actual: dict[str, set[str]], version: int) -> list[str]:
    """The tables and columns of schema `version` that `actual` (from _schema) lacks."""
    missing = []
    for table, columns in expected_schema(version).items():
        if table not in actual:
            missing.append(f"table {table}")
        else:
            missing += [f"column {table}.{c}" for c in sorted(columns - actual[table])]
    return missing


def backups_hint(db_path: Path, data_dir: Optional[Path] = None) -> str:
    """Where a copy to restore could be, with the newest one named when there is one."""
    folder = (data_dir or db_path.parent) / "backups"
    try:
        copies = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix == ".sqlite"
                         and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    except OSError:
        copies = []
    where = f"{folder}/" + (f" (newest: {copies[-1].name})" if copies else " (none there now: use your own copy)")
    return f"restore the last good copy from {where} to {db_path} with the host stopped"


def check_database(conn: sqlite3.Connection, path: Path) -> None:
    """PRAGMA quick_check and the schema against the migrations; raise DatabaseUnusable with what to do."""
    damaged = (f"refusing to start: the database {path} is damaged (PRAGMA quick_check: {{why}}). Nothing was "
               f"changed. Do not delete it: {backups_hint(path)}; or move the damaged file aside "
               f"(mv {path} {path}.damaged, and its -wal file) and start with a new, empty database: "
               f"`strategy-host run --new-database` (orders, positions, the halt and the alert ids seen are then "
               f"forgotten; check the broker's books). `sqlite3 {path}.damaged .recover` may save part of it.")
    try:
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise DatabaseUnusable(damaged.format(why=" ".join("; ".join(problems).split())[:300]))
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        actual = _schema(conn)
    except sqlite3.DatabaseError as e:
        raise DatabaseUnusable(damaged.format(why=str(e))) from None
    if version > len(MIGRATIONS):
        raise DatabaseUnusable(f"refusing to start: the database {path} has schema version {version}, written by a "
                               f"newer strategy-host (this one knows {len(MIGRATIONS)}); run the newer version, or "
                               f"{backups_hint(path)}.")
    missing = schema_gaps(actual, version)
    if missing:
        raise DatabaseUnusable(f"refusing to start: the database {path} (schema version {version}) lacks "
                               f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; it was changed "
                               f"outside the host. {backups_hint(path).capitalize()}.")
    found = foreign_code(conn, version)
    if found:
        raise DatabaseUnusable(f"refusing to start: the database {path} (schema version {version}) was changed "
                               f"outside the host: {foreign_code_problem(found, path)}. Or "
                               f"{backups_hint(path)}.")
    stale = stale_indexes(conn)
    if stale:
        raise DatabaseUnusable(f"refusing to start: in the database {path}, {'; '.join(stale)}. Risk reads them "
                               f"and would miss rows. Nothing was changed: with the host stopped, run that with "
                               f"sqlite3 {path} '...'; or {backups_hint(path)}.")


def stale_indexes(conn: sqlite3.Connection) -> list[str]:
    """Partial indexes that risk reads whose rows differ from their table's (each said in words); [] when all
    match, or do not exist yet (an older schema)."""
    own = not conn.in_transaction
    if own:  # both reads of a table on one snapshot: another worker's fill between them is no mismatch
        conn.execute("BEGIN")
    try:
        return _stale_indexes(conn)
    finally:
        if own:
            conn.execute("ROLLBACK")


def _stale_indexes(conn: sqlite3.Connection) -> list[str]:
    made = {r[0]: " ".join((r[1] or "").split()) for r in conn.execute(
        "select name, sql from sqlite_master where type = 'index'")}
    found = []
    for index, table, column, where in PARTIAL_INDEXES:
        if index not in made or made[index] in EARLIER_DEFINITIONS:
            continue
        try:
            through = conn.execute(f"select rowid, {column} from {table} indexed by {index} where {where} "
                                   f"order by rowid").fetchall()
        except sqlite3.OperationalError:  # made by hand, on other rows: it cannot serve risk's read
            found.append(f"the index {index} is not the one the host makes (drop it, then: create index {index} on "
                         f"{table} ({column}) where {where})")
            continue
        whole = conn.execute(f"select rowid, {column} from {table} not indexed where {where} "
                             f"order by rowid").fetchall()
        if through != whole:
            found.append(f"the index {index} lists {len(through)} rows of {table} where the table has {len(whole)} "
                         f"(rebuild it from the table: REINDEX {index})")
    return found


EARLIER_RUN_MARKS = ("secrets.env", "paper.sqlite", "engine.lock", "host.lock", "backups")


def earlier_run_marks(data_dir: Path, db_path: Path, ignore: Iterable[str] = ()) -> list[Path]:
    """What in DATA_DIR shows that a host has run there before (its secrets, paper book, locks, backups)."""
    found = [data_dir / n for n in EARLIER_RUN_MARKS if n not in ignore and (data_dir / n).exists()]
    wal = db_path.with_name(db_path.name + "-wal")
    if wal.is_file() and wal.stat().st_size > 0:
        found.append(wal)
    return found


def database_is_empty(path: Path) -> bool:
    """Missing, 0 bytes, or a SQLite file with no tables and schema version 0."""
    if not path.exists() or path.stat().st_size == 0:
        return True
    try:
        conn = connect_read_only(path)
        try:
            tables = conn.execute("select count(*) from sqlite_master").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return False  # not empty: damaged, and check_database says so
    return tables == 0 and version == 0


def refuse_lost_database(db_path: Path, marks: list[Path], new_database: bool) -> None:
    """Refuse to begin a new database where an earlier run's database should be, unless asked to."""
    if not marks or new_database or not database_is_empty(db_path):
        return
    state = "missing" if not db_path.exists() else "empty"
    shown = ", ".join(str(m) + ("/" if m.is_dir() else "") for m in marks)
    raise DatabaseUnusable(
        f"refusing to start: the database {db_path} is {state}, but {shown} {'show' if len(marks) > 1 else 'shows'} that the host has run here "
        f"before. Starting would begin a new, empty database: the halt, the alert ids already seen and the "
        f"orders and positions it knows would be forgotten. Either {backups_hint(db_path, marks[0].parent)}, "
        f"or, to start with a new, empty database on purpose, run `strategy-host run --new-database`.")


class _Database(sqlite_utils.Database):
    """sqlite-utils without the savepoint it wraps around every query: a SELECT has nothing to undo.

    (Two more statements and their Python per read; the hot path reads a dozen times per alert.)
    """

    def query(self, sql: str, params: Any = None) -> Any:
        if sql.lstrip()[:6].lower() != "select":
            return super().query(sql, params)
        cursor = self.conn.execute(sql, params if params is not None else ())
        keys = _row_keys(tuple(d[0] for d in cursor.description))
        return (dict(zip(keys, row)) for row in cursor)


@functools.lru_cache(maxsize=512)
def _row_keys(names: tuple[str, ...]) -> tuple[str, ...]:
    """sqlite-utils' row keys (a repeated column name gets a suffix), worked out once per column list."""
    return tuple(dedupe_keys(names))


class Storage:
    """The process's write connection, shared under its lock, and one read connection per thread.

    Writes go through one connection, one transaction at a time. Each thread reads on its own
    connection, so under WAL a reader waits neither for a writer's fsync nor for another reader
    (a dashboard refreshing its panels never holds up the engine). Commits are synchronous=NORMAL
    (they survive a killed process); `durable=True` returns only once the commit is on the disk
    (which also syncs every commit before it): used where a promise depends on it (an alert before
    its answer, an order before it goes to the broker). Durable commits made at the same time share
    one fsync of the WAL, done outside the write lock (group_sync.py).
    """

    def __init__(self, path: Path | str, backups: Optional[Path] = None, min_free_mb: int = 200):
        self.path = Path(path)
        self.backups = Path(backups) if backups is not None else self.path.parent / "backups"  # pre-migration copies
        self.min_free_mb = min_free_mb  # DISK_MIN_FREE_MB: a backup that would leave less free is skipped
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.full_since: Optional[str] = None  # a write failed for a full disk (cleared by the next that works)
        self.reserve = self.path.parent / RESERVE_NAME  # space kept back for risk and exits on a full disk
        self._lock = threading.RLock()
        self._readers_lock = threading.RLock()  # RLock: a reader's finalizer may run in a GC inside close()
        self._readers: set[sqlite3.Connection] = set()
        self._local = threading.local()
        create_private(self.path)
        try:
            checked = self._check_read_only()
            self.conn = self._connect()
            wal = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        except sqlite3.DatabaseError as e:
            if _is_full(e):
                raise _full(self.path, e) from None
            raise DatabaseUnusable(f"refusing to start: the database {self.path} cannot be opened ({e}); "
                                   f"{backups_hint(self.path)}, or move it aside and start with "
                                   f"`strategy-host run --new-database`.") from None
        if not checked:  # the writer has rolled back what needed it: checked now
            try:
                check_database(self.conn, self.path)
            except DatabaseUnusable:
                self.conn.close()
                raise
        self.db = _Database(self.conn)
        if wal:  # a writer waits only to begin (_begin); without WAL a COMMIT waits for readers: SQLite's handler
            self.conn.execute("PRAGMA busy_timeout=0")
        # without WAL (a file system that cannot share memory), a durable commit stays synchronous=FULL
        self._wal = WalFile(self.path) if wal else None
        self.group = GroupSync(self._wal.sync) if self._wal else None
        self.migrate()

    def _check_read_only(self) -> bool:
        """At start, damage or a foreign schema stops here, not in a request: read on a read-only connection, so
        that a refused file is left as it was (a writer closing would checkpoint its WAL into it, and delete it).
        False when a read-only connection cannot tell (a hot rollback journal to roll back, a file or folder it
        cannot open, a lock): the writer checks then, once it has opened the file."""
        try:
            checker = connect_read_only(self.path)
        except sqlite3.DatabaseError:  # (a link to a file not made yet, a folder it cannot open)
            return False
        try:
            try:
                checker.execute("select count(*) from sqlite_master").fetchone()
            except sqlite3.DatabaseError as e:
                if not _is_damage(e):
                    return False
            check_database(checker, self.path)
            return True
        finally:
            checker.close()

    def _reader(self) -> sqlite_utils.Database:
        """This thread's read connection: under WAL readers never wait for each other or for the writer.
        It is closed when its thread ends (a thread per exit's book read would otherwise leave one open each)."""
        reader = getattr(self._local, "reader", None)
        if reader is None:
            conn = self._connect()
            with self._readers_lock:
                self._readers.add(conn)
            reader = self._local.reader = _Database(conn)
            # when the thread's locals go; nothing in it leads back to self (a Storage never closed is still freed),
            # and not at exit (a daemon thread still reading would find its connection closed under it)
            weakref.finalize(reader, _drop_reader, self._readers, self._readers_lock, conn).atexit = False
        return reader

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                               timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    # ---- transactions ----
    # ---- the reserve: a full disk must not switch risk off ----
    @property
    def low_space(self) -> bool:
        """The disk is nearly full: entries are refused, and risk, exits and control write into the reserve."""
        try:
            return shutil.disk_usage(self.path.parent).free < 2 * RESERVE_BYTES
        except OSError:
            return True

    def keep_reserve(self) -> None:
        """Make (or make again, once space is back) the reserve file; never fails."""
        if self.reserve.exists():
            return
        try:
            if shutil.disk_usage(self.path.parent).free < 3 * RESERVE_BYTES:
                return
            with open(self.reserve, "wb") as f:
                f.write(b"\0" * RESERVE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            log.warning("the disk reserve %s was not made: %s", self.reserve, e)
            self.reserve.unlink(missing_ok=True)

    def _release_reserve(self) -> bool:
        """A write hit a full disk: give up the reserve so that the write can be tried once more."""
        try:
            self.reserve.unlink()
        except FileNotFoundError:
            return False
        log.error("disk full under %s: the %d MB reserve was released so that risk, exits and halt keep "
                  "working; new entries answer 507 until space is freed", self.path.parent, RESERVE_BYTES >> 20)
        return True

    def write(self, fn: Callable[[sqlite_utils.Database], T], durable: bool = False,
              on_commit: Optional[Callable[[T], None]] = None) -> T:
        """Run fn in one transaction (see _write); on a full disk, once, with the reserve given up.

        durable: return only once the commit is on the disk (group commit: see group_sync.py).
        on_commit(result) runs right after COMMIT, under the write lock (so in commit order), before the sync.
        """
        after = on_commit or (lambda result: None)
        grouped = durable and self.group is not None
        if not grouped:
            return self._write_once(fn, durable, after)
        self.group.begin()
        seq: list[int] = []  # set right after COMMIT, under the write lock: numbers follow the WAL's order

        def committed(result: T) -> None:
            seq.append(self.group.end(True))
            after(result)
        try:
            result = self._write_once(fn, False, committed)
        finally:
            if not seq:
                self.group.end(False)
        self.group.wait(seq[0])
        return result

    def _write_once(self, fn: Callable[[sqlite_utils.Database], T], durable: bool,
                    committed: Callable[[T], None]) -> T:
        try:
            return self._write(fn, durable, committed)
        except StorageFull:
            if not self._release_reserve():
                raise
            return self._write(fn, durable, committed)

    def _write(self, fn: Callable[[sqlite_utils.Database], T], durable: bool,
               committed: Callable[[T], None]) -> T:
        """Run fn in one IMMEDIATE transaction; retry while the database is locked, never drop.

        A full disk raises StorageFull after the whole transaction is rolled back: nothing half-way.
        `committed` runs right after COMMIT, still under the write lock.
        """
        for attempt in range(LOCK_RETRIES):
            with self._lock:
                try:
                    if durable:
                        self.conn.execute("PRAGMA synchronous=FULL")
                    self._begin()
                except sqlite3.OperationalError as e:
                    if _is_full(e):
                        self.full_since = self.full_since or utcnow()
                        raise _full(self.path, e) from e
                    if not _is_locked(e) or attempt == LOCK_RETRIES - 1:
                        raise
                    log.warning("database locked, retrying (attempt %d)", attempt + 1)
                else:
                    try:
                        result = fn(self.db)
                        self.conn.execute("COMMIT")
                        committed(result)
                        self.full_since = None
                        return result
                    except BaseException as e:
                        self._rollback()
                        if _is_full(e):
                            self.full_since = self.full_since or utcnow()
                            log.error("disk full: a write to %s was rolled back: %s", self.path, e)
                            raise _full(self.path, e) from e
                        if isinstance(e, sqlite3.OperationalError) and _is_locked(e) and attempt < LOCK_RETRIES - 1:
                            log.warning("database locked, retrying (attempt %d)", attempt + 1)
                        else:
                            raise
                finally:
                    if durable:
                        self.conn.execute("PRAGMA synchronous=NORMAL")
            time.sleep(min(0.05 * (attempt + 1), 0.5))
        raise AssertionError("unreachable")

    def _begin(self) -> None:
        """BEGIN IMMEDIATE; while another process writes (another worker), try again after short pauses.

        SQLite's own busy handler (off on this connection) sleeps 1 ms at least, then 2, 5 and 10 ms, while a
        write here lasts well under one: two workers would spend more time asleep than writing.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        for pause in itertools.chain(BEGIN_PAUSES_S, itertools.repeat(BEGIN_PAUSES_S[-1])):
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if not _is_locked(e) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error as e:  # SQLite may have rolled back already (SQLITE_FULL, SQLITE_IOERR)
                log.warning("rollback on %s: %s", self.path, e)

    def read(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run fn on this thread's read connection, retrying while the database is locked. fn returns its rows
        whole (a list, not a generator): the connection is closed when its thread ends."""
        for attempt in range(LOCK_RETRIES):
            try:
                return fn(self._reader())
            except sqlite3.OperationalError as e:
                if not _is_locked(e) or attempt == LOCK_RETRIES - 1:
                    raise
            time.sleep(min(0.05 * (attempt + 1), 0.5))
        raise AssertionError("unreachable")

    def rows(self, sql: str, params: tuple | dict = ()) -> list[dict]:
        return self.read(lambda db: list(db.query(sql, params)))

    def one(self, sql: str, params: tuple | dict = ()) -> Optional[dict]:
        found = self.rows(sql, params)
        return found[0] if found else None

    def migrate(self) -> None:
        """Apply every migration newer than PRAGMA user_version, each in its own transaction.

        A database with data (schema version 1 or more) is backed up first; if it cannot be, the migration
        goes on (the host must run to manage risk) and the reason is an error event.
        """
        version = self.schema_version
        said = self._backup_before_migration(version) if 0 < version < len(MIGRATIONS) else None
        def step(db: sqlite_utils.Database) -> bool:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version >= len(MIGRATIONS):
                return False
            MIGRATIONS[version](db)
            db.execute(f"PRAGMA user_version={version + 1}")
            log.info("database %s migrated to schema %d", self.path, version + 1)
            return True
        while self.write(step):
            pass
        if said is not None:
            self.write(lambda db: Storage.add_event(db, *said))

    def _backup_before_migration(self, version: int) -> tuple[str, str, str]:
        """A copy of the database as it is, before migrating it from `version`; the event that says so."""
        from . import backup  # it builds on this module
        try:
            with self._lock:
                made = backup.write(self.conn, self.backups, f"pre-migration-v{version}", self.min_free_mb)
        except backup.BackupSkipped as e:
            log.error("no backup before migrating %s from schema %d: %s", self.path, version, e)
            return ("backup_failed", f"no backup before migrating the database from schema {version} to "
                                     f"{len(MIGRATIONS)}: {e}", "error")
        return ("backup", f"database backed up to {made.path} before migrating it from schema {version} to "
                          f"{len(MIGRATIONS)}", "info")

    @property
    def schema_version(self) -> int:
        return self.read(lambda db: db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self._lock, self._readers_lock:
            self.conn.close()
            if self._wal is not None:
                self._wal.close()
            readers = list(self._readers)  # a reader's finalizer may run (a GC) while these close
            self._readers.clear()
            for conn in readers:
                conn.close()

    # ---- small shared records ----
    @staticmethod
    def insert(db: sqlite_utils.Database, table: str, row: dict, upsert_pk: tuple[str, ...] = ()) -> int:
        """A plain INSERT (or upsert on upsert_pk) for hot paths; sqlite-utils' insert inspects the table each call."""
        cols = ", ".join(row)
        sql = f"insert into {table} ({cols}) values ({', '.join('?' * len(row))})"
        if upsert_pk:
            updates = ", ".join(f"{c} = excluded.{c}" for c in row if c not in upsert_pk)
            sql += f" on conflict ({', '.join(upsert_pk)}) do update set {updates}"
        return db.execute(sql, tuple(row.values())).lastrowid


    def get_state(self, key: str, default: Optional[str] = None) -> Optional[str]:
        row = self.one("select value from state where key = ?", (key,))
        return row["value"] if row else default

    @staticmethod
    def put_state(db: sqlite_utils.Database, key: str, value: str) -> None:
        Storage.insert(db, "state", {"key": key, "value": value, "updated_at": utcnow()}, upsert_pk=("key",))

    @staticmethod
    def add_event(db: sqlite_utils.Database, kind: str, message: str, severity: str = "info",
                  strategy: Optional[str] = None, data: Optional[dict] = None) -> None:
        Storage.insert(db, "events", {"at": utcnow(), "kind": kind, "severity": severity, "strategy": strategy,
                                      "message": message, "data": json.dumps(data, default=str) if data else None})


def connect_read_only(path: Path | str) -> sqlite3.Connection:
    """A connection that can only read (and never creates the file): the path quoted, so that a '#', '?' or '%'
    in it is not taken for the URI's own syntax (cutting the path, and dropping mode=ro)."""
    return sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True)


def _is_damage(e: sqlite3.DatabaseError) -> bool:
    """The file's content is bad (SQLITE_CORRUPT, SQLITE_NOTADB), not the way to it (a lock, a folder, a journal)."""
    code = getattr(e, "sqlite_errorcode", None)  # Python 3.11 and later
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    return str(e) in ("database disk image is malformed", "file is not a database")


def _is_locked(e: sqlite3.OperationalError) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg
