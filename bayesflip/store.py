"""Zarr result stores: one per (sweep, experiment, model), one chunk per shard.

Layout of ``results/<sweep>/<experiment>/<model>.zarr``::

    <array>            (cell, *dims)   chunk = (shard_size, *dims)   dimension_names set
    cell, <field>      (cell,)         cell index and condition fields of every cell (theta, depth, sample, ...)
    <dim>              (n,)            labels of a per-cell dim (choice strings, positions)
    verified           (cell,) bool    cells of shards with a done record (not checksummed; see store_layout)
    attrs              provenance: config + hash, seed, model id + revision, versions, git commit,
                       ``identity`` (what determines the numbers) and ``store_uid`` (this store)

Completion is recorded per shard, **after** its chunks are written, as an atomically
renamed JSON file in ``<model>.records/shard-000012.json`` (status done|failed, timings,
host, job id, error). A ``done`` record carries the store's uid, its identity hash and a
checksum (blake2b) of every chunk file of the shard as written. A shard is *done* only when
its record is complete, belongs to this store (same uid) and every chunk still matches its
checksum; anything else is ``corrupt`` (with the file named) and is recomputed.

One writer per shard: a process computes a shard only while it holds the shard's lease
``<model>.leases/shard-000012.lease`` (host, pid, SLURM job id; mtime = heartbeat). A lease
whose holder is gone (SLURM job no longer active, local pid dead, or heartbeat older than
``BAYESFLIP_LEASE_TTL`` seconds) is broken by the next process that wants the shard. Every change of a shard's lease or
record happens under the shard's lock (``flock`` on ``<model>.leases/shard-000012.lock``, held for
microseconds): taking over a stale lease, releasing one, and each write — clearing the record before the
chunks change, writing the record after — re-checks *inside the lock* that this process still holds the
lease (the lease token is the fencing token, kept in the record as ``lease_token``). So a writer paused
after its last check (SIGSTOP, a long GC) whose lease was taken over writes nothing when it resumes, and
never deletes or replaces the record of the writer that took over. Which jobs
are active is not asked here: the store is given a ``live_jobs`` callable
(:func:`bayesflip.hpc.slurm.live_jobs` from the planner, the job and status).

All coordinates sit at the root so ``xarray.open_zarr`` reads a labelled Dataset; the older
``coords/`` + ``labels/`` layout is still read (see :mod:`bayesflip.store_layout`).
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np
import zarr

from . import __version__
from .atomic import LockTimeout, atomic_write_text, file_lock
from .errors import LeaseLost, StoreIdentityError, StoreWriteError
from .experiments.base import ArraySpec
from .paths import REPO_ROOT, RESULTS_DIR
from . import store_layout as layout

STORE_FORMAT = 2
CODE_VERSION = f"bayesflip-{__version__}+store{STORE_FORMAT}"
IDENTITY_FIELDS = ("config_hash", "model_id", "model_revision", "dtype", "backend", "tp", "attn_implementation",
                   "code_version")
DONE_FIELDS = ("shard", "status", "store_uid", "identity_hash", "checksums", "n_cells")


def version_problem(attrs: Mapping) -> Optional[str]:
    """None when this bayesflip understands the store's layout and format, else the one message that
    ``status``, ``reduce`` and ``migrate`` all give for it."""
    lay, fmt = attrs.get("store_layout"), attrs.get("store_format")
    newer = [f"{k}={v!r}" for k, v, mine in (("store_layout", lay, layout.LAYOUT), ("store_format", fmt, STORE_FORMAT))
             if v is not None and (not isinstance(v, int) or v > mine)]
    if not newer:
        return None
    code = (attrs.get("identity") or {}).get("code_version") if isinstance(attrs.get("identity"), dict) else None
    return (f"written by a newer bayesflip ({', '.join(newer)}{f', {code}' if code else ''}); this one reads "
            f"store_layout <= {layout.LAYOUT}, store_format <= {STORE_FORMAT}: not read, use the bayesflip that "
            f"wrote it")


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e.__class__.__name__})"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("bayesflip", "torch", "transformers", "tokenizers", "numpy", "zarr", "submitit", "deepspeed",
                "scipy", "pandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def identity(config_hash: str, model_spec) -> dict[str, Any]:
    """What determines a store's numbers: config, resolved model spec, code version.

    ``model_revision`` of a prepared Hub model is its pinned commit sha (from the ``prepare``
    record or the Hub cache's ref: :func:`bayesflip.models.prepare.store_revision`), not the
    registry's ``main``: a store planned against sha A refuses a job that would load sha B after
    a re-prepare. (Stores planned before the sha was pinned, with ``main`` in their identity,
    are refused the same way until re-planned with ``--overwrite``.) Other sources keep their
    registry revision (package version, seed, ...).
    """
    from .models.prepare import store_revision

    return {"config_hash": config_hash, "model_id": model_spec.id, "model_revision": store_revision(model_spec),
            "dtype": model_spec.dtype, "backend": model_spec.backend, "tp": model_spec.tp,
            "attn_implementation": model_spec.attn_implementation, "code_version": CODE_VERSION}


def identity_hash(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity_diff(old: Optional[dict], new: dict) -> list[str]:
    """``field: store=<old> now=<new>`` for every differing identity field."""
    if not old:
        return ["identity: store has none (written by an older bayesflip)"]
    return [f"{k}: store={old.get(k)!r} now={new.get(k)!r}" for k in IDENTITY_FIELDS if old.get(k) != new.get(k)]


def provenance(exp, model_spec) -> dict[str, Any]:
    ident = identity(exp.hash, model_spec)
    return {
        "experiment": exp.name, "family": exp.family, "config": exp.raw, "config_hash": exp.hash,
        "seed": exp.seed, "shard_size": exp.shard_size,
        "model": model_spec.name, "model_id": model_spec.id, "model_revision": ident["model_revision"],
        "model_revision_requested": model_spec.revision,
        "model_spec": model_spec.model_dump(mode="json"),
        "identity": ident, "identity_hash": identity_hash(ident),
        "versions": library_versions(), "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(),
    }


def store_path(sweep: str, experiment: str, model: str, root: Path | None = None) -> Path:
    return Path(root or RESULTS_DIR) / sweep / experiment / f"{model}.zarr"


def checksum_file(path: Path) -> Optional[str]:
    """blake2b of a file's bytes, or None when the file does not exist (an all-fill chunk is not written)."""
    try:
        with open(path, "rb") as f:
            return "blake2b:" + hashlib.blake2b(f.read(), digest_size=20).hexdigest()
    except FileNotFoundError:
        return None


@dataclass
class ShardRecord:
    shard: int
    status: str
    data: dict


@dataclass
class ShardState:
    """``state``: done | failed | corrupt | pending; ``kind`` the finer reason (reduce's coverage status)."""

    state: str
    kind: str
    message: str = ""
    record: Optional[dict] = None


# ---------------------------------------------------------------------- leases
LOCK_WAIT_S = 30.0                 # a shard lock not free after this long: its holder is stopped or hung
FENCE_HOOK: Optional[Callable[[str, int], None]] = None   # testing: called at "before-record" (see write_shard)
LEASE_TTL_S = float(os.environ.get("BAYESFLIP_LEASE_TTL", "120"))
HEARTBEAT_S = max(1.0, LEASE_TTL_S / 6)
_TOKEN = uuid.uuid4().hex          # this process
LiveJobs = Callable[[], Optional[Mapping[str, str]]]


def no_scheduler() -> Optional[Mapping[str, str]]:
    """The ``live_jobs`` of a store opened without a scheduler: nothing known (pids and heartbeats decide)."""
    return None


def _proc_start(pid: int) -> Optional[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me() -> dict:
    return {"token": _TOKEN, "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
            "job_id": os.environ.get("SLURM_JOB_ID"), "procid": os.environ.get("SLURM_PROCID"),
            "array_task": (f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
                           if os.environ.get("SLURM_ARRAY_JOB_ID") else None),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def lease_alive(info: dict, mtime: float, live_jobs: LiveJobs = no_scheduler) -> tuple[bool, str]:
    """Is the holder of a lease still alive? (answer, why).

    ``live_jobs()``: {job id: state} of the jobs the scheduler still runs or queues, or None when it cannot
    tell (:func:`bayesflip.hpc.slurm.live_jobs`). A holder with a job id is alive while its job is listed;
    else a holder on this host while its pid lives (same start time); else while its heartbeat is recent."""
    jid = info.get("job_id")
    if jid:
        jobs = live_jobs()
        if jobs is not None:
            state = jobs.get(str(jid))
            return (state is not None, f"SLURM job {jid} {state or 'ended'}")
    if info.get("host") == socket.gethostname() and info.get("pid"):
        pid = int(info["pid"])
        alive = _proc_start(pid) is not None and _proc_start(pid) == info.get("pid_start")
        return alive, f"pid {pid} on {info['host']} {'running' if alive else 'gone'}"
    age = time.time() - mtime
    return age < LEASE_TTL_S, f"heartbeat {age:.0f} s ago (ttl {LEASE_TTL_S:.0f} s)"


def describe_holder(info: dict) -> str:
    job = f"SLURM job {info['job_id']}" + (f" (task {info['array_task']})" if info.get("array_task") else "") \
        if info.get("job_id") else "in-process run"
    return f"{job}, host {info.get('host')}, pid {info.get('pid')}, since {info.get('time')}"


class _Heartbeat:
    """One daemon thread per process: touches every held lease every HEARTBEAT_S seconds."""

    def __init__(self):
        self.paths: set[Path] = set()
        self.lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None

    def add(self, p: Path) -> None:
        with self.lock:
            self.paths.add(p)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="bayesflip-lease-heartbeat", daemon=True)
                self.thread.start()

    def discard(self, p: Path) -> None:
        with self.lock:
            self.paths.discard(p)

    def _run(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self.lock:
                paths = list(self.paths)
            for p in paths:
                try:
                    os.utime(p)
                except OSError:   # the lease was broken or removed: the write-time check notices
                    self.discard(p)


_HEARTBEAT = _Heartbeat()


class Leases:
    """Shard leases of one store (see the module docstring). ``live_jobs`` tells which scheduler jobs
    still run (:func:`lease_alive`); the store never asks the scheduler itself."""

    def __init__(self, store_path_: Path, live_jobs: LiveJobs = no_scheduler):
        self.dir = Path(store_path_).with_suffix(".leases")
        self.live_jobs = live_jobs

    def path(self, shard: int) -> Path:
        return self.dir / f"shard-{shard:06d}.lease"

    @contextmanager
    def locked(self, shard: int) -> Iterator[None]:
        """The shard's lock (``flock``, released when the process dies); :class:`LeaseLost` when it is not
        free within :data:`LOCK_WAIT_S` (its holder is stopped inside a microsecond section: let it be)."""
        p = self.dir / f"shard-{shard:06d}.lock"
        with ExitStack() as stack:
            try:
                stack.enter_context(file_lock(p, wait_s=LOCK_WAIT_S))
            except LockTimeout:
                raise LeaseLost(f"shard {shard}: lock {p} held for over {LOCK_WAIT_S:.0f} s by another "
                                f"process; nothing written") from None
            yield

    def token(self, shard: int) -> Optional[str]:
        """The token of the lease this process holds on the shard (the fencing token), else None."""
        got = self._read(self.path(shard))
        return got[0].get("token") if got is not None and self.is_mine(got[0]) else None

    @staticmethod
    def _read(p: Path) -> Optional[tuple[dict, float]]:
        try:
            return json.loads(p.read_text()), p.stat().st_mtime
        except FileNotFoundError:
            return None
        except (OSError, ValueError):      # torn / unreadable lease: treat as a dead holder
            try:
                return {"token": "unreadable"}, 0.0
            except OSError:
                return None

    @staticmethod
    def is_mine(info: dict) -> bool:
        if info.get("token") == _TOKEN:
            return True
        jid = os.environ.get("SLURM_JOB_ID")
        if jid and info.get("job_id") == jid:      # same SLURM job: a requeued run or another TP rank
            other_live = (info.get("host") == socket.gethostname() and info.get("pid") != os.getpid()
                          and info.get("procid") == os.environ.get("SLURM_PROCID")
                          and _proc_start(int(info.get("pid") or 0)) == info.get("pid_start"))
            return not other_live
        return False

    def _link_new(self, p: Path, me: dict, replace: bool = False) -> bool:
        tmp = self.dir / f".tmp-{_TOKEN}-{p.stem}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(me))
            if replace:
                os.replace(tmp, p)
                return True
            try:
                os.link(tmp, p)            # atomic create-if-absent, whole content at once
                return True
            except FileExistsError:
                return False
        except OSError as e:
            raise StoreWriteError(f"cannot write lease {p}: {e.strerror or e}") from None
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def holder(self, shard: int) -> Optional[dict]:
        """The live holder of a shard's lease that is not this process/job, else None."""
        got = self._read(self.path(shard))
        if got is None:
            return None
        info, mtime = got
        if self.is_mine(info):
            return None
        alive, why = lease_alive(info, mtime, self.live_jobs)
        return {**info, "why": why} if alive else None

    def live_holders(self) -> dict[int, dict]:
        out = {}
        if self.dir.is_dir():
            for p in self.dir.glob("shard-*.lease"):
                try:
                    shard = int(p.stem.split("-")[1])
                except (IndexError, ValueError):
                    continue
                h = self.holder(shard)
                if h is not None:
                    out[shard] = h
        return out

    def acquire(self, shard: int) -> tuple[bool, Optional[dict]]:
        """(True, None) when this process now holds the shard; (False, holder) when a live job does.
        Under the shard's lock: a takeover never interleaves with the old holder's fenced write."""
        try:
            with self.locked(shard):
                return self._acquire(shard)
        except LeaseLost as e:
            return False, {"why": str(e)}

    def _acquire(self, shard: int) -> tuple[bool, Optional[dict]]:
        p = self.path(shard)
        me = _me()
        for _ in range(5):
            if self._link_new(p, me):
                _HEARTBEAT.add(p)
                return True, None
            got = self._read(p)
            if got is None:
                continue
            info, mtime = got
            if self.is_mine(info):
                self._link_new(p, me, replace=True)
                _HEARTBEAT.add(p)
                return True, None
            alive, why = lease_alive(info, mtime, self.live_jobs)
            if alive:
                return False, {**info, "why": why}
            broken = p.with_name(f"{p.name}.stale-{_TOKEN}")   # break it: rename, then make sure it was that one
            try:
                os.rename(p, broken)
            except FileNotFoundError:
                continue
            got2 = self._read(broken)
            if got2 is not None and got2[0].get("token") != info.get("token"):
                try:                                           # a fresh lease slipped in: put it back
                    os.link(broken, p)
                except FileExistsError:
                    pass
                os.unlink(broken)
                return False, {**got2[0], "why": "just taken"}
            os.unlink(broken)
        return False, {"why": "lease contended"}

    def holds(self, shard: int) -> bool:
        got = self._read(self.path(shard))
        return got is not None and self.is_mine(got[0])

    def release(self, shard: int) -> None:
        """Remove the shard's lease if it is still ours (checked under the lock: never another's lease)."""
        p = self.path(shard)
        _HEARTBEAT.discard(p)
        try:
            with self.locked(shard):
                if self.holds(shard):
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        pass
        except LeaseLost:       # the lock is taken: whoever has it now owns the shard
            pass


# ---------------------------------------------------------------------- store
class ResultStore:
    """One Zarr store plus its per-shard completion records and leases.

    ``live_jobs`` goes to the store's :class:`Leases` (which scheduler jobs still run); without it a lease's
    holder is judged by its pid and heartbeat alone. Whoever takes or reports leases passes
    :func:`bayesflip.hpc.slurm.live_jobs`."""

    def __init__(self, path: Path, live_jobs: LiveJobs = no_scheduler):
        self.path = Path(path)
        self.records_dir = self.path.with_suffix(".records")
        self.leases = Leases(self.path, live_jobs)
        self._attrs: Optional[dict] = None

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: Path, arrays: dict[str, ArraySpec], cells: list[dict], shard_size: int,
               labels: dict[str, list], attrs: dict, overwrite: bool = False,
               live_jobs: LiveJobs = no_scheduler) -> "ResultStore":
        """Create (or re-open an identical) store. A different identity is an error unless overwrite."""
        st = cls(path, live_jobs)
        layout.check_names({k: v.dims for k, v in arrays.items()}, {k: v.shape for k, v in arrays.items()},
                           list(cells[0]) if cells else [], labels)
        if "identity" not in attrs:   # synthetic / hand-made provenance: identity from what it has
            ident = {k: attrs.get(k) for k in IDENTITY_FIELDS}
            ident["code_version"] = CODE_VERSION
            attrs = {**attrs, "identity": ident, "identity_hash": identity_hash(ident)}
        if overwrite:
            for p in (st.path, st.records_dir, st.path.with_suffix(".leases"), st.path.with_suffix(".work")):
                if p.exists():
                    shutil.rmtree(p)
        if st.path.exists():
            damaged = st.damage()
            if damaged:     # never trusted, never deleted: moved aside, then a fresh store (new uid)
                aside = st.path.with_name(f"{st.path.name}.damaged-{_dt.datetime.now():%Y%m%dT%H%M%S}")
                try:
                    os.rename(st.path, aside)
                except FileNotFoundError:       # a concurrent planner moved it first
                    pass
                except OSError as e:
                    raise StoreWriteError(f"store {st.path} is damaged ({damaged}) and cannot be moved aside: "
                                          f"{e.strerror or e}") from None
                import logging
                logging.getLogger(__name__).warning("store %s is damaged (%s): moved to %s, creating a fresh one",
                                                    st.path, damaged, aside)
                st._attrs = None
        if st.path.exists() and (st.path / "zarr.json").exists():
            old = st.attrs
            diff = identity_diff(old.get("identity"), attrs["identity"])
            if diff:
                raise StoreIdentityError(f"{st.path} holds results of another identity ({'; '.join(diff)}); "
                                         f"re-run with --overwrite or use another sweep name")
            return st
        tmp = None
        try:
            st.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=st.path.name + ".tmp-", dir=st.path.parent))
            root = zarr.open_group(tmp, mode="w")
            n = len(cells)
            for name, spec in arrays.items():
                dtype = str if spec.dtype == "str" else spec.dtype
                root.create_array(name, shape=(n, *spec.shape), chunks=(shard_size, *spec.shape), dtype=dtype,
                                  fill_value=spec.fill, dimension_names=("cell", *spec.dims))
            cell_coords = {f: layout.np_coord([c[f] for c in cells]) for f in (cells[0].keys() if cells else [])}
            extra = layout.write_coords(root, {k: v.dims for k, v in arrays.items()},
                                        {k: v.shape for k, v in arrays.items()}, cell_coords,
                                        {d: layout.np_coord(list(v)) for d, v in labels.items()}, n, shard_size)
            n_shards = (n + shard_size - 1) // shard_size
            root.attrs.update({**attrs, **extra, "n_cells": n, "n_shards": n_shards, "store_uid": uuid.uuid4().hex,
                               "store_format": STORE_FORMAT,
                               "arrays": {k: {"dims": ["cell", *v.dims], "dtype": v.dtype} for k, v in arrays.items()}})
            layout.consolidate(tmp)
            try:
                os.replace(tmp, st.path)  # atomic: concurrent creators see a whole store or none
                tmp = None
            except OSError as e:
                if not (st.path / "zarr.json").exists():
                    raise StoreWriteError(f"cannot create store {st.path}: the path exists but is not a Zarr store "
                                          f"(no zarr.json); remove it or re-run with --overwrite") from None
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                diff = identity_diff(st.attrs.get("identity"), attrs["identity"])   # a concurrent creator won
                if diff:
                    raise StoreIdentityError(f"{st.path} holds results of another identity ({'; '.join(diff)})") from e
        except OSError as e:
            raise StoreWriteError(f"cannot create store {st.path}: {e.strerror or e}"
                                  + (f" ({e.filename})" if getattr(e, "filename", None) else "")) from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return st

    def damage(self) -> Optional[str]:
        """None when the store's metadata (group, every array, coords, labels) opens, else why not."""
        if not (self.path / "zarr.json").exists():
            return "no zarr.json"
        try:
            g = zarr.open_group(self.path, mode="r", use_consolidated=False)   # each array's own zarr.json
            attrs: dict[str, Any] = dict(g.attrs)
            for k in ("n_cells", "n_shards", "shard_size", "arrays"):
                if k not in attrs:
                    return f"attribute {k!r} missing"
            for name in attrs["arrays"]:
                _ = g[name].metadata   # reading the metadata is the check
            for a in layout.coord_arrays(g, attrs):
                _ = a.metadata
        except Exception as e:  # any unreadable metadata means the store cannot be trusted
            return f"{type(e).__name__}: {e}"
        return None

    def integrity(self) -> Optional[str]:
        """None when what ``status``/``reduce`` are about to trust is self-consistent, else why not: a layout or
        format this bayesflip does not read (:func:`version_problem`); ``n_shards`` against ``n_cells`` /
        ``shard_size``, the config's ``shard_size`` and every data array's length; the identity hash recomputed
        from the identity (an edited attribute). The config itself is not re-hashed: a plug-in's hand-made
        provenance may name its own ``config_hash``."""
        a = self.read_attrs()
        v = version_problem(a)
        if v:
            return v
        try:
            n, size, ns = int(a["n_cells"]), int(a["shard_size"]), int(a["n_shards"])
        except (KeyError, TypeError, ValueError) as e:
            return f"attribute n_cells/shard_size/n_shards unreadable ({type(e).__name__}: {e})"
        if size < 1 or ns != -(-n // size):
            return (f"n_shards={ns} does not match n_cells={n} / shard_size={size} (= {-(-n // max(size, 1))} shards): "
                    f"attributes edited?")
        cfg = a.get("config")
        if isinstance(cfg, dict) and "shard_size" in cfg and cfg["shard_size"] != size:
            return f"shard_size={size} but its config says shard_size={cfg['shard_size']}: attributes edited?"
        g = zarr.open_group(self.path, mode="r")
        for name in a.get("arrays", {}):
            arr = g[name]
            if not isinstance(arr, zarr.Array):
                return f"{name!r} is not an array: store damaged?"
            if arr.shape[0] != n:
                return f"array {name!r} holds {arr.shape[0]} cells, n_cells={n}: attributes edited?"
        ident = a.get("identity")
        if isinstance(ident, dict):
            if identity_hash(ident) != a.get("identity_hash"):
                return (f"identity_hash {a.get('identity_hash')} is not the hash of its identity "
                        f"({identity_hash(ident)}): attributes edited?")
        return None

    @property
    def group(self):
        return zarr.open_group(self.path, mode="r+")

    @property
    def attrs(self) -> dict:
        if self._attrs is None:
            self._attrs = self.read_attrs()
        return self._attrs

    def update_attrs(self, **values) -> None:
        """Change root attributes after creation; re-consolidates the metadata (layout 3), else readers
        using the consolidated copy (xarray, zarr) would still see the old values."""
        g = zarr.open_group(self.path, mode="r+", use_consolidated=False)
        g.attrs.update(values)
        if layout.is_current(dict(g.attrs)):
            layout.consolidate(self.path)
        self._attrs = None

    def read_attrs(self) -> dict:
        """The attributes as they are on disk now (not cached)."""
        return dict(zarr.open_group(self.path, mode="r").attrs)

    @property
    def exists(self) -> bool:
        return (self.path / "zarr.json").exists()

    @property
    def uid(self) -> Optional[str]:
        return self.attrs.get("store_uid")

    @property
    def n_shards(self) -> int:
        return int(self.attrs["n_shards"])

    def shard_slice(self, shard: int) -> slice:
        a = self.attrs
        lo = shard * a["shard_size"]
        return slice(lo, min(lo + a["shard_size"], a["n_cells"]))

    def cells(self) -> list[dict]:
        cols, _ = layout.read_coords(zarr.open_group(self.path, mode="r"), self.attrs)
        names = sorted(cols)
        n = self.attrs["n_cells"]
        return [{k: (cols[k][i].item() if hasattr(cols[k][i], "item") else cols[k][i]) for k in names} for i in range(n)]

    # ------------------------------------------------------------------ records
    def _record_path(self, shard: int) -> Path:
        return self.records_dir / f"shard-{shard:06d}.json"

    def write_record(self, shard: int, status: str, **data) -> None:
        rec = {"shard": shard, "status": status, "host": socket.gethostname(),
               "job_id": os.environ.get("SLURM_JOB_ID"), "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
               "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "store_uid": self.uid if self.exists else None,
               "identity_hash": self.attrs.get("identity_hash") if self.exists else None,
               "code_version": CODE_VERSION, **data}
        if status != "done":
            self._mark(shard, False)
        atomic_write_text(self._record_path(shard), json.dumps(rec, default=str))
        if status == "done":        # after the record: verified=True always has a done record behind it
            self._mark(shard, True)

    def _mark(self, shard: int, value: bool) -> None:
        """set_verified that never hides the record being written: the record is the truth (readers
        re-verify it) and the next plan re-syncs a flag that could not be written."""
        if not self.exists:
            return
        try:
            self.set_verified(shard, value)
        except Exception as e:  # noqa: BLE001 -- a flag must never stop a record (the truth) being written
            import logging
            logging.getLogger(__name__).warning("%s: verified flag of shard %d not updated (%s: %s); the next "
                                                "plan re-syncs it", self.path, shard, type(e).__name__, e)

    def records(self) -> dict[int, dict]:
        """shard → record; a record that cannot be parsed or lacks ``shard``/``status`` becomes
        ``{"status": "corrupt-record", "error": ...}`` for that shard only."""
        out = {}
        if self.records_dir.exists():
            for p in sorted(self.records_dir.glob("shard-*.json")):
                try:
                    shard = int(p.stem.split("-")[1])
                except (IndexError, ValueError):
                    continue
                try:
                    rec = json.loads(p.read_text())
                    if not isinstance(rec, dict):
                        raise ValueError("not a JSON object")
                    missing = [k for k in ("shard", "status") if k not in rec]
                    if missing:
                        raise ValueError(f"missing field(s) {missing}")
                    if rec["shard"] != shard:
                        raise ValueError(f"field shard={rec['shard']!r} in the file of shard {shard}")
                except (ValueError, OSError, UnicodeDecodeError) as e:  # a torn record counts as not done
                    rec = {"shard": shard, "status": "corrupt-record", "error": f"record {p}: {e}"}
                out[shard] = rec
        return out

    def chunk_files(self, shard: int) -> dict[str, Path]:
        """array name → the file of its chunk for this shard."""
        g = zarr.open_group(self.path, mode="r")
        out = {}
        for name in self.attrs["arrays"]:
            a = layout.array(g, name)
            key = a.metadata.encode_chunk_key((shard,) + (0,) * (a.ndim - 1))
            out[name] = self.path / a.path / key
        return out

    def verify(self, shard: int, rec: dict) -> Optional[str]:
        """None when every chunk of the shard matches the record's checksums, else what is wrong."""
        sums = rec.get("checksums")
        if not isinstance(sums, dict):
            return f"record {self._record_path(shard)} has no chunk checksums"
        for name, path in self.chunk_files(shard).items():
            if name not in sums:
                return f"record {self._record_path(shard)} has no checksum of array {name!r}"
            got = checksum_file(path)
            if got != sums[name]:
                if got is None:
                    return f"chunk file {path} (array {name!r}) is missing"
                if sums[name] is None:
                    return f"chunk file {path} (array {name!r}) should not exist (all-fill chunk)"
                return f"chunk file {path} (array {name!r}) does not match its checksum"
        return None

    def shard_states(self, verify: bool = True) -> dict[int, ShardState]:
        """Every shard's state; ``done`` only for a complete record of this store whose chunks verify."""
        recs = self.records()
        uid = self.uid
        out = {}
        for s in range(self.n_shards):
            out[s] = self.classify(s, recs.get(s), uid, verify)
        return out

    def classify(self, shard: int, rec: Optional[dict], uid: Optional[str] = None, verify: bool = True) -> ShardState:
        uid = uid or self.uid
        if rec is None:
            return ShardState("pending", "missing", "", None)
        status = rec.get("status")
        if status == "corrupt-record":
            return ShardState("corrupt", "corrupt-record", str(rec.get("error")), rec)
        if rec.get("store_uid") not in (None, uid) or (status == "done" and rec.get("store_uid") != uid):
            return ShardState("corrupt", "stale-record",
                              f"record {self._record_path(shard)} belongs to another store (uid "
                              f"{rec.get('store_uid')}, this store {uid}): not trusted", rec)
        if status == "failed":
            return ShardState("failed", "failed", str(rec.get("error", "failed")), rec)
        if status != "done":
            return ShardState("corrupt", "corrupt-record",
                              f"record {self._record_path(shard)}: unknown status {status!r}", rec)
        missing = [k for k in DONE_FIELDS if k not in rec]
        if missing:
            return ShardState("corrupt", "corrupt-record",
                              f"record {self._record_path(shard)} lacks field(s) {missing}", rec)
        if rec.get("identity_hash") != self.attrs.get("identity_hash"):
            return ShardState("corrupt", "stale-record",
                              f"record {self._record_path(shard)} has identity {rec.get('identity_hash')}, "
                              f"store {self.attrs.get('identity_hash')}", rec)
        if verify:
            bad = self.verify(shard, rec)
            if bad:
                return ShardState("corrupt", "corrupt-chunk", bad, rec)
        return ShardState("done", "done", "", rec)

    def shard_state(self, shard: int) -> ShardState:
        """One shard, read fresh from disk."""
        recs = {}
        p = self._record_path(shard)
        if p.exists():
            recs = {k: v for k, v in self.records().items() if k == shard}
        return self.classify(shard, recs.get(shard))

    def done_shards(self) -> set[int]:
        return {s for s, r in self.shard_states().items() if r.state == "done"}

    def pending_shards(self) -> list[int]:
        done = self.done_shards()
        return [s for s in range(self.n_shards) if s not in done]

    # ------------------------------------------------------------------ writing
    def check_writable(self, expect_uid: Optional[str] = None, expect_identity: Optional[dict] = None,
                       shard: Optional[int] = None) -> None:
        """Right before writing: the store on disk is still the one we planned against, of our identity,
        and (when ``shard`` is given) we still hold its lease."""
        if not self.exists:
            raise StoreIdentityError(f"{self.path} no longer exists (deleted or overwritten): nothing written")
        now = self.read_attrs()
        if expect_uid is not None and now.get("store_uid") != expect_uid:
            raise StoreIdentityError(f"{self.path} was replaced while this job ran (store uid {now.get('store_uid')}, "
                                     f"the job started on {expect_uid}): nothing written")
        if expect_identity is not None:
            diff = identity_diff(now.get("identity"), expect_identity)
            if diff:
                raise StoreIdentityError(f"{self.path}: this job's identity differs from the store's "
                                         f"({'; '.join(diff)}); nothing written (re-run with --overwrite or "
                                         f"another sweep name)")
        if shard is not None and not self.leases.holds(shard):
            raise LeaseLost(f"{self.path} shard {shard}: lease lost to another job; nothing written")

    def write_shard(self, shard: int, arrays: dict[str, np.ndarray], expect_uid: Optional[str] = None,
                    expect_identity: Optional[dict] = None, require_lease: bool = False, **record) -> None:
        g = self.group
        sl = self.shard_slice(shard)
        n = sl.stop - sl.start
        expected = set(self.attrs["arrays"])
        if set(arrays) != expected:
            raise ValueError(f"shard {shard}: family returned arrays {sorted(arrays)}, store has {sorted(expected)}")
        for name, a in arrays.items():
            if np.asarray(a).shape[0] != n:
                raise ValueError(f"shard {shard}: array {name} has {np.asarray(a).shape[0]} cells, expected {n}")
        lease = shard if require_lease else None
        try:
            with self.fenced(shard, expect_uid, expect_identity, require_lease):
                try:                                  # not done while its chunks change
                    os.unlink(self._record_path(shard))
                except FileNotFoundError:
                    pass
                self.set_verified(shard, False)
            for name, a in arrays.items():
                g[name][sl] = np.asarray(a)
            sums = {name: checksum_file(p) for name, p in self.chunk_files(shard).items()}
        except OSError as e:
            raise StoreWriteError(f"cannot write shard {shard} of {self.path}: {e.strerror or e}"
                                  + (f" ({e.filename})" if getattr(e, "filename", None) else "")) from None
        self.check_writable(expect_uid, expect_identity, lease)       # cheap early exit, not the fence
        if FENCE_HOOK is not None:
            FENCE_HOOK("before-record", shard)
        with self.fenced(shard, expect_uid, expect_identity, require_lease) as fence:
            self.write_record(shard, "done", n_cells=n, checksums=sums, **fence, **record)

    @contextmanager
    def fenced(self, shard: int, expect_uid: Optional[str] = None, expect_identity: Optional[dict] = None,
               require_lease: bool = True) -> Iterator[dict]:
        """Hold the shard's lock and check, inside it, that the store is still ours and (``require_lease``)
        that we still hold the shard's lease: what is written in the block is written only by the lease's
        holder at write time. Yields ``{"lease_token": ...}`` for the record (empty without a lease)."""
        if not require_lease:
            self.check_writable(expect_uid, expect_identity)
            yield {}
            return
        with self.leases.locked(shard):
            self.check_writable(expect_uid, expect_identity, shard)
            yield {"lease_token": self.leases.token(shard)}

    def read(self, name: str) -> np.ndarray:
        return layout.read_array(zarr.open_group(self.path, mode="r"), name)

    def labels(self) -> dict[str, np.ndarray]:
        return layout.read_coords(zarr.open_group(self.path, mode="r"), self.attrs)[1]

    # ------------------------------------------------------------------ the ``verified`` coordinate
    def set_verified(self, shard: int, value: bool) -> None:
        """Mark the cells of a shard (layout 3 only; one chunk per shard, so writers never share a chunk)."""
        if not layout.is_current(self.read_attrs()):
            return
        try:
            layout.array(zarr.open_group(self.path, mode="r+"), "verified")[self.shard_slice(shard)] = value
        except OSError as e:
            raise StoreWriteError(f"cannot mark shard {shard} of {self.path} verified={value}: {e.strerror or e}") from None

    def sync_verified(self, states: Optional[dict[int, ShardState]] = None) -> int:
        """Set ``verified`` from the shards' checked states; returns how many shards changed."""
        if not layout.is_current(self.attrs):
            return 0
        states = states if states is not None else self.shard_states()
        flags = layout.read_array(zarr.open_group(self.path, mode="r"), "verified")
        changed = 0
        for s, ss in states.items():
            want = ss.state == "done"
            sl = self.shard_slice(s)
            if bool(flags[sl].all()) != want or bool(flags[sl].any()) != want:
                self.set_verified(s, want)
                changed += 1
        return changed
