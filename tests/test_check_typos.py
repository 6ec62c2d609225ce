"""`strategy-host check` and `run` catch what would silently weaken protection: unknown names, empty values,
bad holidays, files others can read; the databases are created readable by their owner only."""
from __future__ import annotations

import os
import stat

import pytest

from host.cli import main
from host import config
from host.config import VARS, ConfigError, load

SECRETS = "WEBHOOK_SECRET=wwwwwwwwwwww\nAPI_TOKEN=tttttttttttttttttttt\nDASHBOARD_PASSWORD=pppppppp\n"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """Our own settings in the test runner's environment would be read too."""
    for name in list(os.environ):
        if name.startswith(("RISK_", "SHOONYA_", "DASHBOARD_", "WEBHOOK_", "TELEGRAM_", "OAUTH_", "BROKER", "PORT",
                            "DATA_DIR", "SQUARE_OFF_TIME", "MARKET_HOLIDAYS", "API_TOKEN", "ORDERS_DB_PATH")):
            monkeypatch.delenv(name)


def _env(tmp_path, text, name="host.env", mode=0o600):
    path = tmp_path / name
    path.write_text(f"DATA_DIR={tmp_path / 'var'}\n" + SECRETS + text)
    os.chmod(path, mode)
    return str(path)


def test_check_names_a_typo_and_the_setting_it_meant(tmp_path, capsys):
    env = _env(tmp_path, "RISK_BASE_MAXLOSS=-3000\nTELEGRAM_CHATID=-100123\nMY_OWN_THING=1\n")
    assert main(["check", "--env", env]) == 1
    out = capsys.readouterr().out
    assert "`RISK_BASE_MAXLOSS` is not a setting" in out and "did you mean `RISK_BASE_MAX_LOSS`?" in out
    assert "did you mean `TELEGRAM_CHAT_ID`?" in out
    assert "`MY_OWN_THING` is not a setting" in out and "3 problem(s)" in out


def test_run_refuses_an_unknown_risk_name_and_warns_of_others(tmp_path, capsys):
    env = _env(tmp_path, "RISK_MAX_ORDER_PER_DAY=5\n")
    with pytest.raises(SystemExit) as e:
        main(["run", "--env", env])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "`RISK_MAX_ORDER_PER_DAY` is not a setting" in err and "RISK_MAX_ORDERS_PER_DAY" in err
    assert not (tmp_path / "var" / "host.sqlite").exists()  # refused before anything started
    s = load(_env(tmp_path, "TELEGRAM_TOKN=1\n"), environ={})  # not a risk limit: run starts, and says so
    assert any("`TELEGRAM_TOKN` is not a setting" in w and "TELEGRAM_TOKEN" in w for w in s.warnings)


def test_the_environment_is_checked_only_under_our_prefixes(tmp_path):
    env = _env(tmp_path, "")
    with pytest.raises(ConfigError) as e:  # systemd's EnvironmentFile hands host.env over as the environment
        load(env, environ={"RISK_BASE_MAXLOSS": "-100", "PATH": "/bin", "HOME": "/root", "LANG": "C"})
    assert [p.field for p in e.value.problems] == ["RISK_BASE_MAXLOSS"]
    found = config.doubtful_names(env, {"PATH": "/bin", "TERM": "xterm", "DASHBOARD_PASWORD": "x"})
    assert [p.field for p, _ in found] == ["DASHBOARD_PASWORD"]


def test_every_setting_and_old_name_is_known(tmp_path):
    """Driven from the Var list: a setting added there is never reported as unknown."""
    names = [key for var in VARS for key in (var.name, *var.aliases)]
    path = tmp_path / "all.env"
    path.write_text("".join(f"{n}=x\n" for n in names))
    assert not [p for p, _ in config.doubtful_names(str(path), {}) if isinstance(p, config.UnknownSetting)]


def test_an_empty_value_is_reported_not_silently_defaulted(tmp_path, capsys):
    env = _env(tmp_path, "SQUARE_OFF_TIME=\nRISK_WARNING_THRESHOLD=\nALGO_ID=\n")
    assert main(["check", "--env", env]) == 1
    out = capsys.readouterr().out
    assert "SQUARE_OFF_TIME:" in out and "default 15:15" in out and "found an empty value" in out
    assert "RISK_WARNING_THRESHOLD:" in out and "ALGO_ID" not in out  # ALGO_ID's default is empty
    with pytest.raises(ConfigError) as e:  # run: an empty risk setting refuses
        load(env, environ={})
    assert [p.field for p in e.value.problems] == ["RISK_WARNING_THRESHOLD"]
    s = load(_env(tmp_path, "SQUARE_OFF_TIME=\n"), environ={})  # other settings: a warning, and the default
    assert any("SQUARE_OFF_TIME" in w and "the default 15:15 is used" in w for w in s.warnings)
    with pytest.raises(ConfigError):  # the environment's empty value overrides the file's
        load(_env(tmp_path, "RISK_BASE_MAX_LOSS=-2000\n"), environ={"RISK_BASE_MAX_LOSS": ""})


def test_a_bad_holiday_is_named(tmp_path, capsys):
    env = _env(tmp_path, "MARKET_HOLIDAYS=2026-01-26, 2026-02-30,2026-03-03\n")
    assert main(["check", "--env", env]) == 1
    assert "entry 2, '2026-02-30', is not one" in capsys.readouterr().out
    with pytest.raises(ConfigError) as e:
        load(_env(tmp_path, "MARKET_HOLIDAYS=2026-01-26,26/01/2026\n"), environ={})
    assert "'26/01/2026'" in e.value.problems[0].expected


def test_databases_are_created_for_their_owner_only(tmp_path):
    from host.sim.matching import MatchingEngine
    from host.storage import Storage
    old = os.umask(0o022)  # the usual umask: SQLite alone would create them 0644
    try:
        storage = Storage(tmp_path / "host.sqlite")
        storage.write(lambda db: Storage.put_state(db, "k", "v"))
        paper = MatchingEngine(tmp_path / "paper.sqlite")
    finally:
        os.umask(old)
    for name in ("host.sqlite", "host.sqlite-wal", "host.sqlite-shm", "paper.sqlite", "paper.sqlite-wal"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    storage.close()
    del paper


def test_files_others_can_read_are_reported(tmp_path, capsys):
    env = _env(tmp_path, "", mode=0o644)
    (tmp_path / "var").mkdir()
    db = tmp_path / "var" / "host.sqlite"
    db.write_bytes(b"")
    os.chmod(db, 0o644)
    assert main(["check", "--env", env]) == 0
    out = capsys.readouterr().out
    assert f"warning: {env} is readable by other users" in out
    assert f"warning: {db} is readable by other users (mode 644); run: chmod 600 {db}" in out
