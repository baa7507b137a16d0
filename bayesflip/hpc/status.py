"""Sweep status: per model × experiment, shards done / running / pending / failed.

Sources, in order of authority:

1. the stores' per-shard records (``<model>.records/shard-N.json``): ``done`` is final;
   ``failed`` carries the error;
2. SLURM (``sacct -X`` for the array ids of the manifest's submissions): the state of the
   latest task that was given the shard — RUNNING → running; PENDING/REQUEUED → pending
   (queued); FAILED/TIMEOUT/CANCELLED/PREEMPTED/OUT_OF_MEMORY/NODE_FAIL → failed, with the
   tail of the task's stderr as the message.

Per shard: a verified ``done`` record (complete, of this store, every chunk matching its
checksum) → done; a live lease (a SLURM task or in-process run computing it) → running; a
``failed`` record written after the latest submission of the shard → failed (a record older
than a resubmission is a previous attempt); else the SLURM state as above; a record that is
torn, incomplete, of another (deleted/overwritten) store, or whose chunks are missing or do
not match → corrupt (message names the file); a task that COMPLETED without a record for the
shard → failed; no task and no record → pending.

Store locations are always ``<results dir>/<sweep>/<experiment>/<model>.zarr`` under the
results directory given now, so a moved or copied sweep reads its own stores. A tensor-parallel
task (one SLURM task per rank) is one entry: ``sacct -X`` lists allocations, not steps or ranks.
``bayesflip status --sweep S --json`` prints the same as one JSON object.

Also here, for ``--overwrite`` (plan, debug, submit): :func:`active_jobs`, who still works on a sweep
(queued/running SLURM tasks of its manifest, live shard leases). SLURM is asked through
:mod:`bayesflip.hpc.slurm` only; the manifest is read as a :class:`~bayesflip.hpc.manifest.Manifest`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ..errors import BayesflipError, ConfigError, StoreIdentityError
from ..store import ResultStore, ShardState, describe_holder, store_path
from . import slurm
from .manifest import Manifest, ManifestError, parse_time
from .slurm import ACTIVE, FAILED, QUEUED

COLUMNS = ("done", "running", "pending", "failed", "corrupt")


@dataclass
class UnitStatus:
    experiment: str
    model: str
    n_shards: int
    shards: dict[int, str] = field(default_factory=dict)          # shard → done|running|queued|pending|failed|corrupt
    errors: dict[int, str] = field(default_factory=dict)          # shard → message

    def count(self, state: str) -> int:
        if state == "pending":   # queued in SLURM or not submitted at all
            return sum(1 for s in self.shards.values() if s in ("pending", "queued"))
        return sum(1 for s in self.shards.values() if s == state)


@dataclass
class SweepStatus:
    sweep: str
    units: list[UnitStatus]
    tasks: dict[str, str]               # job id (e.g. 123_4) → SLURM state
    task_errors: dict[str, str]         # failed job id → stderr tail
    n_submissions: int
    sacct_error: Optional[str] = None
    slurm_unknown: bool = False         # neither sacct nor squeue answered: queued/running tasks are unknown
    pending_submissions: list[str] = field(default_factory=list)   # recorded before sbatch, never completed

    def totals(self) -> dict[str, int]:
        return {c: sum(u.count(c) for u in self.units) for c in COLUMNS}


_EXC = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Failed|Interrupt|Exit)\b.*")
_SLURM_MSG = re.compile(r"(slurmstepd|srun): error: (?!.*Exited with exit code).*"
                        r"|.*(oom-kill|OUT OF MEMORY|DUE TO TIME LIMIT|DUE TO PREEMPTION|CANCELLED AT).*")


def log_error(path: str, max_lines: int = 8) -> str:
    """The failure of a task from its stderr log: the last exception line (+ its indented
    continuation lines) and SLURM's own error lines (OOM kill, time limit, cancel); else the tail."""
    p = Path(path)
    if not p.exists():
        return f"(no log at {p})"
    lines = [ln.rstrip() for ln in p.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    idx = [i for i, ln in enumerate(lines) if _EXC.match(ln)]
    picked: list[str] = []
    if idx:
        i = idx[-1]
        picked.append(lines[i])
        for ln in lines[i + 1:]:
            if not ln.startswith((" ", "\t")):
                break
            picked.append(ln)
    picked += [ln.strip() for ln in lines if _SLURM_MSG.search(ln)]
    if not picked:
        picked = [ln for ln in lines if "it/s]" not in ln and "/shard]" not in ln][-3:]
    return "\n".join(picked[:max_lines])


@dataclass(frozen=True)
class StoreUnit:
    """One (experiment, model) store of a sweep, at its path under the results dir given now."""

    experiment: str
    model: str
    store: Path
    n_shards: int


def manifest_units(manifest: Manifest, results_dir: Optional[Path] = None) -> list[StoreUnit]:
    """The manifest's units (latest plan) plus every (experiment, model) an earlier submission ran
    (a later submit for fewer models rewrites ``units`` but not the stores of the others).
    ``store`` is always the path under ``results_dir`` (never the absolute path of the manifest)."""
    sweep = manifest.sweep
    units = []
    seen = set()
    for u in manifest.units:
        seen.add((u.experiment, u.model))
        units.append(StoreUnit(u.experiment, u.model, store_path(sweep, u.experiment, u.model, results_dir),
                               int(u.n_shards)))
    for exp, model in manifest.submitted_units():
        if (exp, model) in seen:
            continue
        seen.add((exp, model))
        path = store_path(sweep, exp, model, results_dir)
        if (path / "zarr.json").exists():
            units.append(StoreUnit(exp, model, path, ResultStore(path).n_shards))
    return units


def sweep_status(manifest: Manifest, use_sacct: bool = True, results_dir: Optional[Path] = None) -> SweepStatus:
    """Classify every shard of every (experiment, model) store of the manifest."""
    latest = manifest.latest_tasks()
    states: dict[str, str] = {}
    sacct_error = None
    slurm_unknown = False
    if use_sacct and manifest.slurm_array_ids():
        try:
            states = slurm.task_states(manifest.slurm_array_ids())
        except RuntimeError as e:       # squeue still tells which tasks are queued/running
            queued = slurm.queued_states(manifest.slurm_array_ids())
            if queued is None:
                sacct_error, slurm_unknown = f"{e}; squeue failed too", True
            else:
                states, sacct_error = queued, f"{e}; queued/running tasks from squeue"
    task_errors: dict[str, str] = {}
    units = []
    for u in manifest_units(manifest, results_dir):
        us = UnitStatus(u.experiment, u.model, u.n_shards)
        st = ResultStore(u.store, slurm.live_jobs)
        if st.exists:
            try:
                bad = st.integrity()
                if bad is None and st.n_shards != u.n_shards:
                    bad = f"n_shards={st.n_shards}, but the manifest's plan has {u.n_shards}: attributes edited?"
                if bad is not None:
                    raise StoreIdentityError(bad)
                shard_states = st.shard_states()
                holders = st.leases.live_holders()
            except StoreIdentityError as e:     # not trusted: every planned shard is corrupt, with the reason
                shard_states = {s: ShardState("corrupt", "unreadable-store", f"store {st.path}: {e}")
                                for s in range(max(us.n_shards, st.n_shards))}
                holders = {}
            except Exception as e:   # unreadable metadata: every shard is corrupt, with the reason
                shard_states = {s: ShardState("corrupt", "unreadable-store", f"store {st.path}: "
                                              f"{type(e).__name__}: {e}") for s in range(us.n_shards)}
                holders = {}
            us.n_shards = len(shard_states)
        else:
            recs = st.records()
            msg = f"store {st.path} is missing (deleted or moved?)"
            shard_states = {s: (ShardState("corrupt", "stale-record", f"{msg}; its record is not trusted", recs[s])
                                if s in recs else ShardState("pending", "missing", msg)) for s in range(us.n_shards)}
            holders = {}
        for shard in range(us.n_shards):
            ss = shard_states[shard]
            rec = ss.record or {}
            job, when, stderr = latest.get((u.model, u.experiment, shard), (None, None, ""))
            task_state = states.get(job) if job else None
            rec_time = parse_time(rec.get("time"))
            if ss.state == "done":
                us.shards[shard] = "done"
            elif shard in holders:
                us.shards[shard] = "running"
                us.errors[shard] = f"being computed by {describe_holder(holders[shard])}"
            elif ss.state == "failed" and (job is None or when is None or (rec_time and rec_time >= when)):
                us.shards[shard] = "failed"
                us.errors[shard] = f"{ss.message} (job {rec.get('job_id')}, host {rec.get('host')})"
            elif task_state in ACTIVE:
                us.shards[shard] = "running"
            elif task_state in QUEUED:
                us.shards[shard] = "queued"
            elif ss.state == "corrupt":
                us.shards[shard] = "corrupt"
                us.errors[shard] = ss.message
            elif task_state in FAILED:
                us.shards[shard] = "failed"
                us.errors[shard] = f"SLURM task {job} {task_state}"
            elif task_state == "COMPLETED":
                us.shards[shard] = "failed"
                us.errors[shard] = f"task {job} COMPLETED without writing this shard"
            elif ss.state == "failed":
                us.shards[shard] = "failed"
                us.errors[shard] = ss.message
            else:
                us.shards[shard] = "pending"
                if ss.message:
                    us.errors[shard] = ss.message
        units.append(us)
    # failed SLURM tasks that still own an unfinished shard: their stderr tail (tracebacks, OOM, ...)
    unit_of = {(u.model, u.experiment): u for u in units}
    for (model, exp, shard), (job, _, stderr) in latest.items():
        us_ = unit_of.get((model, exp))
        if states.get(job) in FAILED and us_ is not None and us_.shards.get(shard) != "done" and job not in task_errors:
            task_errors[job] = f"{states[job]}: {log_error(stderr)}"
    tasks = dict(states)
    pending = [f"submission {p.uid} ({p.command or p.mode}, {p.time}) is pending: its submitter stopped between "
               f"sbatch and recording the arrays; jobs named bf-{manifest.sweep}-* may run untracked (squeue --name); "
               f"their leases keep any shard from being computed twice, `resubmit` submits only shards neither "
               f"done nor held" for p in manifest.pending_submissions()]
    return SweepStatus(manifest.sweep, units, tasks, task_errors, len(manifest.submissions), sacct_error,
                       slurm_unknown, pending)


def to_json(s: SweepStatus) -> dict:
    """One JSON object: per store the counts and every problem shard (state + message)."""
    stores = []
    for u in s.units:
        problems = [{"shard": sh, "state": u.shards[sh], "message": u.errors.get(sh, "")}
                    for sh in sorted(u.shards) if u.shards[sh] in ("failed", "corrupt")
                    or (u.shards[sh] != "done" and u.errors.get(sh))]
        stores.append({"experiment": u.experiment, "model": u.model, "store": f"{u.experiment}/{u.model}.zarr",
                       "total": u.n_shards, **{c: u.count(c) for c in COLUMNS},
                       "queued": sum(1 for v in u.shards.values() if v == "queued"), "problems": problems})
    return {"sweep": s.sweep, "submissions": s.n_submissions,
            "totals": {"total": sum(u.n_shards for u in s.units), **s.totals()},
            "stores": stores, "slurm_tasks": s.tasks, "task_errors": s.task_errors, "sacct_error": s.sacct_error,
            **({"pending_submissions": s.pending_submissions} if s.pending_submissions else {})}


def active_shards(manifest: Manifest, results_dir: Optional[Path] = None) -> set[tuple[str, str, int]]:
    """(model, experiment, shard) currently running or queued in SLURM (resubmit leaves them alone)."""
    s = sweep_status(manifest, results_dir=results_dir)
    if s.slurm_unknown:     # resubmitting now could submit shards a queued task still owns
        raise BayesflipError(f"cannot tell which tasks of sweep {manifest.sweep} are still queued or running "
                             f"({s.sacct_error}); nothing submitted — retry when SLURM answers")
    return {(u.model, u.experiment, sh) for u in s.units for sh, st in u.shards.items() if st in ("running", "queued")}


def bar(frac: float, width: int = 24) -> str:
    n = int(round(frac * width))
    return "[" + "#" * n + "-" * (width - n) + f"] {100 * frac:5.1f}%"


def render(s: SweepStatus) -> str:
    lines = [f"sweep {s.sweep}: {len(s.units)} store(s), {s.n_submissions} submission(s)"]
    w_e = max([10] + [len(u.experiment) for u in s.units])
    w_m = max([5] + [len(u.model) for u in s.units])
    lines.append(f"{'experiment':{w_e}s}  {'model':{w_m}s}  {'done':^9s} {'running':>7s} {'pending':>7s} "
                 f"{'failed':>6s} {'corrupt':>7s}  progress")
    for u in s.units:
        frac = u.count("done") / u.n_shards if u.n_shards else 1.0
        lines.append(f"{u.experiment:{w_e}s}  {u.model:{w_m}s}  {u.count('done'):>4d}/{u.n_shards:<4d} "
                     f"{u.count('running'):>7d} {u.count('pending'):>7d} {u.count('failed'):>6d} "
                     f"{u.count('corrupt'):>7d}  {bar(frac)}")
    t = s.totals()
    n = sum(u.n_shards for u in s.units)
    lines.append(f"{'total':{w_e + w_m + 2}s}  {t['done']:>4d}/{n:<4d} {t['running']:>7d} {t['pending']:>7d} "
                 f"{t['failed']:>6d} {t['corrupt']:>7d}  {bar(t['done'] / n if n else 1.0)}")
    queued = sum(1 for u in s.units for v in u.shards.values() if v == "queued")
    if queued:
        lines.append(f"({queued} of the pending shard(s) are queued in SLURM)")
    if s.tasks:
        counts: dict[str, int] = {}
        for v in s.tasks.values():
            counts[v] = counts.get(v, 0) + 1
        lines.append("SLURM tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if s.sacct_error:
        lines.append(f"SLURM state unavailable: {s.sacct_error}")
    lines += [f"warning: {p}" for p in s.pending_submissions]
    errs = [(u, sh, m) for u in s.units for sh, m in sorted(u.errors.items())
            if u.shards.get(sh) in ("failed", "corrupt")]
    if errs or s.task_errors:
        lines.append("failures / corrupt shards:")
        for u, sh, m in errs:
            lines.append(f"  {u.experiment}:{sh} ({u.model}): {m}")
        for job, m in sorted(s.task_errors.items()):
            lines.append(f"  task {job}: " + m.replace("\n", "\n      "))
        lines.append(f"resubmit what is missing: bayesflip resubmit --sweep {s.sweep}")
    return "\n".join(lines)


def active_jobs(sweep_name: str, root: Path, stores: Iterable[tuple[str, Path]]) -> list[str]:
    """Who is still working on the sweep: SLURM tasks of the manifest that are queued/running, and
    live shard leases (in-process runs or tasks) in its ``stores`` ((experiment, store path) pairs);
    one description each. Refuses (``--overwrite``) when SLURM cannot tell."""
    out = []
    if slurm.available() and Manifest.path(sweep_name, root).exists():
        try:
            manifest = Manifest.read(Manifest.path(sweep_name, root))
            states = slurm.task_states(manifest.slurm_array_ids())
        except (RuntimeError, ManifestError) as e:
            raise ConfigError("--overwrite", f"cannot tell whether jobs of {sweep_name} still run ({e}); "
                              f"refusing to delete its stores") from None
        out += [f"SLURM job {j} {v}" for j, v in sorted(states.items()) if v in ACTIVE | QUEUED]
    seen = set()
    for exp, path in stores:
        st = ResultStore(path, slurm.live_jobs)
        if path in seen or not st.records_dir.parent.exists():
            continue
        seen.add(path)
        for shard, h in sorted(st.leases.live_holders().items()):
            out.append(f"{exp}:{shard} held by {describe_holder(h)}")
    return out
