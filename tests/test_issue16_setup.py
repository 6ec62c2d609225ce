"""Issue 16 (new-user break test): paper data never becomes live data, an unexplained closure is never valued
at 0, and `check` refuses what the file says but does not run (placeholders, overrides, duplicates)."""
from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

import pytest

from host.cli import main
from host.config import ConfigError, load
from host.outside import OutsideTrades
from host.models import Side
from host.storage import Storage
from host.watcher import move_position

ROOT = Path(__file__).parent.parent
SECRETS = "WEBHOOK_SECRET=s3cret-webhook-value\nAPI_TOKEN=tttttttttttttttttttt\nDASHBOARD_PASSWORD=pppppppp\n"
LIVE = "BROKER=shoonya\nUSER_ID=FA12345\nOAUTH_CLIENT_ID=cid\nOAUTH_SECRET=a-real-oauth-secret\n"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """Our own settings in the test runner's environment would be read too."""
    for name in list(os.environ):
        if name.startswith(("RISK_", "SHOONYA_", "DASHBOARD_", "WEBHOOK_", "TELEGRAM_", "OAUTH_", "BROKER", "PORT",
                            "DATA_DIR", "SQUARE_OFF_TIME", "MARKET_HOLIDAYS", "API_TOKEN", "ORDERS_DB_PATH", "HOST",
                            "USER_ID")):
            monkeypatch.delenv(name)


def _env(tmp_path, text, name="host.env", data="var"):
    path = tmp_path / name
    path.write_text(f"DATA_DIR={tmp_path / data}\n" + text)
    os.chmod(path, 0o600)
    return str(path)


def _run_refusal(env, capsys, monkeypatch):
    """Start `run` only as far as its startup checks: the exit code and stderr of a refusal."""
    def started(*a, **k):
        raise AssertionError("the server was started")
    monkeypatch.setattr("host.server.HostServer", started)
    with pytest.raises(SystemExit) as e:
        code = main(["run", "--env", env])
        raise SystemExit(code)
    return e.value.code, capsys.readouterr().err


# ---- M1: paper and live never share a database ----

def _first_paper_start(tmp_path):
    """What a paper run leaves in DATA_DIR: the database (with its mode recorded) and the paper book."""
    from host.cli import _database_problem
    env = _env(tmp_path, SECRETS + "BROKER=paper\n")
    settings = load(env, environ={})
    assert _database_problem(settings, [], False) == ""
    (settings.data_dir / "paper.sqlite").write_bytes(b"")
    return settings


def test_live_refuses_the_database_paper_mode_wrote_and_check_says_so(tmp_path, capsys, monkeypatch):
    paper = _first_paper_start(tmp_path)
    st = Storage(paper.db_path)
    assert st.get_state("broker_mode") == "paper"
    st.close()
    live_env = _env(tmp_path, SECRETS + LIVE, name="live.env")
    code, err = _run_refusal(live_env, capsys, monkeypatch)
    assert code == 2
    assert f"DATA_DIR {tmp_path / 'var'} holds paper-mode data" in err
    assert "live trading needs its own DATA_DIR (e.g. DATA_DIR=var-live)" in err and "or move" in err
    assert main(["check", "--env", live_env]) == 1
    assert "holds paper-mode data" in capsys.readouterr().out
    # and the other way round: a live database is not paper's either
    other = tmp_path / "live-db"
    from host.cli import _database_problem
    live = load(_env(tmp_path, SECRETS + LIVE, name="l2.env", data="live-db"), environ={})
    assert _database_problem(live, [], False) == ""
    back = load(_env(tmp_path, SECRETS + "BROKER=paper\n", name="p2.env", data="live-db"), environ={})
    assert "holds live (BROKER=shoonya) data" in _database_problem(back, [], False)
    assert other.is_dir()


def test_an_older_database_without_the_mode_is_known_as_paper_by_its_paper_book(tmp_path):
    from host.cli import _database_problem
    paper = _first_paper_start(tmp_path)
    st = Storage(paper.db_path)
    st.write(lambda db: db.execute("delete from state where key = 'broker_mode'"))
    st.close()
    live = load(_env(tmp_path, SECRETS + LIVE, name="live.env"), environ={})
    assert "holds paper-mode data" in _database_problem(live, [], False)


def test_the_live_example_has_its_own_data_dir():
    from dotenv import dotenv_values
    live = dotenv_values(ROOT / "config_env" / "live.env.example")["DATA_DIR"]
    paper = dotenv_values(ROOT / "config_env" / "paper.env.example")["DATA_DIR"]
    assert live != paper and live == "var-live"


