"""Helpers to write plugin files the way editors do, and to wait for the host to take them."""
from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path
from typing import Any, Optional

from conftest import wait_for

HEADER = "from decimal import Decimal\nfrom host import hookimpl, Intent, ExecutionType, OrderType, Product, Side\n"


def strategy_source(name: str, version: str = "1.0", body: str = "", meta_extra: str = "") -> str:
    return HEADER + textwrap.dedent(f'''
        @hookimpl
        def strategy_meta():
            return {{"name": "{name}", "version": "{version}", "api_version": 1{meta_extra}}}
    ''') + textwrap.dedent(body)


def write(folder: Path, name: str, source: str, atomic: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    if atomic:  # what most editors do: write a temp file, then rename it over the original
        tmp = folder / f".{name}.py.swp"
        tmp.write_text(source)
        os.replace(tmp, path)
    else:
        path.write_text(source)
    return path


def strategies(host: Any) -> dict[str, dict]:
    return {s["name"]: s for s in host.api("/api/strategies").get_json()["items"]}


def wait_strategy(host: Any, name: str, timeout: float = 3.0, **expected: Any) -> dict:
    """Wait until /api/strategies shows `name` with the expected fields; return its record."""
    def match() -> Optional[dict]:
        s = strategies(host).get(name)
        return s if s and all(s.get(k) == v for k, v in expected.items()) else None
    return wait_for(match, timeout=timeout)


def gone(host: Any, name: str, timeout: float = 3.0) -> None:
    wait_for(lambda: name not in strategies(host), timeout=timeout)


def stays(check: Any, seconds: float = 0.8) -> None:
    """Assert check() stays true for a while (nothing else happens)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert check()
        time.sleep(0.05)
