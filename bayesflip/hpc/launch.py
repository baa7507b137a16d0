"""Submit a sweep as SLURM job arrays (submitit): one array per (model, job template).

Pipeline (nothing is submitted unless every step before submission succeeds)::

    load_sweep → templates per model (+ CLI overrides, checked against the partition)
               → plan_sweep(create=False) (configs, tokenization, store identity; writes nothing)
               → arrays checked against SLURM's MaxArraySize (split into several arrays if larger)
               → [--dry-run stops here]  plan_sweep (creates every store up front)
               → make_tasks per model (pending shards packed into tasks of ~target_task_min from the
                 template's throughput, bayesflip.hpc.cost; else grouped by shards_per_task), minus shards
                 held by a live job (lease) or given to a queued/running task of the manifest
               → one submitit job array per (model, template), throttled to %N
               → manifest: job ids + each task's (experiment, shard) work list

``--overwrite`` refuses while jobs of the sweep are queued/running or a live process holds a
shard (``--cancel-running`` cancels the sweep's SLURM jobs first).

Each array task is a :class:`SweepTask` — a ``submitit.helpers.Checkpointable`` called with the
task's pickled :class:`~bayesflip.plan.TaskPlan` (resolved configs, ModelSpec, work list; nothing
is looked up by name in the job) and running it through :class:`bayesflip.job.ShardRunner`. On
preemption or time-out submitit calls ``checkpoint()``, which resubmits the *same* callable with
the *same* plan; the requeued task skips every shard that already has a ``done`` record, so
requeue = resume, with no recomputation and no duplicates. A tensor-parallel model runs as one
array task of ``tp`` SLURM tasks (one per rank): every rank runs the plan, rank 0 alone takes
leases and writes (:mod:`bayesflip.job`), and :func:`wait_jobs` reads every rank's result.

SLURM is asked through :mod:`bayesflip.hpc.slurm` only; the manifest is a
:class:`~bayesflip.hpc.manifest.Manifest`, recorded through :func:`bayesflip.plan.write_manifest`.

Why one array per (model, template) and not one per sweep: a task loads its model once and
runs many shards with it, so a task never mixes models; and models need different resources
(1 GPU for an 8B model, 4 GPUs with 4 TP ranks for a 70B one, 1 CPU for SmolLM2), while all
tasks of one array share one resource request.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from ..backends.distributed import RENDEZVOUS_VARS
from ..config import SweepConfig, load_sweep
from ..errors import BayesflipError, ConfigError
from ..models.registry import ModelSpec, get_model_spec
from ..paths import RESULTS_DIR
from ..plan import TaskPlan, Unit, make_tasks, plan_sweep, write_manifest
from . import slurm
from .manifest import ArrayRecord, Manifest, Submission as SubmissionRecord, TaskRecord, new_uid, now_iso
from .status import ACTIVE, QUEUED, active_jobs, active_shards, manifest_units
from .templates import JobTemplate, check_against_partition, load_template, template_for, templates_for, with_overrides

EXECUTORS = ("slurm", "local")


class ShardsFailed(BayesflipError, RuntimeError):
    """Raised at the end of an array task when some of its shards failed (the others are stored)."""


class SweepTask(Checkpointable):
    """One array task: load the plan's model once and run its (experiment, shard) work list.

    ``__call__(task)`` runs the :class:`~bayesflip.plan.TaskPlan` (:func:`bayesflip.job.run_task`);
    returns a summary dict, or raises :class:`ShardsFailed` (after finishing every other shard) so that
    SLURM marks the task FAILED. ``checkpoint(task)`` → the same callable with the same plan (resume
    from the records). ``device``: ``cpu`` for a CPU template; ``template`` (name, or {name,
    gpus_per_node}): checked against the node (``check_device``) before anything is loaded.
    A work list instead of a plan is a task pickled by an older bayesflip (``sweep``/``model``/
    ``results_dir`` attributes): resolved once by name.
    """

    def __init__(self, device: Optional[str] = None, template: Optional[str | dict] = None):
        self.device = device
        self.template = template

    def __call__(self, task: TaskPlan | list) -> dict:
        from ..models.prepare import offline_job
        offline_job()                       # HF_HUB_OFFLINE=1: jobs load prepared snapshots, never download
        if not isinstance(task, TaskPlan):  # an array task submitted by an older bayesflip
            task = TaskPlan.resolve(self.__dict__["sweep"], self.__dict__["model"], task, self.__dict__["results_dir"])
        n_cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if n_cpus:
            import torch

            torch.set_num_threads(n_cpus)   # no cgroup pinning on every cluster: do not oversubscribe
        if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
            # tensor-parallel ranks: env:// rendezvous for torch.distributed / DeepSpeed. Rank 0 alone
            # takes leases and writes (bayesflip.job.ShardRunner); every rank computes. CUDA_VISIBLE_DEVICES
            # is left as SLURM set it: rank_device picks cuda:LOCAL_RANK (or cuda:0 with one GPU per task).
            from ..backends.distributed import export_rendezvous

            export_rendezvous(slurm.hostnames)  # keeps MASTER_ADDR / MASTER_PORT / RANK ... that are already set
        from ..backends.distributed import check_device
        from ..job import run_task

        check_device(task.model, task_template(task.model, getattr(self, "template", None)))  # one line, before loading
        try:
            res = run_task(task, device=self.device)
        finally:
            _leave_together()
        if res.rank == 0:           # every rank has the same lists: rank 0's log is the audit log
            for e, s in res.done:   # one line per computed shard (audit: computed once)
                print(f"bayesflip: computed {e}:{s}", flush=True)
            for e, s, why in res.held:
                print(f"bayesflip: not computed {e}:{s}: held by {why}", flush=True)
        else:
            print(f"bayesflip: rank {res.rank} of {res.world_size} computed {len(res.done)} shard(s) with rank 0 "
                  f"(rank 0 wrote them)", flush=True)
        summary = {"sweep": task.sweep, "model": task.model.name, "done": [list(x) for x in res.done],
                   "skipped": [list(x) for x in res.skipped], "failed": [list(x) for x in res.failed],
                   "held": [list(x) for x in res.held],
                   "seconds": round(res.seconds, 3), "load_seconds": round(res.load_seconds, 3),
                   "job_id": os.environ.get("SLURM_JOB_ID"), "restarts": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                   "host": socket.gethostname(), "deepspeed_loaded": "deepspeed" in sys.modules,
                   "rank": res.rank, "world_size": res.world_size, "runs": res.runs}
        if res.failed:
            lines = "\n".join(f"  {e}:{s}: {err}" for e, s, err in res.failed)
            raise ShardsFailed(f"{len(res.failed)} of {len(task.work)} shard(s) failed ({task.model.name}); the other "
                               f"{len(res.done) + len(res.skipped)} are stored:\n{lines}")
        return summary

    def checkpoint(self, task: TaskPlan | list) -> DelayedSubmission:
        """Requeue the same task: completed shards are skipped by their ``done`` records."""
        return DelayedSubmission(self, task)


def task_template(spec: ModelSpec, template: Optional[str | dict | JobTemplate] = None) -> dict | JobTemplate:
    """The job template a task runs under: ``template`` as given (a dict or JobTemplate), loaded by name
    from ``job_templates/``, or (None) the model's own (:func:`~bayesflip.hpc.templates.template_for`)."""
    if template is None:
        return template_for(spec)
    return load_template(template) if isinstance(template, str) else template


