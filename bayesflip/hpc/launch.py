"""Submit a sweep as SLURM job arrays (submitit): one array per (model, job template).

Pipeline (nothing is submitted unless every step before submission succeeds)::

    load_sweep → templates per model (+ CLI overrides, checked against the partition)
               → plan_sweep (validates configs + tokenization, creates every store up front)
               → make_tasks per model (pending shards grouped by shards_per_task)
               → one submitit job array per (model, template), throttled to %N
               → manifest: job ids + each task's (experiment, shard) work list

Each array task is a :class:`SweepTask` — a ``submitit.helpers.Checkpointable`` whose
``__call__`` is :func:`bayesflip.job.run_task`. On preemption or time-out submitit calls
``checkpoint()``, which resubmits the *same* callable with the *same* work list; the requeued
task skips every shard that already has a ``done`` record, so requeue = resume, with no
recomputation and no duplicates.

Why one array per (model, template) and not one per sweep: a task loads its model once and
runs many shards with it, so a task never mixes models; and models need different resources
(1 GPU for an 8B model, 4 GPUs with 4 TP ranks for a 70B one, 1 CPU for SmolLM2), while all
tasks of one array share one resource request.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from ..config import SweepConfig, load_sweep
from ..errors import BayesflipError, ConfigError
from ..models.registry import ModelSpec, get_model_spec
from ..paths import RESULTS_DIR
from ..plan import Task, Unit, make_tasks, plan_sweep, write_manifest
from .templates import (JobTemplate, check_against_partition, load_template, query_partition, slurm_available,
                        with_overrides)

EXECUTORS = ("slurm", "local")


class ShardsFailed(BayesflipError, RuntimeError):
    """Raised at the end of an array task when some of its shards failed (the others are stored)."""


class SweepTask(Checkpointable):
    """One array task: load ``model`` once and run its (experiment, shard) work list.

    ``__call__(work)`` → ``run_task(sweep, model, work)``; returns a summary dict, or raises
    :class:`ShardsFailed` (after finishing every other shard) so that SLURM marks the task FAILED.
    ``checkpoint(work)`` → the same callable with the same work list (resume from the records).
    """

    def __init__(self, sweep: str, model: str, results_dir: str, device: Optional[str] = None):
        self.sweep = sweep
        self.model = model
        self.results_dir = results_dir
        self.device = device

    def __call__(self, work: list) -> dict:
        n_cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if n_cpus:
            import torch

            torch.set_num_threads(n_cpus)   # no cgroup pinning on every cluster: do not oversubscribe
        if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
            # tensor-parallel ranks (gpu-large): env:// rendezvous for torch.distributed / DeepSpeed.
            # Every rank runs the same shards in lock-step and writes identical bytes through atomic
            # renames (Zarr chunks and records), so the duplicate writes are harmless.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=True)
        from ..job import run_task

        pairs = [(str(e), int(s)) for e, s in work]
        res = run_task(self.sweep, self.model, pairs, device=self.device, results_dir=Path(self.results_dir))
        summary = {"sweep": self.sweep, "model": self.model, "done": [list(x) for x in res.done],
                   "skipped": [list(x) for x in res.skipped], "failed": [list(x) for x in res.failed],
                   "seconds": round(res.seconds, 3), "load_seconds": round(res.load_seconds, 3),
                   "job_id": os.environ.get("SLURM_JOB_ID"), "restarts": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                   "host": socket.gethostname(), "deepspeed_loaded": "deepspeed" in sys.modules}
        if res.failed:
            lines = "\n".join(f"  {e}:{s}: {err}" for e, s, err in res.failed)
            raise ShardsFailed(f"{len(res.failed)} of {len(pairs)} shard(s) failed ({self.model}); the other "
                               f"{len(res.done) + len(res.skipped)} are stored:\n{lines}")
        return summary

    def checkpoint(self, work: list) -> DelayedSubmission:
        """Requeue the same task: completed shards are skipped by their ``done`` records."""
        return DelayedSubmission(self, work)


# ---------------------------------------------------------------------- planning
@dataclass
class ArrayPlan:
    """One job array: every task loads ``model`` and runs with ``template``'s resources."""

    model: ModelSpec
    template: JobTemplate
    tasks: list[Task]

    @property
    def n_shards(self) -> int:
        return sum(len(t.work) for t in self.tasks)