def test_a_position_the_broker_does_not_have_is_closed_at_a_known_price_never_0(tmp_path):
    st = Storage(tmp_path / "h.sqlite")
    key = ("demo", "NFO", "NIFTY28APR26P24500", "M")
    st.write(lambda db: move_position(db, key, Side.BUY, 75, Decimal("61")))
    trades = OutsideTrades(st, lambda: [], lambda: [])
    for _ in range(2):  # an unexplained difference counts on its second poll
        trades.adopt([], [])
    pos = st.one("select net_qty, realized_pnl from positions where strategy = 'demo'")
    assert pos["net_qty"] == 0 and Decimal(pos["realized_pnl"]) == 0  # its own average: no invented loss
    ev = st.one("select message from events where kind = 'closed_outside'")
    assert "@ 61" in ev["message"] and "own average price" in ev["message"]
    # with a last traded price, that is used (and said)
    st.write(lambda db: move_position(db, key, Side.BUY, 75, Decimal("61")))
    st.write(lambda db: db["quotes"].insert({"exchange": "NFO", "symbol": key[2], "ltp": "59.5", "at": "x"}))
    for _ in range(2):
        trades.adopt([], [])
    pos = st.one("select net_qty, realized_pnl from positions where strategy = 'demo'")
    assert pos["net_qty"] == 0 and Decimal(pos["realized_pnl"]) == Decimal("-112.5")
    assert "last traded price" in st.rows("select message from events where kind = 'closed_outside'")[-1]["message"]
    st.close()


# ---- K1..K6: what the file says is what runs ----

def test_the_untouched_live_example_fails_check_and_run_refuses_its_placeholders(tmp_path, capsys):
    text = (ROOT / "config_env" / "live.env.example").read_text().replace("DATA_DIR=var-live", "")
    env = _env(tmp_path, text, name="live.env")
    assert main(["check", "--env", env]) == 1
    out = capsys.readouterr().out
    for name in ("WEBHOOK_SECRET", "DASHBOARD_PASSWORD", "API_TOKEN"):
        assert f"{name}: expected a secret of your own" in out
    with pytest.raises(ConfigError) as e:
        load(env, environ={}, generate_secrets=True)  # as `run` loads it
    assert {"WEBHOOK_SECRET", "DASHBOARD_PASSWORD"} <= {p.field for p in e.value.problems}
    # any value published in an example file counts, and paper mode only warns
    paper = load(_env(tmp_path, "DASHBOARD_PASSWORD=change-me-too\nWEBHOOK_SECRET=<your secret here>\n"
                      "API_TOKEN=tttttttttttttttttttt\n", name="p.env"), environ={})
    assert any("DASHBOARD_PASSWORD" in w and "placeholder" in w for w in paper.warnings)
    assert any("WEBHOOK_SECRET" in w for w in paper.warnings)


def test_the_environment_overriding_a_risk_limit_in_the_file_is_a_problem(tmp_path, capsys, monkeypatch):
    env = _env(tmp_path, SECRETS + "RISK_BASE_MAX_LOSS=-2000\nPORT=8000\n")
    monkeypatch.setenv("RISK_BASE_MAX_LOSS", "-500000")
    monkeypatch.setenv("PORT", "8001")
    assert main(["check", "--env", env]) == 1
    out = capsys.readouterr().out
    assert "RISK_BASE_MAX_LOSS" in out and "'-500000' in the environment and '-2000' in" in out
    assert "the environment's value '-500000' wins" in out
    assert "warning: PORT" in out and "'8001' in the environment and '8000'" in out  # not a risk limit: a warning
    monkeypatch.setenv("RISK_BASE_MAX_LOSS", "-2000")  # the same value twice is no conflict
    assert main(["check", "--env", env]) == 0


def test_a_setting_given_twice_names_both_lines(tmp_path, capsys):
    env = _env(tmp_path, SECRETS + "RISK_TRAIL_STEP=100\nHOST=127.0.0.1\nRISK_TRAIL_STEP=0\n")
    assert main(["check", "--env", env]) == 1
    assert "RISK_TRAIL_STEP: expected one line per setting, found lines 5 and 7 of" in capsys.readouterr().out
    with pytest.raises(ConfigError):  # `run` refuses it: a risk limit would silently change
        load(env, environ={})


def test_check_on_the_paper_example_before_the_first_run_passes(tmp_path, capsys):
    text = (ROOT / "config_env" / "paper.env.example").read_text().replace("DATA_DIR=var", "")
    env = _env(tmp_path, text, name="paper.env")
    assert main(["check", "--env", env]) == 0
    out = capsys.readouterr().out
    assert "WEBHOOK_SECRET is not set: `run` generates one" in out and ": OK (broker paper" in out


def test_a_file_others_can_read_is_reported_with_the_other_problems(tmp_path, capsys):
    env = _env(tmp_path, SECRETS + "RISK_BASE_MAX_LOSS=5\n")
    os.chmod(env, 0o644)
    assert main(["check", "--env", env]) == 1
    out = capsys.readouterr().out
    assert "RISK_BASE_MAX_LOSS" in out and "readable by other users" in out


def test_a_lower_case_name_gets_a_suggestion(tmp_path, capsys):
    env = _env(tmp_path, SECRETS + "risk_base_max_loss=-2000\nSquare_Off_Time=15:00\n")
    assert main(["check", "--env", env]) == 1
    out = capsys.readouterr().out
    assert "`risk_base_max_loss` is not a setting (in" in out and "did you mean `RISK_BASE_MAX_LOSS`?" in out
    assert "did you mean `SQUARE_OFF_TIME`?" in out
