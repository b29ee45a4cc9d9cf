"""Atomic writes: a temp file (or folder) in the target's folder, renamed into place, so a reader sees the old
entry or the new one, never half of one; a killed run leaves no half-written file behind.

``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 entries, fine for a temp file but not once renamed into a
results folder colleagues read: what we rename into place gets the mode ``open()`` / ``mkdir()`` would give.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

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


@contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f: f.write(...)``: ``f`` is a temp file beside ``path``, flushed, fsync'ed and
    published onto ``path`` when the block ends; deleted instead if the block raises."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(final: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``final`` atomically (``atomic_file``)."""
    with atomic_file(final) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(final)
