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

from host.models import ExecutionType, Order, OrderStatus, OrderType, Product, Side
from host.plugins.loader import load
from conftest import wait_for
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


def _filled(side: Side, avg: str) -> Order:
    return Order("o1", "s", ExecutionType.ENTRY, "NFO", "X", side, 75, OrderType.MKT, Product.NRML,
                 OrderStatus.FILLED, 75, Decimal(avg), None, None, None, None)


def test_the_stop_loss_example_is_below_a_long_and_above_a_short(tmp_path):
    [n] = [n for n, b in enumerate(BLOCKS) if "def strategy_on_order" in b]
    cand, _ = _as_plugin(BLOCKS[n], tmp_path, n)
    hook = cand.module.strategy_on_order
    long_stop = hook(ctx=None, order=_filled(Side.BUY, "100"))
    short_stop = hook(ctx=None, order=_filled(Side.SELL, "100"))
    assert long_stop.side is Side.SELL and long_stop.trigger_price < Decimal("100")
    assert short_stop.side is Side.BUY and short_stop.trigger_price > Decimal("100")
    assert long_stop.action is short_stop.action is ExecutionType.EXIT


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
