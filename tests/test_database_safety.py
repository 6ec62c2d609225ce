"""The database is never silently reset (issue 13, item 10): a lost, emptied or damaged host.sqlite refuses
to start, a full disk answers 507 and stores nothing half-way, notifications go out at most once."""
from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import pytest
import requests

from host.notify import CURSOR_KEY, EventPump
from host.storage import Storage
from conftest import Host, alert, make_settings
from serverproc import ServerProcess

SECRETS = "WEBHOOK_SECRET=safety-webhook-secret\nAPI_TOKEN=safety-api-token-0123456789\nDASHBOARD_PASSWORD=pw-safety\n"


# ---- a `strategy-host run` that either refuses (exits) or serves ----
def run_host(workdir: Path, *args: str, timeout: float = 25.0) -> tuple[Optional[int], str]:
    """Start `python -m host run`; return (exit code, output) if it exits, (None, output) once it serves."""
    server = ServerProcess(workdir, *args)
    server.start(wait=False)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            rc = server.proc.poll()
            if rc is not None:
                return rc, server.output()
            try:
                if requests.get(server.url + "/healthz", timeout=1).status_code == 200:
                    return None, server.output()
            except requests.RequestException:
                pass
            time.sleep(0.1)
        return None, server.output()
    finally:
        server.stop()


def earlier_run(workdir: Path) -> Path:
    """A DATA_DIR (workdir/var, the default) that a host has used before: its secrets.env is there."""
    data = workdir / "var"
    data.mkdir(parents=True)
    (data / "secrets.env").write_text(SECRETS)
    os.chmod(data / "secrets.env", 0o600)
    return data


def assert_refused(rc: Optional[int], out: str, *words: str) -> None:
    assert rc == 2, f"expected the host to refuse to start (exit 2), got {rc}:\n{out}"
    assert "Traceback" not in out, out
    for w in words:
        assert w in out, f"{w!r} not in:\n{out}"


def test_missing_database_after_a_run_refuses_to_start(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path)
    try:
        first.start()
    finally:
        first.stop()
    data = tmp_path / "var"
    assert (data / "host.sqlite").is_file() and (data / "secrets.env").is_file()
    for name in ("host.sqlite", "host.sqlite-wal", "host.sqlite-shm"):
        with contextlib.suppress(FileNotFoundError):
            (data / name).unlink()
    rc, out = run_host(tmp_path)
    assert_refused(rc, out, "host.sqlite", "missing", "backups", "--new-database")
    assert not (data / "host.sqlite").exists(), "a refused start must not create a fresh database"


def test_new_database_flag_starts_fresh(tmp_path: Path) -> None:
    data = earlier_run(tmp_path)
    (data / "paper.sqlite").touch()
    rc, out = run_host(tmp_path, "--new-database")
    assert rc is None, f"--new-database should start the host:\n{out}"
    assert Storage(data / "host.sqlite").schema_version > 0


def test_fresh_first_run_still_starts(tmp_path: Path) -> None:
    rc, out = run_host(tmp_path)
    assert rc is None, f"a first run on an empty DATA_DIR must start:\n{out}"


def test_first_run_with_a_config_problem_does_not_look_like_an_earlier_run(tmp_path: Path) -> None:
    bad = tmp_path / "bad.env"
    bad.write_text("BROKER=bogus\n")
    rc, out = run_host(tmp_path, "--env", str(bad))
    assert rc == 2 and "BROKER" in out, out
    rc, out = run_host(tmp_path)  # fixed: the first real start
    assert rc is None, f"a failed first start must not block the next one:\n{out}"


@pytest.mark.parametrize("how", ["zero_bytes", "no_tables"])
def test_emptied_database_refuses_to_start(tmp_path: Path, how: str) -> None:
    data = earlier_run(tmp_path)
    db = data / "host.sqlite"
    if how == "zero_bytes":
        db.write_bytes(b"")
    else:
        conn = sqlite3.connect(db)
        conn.execute("create table t (a)")
        conn.execute("drop table t")
        conn.commit()
        conn.close()
        assert db.stat().st_size > 0
    rc, out = run_host(tmp_path)
    assert_refused(rc, out, "host.sqlite", "empty", "backups", "--new-database")


