"""Watch the plugin folders: per-path debounce, content hash, then hand the new version to the engine.

A folder that disappears (plugins/ or a kind's folder deleted, moved or replaced) stops its inotify
watch for good, so a guard thread checks each folder's identity (device, inode) four times a second:
while a folder is missing its plugins keep running their last loaded versions; when it is back it is
watched again and what is there is loaded.

Folders are kept as configured, never resolved: when PLUGINS_DIR (or a kind's folder) is a symlink and
it is switched to another directory (a release-plus-symlink deploy), the path now names another
directory, which the guard sees as a replaced folder: the new target is watched and loaded, and plugins
whose file is not there are stopped.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from ..storage import Storage, utcnow
from .loader import plugin_name
from .registry import Registry

log = logging.getLogger(__name__)
DEBOUNCE_S = 0.15
FOLDER_CHECK_S = 0.25  # how often the guard looks for folders gone, back or replaced
REAPPEAR_GRACE_S = 1.0  # a file missing from a folder that came back is stopped after this (mkdir, then cp)
MISSING_KEY = "plugin_folders_missing"  # state: {folder: message} for /healthz in every worker


def identity(folder: Path) -> Optional[tuple[int, int]]:
    """The directory's (device, inode), or None when there is no directory at that path."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def configured(folder: Path) -> Path:
    """The folder as configured, made absolute but with its symlinks kept (they may be switched later)."""
    return Path(os.path.abspath(folder))