@dataclass
class SubmittedArray:
    plan: ArrayPlan
    array_id: str
    jobs: list = field(default_factory=list)   # submitit Job objects, one per task

    def to_json(self) -> dict:
        t = self.plan.template
        return {
            "model": self.plan.model.name, "template": t.name, "array_id": self.array_id,
            "resources": t.resources(), "throttle": t.array_throttle, "n_tasks": len(self.jobs),
            "tasks": [{"task": i, "job_id": str(j.job_id), "work": task.to_json()["work"],
                       "stdout": str(j.paths.stdout), "stderr": str(j.paths.stderr)}
                      for i, (j, task) in enumerate(zip(self.jobs, self.plan.tasks))],
        }


@dataclass
class Submission:
    sweep: SweepConfig
    units: list[Unit]
    arrays: list[ArrayPlan]
    executor: str
    results_dir: Path
    submitted: list[SubmittedArray] = field(default_factory=list)
    manifest: Optional[Path] = None

    @property
    def jobs(self) -> list:
        return [j for a in self.submitted for j in a.jobs]


def resolve_templates(sweep: SweepConfig, template: Optional[str] = None, **overrides) -> dict[str, JobTemplate]:
    """The job template of every model of the sweep, with CLI overrides applied and re-validated.

    ``overrides``: partition, account, qos, time_min, array_throttle, shards_per_task (None = keep).
    The sweep's ``array_throttle`` sits between the template default and the CLI.
    """
    if overrides.get("array_throttle") is None and sweep.array_throttle is not None:
        overrides["array_throttle"] = sweep.array_throttle
    out: dict[str, JobTemplate] = {}
    for name in sweep.models:
        spec = get_model_spec(name)
        t = with_overrides(load_template(template or spec.template), **overrides)
        if t.n_tasks != spec.tp:
            raise ConfigError(f"job_templates/{t.name}.tasks_per_node",
                              f"model {name} has tensor-parallel degree tp={spec.tp}, but the template runs "
                              f"nodes × tasks_per_node = {t.n_tasks} task(s); they must be equal "
                              f"(one SLURM task per TP rank)", allowed=[spec.tp])
        out[name] = t
    return out


def check_partitions(templates: dict[str, JobTemplate]) -> None:
    """Each template against the partition it names (queried once per partition)."""
    if not slurm_available():
        raise ConfigError("--executor", "SLURM is not available here (no sinfo/sbatch on PATH)",
                          allowed=["slurm (on a cluster login node)", "local"])
    infos = {}
    for t in templates.values():
        if t.partition not in infos:
            infos[t.partition] = query_partition(t.partition, key=f"job_templates/{t.name}.partition (--partition)")
        check_against_partition(t, infos[t.partition])


def plan_arrays(sweep: SweepConfig, units: list[Unit], templates: dict[str, JobTemplate],
                exclude: Optional[set[tuple[str, str, int]]] = None) -> list[ArrayPlan]:
    """Pending shards → tasks (per model, ``shards_per_task`` each) → one ArrayPlan per (model, template).

    ``exclude``: (model, experiment, shard) triples not to submit (e.g. still queued/running)."""
    arrays = []
    for model in sweep.models:
        mine = []
        for u in units:
            if u.model.name != model:
                continue
            pend = [s for s in u.pending if not exclude or (model, u.experiment.name, s) not in exclude]
            mine.append(dataclasses.replace(u, pending=pend))
        t = templates[model]
        tasks = make_tasks(sweep.name, mine, shards_per_task=t.shards_per_task)
        if tasks:
            arrays.append(ArrayPlan(get_model_spec(model), t, tasks))
    return arrays