def _leave_together() -> None:
    """Tensor-parallel ranks leave together (a rank that exits first aborts its peers' gloo threads)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------- planning
@dataclass
class ArrayPlan:
    """One job array: every task loads ``model`` and runs with ``template``'s resources."""

    model: ModelSpec
    template: JobTemplate
    tasks: list[TaskPlan]

    @property
    def n_shards(self) -> int:
        return sum(len(t.work) for t in self.tasks)


@dataclass
class SubmittedArray:
    plan: ArrayPlan
    array_id: str
    jobs: list = field(default_factory=list)   # submitit Job objects, one per task

    def record(self) -> ArrayRecord:
        """What the manifest keeps of this array: ids, resources and every task's work list and logs."""
        t = self.plan.template
        return ArrayRecord(
            model=self.plan.model.name, template=t.name, array_id=self.array_id,
            resources=t.resources(), throttle=t.array_throttle, n_tasks=len(self.jobs),
            tasks=[TaskRecord(task=i, job_id=str(j.job_id), work=list(task.work),
                              stdout=str(j.paths.stdout), stderr=str(j.paths.stderr))
                   for i, (j, task) in enumerate(zip(self.jobs, self.plan.tasks))])


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

    ``overrides``: partition, account, qos, time_min, array_throttle, shards_per_task, target_task_min (None = keep).
    The sweep's ``array_throttle`` sits between the template default and the CLI.
    """
    if overrides.get("array_throttle") is None and sweep.array_throttle is not None:
        overrides["array_throttle"] = sweep.array_throttle
    out: dict[str, JobTemplate] = {}
    chosen = templates_for([get_model_spec(n) for n in sweep.models], template)  # tp picks the template
    for name in sweep.models:
        spec = get_model_spec(name)
        t = with_overrides(chosen[name], **overrides)
        if t.n_tasks != spec.tp:
            raise ConfigError(f"job_templates/{t.name}.tasks_per_node",
                              f"model {name} has tensor-parallel degree tp={spec.tp}, but the template runs "
                              f"nodes × tasks_per_node = {t.n_tasks} task(s); they must be equal "
                              f"(one SLURM task per TP rank)", allowed=[spec.tp])
        out[name] = t
    return out


def check_partitions(templates: dict[str, JobTemplate]) -> None:
    """Each template against the partition it names (queried once per partition)."""
    if not slurm.available():
        raise ConfigError("--executor", "SLURM is not available here (no sinfo/sbatch on PATH)",
                          allowed=["slurm (on a cluster login node)", "local"])
    infos = {}
    for t in templates.values():
        if t.partition not in infos:
            infos[t.partition] = slurm.query_partition(t.partition,
                                                       key=f"job_templates/{t.name}.partition (--partition)")
        check_against_partition(t, infos[t.partition])


def plan_arrays(sweep: SweepConfig, units: list[Unit], templates: dict[str, JobTemplate],
                exclude: Optional[set[tuple[str, str, int]]] = None,
                max_array_size: Optional[int] = None, costs: Optional[dict] = None,
                results_dir: Optional[Path] = None) -> list[ArrayPlan]:
    """Pending shards → tasks (per model, ``shards_per_task`` each) → ArrayPlans per (model, template),
    each of at most ``max_array_size`` tasks (SLURM's MaxArraySize).

    ``exclude``: (model, experiment, shard) triples not to submit (e.g. still queued/running).
    ``costs`` (:func:`bayesflip.hpc.cost.estimate_models`): a model whose template has ``target_task_min``
    and a throughput figure gets its shards packed by estimated time instead (None: no packing, e.g.
    an explicit ``--shards-per-task``). ``results_dir``: where the tasks write (None: the default)."""
    arrays = []
    for model in sweep.models:
        mine = []
        for u in units:
            if u.model.name != model:
                continue
            pend = [s for s in u.pending if not exclude or (model, u.experiment.name, s) not in exclude]
            mine.append(dataclasses.replace(u, pending=pend))
        t = templates[model]
        pack = {model: costs[model].pack} if costs and model in costs and costs[model].packable else None
        tasks = make_tasks(sweep.name, mine, shards_per_task=t.shards_per_task, pack=pack, results_dir=results_dir)
        step = max_array_size or len(tasks) or 1
        for i in range(0, len(tasks), step):
            arrays.append(ArrayPlan(get_model_spec(model), t, tasks[i: i + step]))
    return arrays


def cancel_sweep_jobs(sweep_name: str, root: Path, out=print, timeout_s: float = 120) -> None:
    """scancel every queued/running SLURM task of the sweep's manifest and wait until they are gone."""
    import time

    manifest = Manifest.read_if_exists(sweep_name, root)
    arrays = manifest.slurm_array_ids() if manifest is not None else []
    if not arrays:
        return
    slurm.scancel(arrays)
    out(f"cancelled the SLURM jobs of {sweep_name}: {', '.join(arrays)}")
    end = time.time() + timeout_s
    while time.time() < end:
        if not any(v in ACTIVE | QUEUED for v in slurm.task_states(arrays).values()):
            return
        time.sleep(1)
    raise ConfigError("--cancel-running", f"jobs of {sweep_name} still active {timeout_s:.0f} s after scancel")


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
                      slurm_constraint=t.constraint,
                      # sbatch copies the submitting shell's environment: a RANK / MASTER_PORT left there
                      # (a torchrun shell, an in-process DeepSpeed run) is not this job's and would send
                      # two jobs to one rendezvous; the template's setup lines (the site's) come after
                      slurm_setup=[f"unset {' '.join(RENDEZVOUS_VARS)}", *t.setup])
    ex.update_parameters(**params)
    return ex


