"""OS file locks in DATA_DIR: one engine per data folder, one `strategy-host run` per data folder."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional


class FileLock:
    """A non-blocking exclusive flock held for as long as this object keeps its file open."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: Optional[int] = None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """The pid written by whoever holds the lock, for error messages."""
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


class ServingMark:
    """A shared flock that every worker taking connections holds; the engine's worker asks if one is held."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: Optional[int] = None

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd

    def hold(self) -> None:
        """This process takes connections: held until it exits (the kernel drops it even on kill -9)."""
        fcntl.flock(self._open(), fcntl.LOCK_SH)  # waits only while a `held_elsewhere` test holds it (microseconds)

    def held_elsewhere(self) -> bool:
        """Whether another process takes connections (call only where `hold` never was)."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
