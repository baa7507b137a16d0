"""DeepSpeed tensor parallelism (TP=2, gloo on CPU) through the REAL job path on the local SLURM.

configs/sweeps/test_tp.yaml (icl_coin 4 shards, icl_die 2, attention_coin 2; one cell each) on
``tiny-random-llama-tp2`` goes out as ONE 2-task job (template cpu-tp2: 1 node × 2 tasks, the
whole 2-core node) through ``submit_sweep(executor="slurm")`` into a temporary results dir:

(a) every shard done, and the stored arrays equal the single-process ``hf`` run of the same
    weights (``tiny-random-llama``: same arch, seed, tokenizer): log-probs ≤ 1e-4, sampled
    outcomes identical, attention mass ≤ 1e-6 (head means all-reduced over the TP ranks);
    every done record says ``writer_rank 0, world_size 2``; the audit lines ("bayesflip: computed")
    appear once per shard over all task logs; ``wait_jobs`` reports 0 failed; ``status`` counts
    the job as one COMPLETED task;
(b) a failure injected on rank 1 only (``BAYESFLIP_INJECT_FAILURE=icl_coin:1@rank1``) fails that
    shard on both ranks with the same message: rank 0 writes its failed record, the other 7
    shards are done, both ranks raise the same ShardsFailed, the job ends (no hang) and
    ``wait_jobs`` reports it FAILED.

Both jobs are submitted at first use (they run one after the other: each fills the node).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
    pytest.skip("SLURM client tools (sinfo/sbatch) not installed; start the local cluster with `make slurm-up`",
                allow_module_level=True)

from bayesflip.hpc.launch import Submission, job_outcome, read_manifest, submit_sweep, wait_jobs  # noqa: E402
from bayesflip.hpc.status import sweep_status  # noqa: E402
from bayesflip.job import FAIL_ENV  # noqa: E402
from conftest import sweep_arrays, sweep_records  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

SWEEP = "test_tp"
TP_MODEL = "tiny-random-llama-tp2"
REF_MODEL = "tiny-random-llama"
EXPS = {"icl_coin": 4, "icl_die": 2, "attention_coin": 2}
ALL_WORK = [(e, s) for e, n in EXPS.items() for s in range(n)]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster():
    r = subprocess.run(["bash", str(REPO / "hpc" / "slurm_status.sh")], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.fail(f"local SLURM cluster not usable ({r.stdout.strip()}); run `make slurm-up`")
    return True


def _cancel(sub: Submission) -> None:
    for a in sub.submitted:
        subprocess.run(["scancel", a.array_id], capture_output=True, timeout=30)


def _wait(sub: Submission, deadline_s: float) -> None:
    end = time.time() + deadline_s
    n = 0
    while not all(j.done(force_check=(n % 5 == 4)) for j in sub.jobs):
        if time.time() > end:
            _cancel(sub)
            pytest.fail(f"TP job not finished after {deadline_s} s (hang?): "
                        f"{[j.state for j in sub.jobs]}; logs under {sub.results_dir}")
        time.sleep(1)
        n += 1


def _arrays(root: Path, model: str) -> dict[str, dict[str, np.ndarray]]:
    return sweep_arrays(root, SWEEP, EXPS, model)


def _records(root: Path) -> dict[tuple[str, int], dict]:
    return sweep_records(root, SWEEP, EXPS, TP_MODEL)


def _audit(root: Path) -> list[str]:
    out = []
    for p in sorted((root / SWEEP / "slurm").rglob("*_log.out")):
        out += [ln.split("bayesflip: computed ", 1)[1].strip() for ln in p.read_text(errors="replace").splitlines()
                if "bayesflip: computed " in ln]
    return out


@pytest.fixture(scope="module")
def launched(cluster, tmp_path_factory):
    import os

    base = tmp_path_factory.mktemp("tp")
    # a submitting shell that ran torchrun / DeepSpeed before: its rendezvous variables must not reach the
    # jobs (both jobs would meet at port 29500 as rank 0 of 1 — CI once hung here)
    stale = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in stale}
    os.environ.update(stale)
    try:
        subs = {"ok": submit_sweep(SWEEP, TP_MODEL, results_dir=base / "ok", out=lambda s: None)}
        os.environ[FAIL_ENV] = "icl_coin:1@rank1"          # sbatch copies the submitting environment
        try:
            subs["fail"] = submit_sweep(SWEEP, TP_MODEL, results_dir=base / "fail", out=lambda s: None)
        finally:
            del os.environ[FAIL_ENV]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield subs
    for s in subs.values():
        _cancel(s)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process hf run of the same weights, 1 thread like each rank."""
    import torch

    from bayesflip.config import load_sweep
    from bayesflip.job import run_task
    from bayesflip.plan import plan_sweep

    root = tmp_path_factory.mktemp("tpref")
    plan_sweep(load_sweep(SWEEP, REF_MODEL), results_dir=root)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = run_task(SWEEP, REF_MODEL, ALL_WORK, device="cpu", progress=False, results_dir=root)
    finally:
        torch.set_num_threads(n)
    assert not r.failed and len(r.done) == len(ALL_WORK)
    return _arrays(root, REF_MODEL)