def _describe(a: ArrayPlan, packed: bool = False) -> str:
    t = a.template
    per = f"~{t.target_task_min} min" if packed else f"≤{t.shards_per_task} shard(s)"
    return (f"{a.model.name}: template {t.name} (partition {t.partition}, {t.nodes} node × {t.tasks_per_node} task, "
            f"{t.cpus_per_task} cpu, {t.gpus_per_node} gpu, {t.mem_gb} GB, {t.time_min} min), "
            f"{len(a.tasks)} task(s) × {per} = {a.n_shards} shard(s), "
            f"throttle %{t.array_throttle}")


def submit_sweep(sweep_name: str, model_type: Optional[str] = None, *, overwrite: bool = False,
                 results_dir: Optional[Path] = None, partition: Optional[str] = None, account: Optional[str] = None,
                 qos: Optional[str] = None, time_min: Optional[int] = None, array_throttle: Optional[int] = None,
                 shards_per_task: Optional[int] = None, template: Optional[str] = None, executor: str = "slurm",
                 target_task_min: Optional[int] = None, as_json: bool = False,
                 dry_run: bool = False, sweep: Optional[SweepConfig] = None, command: str = "submit",
                 exclude: Optional[set[tuple[str, str, int]]] = None, cancel_running: bool = False,
                 out=print) -> Submission:
    """Validate and plan everything, then submit one job array per (model, template).

    Raises (before anything is submitted) a :class:`ConfigError` naming the key for unknown
    models/types/templates/partitions, empty grids, bad tokenization, and templates that ask
    for more than the partition has. A dry run also prints the cost table (:mod:`bayesflip.hpc.cost`;
    ``as_json``: as JSON) and costs unprepared Hub models with a proxy tokenizer instead of refusing.
    """
    if executor not in EXECUTORS:
        raise ConfigError("--executor", f"unknown executor {executor!r}", allowed=EXECUTORS)
    sweep = sweep or load_sweep(sweep_name, model_type)
    # Hub models must be prepared (snapshot in the shared cache, commit sha pinned) before anything is planned
    from ..models.prepare import require_prepared
    pinned = {} if dry_run else {m: sha for m in sweep.models if (sha := require_prepared(get_model_spec(m)))}
    templates = resolve_templates(sweep, template, partition=partition, account=account, qos=qos, time_min=time_min,
                                  array_throttle=array_throttle, shards_per_task=shards_per_task,
                                  target_task_min=target_task_min)
    if executor == "slurm":
        check_partitions(templates)
    root = Path(results_dir or RESULTS_DIR).resolve()
    # 1. plan without writing anything: configs, tokenization, identity of existing stores
    cells: dict = {}
    costs = None
    toks: dict = {}
    if dry_run or (shards_per_task is None and any(t.target_task_min for t in templates.values())):
        from .cost import estimate_models     # tokens per shard → time-based packing and the dry run's table
        costs = estimate_models(sweep, [], templates, cells, toks)
    units = plan_sweep(sweep, overwrite=overwrite, results_dir=root, create=False, cells_cache=cells,
                       tokenizers={m: (None if p else t) for m, (t, p, _) in toks.items()})
    pack_costs = None if shards_per_task is not None else costs
    if overwrite and not dry_run:
        stores = [(u.experiment.name, u.store) for u in units]
        busy = active_jobs(sweep.name, root, stores)
        if busy and cancel_running and executor == "slurm":
            import time

            cancel_sweep_jobs(sweep.name, root, out)
            end = time.time() + 120          # until their processes are gone too (leases released/dead)
            busy = active_jobs(sweep.name, root, stores)
            while busy and time.time() < end:
                time.sleep(1)
                busy = active_jobs(sweep.name, root, stores)
        if busy:
            raise ConfigError("--overwrite", f"{len(busy)} job(s)/process(es) of sweep {sweep.name} are still "
                              f"active ({'; '.join(busy[:5])}{' ...' if len(busy) > 5 else ''}); wait for them, "
                              f"scancel them, or pass --cancel-running")
    if exclude is None and not overwrite and executor == "slurm" and Manifest.path(sweep.name, root).exists():
        exclude = active_shards(Manifest.load(sweep.name, root), root)     # queued/running tasks own these
    limit = slurm.max_array_size() if executor == "slurm" else None
    arrays = plan_arrays(sweep, units, templates, exclude, limit, costs=pack_costs, results_dir=root)
    n_split = bool(limit) and len(arrays) > len({a.model.name for a in arrays})
    if not dry_run:
        # 2. now create the stores (--overwrite deletes them first) and plan for real
        units = plan_sweep(sweep, overwrite=overwrite, results_dir=root, validate=False, create=True,
                           cells_cache=cells, warn=False)
        arrays = plan_arrays(sweep, units, templates, exclude, limit, costs=pack_costs, results_dir=root)
    sub = Submission(sweep, units, arrays, executor, root)
    n_pending = sum(len(u.pending) for u in units)
    n_total = sum(u.n_shards for u in units)
    n_held = sum(len(u.held) for u in units)
    n_excl = sum(1 for u in units for s in u.pending if exclude and (u.model.name, u.experiment.name, s) in exclude)
    out(f"sweep {sweep.name}: {len(sweep.experiments)} experiment(s) × {len(sweep.models)} model(s); "
        f"{n_pending} of {n_total} shard(s) pending; {sum(a.n_shards for a in arrays)} to submit"
        + (f" ({n_excl} still queued/running, skipped)" if n_excl else "")
        + (f" ({n_held} held by a live job, skipped)" if n_held else ""))
    if n_split:
        out(f"  more tasks than SLURM's MaxArraySize ({limit}): split into {len(arrays)} arrays "
            f"(each throttled separately; raise --shards-per-task for fewer tasks)")
    for a in arrays:
        packed = bool(pack_costs and a.model.name in pack_costs and pack_costs[a.model.name].packable)
        out(("would submit " if dry_run else "  ") + _describe(a, packed))
    if dry_run and costs is not None:
        from .cost import cost_rows, format_cost

        rows = cost_rows(costs, units, arrays, packing=pack_costs is not None)
        out(json.dumps({"sweep": sweep.name, "estimate": True, "models": rows}, indent=2) if as_json
            else format_cost(sweep.name, rows))
    if dry_run or not arrays:
        if not arrays:
            out("nothing to submit: every shard is done" + (" or queued/running" if exclude or n_held else ""))
        return sub
    folder = root / sweep.name / "slurm" / "%j"
    # the submission is recorded before sbatch (state pending) and completed after, so a submitter that dies or
    # cannot write the manifest in between leaves one that status and resubmit understand
    uid = new_uid()
    record = SubmissionRecord(command=command, executor=executor, time=now_iso(), pinned_revisions=pinned,
                              uid=uid, state="pending")
    sub.manifest = write_manifest(sweep, units, record, results_dir=root)
    error: Optional[BaseException] = None
    try:
        for a in arrays:
            ex = make_executor(executor, folder, a.template, f"bf-{sweep.name}-{a.model.name}"[:100])
            fn = SweepTask(device="cpu" if a.template.gpus_per_node == 0 else None,
                           template={"name": a.template.name, "gpus_per_node": a.template.gpus_per_node})
            try:
                jobs = ex.map_array(fn, a.tasks)
            except (submitit.core.utils.FailedJobError, OSError, RuntimeError) as e:
                raise _sbatch_error(e) from None
            array_id = str(jobs[0].job_id).split("_")[0] if jobs else ""
            sub.submitted.append(SubmittedArray(a, array_id, jobs))
            out(f"submitted {'array' if executor == 'slurm' else 'local job'} {array_id} ({executor}): "
                f"{a.model.name}, {len(jobs)} task(s), "
                f"{a.n_shards} shard(s), logs {folder.parent}/{array_id}_*")
            if len(arrays) > 1:      # each array recorded as soon as sbatch answered
                Manifest.update_submission(sweep.name, uid, root, arrays=[s.record() for s in sub.submitted])
    except BaseException as e:
        error = e
        raise
    finally:
        state = "submitted" if error is None else ("partial" if sub.submitted else "failed")
        Manifest.update_submission(sweep.name, uid, root, state=state,
                                   arrays=[s.record() for s in sub.submitted],
                                   error=None if error is None else f"{type(error).__name__}: {error}")
    return sub


