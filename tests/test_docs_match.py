"""Docs match the product: docs/plugins.md's examples load as plugins with the imports it gives, its stop-loss
example is right for BUY and SELL entries, the README's intro and install line, .gitignore, and `generation`."""
from __future__ import annotations

import builtins
import dis
import re
import subprocess
import types
from decimal import Decimal
from pathlib import Path

import pytest

from host.plugins.loader import load
from conftest import alert, wait_for
from plugin_files import strategies, strategy_source, wait_strategy, write

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_MD = (ROOT / "docs" / "plugins.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", PLUGINS_MD, re.S)
PRELUDE = BLOCKS[0]  # "Everything a plugin needs comes from these imports"


def _globals_used(code: types.CodeType) -> set[str]:
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _globals_used(const)
    return names


def _as_plugin(block: str, tmp_path: Path, n: int):
    kind = "notifier" if "notifier_" in block else "strategy"
    name = f"example{n}"
    source = PRELUDE + "\n" + re.sub(r'"name": "\w+"', f'"name": "{name}"', block)
    if f"{kind}_meta" not in block:
        source += f'\n@hookimpl\ndef {kind}_meta():\n    return {{"name": "{name}", "version": "1", "api_version": 1' + \
                  (', "params": {"fast": 3, "slow": 5}' if "params[" in block else "") + "}\n"
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    return load(kind, path, source.encode(), 1), source


def test_the_first_block_is_the_imports_and_every_block_compiles():
    assert "from host import" in PRELUDE and len(BLOCKS) > 10
    for block in BLOCKS:
        compile(PRELUDE + block, "plugins.md", "exec")


@pytest.mark.parametrize("n", [n for n, b in enumerate(BLOCKS) if "@hookimpl" in b])
def test_every_example_loads_as_a_plugin_and_every_name_it_uses_is_imported(tmp_path, n):
    cand, source = _as_plugin(BLOCKS[n], tmp_path, n)
    missing = {name for name in _globals_used(compile(source, "x", "exec"))
               if name not in vars(cand.module) and not hasattr(builtins, name)}
    assert not missing, f"example {n} uses {missing}, which the imports in docs/plugins.md do not give:\n{BLOCKS[n]}"


def _stop_example() -> str:
    """The example in the strategy_on_order section that keeps a stop for every entry."""
    section = PLUGINS_MD.split("### strategy_on_order", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[-1]


@pytest.mark.parametrize("side,stop_side,below", [("BUY", "SELL", True), ("SELL", "BUY", False)])
def test_the_stop_loss_example_rests_on_the_right_side_and_an_exit_alert_still_exits(host, side, stop_side, below):
    name = "docstop"
    source = PRELUDE + "\n" + _stop_example() + \
        f'\n@hookimpl\ndef strategy_meta():\n    return {{"name": "{name}", "version": "1", "api_version": 1}}\n'
    write(host.runtime.strategies.folder, name, source)
    wait_strategy(host, name, status="running")
    host.tick("42.5")
    r = host.post(alert(strategy=name, direction=side, qty=75, order_type="LMT", price="42.5"))
    assert r.status_code == 200, r.get_json()
    held = 75 if side == "BUY" else -75
    wait_for(lambda: host.net(name) == held, timeout=6)
    live = ("NEW", "SUBMITTED", "OPEN", "PARTIAL")
    [stop] = wait_for(lambda: [o for o in host.orders(strategy=name) if o["action"] == "EXIT"
                               and o["status"] in live], timeout=6)
    assert stop["side"] == stop_side and stop["qty"] == 75
    assert (Decimal(stop["trigger_price"]) < Decimal("42.5")) is below
    r = host.post(alert("EXIT", strategy=name, direction=stop_side, qty=75, order_type="MKT", price="0"))
    assert r.status_code == 200 and "nothing to exit" not in r.get_json()["reason"], r.get_json()
    wait_for(lambda: host.net(name) == 0, timeout=6)
    host.settle()
    ended = {o["id"]: o["status"] for o in host.orders(strategy=name) if o["action"] == "EXIT"}
    assert ended[stop["id"]] == "CANCELLED" and list(ended.values()).count("FILLED") == 1, ended


def test_the_readme_intro_and_install_match_the_product():
    readme = (ROOT / "README.md").read_text()
    intro = readme.split("## ", 1)[0]
    assert "later versions" not in intro and "dashboard" in intro.lower() and "Telegram" in intro
    assert "NorenRestApiOAuth==0.0.41" in readme and "NorenRestApiPy" in readme
    assert '"NorenRestApiOAuth==0.0.41"' in (ROOT / "setup.py").read_text()


def test_gitignore_keeps_env_files_out_and_examples_in():
    lines = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) == len(set(lines)), f"listed twice: {[x for x in lines if lines.count(x) > 1]}"
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "config_env/live.env", "config_env/my.env",
                              "config_env/live.env.example", "config_env/paper.env.example"],
                             cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert ignored == ["config_env/live.env", "config_env/my.env"]


def test_generation_counts_loaded_copies_across_restarts_as_documented(host):
    folder = host.runtime.strategies.folder
    write(folder, "counted", strategy_source("counted"))
    wait_strategy(host, "counted", generation=1, status="running")
    write(folder, "counted", strategy_source("counted", version="2"))
    wait_strategy(host, "counted", generation=2, status="running")
    write(folder, "counted", strategy_source("counted", version="3") + "\nthis is not python\n")
    wait_for(lambda: (s := strategies(host)["counted"])["error"] and s)  # the old copy runs on
    assert strategies(host)["counted"]["generation"] == 2  # a failed load: unchanged
    write(folder, "counted", strategy_source("counted", version="2"))
    wait_strategy(host, "counted", generation=3, status="running")
    host.restart()
    wait_strategy(host, "counted", generation=4, status="running")  # a start loads it anew
    assert "every start of the host" in PLUGINS_MD
