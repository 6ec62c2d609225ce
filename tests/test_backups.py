"""Database backups: online and consistent while the host writes, kept 14, before migrations, CLI backup/restore."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlite_utils

from conftest import alert, make_settings, wait_for
from host import backup
from host.storage import MIGRATIONS, Storage
from serverproc import ServerProcess
from test_dashboard import login

NO_ROOM_MB = 1_000_000  # DISK_MIN_FREE_MB's largest value: no test disk has a terabyte free


def one(path: Path, sql: str):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchone()
    finally:
        conn.close()


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


def cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK", "API_TOKEN", "DATA_DIR"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-m", "host", *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=60)


# ---- the backup itself ----
def test_a_backup_taken_while_the_host_writes_is_consistent_and_leaves_no_temp_file(host):
    storage, folder = host.runtime.storage, backup.folder_of(host.settings.data_dir)
    wait_for(lambda: backup.listing(folder), timeout=5)  # the host's own first daily backup, out of the way
    stop, written = threading.Event(), [0]

    def writer() -> None:  # two rows per transaction: a consistent copy has both or neither
        n = 0
        while not stop.is_set() and n < 20000:
            n += 1
            storage.write(lambda db: (Storage.put_state(db, "pair_a", str(n)), Storage.put_state(db, "pair_b", str(n)),
                                      Storage.add_event(db, "test_fill", f"row {n}")))
            written[0] = n
    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_for(lambda: written[0] > 50)
        made = [backup.write(storage.path, folder, "manual", 0) for _ in range(5)]
    finally:
        stop.set()
        t.join(10)
    seen = []
    for b in made:
        assert one(b.path, "PRAGMA integrity_check") == ("ok",)
        a, b_ = (one(b.path, f"select value from state where key = 'pair_{k}'")[0] for k in "ab")
        assert a == b_
        assert one(b.path, "select count(*) from events where kind = 'test_fill'")[0] == int(a)
        assert one(b.path, "PRAGMA user_version")[0] == len(MIGRATIONS)
        seen.append(int(a))
    assert seen == sorted(seen) and seen[-1] > seen[0]  # they were taken while the writes went on
    assert not [n for n in names(folder) if n.endswith(".tmp")]
    assert all(os.stat(b.path).st_mode & 0o077 == 0 for b in made)  # readable by the host's user only


def test_the_newest_14_of_a_kind_are_kept_and_other_kinds_are_left_alone(host_factory):
    h = host_factory(start=False)
    storage, folder = h.runtime.storage, backup.folder_of(h.settings.data_dir)
    manual = backup.write(storage.path, folder, "manual", 0)
    first = [backup.write(storage.path, folder, "daily", 0) for _ in range(16)]
    daily = [b for b in backup.listing(folder) if b.kind == "daily"]
    assert [b.path for b in daily][-14:] == [b.path for b in first][-14:] and len(daily) == 14
    assert not first[0].path.exists() and not first[1].path.exists()
    assert manual.path.exists()


def test_no_room_skips_the_backup_with_a_reason_and_leaves_nothing(host_factory):
    h = host_factory(start=False)
    folder = backup.folder_of(h.settings.data_dir)
    with pytest.raises(backup.BackupSkipped, match="not enough room.*DISK_MIN_FREE_MB"):
        backup.write(h.runtime.storage.path, folder, "manual", NO_ROOM_MB)
    assert names(folder) == []


# ---- the daily backup under a running host ----
def test_the_running_host_backs_up_daily_on_its_own_thread(host):
    folder = backup.folder_of(host.settings.data_dir)
    made = wait_for(lambda: [b for b in backup.listing(folder) if b.kind == "daily"], timeout=5)
    assert len(made) == 1 and one(made[0].path, "PRAGMA integrity_check") == ("ok",)
    events = host.api("/api/events").get_json()["items"]
    assert [e for e in events if e["kind"] == "backup" and str(made[0].path) in e["message"]]
    time.sleep(1.5)  # more clock ticks: one a day, not one a tick
    assert len([b for b in backup.listing(folder) if b.kind == "daily"]) == 1
    daily = host.runtime.engine.daily.backup
    daily._last = datetime.now(timezone.utc) - timedelta(hours=30)  # 30 h later, the market open or not
    wait_for(lambda: len([b for b in backup.listing(folder) if b.kind == "daily"]) == 2, timeout=5)


def test_the_daily_backup_waits_for_the_market_to_close_but_never_past_30_h(tmp_path):
    daily = backup.DailyBackup(tmp_path / "host.sqlite", tmp_path / "backups", 0, lambda *a: None)
    now = datetime.now(timezone.utc)
    assert daily.due(now, market_open=True)  # none yet: at once
    daily._last = now - timedelta(hours=23)
    assert not daily.due(now, market_open=False)
    daily._last = now - timedelta(hours=25)
    assert daily.due(now, market_open=False) and not daily.due(now, market_open=True)
    daily._last = now - timedelta(hours=30)
    assert daily.due(now, market_open=True)
    assert backup.LATEST < backup.STALE  # the dashboard's warning never fires on a host that runs


def test_a_daily_backup_without_room_is_an_error_event_and_the_engine_runs_on(host_factory):
    h = host_factory(DISK_MIN_FREE_MB=NO_ROOM_MB)
    failed = wait_for(lambda: [e for e in h.api("/api/events").get_json()["items"] if e["kind"] == "backup_failed"],
                      timeout=5)
    assert failed[0]["severity"] == "error" and "not enough room" in failed[0]["message"]
    assert not backup.listing(backup.folder_of(h.settings.data_dir))
    beat = h.runtime.storage.get_state("engine_heartbeat")
    wait_for(lambda: h.runtime.storage.get_state("engine_heartbeat") > beat, timeout=3)
    assert h.post(alert()).status_code in (200, 507)  # alerts are still decided


# ---- before a migration ----
def _database_at(path: Path, version: int) -> None:
    db = sqlite_utils.Database(path)
    for m in MIGRATIONS[:version]:
        m(db)
    db.execute(f"PRAGMA user_version={version}")
    db["state"].insert({"key": "marker", "value": "before", "updated_at": "x"})
    db.close()


def test_a_database_is_backed_up_before_it_is_migrated(tmp_path):
    path, folder = tmp_path / "host.sqlite", tmp_path / "backups"
    _database_at(path, len(MIGRATIONS) - 1)
    storage = Storage(path, folder, 0)
    assert storage.schema_version == len(MIGRATIONS)
    made = backup.listing(folder)
    assert [b.kind for b in made] == [f"pre-migration-v{len(MIGRATIONS) - 1}"]
    assert one(made[0].path, "PRAGMA user_version")[0] == len(MIGRATIONS) - 1
    assert one(made[0].path, "select value from state where key = 'marker'") == ("before",)
    assert storage.one("select * from events where kind = 'backup'")["message"].startswith("database backed up to")
    storage.close()
    Storage(path, folder, 0).close()  # up to date: no second copy
    assert len(backup.listing(folder)) == 1


def test_a_new_database_is_not_backed_up_and_no_room_does_not_stop_a_migration(tmp_path):
    Storage(tmp_path / "new.sqlite", tmp_path / "backups", 0).close()
    assert not backup.listing(tmp_path / "backups")
    path = tmp_path / "old.sqlite"
    _database_at(path, 3)
    storage = Storage(path, tmp_path / "backups", NO_ROOM_MB)
    assert storage.schema_version == len(MIGRATIONS)
    event = storage.one("select * from events where kind = 'backup_failed'")
    assert event["severity"] == "error" and "not enough room" in event["message"]
    storage.close()


# ---- the dashboard ----
def test_the_broker_page_shows_the_last_backup_and_warns_when_it_is_old(host_factory):
    h = host_factory(start=False)  # no engine: no daily backup of its own
    assert login(h.client).status_code == 302
    page = h.client.get("/broker").get_data(as_text=True)
    assert "Last backup" in page and "no database backup has been made yet" in page
    folder = backup.folder_of(h.settings.data_dir)
    made = backup.write(h.runtime.storage.path, folder, "manual", 0)
    old = datetime.now(timezone.utc) - timedelta(hours=40)
    made.path.rename(folder / f"host-{old.strftime(backup.STAMP)}000Z-daily.sqlite")
    page = h.client.get("/broker").get_data(as_text=True)
    assert "no database backup in more than 36 h" in page and "40 h ago" in page
    made = backup.write(h.runtime.storage.path, folder, "manual", 0)
    page = h.client.get("/broker").get_data(as_text=True)
    assert "backup-warning" not in page and made.path.name in page
    from host.display import ist
    assert ist(made.at.isoformat(), True) in page


# ---- strategy-host backup / restore ----
@pytest.mark.slow
def test_backup_and_restore_from_the_command_line_and_no_restore_while_the_host_runs(tmp_path):
    server = ServerProcess(tmp_path).start()
    db = tmp_path / "var" / "host.sqlite"
    try:
        secret = server.secrets()["WEBHOOK_SECRET"]
        assert server.webhook({**alert(alert_id="before-backup"), "secret_key": secret}).status_code == 200
        done = cli(tmp_path, "backup")
        assert done.returncode == 0, done.stderr
        made = Path(done.stdout.split(" to ", 1)[1].split(" (", 1)[0])
        assert made.is_file() and made.parent == tmp_path / "var" / "backups" and "manual" in made.name
        assert server.webhook({**alert("EXIT", alert_id="after-backup"), "secret_key": secret}).status_code == 200
        refused = cli(tmp_path, "restore", str(made))
        assert refused.returncode == 1
        assert "strategy-host is running" in refused.stderr and "Nothing was changed" in refused.stderr
        assert not [b for b in backup.listing(made.parent) if b.kind == "before-restore"]
        assert server.api("/api/alerts").json()["items"][0]["alert_key"] == "after-backup"
    finally:
        server.stop()
    alerts_now = one(db, "select count(*) from alerts")[0]
    # bad files are refused before anything is touched
    (tmp_path / "junk.sqlite").write_text("not a database at all " * 100)
    foreign = tmp_path / "foreign.sqlite"
    sqlite_utils.Database(foreign)["t"].insert({"x": 1})
    sqlite_utils.Database(foreign).execute("PRAGMA user_version=3")
    for bad, words in ((tmp_path / "junk.sqlite", "not a readable SQLite database"),
                       (foreign, "lacks table"), (tmp_path / "missing.sqlite", "found nothing")):
        r = cli(tmp_path, "restore", str(bad))
        assert r.returncode == 1 and words in r.stderr and "Nothing was changed" in r.stderr, r.stderr
    assert one(db, "select count(*) from alerts")[0] == alerts_now
    done = cli(tmp_path, "restore", str(made))
    assert done.returncode == 0, done.stderr
    assert "integrity_check ok" in done.stdout and "1 alerts" in done.stdout
    kept = Path(done.stdout.split("kept as ", 1)[1].split()[0])
    assert one(kept, "select count(*) from alerts")[0] == alerts_now == 2
    assert one(db, "select client_alert_id from alerts") == ("before-backup",)
    assert not Path(f"{db}-wal").exists() and not list(db.parent.glob(".host.sqlite.restore-*"))
    server = ServerProcess(tmp_path).start()  # the restored database runs
    try:
        assert [a["alert_key"] for a in server.api("/api/alerts").json()["items"]] == ["before-backup"]
    finally:
        server.stop()


def test_a_raw_copy_with_its_wal_restores_and_a_refused_restore_leaves_a_new_data_dir_as_it_was(tmp_path, monkeypatch,
                                                                                                capsys):
    from host.cli import main
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "var"))
    for name in ("WEBHOOK_SECRET", "API_TOKEN", "DASHBOARD_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    source = tmp_path / "copy" / "host.sqlite"
    storage = Storage(source)  # a WAL database whose last commits are still in its -wal file, copied by hand
    storage.write(lambda db: Storage.put_state(db, "marker", "from the copy"))
    assert Path(f"{source}-wal").stat().st_size > 0
    assert main(["restore", str(tmp_path / "nothing.sqlite")]) == 1
    assert "found nothing" in capsys.readouterr().err
    assert not (tmp_path / "var").exists() or not os.listdir(tmp_path / "var")  # no lock files marking a run
    assert main(["restore", str(source)]) == 1  # no database in DATA_DIR: a new server, or the wrong folder?
    said = capsys.readouterr()
    assert f"DATA_DIR {tmp_path / 'var'} (from the environment variable DATA_DIR)" in said.out
    assert "there is no database at" in said.err and "--yes" in said.err and "--env" in said.err
    assert not (tmp_path / "var").exists() or not os.listdir(tmp_path / "var")
    assert main(["restore", "--yes", str(source)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "there was no database in place to keep" in out
    storage.close()
    restored = tmp_path / "var" / "host.sqlite"
    assert one(restored, "select value from state where key = 'marker'") == ("from the copy",)
    assert one(restored, "PRAGMA journal_mode") == ("delete",) and not Path(f"{restored}-wal").exists()


def test_restore_and_backup_in_a_folder_without_a_database_say_which_data_dir_and_change_nothing(tmp_path):
    """`strategy-host restore FILE` from a shell in the wrong folder: it names ./var and where it came from."""
    source = tmp_path / "copy.sqlite"
    Storage(source).close()
    shell = tmp_path / "shell"
    shell.mkdir()
    r = cli(shell, "restore", str(source))
    assert r.returncode == 1, r.stdout
    assert f"DATA_DIR {shell / 'var'} (the default: ./var in the current folder {shell}" in r.stdout
    assert f"there is no database at {shell / 'var' / 'host.sqlite'}" in r.stderr and "--yes" in r.stderr
    assert not (shell / "var").exists()
    r = cli(shell, "backup")
    assert r.returncode == 1 and "no backup written" in r.stderr and "DATA_DIR" in r.stdout
    assert not (shell / "var" / "backups").exists()  # no empty backups folder left behind
    env = tmp_path / "host.env"
    env.write_text(f"DATA_DIR={tmp_path / 'data'}\n")
    r = cli(shell, "restore", "--env", str(env), "--yes", str(source))
    assert r.returncode == 0, r.stderr
    assert f"DATA_DIR {tmp_path / 'data'} (from DATA_DIR in {env})" in r.stdout
    assert (tmp_path / "data" / "host.sqlite").is_file() and not (shell / "var").exists()


SERVICE_UID = 65534  # the service's own user on a server (nobody here); the command runs as root (sudo)


def owned(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, st.st_mode & 0o777


def test_backup_and_restore_run_as_root_leave_the_service_users_files_its_own(tmp_path, monkeypatch, capsys):
    from host.cli import main
    if os.geteuid() != 0:
        pytest.fail("this test runs the commands as root (as CI does, and as sudo does on a server)")
    for name in ("DATA_DIR", "WEBHOOK_SECRET", "API_TOKEN", "DASHBOARD_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "data"
    storage = Storage(data / "host.sqlite")
    storage.write(lambda db: Storage.put_state(db, "marker", "the service's"))
    storage.close()
    source = backup.write(data / "host.sqlite", tmp_path / "elsewhere", "manual", 0).path
    for path in (data, data / "host.sqlite"):
        os.chown(path, SERVICE_UID, SERVICE_UID)
    os.chmod(data, 0o700)
    os.chmod(data / "host.sqlite", 0o600)
    env = tmp_path / "host.env"
    env.write_text(f"DATA_DIR={data}\n")
    assert main(["backup", "--env", str(env)]) == 0, capsys.readouterr().err
    assert owned(data / "backups") == (SERVICE_UID, SERVICE_UID, 0o700)
    [made] = backup.listing(data / "backups")
    assert owned(made.path) == (SERVICE_UID, SERVICE_UID, 0o600)
    assert main(["restore", "--env", str(env), str(source)]) == 0, capsys.readouterr().err
    assert owned(data / "host.sqlite") == (SERVICE_UID, SERVICE_UID, 0o600)
    [kept] = [b for b in backup.listing(data / "backups") if b.kind == "before-restore"]
    assert owned(kept.path) == (SERVICE_UID, SERVICE_UID, 0o600)
    for lock in ("host.lock", "engine.lock"):  # the service opens these read-write at start
        assert owned(data / lock)[:2] == (SERVICE_UID, SERVICE_UID)
    assert [p.name for p in data.iterdir() if p.stat().st_uid != SERVICE_UID] == []
    # a new server: no database yet, DATA_DIR made by `install -d -o strategy-host`
    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o700)
    os.chown(fresh, SERVICE_UID, SERVICE_UID)
    env.write_text(f"DATA_DIR={fresh}\n")
    assert main(["restore", "--env", str(env), "--yes", str(source)]) == 0, capsys.readouterr().err
    assert owned(fresh / "host.sqlite") == (SERVICE_UID, SERVICE_UID, 0o600)
    assert [p.name for p in fresh.iterdir() if p.stat().st_uid != SERVICE_UID] == []


def test_a_backup_carrying_a_trigger_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    """A "backup" handed over by someone else with a trigger that turns every order's qty 1 into 100."""
    from host.cli import main
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "var"))
    Storage(tmp_path / "var" / "host.sqlite").close()
    evil = tmp_path / "evil.sqlite"
    Storage(evil).close()
    conn = sqlite3.connect(evil)
    conn.execute("create trigger t_evil after insert on orders begin "
                 "update orders set qty = new.qty * 100 where id = new.id; end")
    conn.commit()
    conn.close()
    assert main(["restore", str(evil)]) == 1
    said = capsys.readouterr().err
    assert f"refusing to restore {evil}" in said and "trigger t_evil on orders" in said, said
    assert f"sqlite3 {evil} 'DROP TRIGGER [t_evil];'" in said and "Nothing was changed" in said
    assert one(tmp_path / "var" / "host.sqlite", "select count(*) from sqlite_master where type = 'trigger'") == (0,)