def _sbatch_error(e: Exception) -> BayesflipError:
    msg = " ".join(str(e).split())
    return BayesflipError(f"sbatch refused the array: {msg[-400:]}")


def job_outcome(job) -> tuple[Optional[dict], Optional[str]]:
    """(rank 0's summary, None) when every task (TP rank) of the job returned; else (None, message)
    of rank 0's failure, or of the first other rank that failed. Blocks until the job ends.

    A multi-task job (``tasks_per_node × nodes > 1``: one task per TP rank) has one result per
    task in submitit; ``job.result()`` is only valid for single-task jobs."""
    def last_line(e: Exception) -> str:
        msg = [ln for ln in str(e).strip().splitlines() if ln.strip() and not ln.startswith("-" * 10)]
        # submitit's FailedJobError: the trace, then "You can check full logs ..."; keep the exception line
        exc = [ln for ln in msg if not ln.startswith((" ", "You can check", "or at paths", "Job (task="))]
        return (exc or msg or [type(e).__name__])[-1].strip()

    n = getattr(job, "num_tasks", 1)
    if n <= 1:
        try:
            return job.result(), None
        except Exception as e:  # FailedJobError / UncompletedJobError: the caller reports it
            return None, last_line(e)
    summaries, errors = {}, {}
    for rank in range(n):
        try:
            summaries[rank] = job.task(rank).result()
        except Exception as e:  # FailedJobError / UncompletedJobError of this rank
            errors[rank] = last_line(e)
    if not errors:
        return summaries[0], None
    r = 0 if 0 in errors else min(errors)
    return None, f"rank {r} of {n}: {errors[r]}"


