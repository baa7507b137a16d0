"""A chain job interrupted under the real SLURM resumes at the next generation.

The first SLURM task runs with ``BAYESFLIP_CHAINS_INTERRUPT=1`` (the chain family stops right
after generation 1 was checkpointed, like a preemption; the shard is recorded as failed).
The checkpoint's generation-0 reads are then overwritten with a marker value: a resubmitted
task that resumed keeps the marker, one that recomputed from scratch would not. ``resubmit``
runs the shard again under SLURM; generations 1.. equal an uninterrupted in-process run.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

if shutil.which("sbatch") is None:
    pytest.skip("SLURM client tools not installed; start the local cluster with `make slurm-up`",
                allow_module_level=True)

from bayesflip.experiments.checkpoint import INTERRUPT_ENV, STATE_FILE  # noqa: E402
from bayesflip.hpc.launch import resubmit_sweep, submit_sweep  # noqa: E402
from bayesflip.store import ResultStore, store_path  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slurm]
SWEEP, EXP, MODEL = "test_chain_slurm", "chain_coin", "smollm2-135m-instruct"
MARK = -123.0


def _wait_done(sub, deadline_s=240):
    end = time.time() + deadline_s
    while not all(j.done(force_check=True) for j in sub.jobs):
        assert time.time() < end, f"jobs not finished after {deadline_s} s"
        time.sleep(1)


def test_chain_interrupted_under_slurm_resumes_at_next_generation(smol, tmp_path):
    import torch

    root = tmp_path / "slurm"
    os.environ[INTERRUPT_ENV] = "1"  # sbatch copies the submitting environment
    try:
        sub = submit_sweep(SWEEP, results_dir=root, out=lambda *_: None)
    finally:
        del os.environ[INTERRUPT_ENV]
    _wait_done(sub)
    st = ResultStore(store_path(SWEEP, EXP, MODEL, root))
    recs = st.records()
    assert recs[0]["status"] == "failed" and "ChainInterrupted" in recs[0]["error"]
    ck = st.path.with_suffix(".work") / "shard-000000" / STATE_FILE
    with np.load(ck) as z:
        state = {k: z[k] for k in z.files}
    assert int(state["next_gen"]) == 2
    state["logprobs"][:, 0] = MARK  # a resumed task keeps this; a recomputing one would not
    np.savez(ck, **state)

    sub2 = resubmit_sweep(SWEEP, results_dir=root, out=lambda *_: None)
    assert sum(len(s.jobs) for s in sub2.submitted) == 1
    _wait_done(sub2)
    assert st.records()[0]["status"] == "done"
    got = {k: st.read(k) for k in ("logprobs", "outcomes", "counts")}
    assert (got["logprobs"][:, 0] == MARK).all()

    # the uninterrupted run, in-process with 1 thread like the SLURM task
    from bayesflip.config import load_sweep
    from bayesflip.job import run_task
    from bayesflip.plan import TaskPlan, plan_sweep

    ref_root = tmp_path / "ref"
    plan_sweep(load_sweep(SWEEP), results_dir=ref_root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = run_task(TaskPlan.resolve(SWEEP, MODEL, [(EXP, 0)], ref_root), lm=smol, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert r.done == [(EXP, 0)]
    ref = ResultStore(store_path(SWEEP, EXP, MODEL, ref_root))
    assert np.array_equal(got["outcomes"], ref.read("outcomes"))
    assert np.array_equal(got["counts"], ref.read("counts"))
    assert np.allclose(got["logprobs"][:, 1:], ref.read("logprobs")[:, 1:], atol=1e-6)
