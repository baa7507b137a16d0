"""Is a model snapshot on disk whole? Checks that need no network, and the clean-up of killed runs.

* :func:`snapshot_problems` — one line per damaged file of a snapshot directory (a Hub snapshot or
  the GGUF package's safetensors copy): a dangling link (its blob is gone), a ``*.safetensors`` file
  shorter or longer than its own header declares (``8 + header + max(data_offsets end)`` bytes: a
  truncated copy), a snapshot with a ``config.json`` but no weights file (or a shard its
  ``*.index.json`` names missing), and with ``hashes=True`` a blob whose content does not hash to its name (the
  Hub cache names a weights blob by its sha256, a small file's blob by its git sha1:
  ``sha1(b"blob <size>\\0" + content)``). The size check reads a few kB per file, so it runs
  wherever a snapshot is looked up (:func:`bayesflip.models.prepare.prepared_revision`); the hash
  check reads every byte and runs in ``bayesflip models prepare``.
* :func:`remove_damaged` — deletes the damaged files (the link and its blob) so the next download
  fetches them again.
* :func:`tmp_name` / :func:`clean_stale_tmp` — scratch directories are named
  ``<target>.tmp-<host>-<pid>-<random>``; a later run removes those whose process is gone (same host,
  pid not alive) or, from another host, older than :data:`STALE_S`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import struct
import time
from pathlib import Path

HEX40 = re.compile(r"^[0-9a-f]{40}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
STALE_S = 24 * 3600   # another host's scratch dir older than this is a killed run's


def safetensors_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file is not whole (its size against its header), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name}: truncated ({size} bytes, no header)"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            return f"{path.name}: truncated ({size} bytes, header of {n} bytes)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name}: unreadable header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    want = 8 + n + max(ends, default=0)
    if size != want:
        return f"{path.name}: {'truncated' if size < want else 'too long'} ({size} of {want} bytes)"
    return None


def _hash_problem(path: Path, blob: str) -> str | None:
    if HEX64.match(blob):
        h = hashlib.sha256()
    elif HEX40.match(blob):
        h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    else:
        return None
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return None if h.hexdigest() == blob else f"{path.name}: content does not match its hash {blob[:12]}…"


def snapshot_problems(snap: Path, hashes: bool = False) -> list[str]:
    """One line per damaged file under ``snap`` (module docstring); [] when whole."""
    out = []
    for p in sorted(Path(snap).rglob("*")):
        if p.is_symlink() and not p.exists():
            out.append(f"{p.relative_to(snap)}: missing (its blob is gone)")
            continue
        if not p.is_file():
            continue
        problem = safetensors_problem(p) if p.suffix == ".safetensors" else None
        if problem is None and hashes and p.is_symlink():
            problem = _hash_problem(p, Path(os.readlink(p)).name)
        if problem:
            out.append(problem if str(p.relative_to(snap)) == p.name else f"{p.relative_to(snap)}: "
                       + problem.split(": ", 1)[1])
    out += _missing_weights(Path(snap))
    return out


WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def _missing_weights(snap: Path) -> list[str]:
    """A model snapshot (it has ``config.json``) without its weights: no weights file at all, or a
    shard named by ``*.index.json`` that is not there."""
    if not (snap / "config.json").is_file():
        return []
    out = []
    for idx in snap.glob("*.index.json"):
        try:
            names = set(json.loads(idx.read_text()).get("weight_map", {}).values())
        except (ValueError, AttributeError):
            out.append(f"{idx.name}: unreadable")
            continue
        out += [f"{n}: missing (named by {idx.name})" for n in sorted(names) if not (snap / n).is_file()]
    if not any(p.is_file() for pat in WEIGHTS for p in snap.glob(pat)):
        out.append("model.safetensors: missing (no weights file in the snapshot)")
    return out


def remove_damaged(snap: Path, problems: list[str]) -> None:
    """Delete the files named by ``problems`` (the snapshot entry and, for a Hub link, its blob)."""
    for line in problems:
        p = Path(snap) / line.split(": ", 1)[0]
        if p.is_symlink():
            blob = p.resolve()
            p.unlink()
            if blob.is_file():
                blob.unlink()
        elif p.is_file():
            p.unlink()


def tmp_name(target: Path) -> str:
    """The prefix of a scratch dir for ``target`` (``tempfile.mkdtemp(prefix=...)`` adds the random part)."""
    return f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def clean_stale_tmp(target: Path) -> list[Path]:
    """Remove the scratch dirs of ``target`` left by killed runs (module docstring); return them."""
    host = socket.gethostname()
    pat = re.compile(re.escape(target.name) + r"\.tmp-(?P<host>.+)-(?P<pid>\d+)-[^-]*$")
    gone = []
    for d in Path(target).parent.glob(f"{target.name}.tmp-*"):
        m = pat.match(d.name)
        if m and m["host"] == host:
            stale = int(m["pid"]) != os.getpid() and not _alive(int(m["pid"]))
        else:   # another host's, or the older unnamed form: only when old
            stale = time.time() - d.stat().st_mtime > STALE_S
        if stale and d.is_dir():
            shutil.rmtree(d)
            gone.append(d)
    return gone
