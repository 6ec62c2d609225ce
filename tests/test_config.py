"""Configuration: file and environment, old names, validation messages, secrets, `strategy-host check`."""
from __future__ import annotations

import os
import stat

import pytest

from host.cli import main
from host.config import ConfigError, load


def _write(path, text, mode=0o600):
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_defaults_give_paper_mode(tmp_path):
    s = load(None, environ={"DATA_DIR": str(tmp_path), "WEBHOOK_SECRET": "x" * 12, "API_TOKEN": "t" * 20,
                            "DASHBOARD_PASSWORD": "p" * 10})
    assert s.BROKER == "paper" and s.PORT == 8000 and s.HOST == "127.0.0.1" and s.DEDUPE_WINDOW_S == 10
    assert s.db_path == tmp_path / "host.sqlite"


def test_environment_overrides_the_file_and_old_names_work(tmp_path):
    env = _write(tmp_path / "a.env", "WEBHOOK_SECRET_KEY=from-file-secret\nTELEGRAM_TOKEN=123:abc\nTELEGRAM_CHAT_ID=-1001\nPORT=9000\n"
                                     f"DATA_DIR={tmp_path}\nAPI_TOKEN={'t' * 20}\nDASHBOARD_PASSWORD=pppppppp\n")
    s = load(env, environ={"PORT": "9100"})
    assert s.WEBHOOK_SECRET == "from-file-secret"
    assert s.TELEGRAM_BOT_TOKEN == "123:abc"
    assert s.PORT == 9100


def test_every_problem_names_the_variable_expected_and_found(tmp_path):
    env = _write(tmp_path / "bad.env", "BROKER=zerodha\nPORT=99999\nRISK_BASE_MAX_LOSS=5000\n"
                                       "RISK_WARNING_THRESHOLD=1.5\nSQUARE_OFF_TIME=3pm\nWEBHOOK_ALLOWED_IPS=1.2.3.999\n"
                                       "WEBHOOK_SECRET=short\nDEDUPE_WINDOW_S=ten\n")
    with pytest.raises(ConfigError) as e:
        load(env, environ={"DATA_DIR": str(tmp_path)})
    by_name = {p.field: p for p in e.value.problems}
    assert by_name["BROKER"].expected == "paper | shoonya" and by_name["BROKER"].found == "'zerodha'"
    assert by_name["PORT"].found == "'99999'"
    assert "negative" in by_name["RISK_BASE_MAX_LOSS"].expected
    assert "0 to 1" in by_name["RISK_WARNING_THRESHOLD"].expected
    assert "HH:MM" in by_name["SQUARE_OFF_TIME"].expected
    assert "CIDR" in by_name["WEBHOOK_ALLOWED_IPS"].expected
    assert by_name["DEDUPE_WINDOW_S"].found == "'ten'"
    # a secret's value is never repeated back
    assert "short" not in by_name["WEBHOOK_SECRET"].found
    assert {"API_TOKEN", "DASHBOARD_PASSWORD"} <= set(by_name)  # required, with no secrets.env to fall back on