def make_executor(kind: str, folder: Path, t: JobTemplate, job_name: str):
    """A submitit AutoExecutor (``slurm`` or ``local``) with the template's resources."""
    if kind not in EXECUTORS:
        raise ConfigError("--executor", f"unknown executor {kind!r}", allowed=EXECUTORS)
    ex = submitit.AutoExecutor(folder=folder, cluster=kind, **{f"{kind}_max_num_timeout": t.max_requeues})
    params: dict[str, Any] = dict(name=job_name, timeout_min=t.time_min, nodes=t.nodes, tasks_per_node=t.tasks_per_node,
                                  cpus_per_task=t.cpus_per_task, mem_gb=t.mem_gb)
    if t.gpus_per_node:
        params["gpus_per_node"] = t.gpus_per_node
    if kind == "slurm":
        params.update(slurm_partition=t.partition, slurm_signal_delay_s=t.signal_delay_s,
                      slurm_array_parallelism=t.array_throttle, slurm_account=t.account, slurm_qos=t.qos,
                      slurm_constraint=t.constraint, slurm_setup=list(t.setup) or None)
    ex.update_parameters(**params)
    return ex


def _describe(a: ArrayPlan) -> str:
    t = a.template
    return (f"{a.model.name}: template {t.name} (partition {t.partition}, {t.nodes} node × {t.tasks_per_node} task, "
            f"{t.cpus_per_task} cpu, {t.gpus_per_node} gpu, {t.mem_gb} GB, {t.time_min} min), "
            f"{len(a.tasks)} task(s) × ≤{t.shards_per_task} shard(s) = {a.n_shards} shard(s), "
            f"throttle %{t.array_throttle}")


