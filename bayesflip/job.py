"""What a job runs: load the model once, then score its shards into the stores.

The same function runs in ``make debug`` (in-process), in ``make demo`` and inside SLURM
array tasks (via :mod:`bayesflip.hpc`). Completed shards (``done`` records) are skipped,
so a requeued or re-run task never recomputes or duplicates. A failing shard is recorded
with its error and traceback; the task goes on with its other shards.
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
from .store import ResultStore, store_path

log = logging.getLogger(__name__)

FAIL_ENV = "BAYESFLIP_INJECT_FAILURE"  # testing hook: "experiment:shard[,experiment:shard]"


@dataclass
class TaskResult:
    done: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, int, str]] = field(default_factory=list)
    seconds: float = 0.0
    load_seconds: float = 0.0


def _injected() -> set[tuple[str, int]]:
    spec = os.environ.get(FAIL_ENV, "")
    out = set()
    for part in filter(None, spec.split(",")):
        exp, shard = part.rsplit(":", 1)
        out.add((exp, int(shard)))
    return out


def run_task(sweep_name: str, model_name: str, work: list[tuple[str, int]], device: str | None = None,
             progress: bool = True, results_dir=None, lm=None, batch_tokens: int = 8192) -> TaskResult:
    """Run (experiment, shard) pairs for one model. Loads the model once (unless ``lm`` is given)."""
    t0 = time.time()
    res = TaskResult()
    sweep = load_sweep(sweep_name, model_type=model_name)
    exps = {e.name: e for e in sweep.experiments}
    todo: list[tuple[str, int]] = []
    stores: dict[str, ResultStore] = {}
    for exp_name, shard in work:
        st = stores.setdefault(exp_name, ResultStore(store_path(sweep_name, exp_name, model_name, results_dir)))
        if shard in st.done_shards():
            res.skipped.append((exp_name, shard))
        else:
            todo.append((exp_name, shard))
    if not todo:
        return res
    if lm is None:
        from .models.loader import load_model
        lm = load_model(model_name, device=device)
    res.load_seconds = time.time() - t0
    from .engine import Scorer

    scorer = Scorer(lm, batch_tokens=batch_tokens)
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
        if st.attrs.get("config_hash") != exp.hash:
            raise RuntimeError(f"{st.path}: config changed since planning (re-plan the sweep)")
        cells = cells_cache.setdefault(exp_name, fam.cells(exp.params))
        sl = st.shard_slice(shard)
        ts = time.time()
        try:
            if (exp_name, shard) in inject:
                raise RuntimeError(f"injected failure ({FAIL_ENV}) for {exp_name}:{shard}")
            ctx = RunContext(scorer=scorer, model_kind=lm.spec.kind, model_name=lm.spec.name, seed=exp.seed,
                             workdir=st.path.with_suffix(".work") / f"shard-{shard:06d}")
            arrays = fam.run(exp.params, cells[sl], ctx)
            st.write_shard(shard, arrays, seconds=round(time.time() - ts, 3), model_revision=lm.revision)
            res.done.append((exp_name, shard))
        except Exception as e:  # recorded with traceback; the task goes on with its other shards
            log.error("shard %s:%d failed: %s", exp_name, shard, e)
            st.write_record(shard, "failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            res.failed.append((exp_name, shard, f"{type(e).__name__}: {e}"))
    res.seconds = time.time() - t0
    return res
