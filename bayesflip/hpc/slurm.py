"""Every call to SLURM's command-line tools, and their parsers, in one place.

* :func:`available` — ``sinfo`` and ``sbatch`` are on PATH (a login node); :func:`cluster_up` — ``sinfo`` answers.
* :func:`task_states` — ``sacct -X`` states of every task of some arrays/jobs (``{"123_4": "RUNNING"}``),
  topped up from ``squeue`` (it knows a job the moment ``sbatch`` returns; slurmdbd can lag by seconds).
  sacct's output is read by submitit's own parser (:class:`submitit.slurm.slurm.SlurmInfoWatcher`, which
  expands ``123_[2-5%2]`` through :func:`submitit.slurm.slurm.read_job_id`).
* :func:`queued_states` — squeue's running/queued tasks of some arrays (the fallback when sacct fails);
* :func:`live_jobs` — ``{job id: state}`` of every job SLURM still runs or queues, from ``squeue`` (cached
  :data:`LIVE_JOBS_MAX_AGE_S`); None when squeue is unavailable. This is the callable the shard leases of
  :class:`bayesflip.store.Leases` are given to tell a live holder from a dead one.
* :func:`scancel`, :func:`hostnames` (``scontrol show hostnames``), :func:`max_array_size` (``scontrol show config``), :func:`query_partition` /
  :func:`partition_names` (``scontrol show partition`` + ``sinfo`` per node), with the parsers of SLURM
  durations and Gres strings.

Contract: the functions that *describe* (``task_states``, ``live_jobs``, ``max_array_size``) never raise for
an absent or failing SLURM except ``task_states`` (``RuntimeError`` naming sacct's message: status reports
it and goes on, ``--overwrite`` refuses); ``query_partition`` raises :class:`~bayesflip.errors.ConfigError`
naming the key (a submission is checked before anything goes out). Nothing here imports the rest of bayesflip
but :mod:`bayesflip.errors`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from ..errors import ConfigError

ACTIVE = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"})
QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD", "STOPPED"})
FAILED = frozenset({"FAILED", "TIMEOUT", "CANCELLED", "PREEMPTED", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                    "DEADLINE", "REVOKED", "SPECIAL_EXIT"})
LIVE = ACTIVE | QUEUED               # a job in one of these states may still run (and hold leases)
LIVE_JOBS_MAX_AGE_S = 3.0            # live_jobs() answers from a squeue this recent
TIMEOUT_S = 30


def available() -> bool:
    """SLURM's client tools are here (``sinfo`` and ``sbatch`` on PATH)."""
    return shutil.which("sinfo") is not None and shutil.which("sbatch") is not None


def cluster_up() -> bool:
    """``sbatch`` is on PATH and ``sinfo`` answers (a controller is reachable)."""
    if shutil.which("sbatch") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=TIMEOUT_S).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# ---------------------------------------------------------------------- job states
def _state(text: str) -> str:
    """``CANCELLED by 0`` → ``CANCELLED``; empty → ``UNKNOWN``."""
    return text.split()[0] if text.strip() else "UNKNOWN"


@dataclass(frozen=True)
class QueueEntry:
    """One line of ``squeue -r``: the job's own id (``%A``: unique per array task), its display id
    (``%i``: ``123_4`` for an array task) and its state."""

    job_id: str
    task_id: str
    state: str


