"""Inter-process locking and atomic files in the instance folder.

Gunicorn without ``--preload`` builds the app once per worker, all at once,
and each worker answers requests with its own copy of the development
issuer: a ``threading.Lock`` orders one process's threads, not the workers.
POSIX only (``fcntl``), as is gunicorn.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing).

    The lock belongs to this open file, so it also orders threads of one
    process, and the kernel drops it if the process dies holding it. In a
    folder this process cannot write (a read-only instance folder, the
    database elsewhere) nothing is locked: nothing is written there either.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield  # closing the file releases the lock
    finally:
        os.close(fd)


def _private_temporary(path: Path, data: str) -> str:
    """A new temporary file beside ``path`` holding ``data``, mode ``0o600``
    (``mkstemp`` opens with ``O_CREAT | O_EXCL`` and that mode; a unique name
    per writer, so concurrent writers never touch each other's file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(data)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_private_file(path: Path, data: str) -> None:
    """Replace ``path`` with ``data`` in one step, readable by the owner only:
    readers see the old file or the new one, never half of it."""
    tmp = _private_temporary(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def create_private_file_once(path: Path, data: str) -> bool:
    """Create ``path`` holding ``data`` unless it exists; ``True`` if this call did.

    The file appears complete or not at all (``os.link`` of a finished
    temporary file fails if ``path`` exists), so a process that loses the race
    reads the winner's whole file, private from the start.
    """
    tmp = _private_temporary(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True
