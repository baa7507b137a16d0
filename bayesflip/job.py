"""What a job runs: load the model once, then score its shards into the stores.

The same function runs in ``make debug`` (in-process), in ``make demo`` and inside SLURM
array tasks (via :mod:`bayesflip.hpc`). Per shard: take the shard's lease (skip it when a
live job holds it), re-check its record (skip it when done and its chunks verify), compute,
then write only if the store on disk is still the one of this job's identity and the lease
is still ours. So a requeued or re-run task never recomputes or duplicates, two runs never
compute the same shard, and an old job never writes into a replaced store. A failing shard
is recorded with its error and traceback; the task goes on with its other shards. A store
of another identity (config, model spec, code version) or a failing write (full disk)
stops the task with one clear error.

Shard groups: consecutive pending shards of one experiment whose family is cell-independent
(``Family.batch_across_shards``; not the generational chains / rules / acronym, whose mid-shard
checkpoints are per shard) go through the engine in one ``fam.run`` (at most ``group_cells``
cells, ``$BAYESFLIP_GROUP_CELLS``, default 1024), so the engine sees fewer, larger calls. The
leases of the whole group are held while it computes; the arrays are split back per shard and
each shard is written with its own record (``group_shards`` = the group's size), so a crash
mid-group leaves exactly the unwritten shards pending. A failing group is re-run shard by shard,
so only the failing shard gets a failed record.

Tensor parallelism (DeepSpeed, ``world_size > 1``, one process per rank): the backend is
loaded first; rank 0 alone plans, takes and releases leases, re-checks records and writes
chunks and records, broadcasting every decision and outcome
(:func:`~bayesflip.backends.distributed.from_writer`), so all ranks run the same groups in the
same order; every rank computes under ``be.agree`` (an error on one rank fails the group on all,
before the next collective). Records carry ``writer_rank`` and ``world_size``; every rank's
:class:`TaskResult` has the same lists. Testing hook: ``BAYESFLIP_INJECT_FAILURE=exp:shard``
fails a shard on every rank, ``exp:shard@rank1`` on rank 1 only (raised after the compute, so
the ranks' collectives stay matched).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .config import load_sweep
from .experiments import get_family
from .experiments.base import RunContext
from .errors import LeaseLost, StoreIdentityError
from .store import ResultStore, describe_holder, identity, identity_diff, store_path

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


def open_checked(sweep_name: str, exp, model_spec, results_dir=None) -> ResultStore:
    """The store of (exp, model), refusing one that is missing or of another identity."""
    st = ResultStore(store_path(sweep_name, exp.name, model_spec.name, results_dir))
    if not st.exists:
        raise StoreIdentityError(f"{st.path}: store not found (deleted or moved?); re-plan with "
                                 f"`bayesflip resubmit --sweep {sweep_name}` or `debug`")
    diff = identity_diff(st.attrs.get("identity"), identity(exp.hash, model_spec))
    if diff:
        raise StoreIdentityError(f"{st.path}: this job's identity differs from the store's ({'; '.join(diff)}); "
                                 f"nothing written (re-run with --overwrite or another sweep name)")
    return st


@dataclass(frozen=True)
class _Shard:
    """One pending shard as rank 0 planned it (every rank gets the same list)."""

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


def run_task(sweep_name: str, model_name: str, work: list[tuple[str, int]], device: str | None = None,
             progress: bool = True, results_dir=None, lm=None, batch_tokens: int = 8192,
             group_cells: Optional[int] = None) -> TaskResult:
    """Run (experiment, shard) pairs for one model. Loads the model once (unless ``lm`` is given).

    Pending shards of one experiment go through the engine together (one ``fam.run`` over up to
    ``group_cells`` cells, default ``$BAYESFLIP_GROUP_CELLS`` or 1024, split back per shard;
    ``group_cells=1``: one shard per call) when
    the family is cell-independent; each shard still gets its own record, and a failing group is
    re-run shard by shard so only the failing shard is recorded as failed.

    Tensor parallelism (the backend's ``world_size > 1``, one process per rank): the backend is
    loaded first (it starts torch.distributed); rank 0 alone plans, takes/releases leases,
    re-checks records and writes chunks and records, broadcasting each decision and outcome
    (:func:`~bayesflip.backends.distributed.from_writer`); every rank computes every group under
    ``be.agree`` (an error on one rank fails the group on all). Every rank returns the same lists.
    """
    from .backends.distributed import from_writer
    from .models.registry import get_model_spec

    t0 = time.time()
    res = TaskResult()
    sweep = load_sweep(sweep_name, model_type=model_name)
    spec = get_model_spec(model_name)
    exps = {e.name: e for e in sweep.experiments}
    stores: dict[str, ResultStore] = {}          # rank 0 only

    def plan() -> tuple[list[_Shard], list, list]:
        todo: list[_Shard] = []
        skipped, held = [], []
        states: dict[str, dict] = {}
        for exp_name, shard in work:
            if exp_name not in exps:
                raise StoreIdentityError(f"experiment {exp_name!r} is no longer in sweep {sweep_name!r}; "
                                         f"nothing written")
            if exp_name not in stores:
                stores[exp_name] = open_checked(sweep_name, exps[exp_name], spec, results_dir)
                states[exp_name] = stores[exp_name].shard_states()
            st = stores[exp_name]
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

    def load():
        from .backends import backend_for, load_backend

        return backend_for(lm, batch_tokens=batch_tokens) if lm is not None else \
            load_backend(model_name, device=device, batch_tokens=batch_tokens)

    be = None
    if int(getattr(spec, "tp", 1) or 1) > 1 or int(getattr(lm, "world_size", 1) or 1) > 1:
        be = load()             # starts torch.distributed: rank 0 plans, the other ranks follow
        res.load_seconds = time.time() - t0
        res.rank, res.world_size = be.rank, be.world_size
    todo, res.skipped, res.held = from_writer(plan, "planning the task's shards")
    if not todo:
        res.seconds = time.time() - t0
        return res
    if be is None:
        be = load()
        res.load_seconds = time.time() - t0
    res.rank, res.world_size = be.rank, be.world_size
    writer = {"writer_rank": be.rank, "world_size": be.world_size}
    if group_cells is None:
        try:
            group_cells = int(os.environ.get(GROUP_ENV) or GROUP_CELLS)
        except ValueError:
            raise ValueError(f"{GROUP_ENV}={os.environ.get(GROUP_ENV)!r}: expected a number of cells") from None
    inject = _injected()
    families = {e: get_family(exps[e].family) for e in {sh.exp for sh in todo}}
    groups = group_shards(todo, families, group_cells)
    cells_cache: dict[str, list[dict]] = {}
    bar = None
    if progress and be.is_writer:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc=f"{sweep_name}/{model_name}", unit="shard")

    for grp in groups:
        exp = exps[grp[0].exp]
        fam = families[exp.name]
        ident = identity(exp.hash, spec)
        leased: list[int] = []                   # rank 0: leases taken for this group

        def claim() -> tuple[list[_Shard], list, list]:
            st = stores[exp.name]
            live, skipped, held = [], [], []
            for sh in grp:
                try:
                    ok, holder = st.leases.acquire(sh.shard)
                    if not ok:
                        held.append((exp.name, sh.shard, describe_holder(holder or {})))
                        continue
                    leased.append(sh.shard)
                    st.check_writable(st.uid, ident)
                    if st.shard_state(sh.shard).state == "done":       # re-check right before computing
                        skipped.append((exp.name, sh.shard))
                        continue
                    live.append(sh)
                except LeaseLost as e:
                    log.warning("%s", e)
                    held.append((exp.name, sh.shard, str(e)))
            return live, skipped, held

        def compute(batch: list[_Shard]) -> list[dict[str, np.ndarray]]:
            """Arrays of each shard of ``batch``, from one fam.run over their cells."""
            if exp.name not in cells_cache:
                cells_cache[exp.name] = fam.cells(exp.params)
            cells = cells_cache[exp.name]
            ctx = RunContext(scorer=be, model_kind=be.spec.kind, model_name=be.model_name, seed=exp.seed,
                             workdir=Path(batch[0].workdir) if len(batch) == 1 else None)
            res.runs += 1
            arrays = fam.run(exp.params, [c for sh in batch for c in cells[sh.start:sh.stop]], ctx)
            # the injected failure comes after the compute, so the ranks' collectives stay matched (an
            # error inside a forward leaves the peers in an all-reduce: BAYESFLIP_DIST_TIMEOUT_MIN bounds it)
            for sh in batch:
                for e, s, r in inject:
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

        def what(batch: list[_Shard]) -> str:
            return f"{exp.name}:{','.join(str(sh.shard) for sh in batch)}"

        try:
            live, skipped, held = from_writer(claim, f"leases of {what(grp)}")
            res.skipped += skipped
            res.held += held
            if not live:
                continue
            # every rank computes; an error on any rank fails the group on all ranks alike
            outcomes: dict[int, tuple] = {}
            ts = time.time()
            try:
                parts = be.agree(lambda: compute(live), what(live))
                dt = time.time() - ts
                n = sum(sh.stop - sh.start for sh in live)
                for sh, arrays in zip(live, parts):
                    outcomes[sh.shard] = ("ok", arrays, round(dt * (sh.stop - sh.start) / n, 3))
            except Exception as e:  # recorded below (or retried shard by shard); the task goes on
                if len(live) == 1:
                    outcomes[live[0].shard] = ("failed", f"{type(e).__name__}: {e}", traceback.format_exc())
                else:
                    if be.is_writer:
                        log.warning("group %s failed (%s: %s); running its %d shards one by one",
                                    what(live), type(e).__name__, e, len(live))
                    for sh in live:
                        ts = time.time()
                        try:
                            (arrays,) = be.agree(lambda: compute([sh]), what([sh]))
                            outcomes[sh.shard] = ("ok", arrays, round(time.time() - ts, 3))
                        except Exception as e1:  # noqa: BLE001 — this shard's failed record
                            outcomes[sh.shard] = ("failed", f"{type(e1).__name__}: {e1}", traceback.format_exc())

            def write() -> list[tuple[int, str, str]]:
                """Rank 0: chunks + records of the group; (shard, done|failed|held, message) each."""
                st = stores[exp.name]
                out = []
                for sh in live:
                    kind, a, b = outcomes[sh.shard]
                    try:
                        if kind == "ok":
                            extra = {"group_shards": len(live)} if len(live) > 1 else {}
                            st.write_shard(sh.shard, a, expect_uid=st.uid, expect_identity=ident, require_lease=True,
                                           seconds=b, model_revision=be.revision, **writer, **extra)
                            log.info("computed shard %s:%d of %s", exp.name, sh.shard, st.path)
                            out.append((sh.shard, "done", ""))
                        else:
                            log.error("shard %s:%d failed: %s", exp.name, sh.shard, a)
                            st.check_writable(st.uid, ident, sh.shard)
                            st.write_record(sh.shard, "failed", error=a, traceback=b, **writer)
                            out.append((sh.shard, "failed", a))
                    except LeaseLost as e:
                        log.warning("%s", e)
                        out.append((sh.shard, "held", str(e)))
                return out

            # StoreIdentityError / StoreWriteError stop the task, on every rank: one clear error
            for shard, kind, msg in from_writer(write, f"writing {what(live)}"):
                if kind == "done":
                    res.done.append((exp.name, shard))
                elif kind == "failed":
                    res.failed.append((exp.name, shard, msg))
                else:
                    res.held.append((exp.name, shard, msg))
        finally:
            if be.is_writer:
                for shard in leased:
                    stores[exp.name].leases.release(shard)
            if bar is not None:
                bar.update(len(grp))
    if bar is not None:
        bar.close()
    res.seconds = time.time() - t0
    return res
