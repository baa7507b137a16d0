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
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, field

from .config import load_sweep
from .experiments import get_family
from .experiments.base import RunContext
from .errors import LeaseLost, StoreIdentityError, StoreWriteError
from .store import ResultStore, describe_holder, identity, identity_diff, store_path

log = logging.getLogger(__name__)

FAIL_ENV = "BAYESFLIP_INJECT_FAILURE"  # testing hook: "experiment:shard[,experiment:shard]"


@dataclass
class TaskResult:
    done: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, int, str]] = field(default_factory=list)
    held: list[tuple[str, int, str]] = field(default_factory=list)     # a live job holds the shard
    seconds: float = 0.0
    load_seconds: float = 0.0


def _injected() -> set[tuple[str, int]]:
    spec = os.environ.get(FAIL_ENV, "")
    out = set()
    for part in filter(None, spec.split(",")):
        exp, shard = part.rsplit(":", 1)
        out.add((exp, int(shard)))
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


def run_task(sweep_name: str, model_name: str, work: list[tuple[str, int]], device: str | None = None,
             progress: bool = True, results_dir=None, lm=None, batch_tokens: int = 8192) -> TaskResult:
    """Run (experiment, shard) pairs for one model. Loads the model once (unless ``lm`` is given)."""
    from .models.registry import get_model_spec

    t0 = time.time()
    res = TaskResult()
    sweep = load_sweep(sweep_name, model_type=model_name)
    spec = get_model_spec(model_name)
    exps = {e.name: e for e in sweep.experiments}
    todo: list[tuple[str, int]] = []
    stores: dict[str, ResultStore] = {}
    states: dict[str, dict] = {}
    for exp_name, shard in work:
        if exp_name not in exps:
            raise StoreIdentityError(f"experiment {exp_name!r} is no longer in sweep {sweep_name!r}; nothing written")
        if exp_name not in stores:
            stores[exp_name] = open_checked(sweep_name, exps[exp_name], spec, results_dir)
            states[exp_name] = stores[exp_name].shard_states()
        if states[exp_name][shard].state == "done":
            res.skipped.append((exp_name, shard))
            continue
        holder = stores[exp_name].leases.holder(shard)
        if holder is not None:
            res.held.append((exp_name, shard, describe_holder(holder)))
            continue
        todo.append((exp_name, shard))
    if not todo:
        return res
    from .backends import backend_for, load_backend

    be = backend_for(lm, batch_tokens=batch_tokens) if lm is not None else \
        load_backend(model_name, device=device, batch_tokens=batch_tokens)
    res.load_seconds = time.time() - t0
    inject = _injected()
    cells_cache: dict[str, list[dict]] = {}
    it = todo
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(todo, desc=f"{sweep_name}/{model_name}", unit="shard")
    for exp_name, shard in it:
        exp = exps[exp_name]
        fam = get_family(exp.family)
        st = stores[exp_name]
        ident = identity(exp.hash, spec)
        ok, holder = st.leases.acquire(shard)
        if not ok:
            res.held.append((exp_name, shard, describe_holder(holder or {})))
            continue
        try:
            st.check_writable(st.uid, ident)
            now = st.shard_state(shard)                 # re-check right before computing
            if now.state == "done":
                res.skipped.append((exp_name, shard))
                continue
            if exp_name not in cells_cache:             # once per experiment (setdefault would rebuild it per shard)
                cells_cache[exp_name] = fam.cells(exp.params)
            cells = cells_cache[exp_name]
            sl = st.shard_slice(shard)
            ts = time.time()
            try:
                if (exp_name, shard) in inject:
                    raise RuntimeError(f"injected failure ({FAIL_ENV}) for {exp_name}:{shard}")
                ctx = RunContext(scorer=be, model_kind=be.spec.kind, model_name=be.model_name, seed=exp.seed,
                                 workdir=st.path.with_suffix(".work") / f"shard-{shard:06d}")
                arrays = fam.run(exp.params, cells[sl], ctx)
                st.write_shard(shard, arrays, expect_uid=st.uid, expect_identity=ident, require_lease=True,
                               seconds=round(time.time() - ts, 3), model_revision=be.revision)
                log.info("computed shard %s:%d of %s", exp_name, shard, st.path)
                res.done.append((exp_name, shard))
            except LeaseLost as e:
                log.warning("%s", e)
                res.held.append((exp_name, shard, str(e)))
            except (StoreIdentityError, StoreWriteError):
                raise                                   # the whole task stops: one clear error
            except Exception as e:  # recorded with traceback; the task goes on with its other shards
                log.error("shard %s:%d failed: %s", exp_name, shard, e)
                st.check_writable(st.uid, ident, shard)
                st.write_record(shard, "failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
                res.failed.append((exp_name, shard, f"{type(e).__name__}: {e}"))
        except LeaseLost as e:
            log.warning("%s", e)
            res.held.append((exp_name, shard, str(e)))
        finally:
            st.leases.release(shard)
    res.seconds = time.time() - t0
    return res
