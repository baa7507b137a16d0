"""Shard-group benchmark: a task's shards scored one engine call per shard vs one per experiment.

Runs :func:`bayesflip.job.run_task` twice in this process on the ``bench_group`` sweep
(``configs/sweeps/bench_group.yaml``: 8 needle + 8 ICL shards) into temporary stores, first with
``group_cells=1`` (one ``fam.run`` per shard, as before shard groups), then with the default
groups, and reports family calls, engine forward calls, wall seconds, their ratios, and the
largest difference between the two runs' float arrays (float32 batches of another composition).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

SWEEP = "bench_group"


def _work(sweep: str, model: str) -> list[tuple[str, int]]:
    from .config import load_sweep
    from .experiments import get_family

    out = []
    for e in load_sweep(sweep, model).experiments:
        n = len(get_family(e.family).cells(e.params))
        out += [(e.name, s) for s in range(-(-n // e.shard_size))]
    return out


def _arrays(root: Path, sweep: str, model: str) -> dict[str, np.ndarray]:
    from .config import load_sweep
    from .store import ResultStore, store_path

    out = {}
    for e in load_sweep(sweep, model).experiments:
        st = ResultStore(store_path(sweep, e.name, model, root))
        out.update({f"{e.name}.{k}": st.read(k) for k in st.attrs["arrays"]})
    return out


def bench_shard_groups(lm, sweep: str = SWEEP) -> dict:
    from .backends import backend_for
    from .config import load_sweep
    from .job import run_task
    from .plan import TaskPlan, plan_sweep

    model = lm.spec.name
    work = _work(sweep, model)
    res: dict = {"shards": len(work)}
    with tempfile.TemporaryDirectory(prefix="bayesflip-bench-groups-") as tmp:
        arrays = {}
        for mode, cells in (("warmup", 1), ("per_shard", 1), ("grouped", None)):
            root = Path(tmp) / mode
            plan_sweep(load_sweep(sweep, model), results_dir=root)
            be = backend_for(lm)
            t = time.perf_counter()
            r = run_task(TaskPlan.resolve(sweep, model, work[:1] if mode == "warmup" else work, root), progress=False,
                         lm=be, group_cells=cells)
            dt = time.perf_counter() - t
            if r.failed:
                raise RuntimeError(f"shard-group benchmark: {mode} run failed: {r.failed[0]}")
            if mode == "warmup":
                continue
            res[mode] = {"family_calls": r.runs, "forward_calls": be.stats.forward_calls, "seconds": dt}
            arrays[mode] = _arrays(root, sweep, model)
    p, g = res["per_shard"], res["grouped"]
    res["forward_calls_ratio"] = p["forward_calls"] / max(1, g["forward_calls"])
    res["speedup"] = p["seconds"] / g["seconds"]
    res["max_abs_diff"] = max((float(np.nanmax(np.abs(a - arrays["grouped"][k])))
                               for k, a in arrays["per_shard"].items() if a.dtype.kind == "f" and a.size), default=0.0)
    return res
