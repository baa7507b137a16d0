"""Atomic file writes: a temp file in the same directory, fsync, rename.

A reader sees the old content or the new one, never a partial file. Below the store and its
layout (both write metadata through it); imports nothing of bayesflip but the errors.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