def _damaged_database(path: Path) -> None:
    """A real host database with rows in it, then garbage written over one of its table pages."""
    st = Storage(path)
    st.write(lambda db: [Storage.add_event(db, "test", "x" * 300) for _ in range(200)])
    st.close()
    conn = sqlite3.connect(path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("select rootpage from sqlite_master where name = 'events'").fetchone()[0]
    leaf = conn.execute("select max(pageno) from dbstat where name = 'events'").fetchone()[0] \
        if _has_dbstat(conn) else root
    conn.close()
    with open(path, "r+b") as f:
        for page in {root, leaf}:
            f.seek((page - 1) * page_size)
            f.write(os.urandom(page_size))


def _has_dbstat(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("select 1 from dbstat limit 1")
        return True
    except sqlite3.OperationalError:
        return False


def test_corrupt_pages_refuse_with_a_clear_message(tmp_path: Path) -> None:
    data = earlier_run(tmp_path)
    _damaged_database(data / "host.sqlite")
    rc, out = run_host(tmp_path)
    assert_refused(rc, out, "host.sqlite", "damaged", "backups")
    refusal = [line for line in out.splitlines() if "host.sqlite" in line]
    assert len(refusal) == 1, f"expected one paragraph naming the file:\n{out}"


def test_damaged_database_raises_a_clear_error_in_process(tmp_path: Path) -> None:
    from host.storage import DatabaseUnusable
    path = tmp_path / "h.sqlite"
    _damaged_database(path)
    with pytest.raises(DatabaseUnusable) as e:
        Storage(path)
    assert str(path) in str(e.value) and "damaged" in str(e.value)


def test_a_damaged_database_refused_at_start_is_left_as_it_was_with_its_wal(tmp_path: Path) -> None:
    """Found by an outside test: the refusal says "Nothing was changed" and to move the damaged file aside "and its
    -wal file", but the check's own connection, closing, checkpointed the WAL into the damaged file and deleted
    it: the file changed, and the WAL (the last writes, what `.recover` may save) was gone. The check now reads
    on a read-only connection before anything opens the file for writing."""
    import hashlib
    import shutil
    from host.storage import DatabaseUnusable
    source, path = tmp_path / "live.sqlite", tmp_path / "h.sqlite"
    _damaged_database(source)
    conn = sqlite3.connect(source)  # the host's last writes, in the WAL when it died
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("insert into state (key, value, updated_at) values ('last', 'write', 'now')")
    conn.commit()
    for suffix in ("", "-wal", "-shm"):  # a crash's copy: the file and its WAL, the WAL not checkpointed
        shutil.copyfile(f"{source}{suffix}", f"{path}{suffix}")
    conn.close()

    def digest(p: str) -> str:
        return hashlib.sha256(Path(p).read_bytes()).hexdigest()
    before = {suffix: digest(f"{path}{suffix}") for suffix in ("", "-wal")}
    with pytest.raises(DatabaseUnusable) as e:
        Storage(path)
    assert "damaged" in str(e.value) and "Nothing was changed" in str(e.value)
    assert {suffix: digest(f"{path}{suffix}") for suffix in ("", "-wal")} == before


def test_schema_that_lacks_a_table_refuses(tmp_path: Path) -> None:
    from host.storage import DatabaseUnusable
    path = tmp_path / "h.sqlite"
    Storage(path).close()
    conn = sqlite3.connect(path)
    conn.execute("drop table fills")
    conn.commit()
    conn.close()
    with pytest.raises(DatabaseUnusable) as e:
        Storage(path)
    assert "fills" in str(e.value)


EVIL_TRIGGER = ("create trigger t_evil after insert on orders begin "
                "update orders set qty = new.qty * 100 where id = new.id; end")


@pytest.mark.parametrize("extra, named", [(EVIL_TRIGGER, "trigger t_evil on orders"),
                                          ("create view v_orders as select * from orders", "view v_orders")])
def test_a_trigger_or_view_the_migrations_do_not_define_refuses_to_start(tmp_path: Path, extra: str,
                                                                         named: str) -> None:
    from host.storage import DatabaseUnusable
    path = tmp_path / "h.sqlite"
    Storage(path).close()
    conn = sqlite3.connect(path)
    conn.execute(extra)
    conn.commit()
    conn.close()
    with pytest.raises(DatabaseUnusable) as e:
        Storage(path)
    said = str(e.value)
    assert named in said and str(path) in said and "DROP " in said and "backups" in said, said
    conn = sqlite3.connect(path)  # dropped as the message says, the database starts again
    conn.execute(f"DROP {named.split()[0].upper()} [{named.split()[1]}]")
    conn.commit()
    conn.close()
    Storage(path).close()


# ---- a full disk ----
def test_storage_full_is_classified_and_rolled_back(tmp_path: Path) -> None:
    from host.storage import StorageFull
    st = Storage(tmp_path / "h.sqlite")
    st.write(lambda db: Storage.add_event(db, "before", "kept"))
    pages = st.conn.execute("PRAGMA page_count").fetchone()[0]
    st.conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL as soon as the file has to grow

    def many(db: Any) -> None:
        for i in range(500):
            Storage.add_event(db, "half", "y" * 500)
    with pytest.raises(StorageFull) as e:
        st.write(many)
    assert "full" in str(e.value)
    assert st.rows("select count(*) n from events where kind = 'half'")[0]["n"] == 0
    assert st.rows("select count(*) n from events where kind = 'before'")[0]["n"] == 1
    st.conn.execute("PRAGMA max_page_count = 1073741823")
    st.write(lambda db: Storage.add_event(db, "after", "ok"))  # the connection is usable again


@contextlib.contextmanager
def tiny_disk(tmp_path: Path, size: str = "8m") -> Iterator[Path]:
    """A small tmpfs of its own (root only), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Write files until the disk has no space left (closing a file whose last write failed raises ENOSPC too)."""
    for name, size in (("filler", 65536), ("filler2", 512)):  # the second takes the last partial block
        try:
            with open(disk / name, "wb") as f:
                while True:
                    f.write(b"\0" * size)
                    f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return disk / "filler"


def test_disk_full_webhook_answers_507_and_stores_nothing(tmp_path: Path) -> None:
    with tiny_disk(tmp_path) as disk:
        h = Host(make_settings(disk / "var", PLUGINS_DIR=str(tmp_path / "plugins"))).start()
        try:
            first = h.post(alert(alert_id="before-full"))
            assert first.status_code == 200, first.get_json()
            fill(disk)
            r = h.post(alert(strategy="s2", alert_id="while-full"))
            assert r.status_code == 507, (r.status_code, r.get_json())
            assert "full" in r.get_json()["error"]
            # answered either way: into the space reserve (200), or 507 if the filler ate the reserve too
            halt = h.api("/api/halt", "POST", json={"mode": "halted", "reason": "disk test"})
            assert halt.status_code in (200, 507), (halt.status_code, halt.get_json())
            h.api("/api/halt", "POST", json={"mode": "active"})
            for f in disk.glob("filler*"):
                f.unlink()
            again = h.post(alert(strategy="s2", alert_id="while-full"))
            assert again.status_code == 200 and again.get_json()["status"] == "accepted", again.get_json()
            assert h.runtime.storage.rows("select count(*) n from alerts where client_alert_id = 'while-full'")[0]["n"] == 1
            assert h.runtime.storage.rows("PRAGMA quick_check")[0]["quick_check"] == "ok"
        finally:
            h.stop()
            h.runtime.storage.close()
            if h.runtime.broker is not None and hasattr(h.runtime.broker, "close"):
                h.runtime.broker.close()


def test_api_control_route_answers_507_on_a_full_disk(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    real = host.runtime.storage.write

    def full(fn: Any, durable: bool = False) -> Any:
        def write(db: Any) -> Any:
            raise sqlite3.OperationalError("database or disk is full")
        return real(write, durable)
    monkeypatch.setattr(host.runtime.inbox.storage, "write", full)
    r = host.api("/api/exit-all", "POST")
    assert r.status_code == 507, (r.status_code, r.get_json())
    assert "full" in r.get_json()["error"]


# ---- notifications at most once ----
class Crash(BaseException):
    """The process dies here."""


class Notifier:
    def __init__(self, crash_after: Optional[int] = None):
        self.sent: list[int] = []
        self.crash_after = crash_after

    def send(self, event: dict) -> None:
        self.sent.append(event["id"])
        if self.crash_after is not None and len(self.sent) == self.crash_after:
            raise Crash()


def registry(notifier: Notifier) -> Any:
    class Caller:
        def call(self, hook: str, fn: Any, kwargs: dict) -> Any:
            fn(**kwargs)
            return SimpleNamespace(ok=True, error=None)
    live = SimpleNamespace(candidate=SimpleNamespace(hooks={"notifier_send": notifier.send}), caller=Caller(),
                           label="stub@1")
    return SimpleNamespace(running=lambda: [live], record_call=lambda *a, **k: None)


def _events(st: Storage, n: int) -> None:
    st.write(lambda db: [Storage.add_event(db, "fill", f"fill {i}") for i in range(n)])


def test_notifications_at_most_once_across_a_crash(tmp_path: Path) -> None:
    st = Storage(tmp_path / "h.sqlite")
    st.write(lambda db: Storage.put_state(db, CURSOR_KEY, "0"))
    _events(st, 5)
    notifier = Notifier(crash_after=2)
    with pytest.raises(Crash):
        EventPump(st, registry(notifier)).pump()
    st.close()
    again = Storage(tmp_path / "h.sqlite")  # the restart
    notifier.crash_after = None
    EventPump(again, registry(notifier)).pump()
    assert len(notifier.sent) == len(set(notifier.sent)), f"sent twice: {notifier.sent}"
    assert notifier.sent == [1, 2, 3, 4, 5]  # the message in flight at the crash went out, once


def test_failing_cursor_write_sends_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = Storage(tmp_path / "h.sqlite")
    st.write(lambda db: Storage.put_state(db, CURSOR_KEY, "0"))
    _events(st, 20)
    notifier = Notifier()
    pump = EventPump(st, registry(notifier))

    def disk_full(db: Any, key: str, value: str) -> None:
        raise sqlite3.OperationalError("database or disk is full")
    with monkeypatch.context() as m:
        m.setattr(Storage, "put_state", staticmethod(disk_full))
        for _ in range(3):  # the pump's loop tries again and again while the disk is full
            with pytest.raises(sqlite3.OperationalError):
                pump.pump()
    assert notifier.sent == []
    while pump.pump():
        pass
    assert notifier.sent == list(range(1, 21))
    assert st.get_state(CURSOR_KEY) == "20"


def test_a_rollback_journal_left_by_a_death_is_rolled_back_not_called_damage(tmp_path: Path) -> None:
    """Review of the read-only check: a database in rollback-journal mode (a file system without shared memory)
    whose writer died mid-transaction leaves a hot -journal; a read-only connection cannot roll it back, and the
    check called a healthy database "damaged" (moving it aside without its journal would lose data). A writer
    rolls it back first, as SQLite does, and the host starts."""
    import subprocess
    import sys
    path = tmp_path / "h.sqlite"
    Storage(path).close()
    code = ("import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('PRAGMA journal_mode=DELETE'); c.execute('begin immediate'); "
            "c.execute('PRAGMA cache_size=10'); "
            "[c.execute(\"insert into state (key, value, updated_at) values (?, ?, 'now')\", (str(i), 'x' * 1000)) "
            "for i in range(3000)]; os._exit(9)")  # (pages spilled to the file: the journal is hot)
    subprocess.run([sys.executable, "-c", code, str(path)], timeout=30)
    assert path.with_name("h.sqlite-journal").exists()
    st = Storage(path)
    try:
        assert st.get_state("1") is None  # the dead writer's transaction was rolled back
    finally:
        st.close()


def _damaged_with_wal(source: Path, path: Path) -> None:
    """A damaged database at `path` with its WAL holding the last writes, as a crash leaves them."""
    import shutil
    _damaged_database(source)
    conn = sqlite3.connect(source)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("insert into state (key, value, updated_at) values ('last', 'write', 'now')")
    conn.commit()
    for suffix in ("", "-wal", "-shm"):
        shutil.copyfile(f"{source}{suffix}", f"{path}{suffix}")
    conn.close()


def test_an_empty_stale_journal_beside_a_damaged_database_does_not_let_the_check_change_it(tmp_path: Path) -> None:
    """Review 29: the first version of the read-only check skipped itself whenever a -journal file existed; an empty,
    stale one (no transaction to roll back) let the writer's check checkpoint the WAL into the damaged file again."""
    import hashlib
    from host.storage import DatabaseUnusable
    path = tmp_path / "h.sqlite"
    _damaged_with_wal(tmp_path / "live.sqlite", path)
    path.with_name("h.sqlite-journal").write_bytes(b"")
    before = [hashlib.sha256(Path(f"{path}{s}").read_bytes()).hexdigest() for s in ("", "-wal")]
    with pytest.raises(DatabaseUnusable) as e:
        Storage(path)
    assert "damaged" in str(e.value)
    assert [hashlib.sha256(Path(f"{path}{s}").read_bytes()).hexdigest() for s in ("", "-wal")] == before


def test_a_database_path_through_a_dangling_link_or_with_uri_characters_opens(tmp_path: Path) -> None:
    """Review 29: a database symlink whose target did not exist yet was refused ("cannot be opened"), where the
    writer used to create the target; and a read-only connection built from a path holding '#' cut the path there
    (dropping mode=ro and creating a stray empty file): an emptied-database check then said the wrong thing."""
    from host.storage import database_is_empty
    target, link = tmp_path / "real.sqlite", tmp_path / "link.sqlite"
    link.symlink_to(target)
    Storage(link).close()
    assert target.is_file()
    odd = tmp_path / "d#1?x%41" / "var"
    odd.mkdir(parents=True)
    st = Storage(odd / "host.sqlite")
    st.write(lambda db: Storage.put_state(db, "k", "v"))
    st.close()
    assert database_is_empty(odd / "host.sqlite") is False
    assert not (tmp_path / "d").exists()  # nothing made where a cut path would point
