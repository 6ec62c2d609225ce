"""Load one plugin file: read bytes, hash, compile those bytes, exec under a unique module name, validate."""
from __future__ import annotations

import hashlib
import inspect
import re
import sys
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pluggy

from .. import hookspecs

KINDS = ("strategy", "notifier")
FOLDER = {"strategy": "strategies", "notifier": "notifiers"}
TEMP_PATTERNS = (re.compile(r"~$"), re.compile(r"\.sw[a-p]$"), re.compile(r"^#.*#$"), re.compile(r"^\.#"),
                 re.compile(r"\.(tmp|bak|orig|part)$"), re.compile(r"___jb_(tmp|old)___$"))
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


class LoadError(Exception):
    """A plugin file could not become a running version; `detail` holds the traceback."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


@dataclass
class Candidate:
    """A loaded and validated plugin version, not yet running."""

    kind: str
    name: str
    path: Path
    digest: str
    module: types.ModuleType
    meta: dict
    hooks: dict[str, Any] = field(default_factory=dict)  # hook name -> implementation function

    @property
    def version(self) -> str:
        return str(self.meta.get("version"))

    def retire(self) -> None:
        """Forget the module so it can be garbage-collected."""
        if sys.modules.get(self.module.__name__) is self.module:
            del sys.modules[self.module.__name__]
        self.hooks.clear()


def plugin_name(path: Path) -> Optional[str]:
    """The plugin name for a file in a plugins folder, or None when the file is not a plugin."""
    name = path.name
    if name.startswith(("_", ".")) or any(p.search(name) for p in TEMP_PATTERNS) or not name.endswith(".py"):
        return None
    return path.stem if NAME_RE.match(path.stem) else None


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spec_namespace(kind: str) -> types.SimpleNamespace:
    """The hookspecs of one kind, as an object pluggy can read."""
    return types.SimpleNamespace(**{n: getattr(hookspecs, n) for n in hookspecs.names(kind)})


def new_manager(kind: str) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(spec_namespace(kind))
    return pm


def load(kind: str, path: Path, data: bytes, generation: int) -> Candidate:
    """Compile data (the bytes that were read) as plugin `path`, generation `generation`, and validate it."""
    name = plugin_name(path)
    if name is None:
        raise LoadError(f"{path.name}: not a plugin file name (letters, digits and _, ending in .py)")
    modname = f"host_plugins.{FOLDER[kind]}.{name}__g{generation}"
    module = types.ModuleType(modname)
    module.__file__ = str(path)
    sys.modules[modname] = module  # dataclasses and typing look a class's module up while it is built
    try:
        try:
            code = compile(data, str(path), "exec", dont_inherit=True)
            exec(code, module.__dict__)
        except BaseException as e:
            raise LoadError(f"{path.name}: {type(e).__name__}: {e}", traceback.format_exc()) from None
        hooks, meta = validate(kind, name, module)
        return Candidate(kind, name, path, digest_of(data), module, meta, hooks)
    except BaseException:
        sys.modules.pop(modname, None)
        raise


def validate(kind: str, name: str, module: types.ModuleType) -> tuple[dict[str, Any], dict]:
    """Check the module in a throwaway manager; return its hook implementations and its meta."""
    other = "notifier" if kind == "strategy" else "strategy"
    marker = hookspecs.PROJECT + "_impl"
    impls = {n: f for n, f in vars(module).items() if callable(f) and hasattr(f, marker)}
    if f"{other}_meta" in impls and f"{kind}_meta" not in impls:
        raise LoadError(f"{name}: this is a {other} plugin ({other}_meta); move it to plugins/{FOLDER[other]}/")
    if f"{kind}_meta" not in impls:
        raise LoadError(f"{name}: missing the required hook {kind}_meta (decorate it with @hookimpl)")
    for hook, fn in impls.items():
        with_defaults = [p.name for p in inspect.signature(fn).parameters.values() if p.default is not p.empty]
        if with_defaults:
            raise LoadError(f"{name}: hook {hook} has parameters with default values ({', '.join(with_defaults)}); "
                            f"pluggy never passes those: remove the defaults")
    pm = new_manager(kind)
    try:
        pm.register(module, name=f"scratch:{name}")
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise LoadError(f"{name}: {e}", traceback.format_exc()) from None
    finally:
        if pm.is_registered(module):
            pm.unregister(module)
    meta = call_meta(kind, name, impls[f"{kind}_meta"])
    return impls, meta


def call_meta(kind: str, name: str, fn: Any) -> dict:
    """Run and check the meta hook: name matches the file, version given, supported api_version."""
    try:
        meta = fn()
    except Exception as e:
        raise LoadError(f"{name}: {kind}_meta raised {type(e).__name__}: {e}", traceback.format_exc()) from None
    if not isinstance(meta, dict):
        raise LoadError(f"{name}: {kind}_meta must return a dict, returned {type(meta).__name__}")
    problems = []
    if meta.get("name") != name:
        problems.append(f"name: expected {name!r} (the file name), found {meta.get('name')!r}")
    if not isinstance(meta.get("version"), (str, int, float)) or str(meta.get("version")) == "":
        problems.append(f"version: expected a string such as '1.0', found {meta.get('version')!r}")
    if meta.get("api_version") != hookspecs.API_VERSION:
        problems.append(f"api_version: expected {hookspecs.API_VERSION}, found {meta.get('api_version')!r}")
    symbols = meta.get("symbols", [])
    if not isinstance(symbols, (list, tuple)) or not all(isinstance(s, str) and s.count(":") == 1 for s in symbols):
        problems.append(f"symbols: expected a list of 'EXCHANGE:SYMBOL' strings, found {symbols!r}")
    if not isinstance(meta.get("params", {}), dict):
        problems.append(f"params: expected a dict of defaults, found {meta.get('params')!r}")
    if problems:
        raise LoadError(f"{name}: {kind}_meta: " + "; ".join(problems))
    return meta
