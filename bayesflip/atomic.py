"""Atomic file writes (a temp file in the same directory, fsync, rename) and exclusive file locks.

A reader sees the old content or the new one, never a partial file. A lock is an ``flock`` on a
lock file, released when its holder closes it or dies, so a killed writer never blocks the next.
Below the store, its layout and the manifest (they write metadata and take locks through it);
imports nothing of bayesflip but the errors.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .errors import StoreWriteError


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename; on any OSError the temp file is removed and StoreWriteError names the path."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise StoreWriteError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


class LockTimeout(Exception):
    """:func:`file_lock` waited ``wait_s`` seconds and the lock was still held by another process."""


@contextmanager
def file_lock(lock: Path, wait_s: Optional[float] = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock`` (created with mode 0664) for the duration.

    ``wait_s=None`` waits as long as the holder keeps it; otherwise :class:`LockTimeout` once the
    lock has been busy for ``wait_s`` seconds (polled every 20 ms). A lock file that cannot be
    created is :class:`StoreWriteError` naming it."""
    lock = Path(lock)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o664)
    except OSError as e:
        raise StoreWriteError(f"cannot lock {lock}: {e.strerror or e}") from None
    try:
        if wait_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            end = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > end:
                        raise LockTimeout(str(lock)) from None
                    time.sleep(0.02)
        yield
    finally:
        os.close(fd)                      # closing releases the lock
