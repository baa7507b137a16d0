"""What a job runs: load the model once, then score its shards into the stores.

Input: a :class:`~bayesflip.plan.TaskPlan` (resolved experiment configs, the ModelSpec, the
(experiment, shard) pairs and the results dir) — built by the planner, pickled into SLURM array tasks
by :mod:`bayesflip.hpc.launch`, or handed over in-process by :func:`run_local` (``bayesflip debug``,
``demo``, ``paper-smol``). Nothing is looked up by name again here.

:class:`ShardRunner` runs one task in four named steps. **plan**: per shard, skip it when done
(its record verifies) or held by a live job's lease; **claim** (per group): take the leases,
re-check the record right before computing; **compute**: the family's ``run`` over the group's
cells, split back per shard; **write**: chunks + record, only if the store on disk is still the one
of this job's identity and the lease is still ours. So a requeued or re-run task never recomputes
or duplicates, two runs never compute the same shard, and an old job never writes into a replaced
store. A failing shard is recorded with its error and traceback; the task goes on with its other
shards. A store of another identity (config, model spec, code version) or a failing write (full
disk) stops the task with one clear error. Whether a lease's holder still runs is decided with
``live_jobs`` (:func:`bayesflip.hpc.slurm.live_jobs`, given to the stores' leases).

Shard groups: consecutive pending shards of one experiment whose family is cell-independent
(``Family.batch_across_shards``; not the generational chains / rules / acronym, whose mid-shard
checkpoints are per shard) go through the engine in one ``fam.run`` (at most ``group_cells``
cells, ``$BAYESFLIP_GROUP_CELLS``, default 1024), so the engine sees fewer, larger calls. The
leases of the whole group are held while it computes; the arrays are split back per shard and
each shard is written with its own record (``group_shards`` = the group's size), so a crash
mid-group leaves exactly the unwritten shards pending. A failing group is re-run shard by shard,
so only the failing shard gets a failed record.

Several processes per task (one per rank of a tensor-parallel backend: ``torchrun`` or a SLURM step of
several tasks, seen as ``WORLD_SIZE``/``SLURM_NTASKS`` > 1): the backend is loaded first (it starts the
process group); the backend's writer (``be.is_writer``, rank 0) alone plans, takes and releases leases,
re-checks records and writes chunks and records, broadcasting every decision and outcome
(:func:`~bayesflip.backends.distributed.from_writer`), so all ranks run the same groups in the same
order; every rank computes under ``be.agree`` (an error on one rank fails the group on all, before the
next collective). This module never asks which backend runs or how it is split: only the loaded
backend's ``rank``, ``world_size``, ``is_writer`` and ``agree``. Records carry ``writer_rank`` and
``world_size``; every rank's :class:`TaskResult` has the same lists. Testing hook:
``BAYESFLIP_INJECT_FAILURE=exp:shard`` fails a shard on every rank, ``exp:shard@rank1`` on rank 1 only
(raised after the compute, so the ranks' collectives stay matched).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .backends.distributed import dist_env, from_writer
from .config import ExperimentConfig, SweepConfig, load_sweep, sweep_models
from .errors import BayesflipError, Interrupted, LeaseLost, StoreIdentityError
from .experiments import get_family
from .experiments.base import RunContext, nonfinite
from .hpc import slurm
from .hpc.manifest import Submission
from .plan import TaskPlan, make_tasks, plan_sweep, refuse_busy_overwrite, write_manifest
from .store import LiveJobs, ResultStore, describe_holder, identity, identity_diff

log = logging.getLogger(__name__)

FAIL_ENV = "BAYESFLIP_INJECT_FAILURE"  # testing hook: "experiment:shard[@rankN][,experiment:shard[@rankN]]"
GROUP_CELLS = 1024   # default: at most this many cells (of several shards of one experiment) per fam.run
GROUP_ENV = "BAYESFLIP_GROUP_CELLS"   # overrides GROUP_CELLS (1: one shard per fam.run, as before grouping)


@dataclass
class TaskResult:
    done: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, int, str]] = field(default_factory=list)
    held: list[tuple[str, int, str]] = field(default_factory=list)     # a live job holds the shard
    seconds: float = 0.0
    load_seconds: float = 0.0
    runs: int = 0                       # fam.run calls (a group of shards is one call)
    rank: int = 0
    world_size: int = 1


def _injected() -> set[tuple[str, int, Optional[int]]]:
    """``exp:shard`` fails the shard on every rank; ``exp:shard@rankN`` on rank N only."""
    spec = os.environ.get(FAIL_ENV, "")
    out = set()
    for part in filter(None, spec.split(",")):
        rank = None
        if "@" in part:
            part, r = part.rsplit("@", 1)
            if not r.startswith("rank") or not r[4:].isdigit():
                raise ValueError(f"{FAIL_ENV}: {part}@{r}: expected experiment:shard@rankN")
            rank = int(r[4:])
        exp, shard = part.rsplit(":", 1)
        out.add((exp, int(shard), rank))
    return out


def _group_cells() -> int:
    try:
        return int(os.environ.get(GROUP_ENV) or GROUP_CELLS)
    except ValueError:
        raise ValueError(f"{GROUP_ENV}={os.environ.get(GROUP_ENV)!r}: expected a number of cells") from None


@dataclass(frozen=True)
class _Shard:
    """One pending shard as the writer planned it (every rank gets the same list)."""

    exp: str
    shard: int
    start: int          # its cells: cells[start:stop]
    stop: int
    workdir: str        # per-shard scratch dir (mid-shard checkpoints of generational families)


def group_shards(todo: list[_Shard], families: dict[str, Any], group_cells: int = GROUP_CELLS) -> list[list[_Shard]]:
    """Consecutive shards of one experiment whose family is cell-independent
    (``Family.batch_across_shards``), up to ``group_cells`` cells per group (a larger shard is
    a group of its own); every other shard is a group of one."""
    groups: list[list[_Shard]] = []
    for sh in todo:
        g = groups[-1] if groups else None
        if (g and g[-1].exp == sh.exp and getattr(families[sh.exp], "batch_across_shards", False)
                and sum(x.stop - x.start for x in g) + sh.stop - sh.start <= group_cells):
            g.append(sh)
        else:
            groups.append([sh])
    return groups


def _what(exp: str, batch: list[_Shard]) -> str:
    return f"{exp}:{','.join(str(sh.shard) for sh in batch)}"


# (shard, ("ok", arrays, seconds) | ("failed", message, traceback))
Outcomes = dict[int, tuple]


class ShardRunner:
    """One task: :meth:`plan` → per group :meth:`claim` → :meth:`compute` → :meth:`write` (module docstring).

    ``lm``: an already loaded model or backend (tests) instead of loading ``task.model``; ``group_cells``:
    at most this many cells per ``fam.run`` (default ``$BAYESFLIP_GROUP_CELLS`` or 1024; 1: one shard per
    call); ``live_jobs``: which scheduler jobs still run, for the stores' leases."""

    def __init__(self, task: TaskPlan, *, device: Optional[str] = None, progress: bool = True, lm: Any = None,
                 batch_tokens: int = 8192, group_cells: Optional[int] = None,
                 live_jobs: LiveJobs = slurm.live_jobs):
        self.task = task
        self.device = device
        self.progress = progress
        self.lm = lm
        self.batch_tokens = batch_tokens
        self.group_cells = group_cells
        self.live_jobs = live_jobs
        self.result = TaskResult()
        self.be: Any = None                              # the loaded backend
        self.stores: dict[str, ResultStore] = {}         # the writer's open stores
        self._cells: dict[str, list[dict]] = {}
        self._families: dict[str, Any] = {}
        self._inject: set[tuple[str, int, Optional[int]]] = set()

    # ------------------------------------------------------------------ the task
    def run(self) -> TaskResult:
        t0 = time.time()
        res = self.result
        if dist_env().world_size > 1:     # one process per rank: the backend starts the group, then ranks follow
            self.load(t0)
        todo, res.skipped, res.held = from_writer(self.plan, "planning the task's shards")
        if not todo:
            res.seconds = time.time() - t0
            return res
        if self.be is None:
            self.load(t0)
        group_cells = self.group_cells if self.group_cells is not None else _group_cells()
        self._inject = _injected()
        self._families = {e: get_family(self.task.experiments[e].family) for e in {sh.exp for sh in todo}}
        bar = None
        if self.progress and self.be.is_writer:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(todo), desc=f"{self.task.sweep}/{self.task.model.name}", unit="shard")
        for grp in group_shards(todo, self._families, group_cells):
            try:
                self.run_group(grp)
            finally:
                if bar is not None:
                    bar.update(len(grp))
        if bar is not None:
            bar.close()
        res.seconds = time.time() - t0
        return res

    def load(self, t0: float) -> None:
        """Load the model through its backend once (or wrap the given ``lm``)."""
        from .backends import backend_for, load_backend

        self.be = (backend_for(self.lm, batch_tokens=self.batch_tokens) if self.lm is not None else
                   load_backend(self.task.model, device=self.device, batch_tokens=self.batch_tokens))
        self.result.load_seconds = time.time() - t0
        self.result.rank, self.result.world_size = self.be.rank, self.be.world_size

    def open_store(self, exp: ExperimentConfig) -> ResultStore:
        """The store of (exp, model), refusing one that is missing or of another identity."""
        st = ResultStore(self.task.store(exp.name), self.live_jobs)
        if not st.exists:
            raise StoreIdentityError(f"{st.path}: store not found (deleted or moved?); re-plan with "
                                     f"`bayesflip resubmit --sweep {self.task.sweep}` or `debug`")
        diff = identity_diff(st.attrs.get("identity"), identity(exp.hash, self.task.model))
        if diff:
            raise StoreIdentityError(f"{st.path}: this job's identity differs from the store's ({'; '.join(diff)}); "
                                     f"nothing written (re-run with --overwrite or another sweep name)")
        return st

    # ------------------------------------------------------------------ the four steps
    def plan(self) -> tuple[list[_Shard], list, list]:
        """Writer: the task's shards that are neither done nor held by a live job, plus (skipped, held)."""
        todo: list[_Shard] = []
        skipped, held = [], []
        states: dict[str, dict] = {}
        for exp_name, shard in self.task.work:
            if exp_name not in self.stores:
                if exp_name not in self.task.experiments:
                    raise StoreIdentityError(f"experiment {exp_name!r} has no config in this task's plan "
                                             f"(sweep {self.task.sweep!r}); nothing written")
                self.stores[exp_name] = self.open_store(self.task.experiments[exp_name])
                states[exp_name] = self.stores[exp_name].shard_states()
            st = self.stores[exp_name]
            if states[exp_name][shard].state == "done":
                skipped.append((exp_name, shard))
                continue
            holder = st.leases.holder(shard)
            if holder is not None:
                held.append((exp_name, shard, describe_holder(holder)))
                continue
            sl = st.shard_slice(shard)
            todo.append(_Shard(exp_name, shard, sl.start, sl.stop,
                               str(st.path.with_suffix(".work") / f"shard-{shard:06d}")))
        return todo, skipped, held

    def claim(self, exp: ExperimentConfig, grp: list[_Shard], ident: dict, leased: list[int]
              ) -> tuple[list[_Shard], list, list]:
        """Writer: take the group's leases (appended to ``leased``) and re-check each record right before
        computing; returns (shards to compute, skipped, held)."""
        st = self.stores[exp.name]
        live, skipped, held = [], [], []
        for sh in grp:
            try:
                ok, holder = st.leases.acquire(sh.shard)
                if not ok:
                    held.append((exp.name, sh.shard, describe_holder(holder or {})))
                    continue
                leased.append(sh.shard)
                st.check_writable(st.uid, ident)
                if st.shard_state(sh.shard).state == "done":
                    skipped.append((exp.name, sh.shard))
                    continue
                live.append(sh)
            except LeaseLost as e:
                log.warning("%s", e)
                held.append((exp.name, sh.shard, str(e)))
        return live, skipped, held

    def compute(self, exp: ExperimentConfig, batch: list[_Shard]) -> list[dict[str, np.ndarray]]:
        """Every rank: the arrays of each shard of ``batch``, from one ``fam.run`` over their cells."""
        fam = self._families[exp.name]
        if exp.name not in self._cells:
            self._cells[exp.name] = fam.cells(exp.params)
        cells = self._cells[exp.name]
        be = self.be
        ctx = RunContext(scorer=be, model_kind=be.spec.kind, model_name=be.model_name, seed=exp.seed,
                         workdir=Path(batch[0].workdir) if len(batch) == 1 else None)
        self.result.runs += 1
        arrays = fam.run(exp.params, [c for sh in batch for c in cells[sh.start:sh.stop]], ctx)
        # the injected failure comes after the compute, so the ranks' collectives stay matched (an
        # error inside a forward leaves the peers in an all-reduce: BAYESFLIP_DIST_TIMEOUT_MIN bounds it)
        for sh in batch:
            for e, s, r in self._inject:
                if e == exp.name and s == sh.shard and r in (None, be.rank):
                    raise RuntimeError(f"injected failure ({FAIL_ENV}) for {e}:{s}"
                                       + (f" on rank {be.rank}" if r is not None else ""))
        n = sum(sh.stop - sh.start for sh in batch)
        bad = {k: np.asarray(v).shape[:1] for k, v in arrays.items() if np.asarray(v).shape[:1] != (n,)}
        if bad:
            raise ValueError(f"family {fam.name} returned arrays without {n} cells: {bad}")
        out, off = [], 0
        for sh in batch:
            m = sh.stop - sh.start
            out.append({k: np.asarray(v)[off:off + m] for k, v in arrays.items()})
            off += m
        return out

    def compute_group(self, exp: ExperimentConfig, live: list[_Shard]) -> Outcomes:
        """Every rank: compute the group under ``be.agree`` (an error on any rank fails it on all ranks alike);
        a failing group of several shards is re-run shard by shard, so only the failing shard fails."""
        be = self.be
        outcomes: Outcomes = {}
        ts = time.time()
        try:
            parts = be.agree(lambda: self.compute(exp, live), _what(exp.name, live))
            dt = time.time() - ts
            n = sum(sh.stop - sh.start for sh in live)
            for sh, arrays in zip(live, parts):
                outcomes[sh.shard] = self.checked(exp, arrays, round(dt * (sh.stop - sh.start) / n, 3))
        except Exception as e:  # recorded by write() (or retried shard by shard); the task goes on
            if len(live) == 1:
                outcomes[live[0].shard] = ("failed", f"{type(e).__name__}: {e}", traceback.format_exc())
            else:
                if be.is_writer:
                    log.warning("group %s failed (%s: %s); running its %d shards one by one",
                                _what(exp.name, live), type(e).__name__, e, len(live))
                for sh in live:
                    ts = time.time()
                    try:
                        (arrays,) = be.agree(lambda: self.compute(exp, [sh]), _what(exp.name, [sh]))
                        outcomes[sh.shard] = self.checked(exp, arrays, round(time.time() - ts, 3))
                    except Exception as e1:  # noqa: BLE001 — this shard's failed record
                        outcomes[sh.shard] = ("failed", f"{type(e1).__name__}: {e1}", traceback.format_exc())
        return outcomes

    def checked(self, exp: ExperimentConfig, arrays: dict[str, np.ndarray], seconds: float) -> tuple:
        """A shard's outcome: ``("ok", arrays, seconds)``, or ``("failed", why, "")`` when an array breaks
        its ``finite`` requirement (NaN/inf where a number is required: never stored as done)."""
        specs = self._families[exp.name].arrays(exp.params)
        bad = [m for k, v in arrays.items() if k in specs and (m := nonfinite(k, specs[k], v))]
        if bad:
            return ("failed", f"NonFiniteValues: {'; '.join(bad)}", "")
        return ("ok", arrays, seconds)

    def write(self, exp: ExperimentConfig, live: list[_Shard], outcomes: Outcomes, ident: dict
              ) -> list[tuple[int, str, str]]:
        """Writer: chunks + records of the group; (shard, done|failed|held, message) each."""
        st = self.stores[exp.name]
        writer = {"writer_rank": self.be.rank, "world_size": self.be.world_size}
        out = []
        for sh in live:
            kind, a, b = outcomes[sh.shard]
            try:
                if kind == "ok":
                    extra = {"group_shards": len(live)} if len(live) > 1 else {}
                    st.write_shard(sh.shard, a, expect_uid=st.uid, expect_identity=ident, require_lease=True,
                                   seconds=b, model_revision=self.be.revision, **writer, **extra)
                    log.info("computed shard %s:%d of %s", exp.name, sh.shard, st.path)
                    out.append((sh.shard, "done", ""))
                else:
                    log.error("shard %s:%d failed: %s", exp.name, sh.shard, a)
                    with st.fenced(sh.shard, st.uid, ident) as fence:
                        st.write_record(sh.shard, "failed", error=a, traceback=b, **fence, **writer)
                    out.append((sh.shard, "failed", a))
            except LeaseLost as e:
                log.warning("%s", e)
                out.append((sh.shard, "held", str(e)))
        return out

    def run_group(self, grp: list[_Shard]) -> None:
        """claim → compute → write one group; the writer releases the group's leases whatever happens."""
        res = self.result
        exp = self.task.experiments[grp[0].exp]
        ident = identity(exp.hash, self.task.model)
        leased: list[int] = []                   # writer: leases taken for this group
        try:
            live, skipped, held = from_writer(lambda: self.claim(exp, grp, ident, leased),
                                              f"leases of {_what(exp.name, grp)}")
            res.skipped += skipped
            res.held += held
            if not live:
                return
            outcomes = self.compute_group(exp, live)
            # StoreIdentityError / StoreWriteError stop the task, on every rank: one clear error
            for shard, kind, msg in from_writer(lambda: self.write(exp, live, outcomes, ident),
                                                f"writing {_what(exp.name, live)}"):
                if kind == "done":
                    res.done.append((exp.name, shard))
                elif kind == "failed":
                    res.failed.append((exp.name, shard, msg))
                else:
                    res.held.append((exp.name, shard, msg))
        finally:
            if self.be.is_writer:
                for shard in leased:
                    self.stores[exp.name].leases.release(shard)


