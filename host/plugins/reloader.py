"""Watch the plugin folders: per-path debounce, content hash, then hand the new version to the engine."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .loader import plugin_name
from .registry import Registry

log = logging.getLogger(__name__)
DEBOUNCE_S = 0.15


class Reloader(FileSystemEventHandler):
    """Turns file events into load attempts; `submit` runs a change on the engine thread, between events."""

    def __init__(self, registries: list[Registry], submit: Callable[[Callable[[], None]], None],
                 debounce_s: float = DEBOUNCE_S):
        self.registries = {r.folder.resolve(): r for r in registries}
        self.submit = submit
        self.debounce_s = debounce_s
        self._timers: dict[Path, threading.Timer] = {}
        self._lock = threading.Lock()
        self._observer = None
        self._stopped = threading.Event()

    def scan(self) -> list[Callable[[], None]]:
        """Load every plugin file now (at start-up); return the changes to apply on the engine thread."""
        changes = []
        for folder, registry in self.registries.items():
            folder.mkdir(parents=True, exist_ok=True)
            for path in sorted(folder.iterdir()):
                outcome = registry.prepare(path) if plugin_name(path) else None
                if outcome is not None:
                    changes.append(lambda r=registry, o=outcome: r.apply(o))
        return changes

    def start(self) -> None:
        self._observer = Observer()
        for folder in self.registries:
            self._observer.schedule(self, str(folder), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            for t in self._timers.values():
                t.cancel()
            self._timers.clear()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)

    # watchdog calls this for created, modified, moved and deleted; a move is a delete plus an add
    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        for p in (getattr(event, "src_path", None), getattr(event, "dest_path", None)):
            if p:
                path = Path(p if isinstance(p, str) else p.decode())
                if plugin_name(path) and path.parent.resolve() in self.registries:
                    self._debounce(path)

    def _debounce(self, path: Path) -> None:
        with self._lock:
            if self._stopped.is_set():
                return
            old = self._timers.pop(path, None)
            if old:
                old.cancel()
            timer = threading.Timer(self.debounce_s, self._settled, args=(path,))
            timer.daemon = True
            self._timers[path] = timer
            timer.start()

    def _settled(self, path: Path) -> None:
        with self._lock:
            self._timers.pop(path, None)
        registry = self.registries[path.parent.resolve()]
        if path.exists():
            outcome = registry.prepare(path)
            if outcome is not None:
                self.submit(lambda: registry.apply(outcome))
        else:
            name = plugin_name(path)
            self.submit(lambda: registry.remove(name))