def submit_sweep(sweep_name: str, model_type: Optional[str] = None, *, overwrite: bool = False,
                 results_dir: Optional[Path] = None, partition: Optional[str] = None, account: Optional[str] = None,
                 qos: Optional[str] = None, time_min: Optional[int] = None, array_throttle: Optional[int] = None,
                 shards_per_task: Optional[int] = None, template: Optional[str] = None, executor: str = "slurm",
                 dry_run: bool = False, sweep: Optional[SweepConfig] = None, command: str = "submit",
                 exclude: Optional[set[tuple[str, str, int]]] = None, out=print) -> Submission:
    """Validate and plan everything, then submit one job array per (model, template).

    Raises (before anything is submitted) a :class:`ConfigError` naming the key for unknown
    models/types/templates/partitions, empty grids, bad tokenization, and templates that ask
    for more than the partition has.
    """
    if executor not in EXECUTORS:
        raise ConfigError("--executor", f"unknown executor {executor!r}", allowed=EXECUTORS)
    sweep = sweep or load_sweep(sweep_name, model_type)
    templates = resolve_templates(sweep, template, partition=partition, account=account, qos=qos, time_min=time_min,
                                  array_throttle=array_throttle, shards_per_task=shards_per_task)
    if executor == "slurm":
        check_partitions(templates)
    root = Path(results_dir or RESULTS_DIR).resolve()
    if dry_run and overwrite:
        # never delete anything in a dry run: plan into a scratch dir (everything is pending anyway)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bayesflip-dry-") as tmp:
            units = plan_sweep(sweep, overwrite=True, results_dir=Path(tmp))
    else:
        units = plan_sweep(sweep, overwrite=overwrite and not dry_run, results_dir=root)
    arrays = plan_arrays(sweep, units, templates, exclude)
    sub = Submission(sweep, units, arrays, executor, root)
    n_pending = sum(len(u.pending) for u in units)
    n_total = sum(u.n_shards for u in units)
    out(f"sweep {sweep.name}: {len(sweep.experiments)} experiment(s) × {len(sweep.models)} model(s); "
        f"{n_pending} of {n_total} shard(s) pending; {sum(a.n_shards for a in arrays)} to submit"
        + (f" ({len(exclude)} still queued/running, skipped)" if exclude else ""))
    for a in arrays:
        out(("would submit " if dry_run else "  ") + _describe(a))
    if dry_run or not arrays:
        if not arrays:
            out("nothing to submit: every shard is done" + (" or queued/running" if exclude else ""))
        return sub
    folder = root / sweep.name / "slurm" / "%j"
    try:
        for a in arrays:
            ex = make_executor(executor, folder, a.template, f"bf-{sweep.name}-{a.model.name}"[:100])
            fn = SweepTask(sweep.name, a.model.name, str(root), device="cpu" if a.template.gpus_per_node == 0 else None)
            jobs = ex.map_array(fn, [t.to_json()["work"] for t in a.tasks])
            array_id = str(jobs[0].job_id).split("_")[0] if jobs else ""
            sub.submitted.append(SubmittedArray(a, array_id, jobs))
            out(f"submitted {'array' if executor == 'slurm' else 'local job'} {array_id} ({executor}): "
                f"{a.model.name}, {len(jobs)} task(s), "
                f"{a.n_shards} shard(s), logs {folder.parent}/{array_id}_*")
    finally:
        if sub.submitted:   # record whatever went out, even if a later array failed to submit
            extra = {"command": command, "executor": executor,
                     "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "arrays": [s.to_json() for s in sub.submitted]}
            sub.manifest = write_manifest(sweep, units, extra, results_dir=root)
    return sub


def wait_jobs(sub: Submission, out=print) -> int:
    """Block until every task ends; print each task's outcome. Returns the number of failed tasks."""
    failed = 0
    for arr in sub.submitted:
        for j, task in zip(arr.jobs, arr.plan.tasks):
            try:
                r = j.result()
                out(f"task {j.job_id} ({arr.plan.model.name}): {len(r['done'])} done, {len(r['skipped'])} skipped "
                    f"(already done), {r['seconds']:.1f} s")
            except Exception as e:   # FailedJobError / UncompletedJobError: report and go on
                failed += 1
                msg = str(e).strip().splitlines()
                out(f"task {j.job_id} ({arr.plan.model.name}) FAILED: {msg[-1] if msg else type(e).__name__}")
    return failed


def read_manifest(sweep: str, results_dir: Optional[Path] = None) -> dict:
    path = Path(results_dir or RESULTS_DIR) / sweep / "manifest.json"
    if not path.exists():
        root = Path(results_dir or RESULTS_DIR)
        known = sorted(p.parent.name for p in root.glob("*/manifest.json")) if root.exists() else []
        raise ConfigError("--sweep", f"no manifest at {path}: plan or submit the sweep first", allowed=known)
    return json.loads(path.read_text())


# ---------------------------------------------------------------------- CLI
def _common(args) -> dict:
    return dict(results_dir=Path(args.results_dir) if args.results_dir else None, partition=args.partition,
                account=args.account, qos=args.qos, time_min=args.time, array_throttle=args.array_throttle,
                shards_per_task=args.shards_per_task, template=args.template, executor=args.executor,
                dry_run=args.dry_run)


def submit_cli(args) -> int:
    """``bayesflip submit --exp X --model-type T`` (``make submit``)."""
    sub = submit_sweep(args.sweep, args.model_type, overwrite=args.overwrite, **_common(args))
    if sub.manifest:
        print(f"manifest: {sub.manifest}\nstatus:   bayesflip status --sweep {sub.sweep.name}"
              + (f" --results-dir {args.results_dir}" if args.results_dir else ""))
    if args.wait and sub.submitted:
        return 1 if wait_jobs(sub) else 0
    return 0


def resubmit_sweep(sweep_name: str, model_type: Optional[str] = None, **kw) -> Submission:
    """Re-plan (never overwrite) and submit only shards that are neither done nor queued/running.

    Without ``model_type`` the models are every model the manifest knows (planned or submitted)."""
    from .status import active_shards, manifest_units

    results_dir = kw.get("results_dir")
    manifest = read_manifest(sweep_name, results_dir)
    known = [*manifest.get("models", []), *(u["model"] for u in manifest_units(manifest, results_dir))]
    models = list(dict.fromkeys(known))
    sweep = load_sweep(sweep_name, model_type or models[0])
    if model_type is None:
        sweep = dataclasses.replace(sweep, models=[get_model_spec(m).name for m in models])
    use_sacct = kw.get("executor", "slurm") == "slurm" and slurm_available()
    active = active_shards(manifest, results_dir) if use_sacct else set()
    return submit_sweep(sweep_name, sweep=sweep, overwrite=False, command="resubmit", exclude=active, **kw)


def resubmit_cli(args) -> int:
    """``bayesflip resubmit --sweep X`` (``make resubmit``): only what is missing."""
    if args.overwrite:
        raise ConfigError("--overwrite", "resubmit never deletes results; use `submit --overwrite` to recompute")
    sub = resubmit_sweep(args.sweep, args.model_type, **_common(args))
    if args.wait and sub.submitted:
        return 1 if wait_jobs(sub) else 0
    return 0