def run_task(task: TaskPlan, *, device: Optional[str] = None, progress: bool = True, lm: Any = None,
             batch_tokens: int = 8192, group_cells: Optional[int] = None) -> TaskResult:
    """Run one task's (experiment, shard) pairs for its model (see :class:`ShardRunner`)."""
    return ShardRunner(task, device=device, progress=progress, lm=lm, batch_tokens=batch_tokens,
                       group_cells=group_cells).run()


# ---------------------------------------------------------------------- in-process runs
@dataclass
class LocalRun:
    """What :func:`run_local` ran: each task with its result."""

    sweep: str
    tasks: list[tuple[TaskPlan, TaskResult]] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        return sum(len(r.failed) for _, r in self.tasks)

    @property
    def rc(self) -> int:
        """The exit code of ``bayesflip debug``: 1 when a shard failed, else 0."""
        return 1 if self.n_failed else 0


def run_local(sweep: str | SweepConfig, model_type: Optional[str] = None, *, overwrite: bool = False,
              results_dir: Path | str | None = None, device: Optional[str] = None, list_shards: bool = False,
              lm: Any = None, progress: bool = True, out: Callable[[str], Any] = print,
              resume: Optional[str] = None) -> LocalRun:
    """Plan, then run every pending shard in this process (local GPU or CPU): ``bayesflip debug``, ``demo``
    and ``paper-smol``, the cluster jobs' code path without SLURM.

    ``sweep``: a name (configs/sweeps, with ``model_type``) or a :class:`SweepConfig` built in memory. Hub
    models must be prepared (checked first); ``overwrite`` deletes the stores first, refused while a job or
    process of the sweep still works on them. One line per model is printed through ``out``.
    Ctrl-C raises :class:`~bayesflip.errors.Interrupted` ("interrupted; N/M shards done, resume with
    `<resume>`", exit 130 in the CLI): the shards done so far are kept and a re-run skips them."""
    from .models.prepare import require_prepared_models

    if isinstance(sweep, str):
        require_prepared_models(sweep_models(sweep, model_type))
        sweep = load_sweep(sweep, model_type)
    else:
        require_prepared_models(sweep.models)
    if overwrite:
        refuse_busy_overwrite(sweep, results_dir)
    units = plan_sweep(sweep, overwrite=overwrite, results_dir=Path(results_dir) if results_dir else None)
    write_manifest(sweep, units, Submission(mode="debug"), results_dir=results_dir)
    run = LocalRun(sweep.name)
    tasks = make_tasks(sweep.name, units, shards_per_task=10**9, results_dir=results_dir)
    total = sum(u.n_shards for u in units)
    n_held = sum(len(u.held) for u in units)
    if not tasks:
        out(f"{sweep.name}: nothing to do, all {total} shards of {len(units)} stores are done"
            + (f" or held by another live run ({n_held})" if n_held else "") + " (--overwrite recomputes)")
    if resume is None:
        resume = f"bayesflip debug --exp {sweep.name}" + (f" --model-type {model_type}" if model_type else "") \
            + (f" --results-dir {results_dir}" if results_dir else "")
    try:
        _run_tasks(run, tasks, units, device=device, lm=lm, progress=progress, out=out, list_shards=list_shards)
    except KeyboardInterrupt:
        line = f"interrupted; {_done_line(units)}, resume with `{resume}`"
    else:
        return run
    raise Interrupted(line)   # outside the except block: the run's frames (its progress bar) are let go first