def wait_jobs(sub: Submission, out=print) -> int:
    """Block until every task ends; print each task's outcome. Returns the number of failed tasks.

    A tensor-parallel task (several SLURM tasks, one per rank) counts once: done when every
    rank returned (rank 0's summary is reported), FAILED with rank 0's message (or the failing rank's)."""
    failed = 0
    for arr in sub.submitted:
        for j, _task in zip(arr.jobs, arr.plan.tasks):
            r, err = job_outcome(j)
            ranks = f", {r['world_size']} ranks" if r and r.get("world_size", 1) > 1 else ""
            if err is None:
                assert r is not None          # job_outcome: a result or an error
                out(f"task {j.job_id} ({arr.plan.model.name}): {len(r['done'])} done, {len(r['skipped'])} skipped "
                    f"(already done), {r['seconds']:.1f} s{ranks}")
            else:
                failed += 1
                out(f"task {j.job_id} ({arr.plan.model.name}) FAILED: {err}")
    return failed


def resubmit_sweep(sweep_name: str, model_type: Optional[str] = None, **kw) -> Submission:
    """Re-plan (never overwrite) and submit only shards that are neither done nor queued/running.

    Without ``model_type`` the models are every model the manifest knows (planned or submitted)."""
    results_dir = kw.get("results_dir")
    manifest = Manifest.load(sweep_name, results_dir)
    known = [*manifest.models, *(u.model for u in manifest_units(manifest, results_dir))]
    models = list(dict.fromkeys(known))
    sweep = load_sweep(sweep_name, model_type or models[0])
    if model_type is None:
        sweep = dataclasses.replace(sweep, models=[get_model_spec(m).name for m in models])
    use_sacct = kw.get("executor", "slurm") == "slurm" and slurm.available()
    active = active_shards(manifest, results_dir) if use_sacct else set()
    return submit_sweep(sweep_name, sweep=sweep, overwrite=False, command="resubmit", exclude=active, **kw)