def squeue() -> Optional[list[QueueEntry]]:
    """Every job SLURM knows now (every partition, one line per array task); None if squeue is unavailable."""
    if shutil.which("squeue") is None:
        return None
    try:
        r = subprocess.run(["squeue", "-h", "-a", "-r", "-o", "%A|%i|%T"], capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    out = []
    for ln in r.stdout.splitlines():
        parts = [x.strip() for x in ln.split("|")]
        if len(parts) == 3:
            out.append(QueueEntry(*parts))
    return out


def parse_sacct(text: str) -> dict[str, str]:
    """``sacct -P -o JobID,State`` output (with its header line) → ``{task id: state}``, array ranges
    (``123_[2-5%2]``, ``123_[1,3-4]``) expanded to one entry per task, by submitit's parser."""
    from submitit.slurm.slurm import SlurmInfoWatcher     # submitit on demand: the planner imports this module

    return {jid: _state(info.get("State", "")) for jid, info in SlurmInfoWatcher().read_info(text).items()}


def task_states(array_ids: Iterable[str]) -> dict[str, str]:
    """``sacct -X`` states of every task of the given arrays/jobs: ``{'123_4': 'RUNNING', ...}``, then
    every task squeue shows running or queued (sacct can lag behind sbatch by seconds).

    Raises ``RuntimeError`` when sacct is unavailable or fails."""
    ids = sorted({str(a) for a in array_ids if a})
    if not ids:
        return {}
    try:
        r = subprocess.run(["sacct", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State"],
                           capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"sacct failed: {e}") from None
    if r.returncode != 0:
        raise RuntimeError(f"sacct failed: {r.stderr.strip()}")
    out = parse_sacct(r.stdout)
    wanted = set(ids)
    for q in squeue() or []:
        if q.task_id.split("_")[0] in wanted and q.state in LIVE:
            out[q.task_id] = q.state
    return out


def queued_states(array_ids: Iterable[str]) -> Optional[dict[str, str]]:
    """squeue's view of the given arrays/jobs: every task still running or queued (``{'123_4': 'PENDING'}``;
    a finished task is simply absent); None when squeue is unavailable or fails. What ``status`` and
    ``resubmit`` fall back to when sacct fails: enough to know which shards are still owned by a task."""
    entries = squeue()
    if entries is None:
        return None
    wanted = {str(a) for a in array_ids if a}
    return {q.task_id: q.state for q in entries if q.task_id.split("_")[0] in wanted and q.state in LIVE}


_live_cache: dict = {"t": 0.0, "jobs": None}


def live_jobs() -> Optional[dict[str, str]]:
    """``{job id: state}`` of every job SLURM still runs or queues (the id a task sees as ``SLURM_JOB_ID``);
    None when squeue is unavailable (callers fall back to pids and heartbeats)."""
    now = time.time()
    if _live_cache["jobs"] is not None and now - _live_cache["t"] < LIVE_JOBS_MAX_AGE_S:
        return _live_cache["jobs"]
    entries = squeue()
    if entries is None:
        return None
    jobs = {q.job_id: q.state for q in entries if q.state in LIVE}
    _live_cache.update(t=now, jobs=jobs)
    return jobs


def scancel(job_ids: Iterable[str]) -> None:
    """Cancel these jobs/arrays (whatever scancel says: the caller checks the states afterwards)."""
    ids = [str(j) for j in job_ids]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)


def hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames`` of a SLURM node list (``node[1-3]`` → ``["node1", "node2", "node3"]``);
    [] when scontrol is unavailable or fails."""
    try:
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return []
    return r.stdout.split() if r.returncode == 0 else []


def max_array_size() -> Optional[int]:
    """SLURM's MaxArraySize (``scontrol show config``): an array holds at most this many tasks; None if unknown."""
    try:
        r = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for ln in r.stdout.splitlines():
        if ln.strip().startswith("MaxArraySize"):
            try:
                return int(ln.split("=", 1)[1].strip())
            except ValueError:
                return None
    return None


# ---------------------------------------------------------------------- partitions
@dataclass
class PartitionInfo:
    """What one partition offers per node (max over its nodes) and per job."""

    name: str
    state: str
    max_time_min: Optional[int]      # None = UNLIMITED
    max_nodes: Optional[int]         # None = UNLIMITED
    total_nodes: int
    cpus_per_node: int
    mem_mb_per_node: int
    gpus_per_node: int


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError("partition", f"cannot query SLURM ({' '.join(cmd)}): {e}") from None


def parse_slurm_time(text: str) -> Optional[int]:
    """SLURM durations → minutes (rounded up): ``[D-]HH:MM:SS``, ``D-HH[:MM]``, ``MM:SS``, ``MM``.
    ``UNLIMITED``/``INFINITE``/``NONE`` → None."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        parts = [int(x) for x in text.split(":")] + [0] * (3 - len(text.split(":")))
        h, m, s = parts[:3]
    else:
        parts = [int(x) for x in text.split(":")]
        if len(parts) == 3:
            h, m, s = parts
        elif len(parts) == 2:
            h, (m, s) = 0, parts
        else:
            h, m, s = 0, parts[0], 0
    return days * 1440 + h * 60 + m + (1 if s else 0)


def parse_gres_gpus(gres: str) -> int:
    """GPU count of a node's Gres string, e.g. ``gpu:a100:4(S:0-1),shard:8`` → 4; ``(null)`` → 0."""
    n = 0
    for item in re.split(r",(?![^()]*\))", gres or ""):
        item = re.sub(r"\(.*\)", "", item).strip()
        if not item.startswith("gpu"):
            continue
        last = item.split(":")[-1]
        n += int(last) if last.isdigit() else 1
    return n


def _scontrol_fields(line: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)


def partition_names() -> list[str]:
    out = _run(["sinfo", "-h", "-o", "%R"])
    return sorted(set(out.stdout.split()))


def query_partition(name: str, key: str = "partition") -> PartitionInfo:
    """Read a partition's limits and its nodes' resources from the running SLURM."""
    sc = _run(["scontrol", "show", "partition", name, "-o"])
    if sc.returncode != 0 or not sc.stdout.strip():
        raise ConfigError(key, f"unknown partition {name!r} ({(sc.stderr or sc.stdout).strip()})",
                          allowed=partition_names())
    f = _scontrol_fields(sc.stdout)
    nodes = _run(["sinfo", "-h", "-N", "-p", name, "-o", "%N|%c|%m|%G"])
    if nodes.returncode != 0:
        raise ConfigError("partition", f"sinfo failed for partition {name!r}: {nodes.stderr.strip()}")
    cpus, mems, gpus, names = [0], [0], [0], set()
    for line in nodes.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        names.add(parts[0])
        cpus.append(int(re.sub(r"\D", "", parts[1]) or 0))
        mems.append(int(re.sub(r"\D", "", parts[2]) or 0))
        gpus.append(parse_gres_gpus(parts[3]))
    cpu, mem = max(cpus), max(mems)
    if f.get("MaxCPUsPerNode", "UNLIMITED").isdigit():
        cpu = min(cpu, int(f["MaxCPUsPerNode"]))
    if f.get("MaxMemPerNode", "UNLIMITED").isdigit():
        mem = min(mem, int(f["MaxMemPerNode"]))
    max_nodes = f.get("MaxNodes", "UNLIMITED")
    return PartitionInfo(name=name, state=f.get("State", "?"), max_time_min=parse_slurm_time(f.get("MaxTime", "")),
                         max_nodes=int(max_nodes) if max_nodes.isdigit() else None,
                         total_nodes=int(f.get("TotalNodes", len(names)) or len(names)),
                         cpus_per_node=cpu, mem_mb_per_node=mem, gpus_per_node=max(gpus))
