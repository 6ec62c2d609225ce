"""Files made in DATA_DIR by a command run as root (`sudo strategy-host restore`) go to the service's owner."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def owner(path: Path) -> Optional[tuple[int, int]]:
    """The (uid, gid) of path, or None when nothing is there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_uid, st.st_gid


def follow(path: Path, like: Path, mode: Optional[int] = None) -> None:
    """Give path the owner of `like` (when run as root and they differ), then the mode, if given.

    Only root can hand a file to another user; anyone else makes files that are already theirs.
    """
    want = owner(like)
    if os.geteuid() == 0 and want is not None and owner(path) != want:
        os.chown(path, *want, follow_symlinks=False)
    if mode is not None:
        os.chmod(path, mode)