def dry_run(sweep_name: str, model_type: Optional[str] = None, *, results_dir=None, template: Optional[str] = None,
            shards_per_task: Optional[int] = None, target_task_min: Optional[int] = None, time_min: Optional[int] = None,
            as_json: bool = False, overwrite: bool = False, out: Callable[[str], None] = print) -> list[dict]:
    """``bayesflip plan --dry-run``: plan without writing (no stores, manifest or records), cost every
    model (:mod:`bayesflip.hpc.cost`), pack its pending shards into tasks, print the table (or JSON). No SLURM needed.
    ``overwrite``: cost every shard (as ``--overwrite`` would recompute them), not only pending ones."""
    from .cost import cost_rows, estimate_models, format_cost, tokenizer_for

    sweep = load_sweep(sweep_name, model_type)
    templates = resolve_templates(sweep, template, shards_per_task=shards_per_task, target_task_min=target_task_min,
                                  time_min=time_min)
    cells: dict = {}
    toks: dict = {m: tokenizer_for(get_model_spec(m)) for m in sweep.models}
    # validate first (templates, lengths, choices: one error line), then render every cell for the counts
    units = plan_sweep(sweep, overwrite=overwrite, results_dir=results_dir, create=False, cells_cache=cells,
                       tokenizers={m: (None if p else t) for m, (t, p, _) in toks.items()})
    costs = estimate_models(sweep, [], templates, cells, toks)
    arrays = plan_arrays(sweep, units, templates, costs=None if shards_per_task else costs)
    rows = cost_rows(costs, units, arrays, packing=not shards_per_task)
    if as_json:
        out(json.dumps({"sweep": sweep.name, "estimate": True, "models": rows}, indent=2))
    else:
        out(format_cost(sweep.name, rows))
    return rows
