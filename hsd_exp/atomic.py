"""Atomic writes (a temp file or folder renamed into place) that keep the permissions the umask gives.

``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 entries, fine for a temp file but not once renamed into a
results folder colleagues read: what we rename into place gets the mode ``open()`` / ``mkdir()`` would give.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_lock = threading.Lock()  # os.umask can only be read by setting it


def umask_mode(directory: bool = False) -> int:
    """0666 (files) or 0777 (folders) less the process umask."""
    with _lock:
        mask = os.umask(0)
        os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """chmod ``tmp`` to the umask's mode, then rename it onto ``final`` (atomic on one file system)."""
    tmp = Path(tmp)
    os.chmod(tmp, umask_mode(directory=tmp.is_dir()))
    os.replace(tmp, final)
    return Path(final)