class Reloader(FileSystemEventHandler):
    """Turns file events into load attempts; `submit` runs a change on the engine thread, between events."""

    def __init__(self, registries: list[Registry], submit: Callable[[Callable[[], None]], None],
                 debounce_s: float = DEBOUNCE_S):
        self.registries = {configured(r.folder): r for r in registries}
        self.submit = submit
        self.debounce_s = debounce_s
        self._timers: dict[Path, threading.Timer] = {}
        self._lock = threading.Lock()
        self._observer: Any = None
        self._stopped = threading.Event()
        self._watches: dict[Path, tuple[Any, tuple[int, int]]] = {}  # folder -> (its watch, the directory watched)
        self._watched_as: dict[str, Path] = {}  # the real directory watched -> the folder as configured
        self._missing: dict[Path, dict] = {}  # folder -> what was said about it, and since when
        self._guard: Optional[threading.Thread] = None

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
        self._observer.daemon = True
        self._observer.start()
        for folder in self.registries:
            self._arm(folder)
        self._store_missing()  # clears what an earlier run left
        self.check_folders()
        self._guard = threading.Thread(target=self._guard_folders, name="plugin-folders", daemon=True)
        self._guard.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._guard is not None:
            self._guard.join(timeout=5)
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
                folder = self._watched_as.get(str(path.parent))
                if plugin_name(path) and folder is not None:
                    self._debounce(folder / path.name)

    def _debounce(self, path: Path, delay_s: Optional[float] = None) -> None:
        with self._lock:
            if self._stopped.is_set():
                return
            old = self._timers.pop(path, None)
            if old:
                old.cancel()
            timer = threading.Timer(self.debounce_s if delay_s is None else delay_s, self._settled, args=(path,))
            timer.daemon = True
            self._timers[path] = timer
            timer.start()

    def _settled(self, path: Path) -> None:
        with self._lock:
            self._timers.pop(path, None)
        folder = path.parent
        registry = self.registries[folder]
        if path.exists():
            outcome = registry.prepare(path)
            if outcome is not None:
                self.submit(lambda: registry.apply(outcome))
        elif self._watching(folder):
            name = plugin_name(path)
            self.submit(lambda: registry.remove(name))
        # else the folder itself is gone or replaced: its plugins run on, and the guard loads it when it is back

    # ---- folders that disappear and come back ----
    def _watching(self, folder: Path, found: Optional[tuple[int, int]] = None) -> bool:
        """The folder is there, is the directory being watched, and its watch still runs.

        A new directory may get the inode number of the one just deleted, so the same identity is not
        enough: the watch of a deleted directory has stopped itself.
        """
        armed = self._watches.get(folder)
        if armed is None or (found or identity(folder)) != armed[1]:
            return False
        return any(e.watch == armed[0] and e.is_alive() and e.should_keep_running() for e in list(self._observer.emitters))

    def _disarm(self, folder: Path) -> None:
        old = self._watches.pop(folder, None)
        for real in [r for r, f in self._watched_as.items() if f == folder]:
            del self._watched_as[real]
        if old is not None:
            try:
                self._observer.unschedule(old[0])
            except (KeyError, OSError) as e:  # its emitter stopped itself when the directory went
                log.debug("unscheduling the old watch of %s: %s", folder, e)

    def _arm(self, folder: Path) -> bool:
        """Watch the directory now at `folder` (dropping the watch of one that went away)."""
        found = identity(folder)
        if found is None:
            return False
        self._disarm(folder)
        real = os.path.realpath(folder)  # the directory behind any symlink, as it is now
        try:
            watch = self._observer.schedule(self, real, recursive=False)
        except OSError as e:  # gone again in between: the next check tries again
            log.debug("watching %s: %s", folder, e)
            return False
        self._watches[folder] = (watch, found)
        self._watched_as[real] = folder
        return True

    def _guard_folders(self) -> None:
        while not self._stopped.wait(FOLDER_CHECK_S):
            try:
                self.check_folders()
            except Exception:
                log.exception("checking the plugin folders failed; trying again")

    def check_folders(self) -> None:
        """Note folders gone; re-arm and load folders back (or replaced by another directory)."""
        changed = False
        for folder, registry in self.registries.items():
            found = identity(folder)
            if found is None:
                self._disarm(folder)
                if folder not in self._missing:
                    self._missing[folder] = {"message": self._say_missing(folder, registry), "since": utcnow()}
                    changed = True
            elif not self._watching(folder, found):
                before = next((r for r, f in self._watched_as.items() if f == folder), None)
                if not self._arm(folder):
                    continue
                now = os.path.realpath(folder)
                if self._missing.pop(folder, None) is not None:
                    changed = True
                    registry.emit("plugin_folder_back", f"plugin folder {folder} is back: watching it again and "
                                  f"loading the {registry.kind} files in it", "info", None, {"folder": str(folder)})
                elif before is not None and before != now:
                    registry.emit("plugin_folder_switched", f"plugin folder {folder} now leads to {now} (was "
                                  f"{before}): loading the {registry.kind} files there; plugins without a file "
                                  f"there are stopped", "info", None, {"folder": str(folder), "target": now})
                self._rescan(folder, registry)
        if changed:
            self._store_missing()

    def _say_missing(self, folder: Path, registry: Registry) -> str:
        names = sorted(live.candidate.name for live in registry.running())
        running = (f"{registry.kind} plugins {', '.join(names)} keep running their last loaded versions"
                   if names else f"no {registry.kind} plugin was running")
        message = (f"plugin folder {folder} is missing: {running}; nothing is loaded or stopped until it is back, "
                   f"then the files in it are loaded within 2 s")
        registry.emit("plugin_folder_missing", message, "error", None, {"folder": str(folder), "running": names})
        return message

    def _rescan(self, folder: Path, registry: Registry) -> None:
        """Load the files in a folder that came back; stop plugins whose file is still not there after a grace."""
        try:
            present = {p for p in folder.iterdir() if plugin_name(p)}
        except OSError:
            return
        for path in sorted(present):
            self._debounce(path)
        for entry in list(registry.entries.values()):
            path = entry.path
            if path is not None and configured(path.parent) == folder and path not in present:
                self._debounce(path, REAPPEAR_GRACE_S)

    def _store_missing(self) -> None:
        text = json.dumps({str(f): said for f, said in self._missing.items()})
        storage = next(iter(self.registries.values())).storage
        try:
            storage.write(lambda db: Storage.put_state(db, MISSING_KEY, text))
        except Exception as e:  # a full disk: the event log and the log still say it
            log.error("the missing plugin folders were not stored for /healthz: %s", e)


def missing_folders(storage: Storage) -> dict[str, dict]:
    """The plugin folders the running host misses now ({folder: {message, since}})."""
    try:
        found = json.loads(storage.get_state(MISSING_KEY) or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
