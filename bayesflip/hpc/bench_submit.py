"""``sweep_submit`` benchmark: plan + submit a 1,000-task array to the (local) SLURM.

``sbatch`` calls are counted by a logging wrapper placed first on PATH that execs the real
``sbatch`` (no mock: the jobs are really submitted, then cancelled with ``scancel``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from . import slurm


def submit_array_benchmark(n_tasks: int = 1000, sweep: str = "bench_submit") -> dict:
    real = shutil.which("sbatch")
    if real is None or not slurm.cluster_up():
        raise RuntimeError("no SLURM here (run `make slurm-up`)")
    from .launch import submit_sweep

    tmp = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    log = tmp / "sbatch.log"
    wrapper = tmp / "bin" / "sbatch"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{wrapper.parent}:{old_path}"
    try:
        t0 = time.perf_counter()
        sub = submit_sweep(sweep, results_dir=tmp / "results", shards_per_task=1, array_throttle=2,
                           out=lambda *_: None)
        dt = time.perf_counter() - t0
    finally:
        os.environ["PATH"] = old_path
        slurm.scancel(s.array_id for s in getattr(locals().get("sub"), "submitted", []))
    n_sbatch = len(log.read_text().splitlines()) if log.exists() else 0
    tasks = sum(len(s.jobs) for s in sub.submitted)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"seconds": dt, "tasks": tasks, "sbatch_calls": n_sbatch, "arrays": len(sub.submitted),
            "tasks_per_second": tasks / dt}
