"""Every hook is documented in its spec and in docs/plugins.md, and exercised by a test (Datasette style)."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from host import hookspecs

ROOT = Path(__file__).resolve().parent.parent
ALL_HOOKS = hookspecs.names("strategy") + hookspecs.names("notifier")


def test_there_are_hooks_of_both_kinds():
    assert "strategy_meta" in ALL_HOOKS and "notifier_send" in ALL_HOOKS


@pytest.mark.parametrize("hook", ALL_HOOKS)
def test_every_hookspec_has_a_docstring_and_no_body(hook):
    fn = getattr(hookspecs, hook)
    assert fn.__doc__ and len(fn.__doc__.strip()) > 20
    body = [line.strip() for line in inspect.getsource(fn).splitlines()]
    assert body[-1].endswith('"""'), f"{hook} has a body"


@pytest.mark.parametrize("hook", ALL_HOOKS)
def test_every_hook_is_documented_for_plugin_authors(hook):
    docs = (ROOT / "docs" / "plugins.md").read_text()
    section = re.search(rf"^### {hook}\n(.*?)(?=^### |\Z)", docs, re.M | re.S)
    assert section, f"docs/plugins.md has no '### {hook}' section"
    assert "Arguments" in section.group(1) and "```python" in section.group(1)


@pytest.mark.parametrize("hook", ALL_HOOKS)
def test_every_hook_is_exercised_by_a_test(hook):
    tested = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name
              and re.search(rf"\b{hook}\b", p.read_text())]
    assert tested, f"no test names {hook}: write one that drives it through the engine"
