"""Files only their owner may read: the databases hold orders, positions and dashboard sessions."""
from __future__ import annotations

import os
from pathlib import Path


def create_private(path: Path) -> None:
    """Create `path` empty with mode 0600 if it does not exist; SQLite gives its -wal and -shm the same mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
