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
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..store import ResultStore, ShardState, describe_holder, store_path

ACTIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD", "STOPPED"}
FAILED = {"FAILED", "TIMEOUT", "CANCELLED", "PREEMPTED", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
          "REVOKED", "SPECIAL_EXIT"}
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

    def totals(self) -> dict[str, int]:
        return {c: sum(u.count(c) for u in self.units) for c in COLUMNS}


def _expand_array(spec: str) -> list[int]:
    """``2-5%2`` / ``1,3-4`` → task ids."""
    spec = spec.split("%")[0]
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def sacct_states(array_ids: list[str]) -> dict[str, str]:
    """``sacct -X`` states of every task of the given arrays/jobs: {'123_4': 'RUNNING', ...}.

    Raises ``RuntimeError`` when sacct is unavailable or fails (status reports it and goes on)."""
    ids = sorted({a for a in array_ids if a})
    if not ids:
        return {}
    try:
        r = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"sacct failed: {e}") from None
    if r.returncode != 0:
        raise RuntimeError(f"sacct failed: {r.stderr.strip()}")
    out: dict[str, str] = {}
    for line in r.stdout.splitlines():
        if "|" not in line:
            continue
        jid, state = line.split("|", 1)
        state = state.split()[0] if state.strip() else "UNKNOWN"   # "CANCELLED by 0" → CANCELLED
        m = re.fullmatch(r"(\d+)_\[(.+)\]", jid)
        if m:
            for t in _expand_array(m.group(2)):
                out[f"{m.group(1)}_{t}"] = state
        else:
            out[jid] = state
    # squeue knows a job the moment sbatch returns; sacct (slurmdbd) can lag by seconds
    try:
        q = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=30)
        lines = q.stdout.splitlines() if q.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        lines = []
    wanted = set(ids)
    for line in lines:
        if "|" not in line:
            continue
        jid, state = (x.strip() for x in line.split("|", 1))
        if jid.split("_")[0] in wanted and state in ACTIVE | QUEUED:
            out[jid] = state
    return out


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


def _parse_time(s: Optional[str]) -> Optional[_dt.datetime]:
    try:
        return _dt.datetime.fromisoformat(s) if s else None
    except ValueError:
        return None


def latest_tasks(manifest: dict) -> dict[tuple[str, str, int], tuple[str, Optional[_dt.datetime], str]]:
    """(model, experiment, shard) → (job id, submission time, stderr path) of the latest task given it."""
    out = {}
    for sub in manifest.get("submissions", []):
        when = _parse_time(sub.get("time"))
        for arr in sub.get("arrays", []):
            for t in arr.get("tasks", []):
                for exp, shard in t["work"]:
                    out[(arr["model"], exp, int(shard))] = (str(t["job_id"]), when, t.get("stderr", ""))
    return out


def _slurm_arrays(manifest: dict) -> list[str]:
    return [str(a["array_id"]) for s in manifest.get("submissions", []) if s.get("executor", "slurm") == "slurm"
            for a in s.get("arrays", [])]


def manifest_units(manifest: dict, results_dir: Optional[Path] = None) -> list[dict]:
    """The manifest's units (latest plan) plus every (experiment, model) an earlier submission ran
    (a later submit for fewer models rewrites ``units`` but not the stores of the others).
    ``store`` is always the path under ``results_dir`` (never the absolute path of the manifest)."""
    sweep = manifest["sweep"]
    units = []
    seen = set()
    for u in manifest.get("units", []):
        seen.add((u["experiment"], u["model"]))
        units.append({**u, "store": str(store_path(sweep, u["experiment"], u["model"], results_dir))})
    for sub in manifest.get("submissions", []):
        for arr in sub.get("arrays", []):
            for t in arr.get("tasks", []):
                for exp, _ in t["work"]:
                    if (exp, arr["model"]) in seen:
                        continue
                    seen.add((exp, arr["model"]))
                    path = store_path(sweep, exp, arr["model"], results_dir)
                    if (path / "zarr.json").exists():
                        units.append({"experiment": exp, "model": arr["model"], "store": str(path),
                                      "n_shards": ResultStore(path).n_shards})
    return units


def sweep_status(manifest: dict, use_sacct: bool = True, results_dir: Optional[Path] = None) -> SweepStatus:
    """Classify every shard of every (experiment, model) store of the manifest."""
    latest = latest_tasks(manifest)
    states: dict[str, str] = {}
    sacct_error = None
    if use_sacct and _slurm_arrays(manifest):
        try:
            states = sacct_states(_slurm_arrays(manifest))
        except RuntimeError as e:
            sacct_error = str(e)
    task_errors: dict[str, str] = {}
    units = []
    for u in manifest_units(manifest, results_dir):
        us = UnitStatus(u["experiment"], u["model"], int(u["n_shards"]))
        st = ResultStore(Path(u["store"]))
        if st.exists:
            try:
                shard_states = st.shard_states()
                holders = st.leases.live_holders()
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
            job, when, stderr = latest.get((u["model"], u["experiment"], shard), (None, None, ""))
            slurm = states.get(job) if job else None
            rec_time = _parse_time(rec.get("time"))
            if ss.state == "done":
                us.shards[shard] = "done"
            elif shard in holders:
                us.shards[shard] = "running"
                us.errors[shard] = f"being computed by {describe_holder(holders[shard])}"
            elif ss.state == "failed" and (job is None or when is None or (rec_time and rec_time >= when)):
                us.shards[shard] = "failed"
                us.errors[shard] = f"{ss.message} (job {rec.get('job_id')}, host {rec.get('host')})"
            elif slurm in ACTIVE:
                us.shards[shard] = "running"
            elif slurm in QUEUED:
                us.shards[shard] = "queued"
            elif ss.state == "corrupt":
                us.shards[shard] = "corrupt"
                us.errors[shard] = ss.message
            elif slurm in FAILED:
                us.shards[shard] = "failed"
                us.errors[shard] = f"SLURM task {job} {slurm}"
            elif slurm == "COMPLETED":
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
        unit = unit_of.get((model, exp))
        if states.get(job) in FAILED and unit is not None and unit.shards.get(shard) != "done" and job not in task_errors:
            task_errors[job] = f"{states[job]}: {log_error(stderr)}"
    tasks = dict(states)
    return SweepStatus(manifest.get("sweep", "?"), units, tasks, task_errors,
                       len(manifest.get("submissions", [])), sacct_error)


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
            "stores": stores, "slurm_tasks": s.tasks, "task_errors": s.task_errors, "sacct_error": s.sacct_error}


def active_shards(manifest: dict, results_dir: Optional[Path] = None) -> set[tuple[str, str, int]]:
    """(model, experiment, shard) currently running or queued in SLURM (resubmit leaves them alone)."""
    s = sweep_status(manifest, results_dir=results_dir)
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


def status_cli(args) -> int:
    """``bayesflip status --sweep X`` (``make status SWEEP=X``). Always exits 0 once the manifest is read."""
    from .launch import read_manifest

    root = Path(args.results_dir) if args.results_dir else None
    st = sweep_status(read_manifest(args.sweep, root), results_dir=root)
    print(json.dumps(to_json(st), indent=1, default=str) if getattr(args, "json", False) else render(st))
    return 0