def _done_line(units: list) -> str:
    """"N/M shards done" over the units' stores, read back after an interrupt (records only, no checksums)."""
    total = sum(u.n_shards for u in units)
    try:
        done = sum(sum(1 for ss in ResultStore(u.store).shard_states(verify=False).values() if ss.state == "done")
                   for u in units)
    except (BayesflipError, OSError) as e:   # the count is a courtesy: say why it is missing
        return f"? of {total} shards done ({e})"
    return f"{done}/{total} shards done"


def _run_tasks(run: LocalRun, tasks: list, units: list, *, device, lm, progress, out, list_shards) -> None:
    for task in tasks:
        r = run_task(task, device=device, lm=lm, progress=progress)
        run.tasks.append((task, r))
        model = task.model.name
        held = sum(len(u.held) for u in units if u.model.name == model) + len(r.held)
        already = sum(u.n_shards - len(u.pending) - len(u.held) for u in units if u.model.name == model) \
            + len(r.skipped)
        out(f"{model}: {len(r.done)} shards done, {already} already done, {len(r.failed)} failed"
            + (f", {held} held by another live run (not computed here)" if held else "")
            + f" ({r.seconds:.1f} s, model load {r.load_seconds:.1f} s)")
        if list_shards:
            for exp, shard in r.done:
                out(f"  computed {exp}:{shard}")
        for exp, shard, err in r.failed:
            out(f"  FAILED {exp}:{shard}: {err}")