def test_live_mode_names_what_it_needs(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(None, environ={"DATA_DIR": str(tmp_path), "BROKER": "shoonya", "WEBHOOK_SECRET": "w" * 12,
                            "API_TOKEN": "t" * 20, "DASHBOARD_PASSWORD": "p" * 10})
    assert {p.field for p in e.value.problems} == {"USER_ID", "OAUTH_CLIENT_ID", "OAUTH_SECRET"}


def test_first_run_generates_secrets_with_mode_0600_and_reuses_them(tmp_path):
    s1 = load(None, environ={"DATA_DIR": str(tmp_path)}, generate_secrets=True)
    f = tmp_path / "secrets.env"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert set(s1.generated_secrets) == {"WEBHOOK_SECRET", "DASHBOARD_PASSWORD", "API_TOKEN"}
    s2 = load(None, environ={"DATA_DIR": str(tmp_path)}, generate_secrets=True)
    assert s2.generated_secrets == () and s2.WEBHOOK_SECRET == s1.WEBHOOK_SECRET


def test_a_config_file_readable_by_others_gets_a_warning(tmp_path):
    env = _write(tmp_path / "open.env", f"DATA_DIR={tmp_path}\nWEBHOOK_SECRET=wwwwwwwwwwww\nAPI_TOKEN={'t' * 20}\n"
                                        "DASHBOARD_PASSWORD=pppppppp\n", mode=0o644)
    s = load(env, environ={})
    assert any("readable by other users" in w and "chmod 600" in w for w in s.warnings)


def test_check_command_lists_problems_and_exits_non_zero(tmp_path, capsys, monkeypatch):
    for k in ("BROKER", "PORT", "DATA_DIR"):
        monkeypatch.delenv(k, raising=False)
    env = _write(tmp_path / "bad.env", f"DATA_DIR={tmp_path}\nBROKER=live\nPORT=http\n")
    assert main(["check", "--env", env]) == 1
    out = capsys.readouterr().out
    assert "BROKER: expected paper | shoonya, found 'live'" in out
    assert "PORT: expected an integer from 1 to 65535, found 'http'" in out
    assert "warning: WEBHOOK_SECRET is not set: `run` generates one" in out  # not a problem: run makes it
    good = _write(tmp_path / "good.env", f"DATA_DIR={tmp_path}\nWEBHOOK_SECRET=wwwwwwwwwwww\nAPI_TOKEN={'t' * 20}\n"
                                         "DASHBOARD_PASSWORD=pppppppp\n")
    assert main(["check", "--env", good]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_with_a_missing_file_says_so(tmp_path, capsys):
    assert main(["check", "--env", str(tmp_path / "nope.env")]) == 1
    assert "--env: expected an existing .env file" in capsys.readouterr().out


def test_example_config_files_are_valid(tmp_path, monkeypatch):
    """Every shipped example must pass `check` once its placeholders are filled."""
    from pathlib import Path
    examples = sorted(Path(__file__).parent.parent.joinpath("config_env").glob("*.env.example"))
    assert examples
    for ex in examples:
        text = ex.read_text().replace("DATA_DIR=var", f"DATA_DIR={tmp_path}")
        for n, line in enumerate(text.splitlines()):  # the placeholder secrets, as a trader fills them in
            name, _, value = line.partition("=")
            if name in ("WEBHOOK_SECRET", "DASHBOARD_PASSWORD", "API_TOKEN", "OAUTH_SECRET") and value:
                text = text.replace(line, f"{name}=filled-in-{n}-{'s' * 20}")
        env = _write(tmp_path / ex.name, text)
        load(env, environ={}, generate_secrets=True)  # as `run` loads it


def test_a_random_secret_that_happens_to_hold_xxx_is_no_placeholder(tmp_path, monkeypatch):
    """About one secret in a thousand that `run` generates holds "xxx" in some case: live mode then refused the
    secret the host had made itself ("an example placeholder from the docs") and would not start."""
    import host.config as config
    made = iter(["kQ2xXx9vB7_mN4pL0aZ3rT8yU1wE5sD6", "Pz8-XXXq1Lm2Nb3Vc4Kd5Jf6Hg7Tr9Ye0", "a1b2c3xxxd4e5f6g7h8i9j0kLmNoPqRs"])
    monkeypatch.setattr(config.secrets, "token_urlsafe", lambda n: next(made))
    live = {"DATA_DIR": str(tmp_path), "BROKER": "shoonya", "SHOONYA_AUTH": "token", "USER_ID": "FA1",
            "SHOONYA_ACCESS_TOKEN": "a" * 24}
    s = load(None, environ=live, generate_secrets=True)
    assert s.API_TOKEN == "a1b2c3xxxd4e5f6g7h8i9j0kLmNoPqRs"
    assert load(None, environ=live).WEBHOOK_SECRET == "kQ2xXx9vB7_mN4pL0aZ3rT8yU1wE5sD6"  # and again at the next start
    for placeholder in ("xxxxxxxxxxxxxxxx", "XXXX-XXXX-XXXX-XXXX", "change-me-please", "<your-api-token-here>"):
        with pytest.raises(ConfigError) as e:
            load(None, environ={**live, "API_TOKEN": placeholder})
        assert any(p.field == "API_TOKEN" and "placeholder" in p.found for p in e.value.problems)


def test_one_value_for_two_secrets_is_refused_live_and_said_in_paper(tmp_path):
    """Found by an outside test: WEBHOOK_SECRET, API_TOKEN and DASHBOARD_PASSWORD all one value passed `check`. The
    webhook secret travels in every TradingView alert (and sits in TradingView's alert settings): whoever sees it
    would also hold the API token, which can halt, exit-all and disable strategies."""
    same = "Zq8-shared-secret-value-0123456789"
    live = {"DATA_DIR": str(tmp_path), "BROKER": "shoonya", "SHOONYA_AUTH": "token", "USER_ID": "FA1",
            "SHOONYA_ACCESS_TOKEN": "a" * 24, "WEBHOOK_SECRET": same, "API_TOKEN": same,
            "DASHBOARD_PASSWORD": "another-password-1"}
    with pytest.raises(ConfigError) as e:
        load(None, environ=live)
    [p] = [p for p in e.value.problems if p.field == "API_TOKEN"]
    assert "WEBHOOK_SECRET" in p.found and same not in str(e.value), p
    paper = {k: v for k, v in live.items() if k not in ("BROKER", "SHOONYA_AUTH", "USER_ID", "SHOONYA_ACCESS_TOKEN")}
    s = load(None, environ=paper)
    assert any("API_TOKEN" in w and "WEBHOOK_SECRET" in w for w in s.warnings), s.warnings
    assert load(None, environ={**live, "API_TOKEN": "b" * 24}).API_TOKEN == "b" * 24  # different values: fine