def test_tp2_job_on_slurm_equals_single_process(launched, reference):
    sub = launched["ok"]
    assert len(sub.submitted) == 1 and len(sub.jobs) == 1      # one 2-task job for all 8 shards
    arr = sub.submitted[0]
    assert arr.plan.template.name == "cpu-tp2" and [t.work for t in arr.plan.tasks] == [ALL_WORK]
    script = (sub.results_dir / SWEEP / "slurm" / arr.array_id / f"{arr.array_id}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --partition=debug" in script
    assert "unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE" in script
    t0 = time.time()
    _wait(sub, 150)
    wall = time.time() - t0
    job = sub.jobs[0]
    assert job.num_tasks == 2
    summaries = [job.task(r).result() for r in range(2)]
    assert [s["rank"] for s in summaries] == [0, 1] and {s["world_size"] for s in summaries} == {2}
    assert summaries[0]["done"] == summaries[1]["done"] and sorted(map(tuple, summaries[0]["done"])) == sorted(ALL_WORK)
    assert summaries[0]["deepspeed_loaded"] and summaries[0]["runs"] == len(EXPS)   # one engine group per experiment
    lines: list[str] = []
    assert wait_jobs(sub, out=lines.append) == 0, lines
    assert "8 done" in lines[0] and "2 ranks" in lines[0]
    print(f"TP=2 job: wall {wall:.1f} s after submission, task {summaries[0]['seconds']:.1f} s "
          f"(load {summaries[0]['load_seconds']:.1f} s)")

    root = sub.results_dir
    recs = _records(root)
    assert set(recs) == set(ALL_WORK)
    for k, rec in recs.items():
        assert rec["status"] == "done", (k, rec)
        assert rec["writer_rank"] == 0 and rec["world_size"] == 2, (k, rec)
    audit = _audit(root)
    assert sorted(audit) == sorted(f"{e}:{s}" for e, s in ALL_WORK), audit      # each shard written once

    got = _arrays(root, TP_MODEL)
    for exp in EXPS:
        ref = reference[exp]
        assert set(got[exp]) == set(ref)
        for k, a in ref.items():
            b = got[exp][k]
            assert b.shape == a.shape, (exp, k)
            if a.dtype.kind != "f":
                assert np.array_equal(b, a), (exp, k)           # outcomes, layer ranges: identical
            else:
                assert not np.isnan(b).any(), (exp, k)
                tol = 1e-6 if k.startswith(("mass", "attn_max")) else 1e-4
                assert np.abs(b - a).max() <= tol, (exp, k, float(np.abs(b - a).max()))

    st = sweep_status(read_manifest(SWEEP, root), results_dir=root)
    end = time.time() + 30
    while any(v not in ("COMPLETED", "FAILED") for v in st.tasks.values()) and time.time() < end:
        time.sleep(1)
        st = sweep_status(read_manifest(SWEEP, root), results_dir=root)
    assert st.tasks == {str(job.job_id): "COMPLETED"}       # one task, not one per rank / step
    assert st.totals() == {"done": 8, "running": 0, "pending": 0, "failed": 0, "corrupt": 0}


def test_failure_on_rank1_fails_the_shard_on_all_ranks(launched):
    sub = launched["fail"]
    _wait(sub, 150)
    job = sub.jobs[0]
    errs = [job.task(r).exception() for r in range(2)]
    assert all(e is not None for e in errs), errs
    tails = [str(e).split("ShardsFailed: ", 1)[1].split("\n----")[0] for e in errs]
    assert tails[0] == tails[1], tails                            # the same failure on both ranks
    assert "icl_coin:1" in tails[0] and "on rank 1" in tails[0] and "1 of 8 shard(s) failed" in tails[0]
    summary, err = job_outcome(job)
    assert summary is None and err.startswith("rank 0 of 2: ") and "ShardsFailed" in err
    lines: list[str] = []
    assert wait_jobs(sub, out=lines.append) == 1 and "FAILED" in lines[0]

    recs = _records(sub.results_dir)
    bad = recs[("icl_coin", 1)]
    assert bad["status"] == "failed" and bad["writer_rank"] == 0 and bad["world_size"] == 2
    assert "failed on rank 1 of 2" in bad["error"] and "injected failure" in bad["error"]
    assert all(r["status"] == "done" for k, r in recs.items() if k != ("icl_coin", 1))
    assert len(recs) == 8
    assert sorted(_audit(sub.results_dir)) == sorted(f"{e}:{s}" for e, s in ALL_WORK if (e, s) != ("icl_coin", 1))
