"""The HPC layer against the REAL local SLURM cluster (hpc/slurm_up.sh) and the real SmolLM2.

One tiny sweep (configs/sweeps/test_slurm.yaml: icl_coin 4 shards + icl_die 2 shards, one cell
per shard) is submitted several times into separate temporary results dirs:

(e) bad submissions fail before anything reaches SLURM (no new job in sacct);
(b) array task 0 (5 shards) is interrupted (submitit ``_interrupt``) after ≥1 shard: it is
    requeued, skips its done shards (records untouched) and finishes the rest;
(a) that array (2 tasks) completes and its stores == an uninterrupted in-process ``run_task``
    (the ``debug`` code path);
(c) an injected shard failure is reported by ``status``; ``resubmit`` runs only that shard;
(d) the DeepSpeed backend inside a SLURM task gives the hf log-probs (≤ 1e-6).

The three submissions of (a/b), (c) and (d) go out together at first use (the cluster has 2
cores, task start-up dominates), in that order, so array task 0 starts first and can be
interrupted while it runs. Every wait has a deadline and cancels its jobs when it expires.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
    pytest.skip("SLURM client tools (sinfo/sbatch) not installed; start the local cluster with `make slurm-up`",
                allow_module_level=True)

from bayesflip.errors import ConfigError  # noqa: E402
from bayesflip.hpc.launch import Submission, resubmit_sweep, submit_sweep  # noqa: E402
from bayesflip.hpc.manifest import Manifest  # noqa: E402
from bayesflip.hpc.status import render, sweep_status  # noqa: E402
from bayesflip.job import FAIL_ENV  # noqa: E402
from conftest import sweep_arrays, sweep_records  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

SWEEP = "test_slurm"
MODEL = "smollm2-135m-instruct"
DS_MODEL = "smollm2-135m-instruct-ds"
EXPS = {"icl_coin": 4, "icl_die": 2}          # experiment → shards (must match the sweep file)
ALL_WORK = [(e, s) for e, n in EXPS.items() for s in range(n)]
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------- helpers
def _sacct_jobs(since: str) -> list[str]:
    """Our jobs (name bf-test_slurm-*) submitted since ``since``, from sacct and squeue."""
    r = subprocess.run(["sacct", "-a", "-X", "-n", "-P", "-S", since, "-o", "JobID,JobName"],
                       capture_output=True, text=True, timeout=30, check=True)
    q = subprocess.run(["squeue", "-h", "-o", "%i|%j"], capture_output=True, text=True, timeout=30, check=True)
    lines = r.stdout.splitlines() + q.stdout.splitlines()
    return sorted({ln.split("|")[0] for ln in lines if f"|bf-{SWEEP}-" in ln})


def _cancel(sub: Submission) -> None:
    for a in sub.submitted:
        subprocess.run(["scancel", a.array_id], capture_output=True, timeout=30)


def _wait(sub: Submission, deadline_s: float) -> list:
    """Results (or exceptions) of every task, waiting at most ``deadline_s``; cancels on expiry."""
    end = time.time() + deadline_s
    jobs = sub.jobs
    n = 0
    while not all(j.done(force_check=(n % 5 == 4)) for j in jobs):
        if time.time() > end:
            _cancel(sub)
            states = {j.job_id: j.state for j in jobs}
            pytest.fail(f"jobs not finished after {deadline_s} s: {states}; logs under {sub.results_dir}")
        time.sleep(1)
        n += 1
    out = []
    for j in jobs:
        try:
            out.append(j.result())
        except Exception as e:  # FailedJobError: the caller asserts on it
            out.append(e)
    return out


def _settled_status(root: Path, deadline_s: float = 30):
    """sweep_status once sacct has caught up (no task RUNNING/PENDING any more; sacct lags ~1 s)."""
    end = time.time() + deadline_s
    while True:
        st = sweep_status(Manifest.load(SWEEP, root), results_dir=root)
        busy = [j for j, v in st.tasks.items() if v in ("RUNNING", "PENDING", "COMPLETING", "REQUEUED")]
        if (st.tasks and not busy) or time.time() > end:
            return st
        time.sleep(0.5)


def _arrays(root: Path, model: str) -> dict[str, dict[str, np.ndarray]]:
    return sweep_arrays(root, SWEEP, EXPS, model)


def _assert_same(got: dict, ref: dict, atol: float = 1e-6) -> None:
    for exp, arrays in ref.items():
        assert set(got[exp]) == set(arrays)
        for k, a in arrays.items():
            b = got[exp][k]
            assert b.shape == a.shape, (exp, k)
            if a.dtype.kind == "f":
                assert not np.isnan(b).any(), f"{exp}.{k}: unwritten cells (NaN)"
                assert np.allclose(b, a, rtol=0, atol=atol), (exp, k, float(np.abs(b - a).max()))
            else:
                assert np.array_equal(b, a), (exp, k)


def _records(root: Path, model: str = MODEL) -> dict[tuple[str, int], dict]:
    return sweep_records(root, SWEEP, EXPS, model)


def _submit(root: Path, model: str = MODEL, **kw) -> Submission:
    lines: list[str] = []
    sub = submit_sweep(SWEEP, model, results_dir=root, out=lines.append, **kw)
    sub.log = lines  # type: ignore[attr-defined]
    return sub


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster():
    r = subprocess.run(["bash", str(REPO / "hpc" / "slurm_status.sh")], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.fail(f"local SLURM cluster not usable ({r.stdout.strip()}); run `make slurm-up`")
    return True


@pytest.fixture(scope="module")
def launched(cluster, tmp_path_factory):
    """(a/b), (c) and (d) submitted at once; each test waits for its own."""
    base = tmp_path_factory.mktemp("hpc")
    subs = {"array": _submit(base / "array", shards_per_task=5)}     # tasks of 5 and 1 shard(s)
    os.environ[FAIL_ENV] = "icl_coin:1"          # sbatch copies the submitting environment
    try:
        subs["fail"] = _submit(base / "fail", shards_per_task=len(ALL_WORK))
    finally:
        del os.environ[FAIL_ENV]
    subs["ds"] = _submit(base / "ds", DS_MODEL, shards_per_task=len(ALL_WORK))
    yield subs
    for s in subs.values():
        _cancel(s)


@pytest.fixture(scope="module")
def reference(smol, tmp_path_factory):
    """The uninterrupted in-process run (the `bayesflip debug` code path), 1 thread like the tasks."""
    import torch

    from bayesflip.config import load_sweep
    from bayesflip.job import run_task
    from bayesflip.plan import TaskPlan
    from bayesflip.plan import plan_sweep

    root = tmp_path_factory.mktemp("ref")
    plan_sweep(load_sweep(SWEEP, MODEL), results_dir=root)
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # cpus_per_task = 1 in the tasks: same reduction order, same bits
    try:
        r = run_task(TaskPlan.resolve(SWEEP, MODEL, ALL_WORK, root), device="cpu", progress=False, lm=smol)
    finally:
        torch.set_num_threads(n)
    assert not r.failed and len(r.done) == len(ALL_WORK)
    return _arrays(root, MODEL)


# ---------------------------------------------------------------------- (e) fail before submitting
def test_bad_submissions_fail_before_submitting(cluster, tmp_path, capsys):
    from bayesflip.cli import main

    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 2))
    before = _sacct_jobs(since)
    res = str(tmp_path / "res")

    # unknown MODEL_TYPE → config error, exit 2
    assert main(["submit", "--exp", SWEEP, "--model-type", "no-such-type", "--results-dir", res]) == 2
    err = capsys.readouterr().err
    assert "MODEL_TYPE" in err and "no-such-type" in err and "allowed:" in err

    # a template asking for more than partition debug has (1 GPU; the node has none)
    assert main(["submit", "--exp", SWEEP, "--model-type", MODEL, "--template", "gpu-small",
                 "--partition", "debug", "--results-dir", res]) == 2
    err = capsys.readouterr().err
    assert "gpu-small.gpus_per_node" in err and "partition 'debug'" in err and "at most 0" in err
    with pytest.raises(ConfigError, match=r"huge\.mem_gb.*100000 GB.*at most"):
        _too_much_memory(tmp_path)

    # an unknown partition names the known ones
    with pytest.raises(ConfigError, match=r"unknown partition 'nope'.*allowed: debug"):
        submit_sweep(SWEEP, MODEL, results_dir=Path(res), partition="nope", out=lambda s: None)

    # an empty grid (a sweep listing no experiments), through the real CLI and a private config dir
    cfg = tmp_path / "configs"
    shutil.copytree(REPO / "configs", cfg)
    (cfg / "sweeps" / "empty_grid.yaml").write_text(f"models: [{MODEL}]\nexperiments: {{}}\n")
    r = subprocess.run([sys.executable, "-m", "bayesflip.cli", "submit", "--exp", "empty_grid", "--results-dir", res],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "BAYESFLIP_CONFIG_DIR": str(cfg)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "empty grid" in r.stderr and "'experiments'" in r.stderr

    assert not Manifest.path(SWEEP, res).exists()
    assert not (Path(res) / SWEEP / "icl_coin").exists()       # checks ran before planning created stores
    time.sleep(1.5)   # sacct lags ~1 s
    assert _sacct_jobs(since) == before, "a job was submitted although the submission was invalid"


def _too_much_memory(tmp: Path):
    """A template file asking for more memory than the node has (private template dir)."""
    from bayesflip.hpc import slurm, templates as T

    tdir = tmp / "templates"
    tdir.mkdir(exist_ok=True)
    (tdir / "huge.yaml").write_text("partition: debug\ncpus_per_task: 1\nmem_gb: 100000\ntime_min: 5\n")
    tpl = T.load_template("huge", tdir)
    T.check_against_partition(tpl, slurm.query_partition("debug"))


# ---------------------------------------------------------------------- (b) preemption → requeue → resume
INTERRUPT = {}   # what (b) saw before interrupting; (a) checks the end state of the same array


def test_interrupted_array_task_requeues_and_resumes(launched):
    sub = launched["array"]
    job0 = sub.submitted[0].jobs[0]
    work0 = sub.submitted[0].plan.tasks[0].work
    assert work0 == ALL_WORK[:5]
    end = time.time() + 150
    while True:
        done = {k: r for k, r in _records(sub.results_dir).items() if k in work0 and r["status"] == "done"}
        if done:
            break
        if time.time() > end:
            _cancel(sub)
            pytest.fail("no shard of array task 0 finished in time")
        time.sleep(0.2)
    assert len(done) < len(work0), "task 0 finished before it could be interrupted"
    job0._interrupt()                       # SIGTERM + USR2 as on preemption: checkpoint() + requeue
    INTERRUPT.update(done=done)
    results = _wait(sub, 180)
    INTERRUPT.update(results=results)
    r0 = results[0]
    assert isinstance(r0, dict), r0
    assert r0["restarts"] >= 1              # SLURM_RESTART_COUNT: the task really was requeued
    skipped = {tuple(w) for w in r0["skipped"]}
    assert set(done) <= skipped             # shards done before the interrupt were not recomputed
    assert skipped | {tuple(w) for w in r0["done"]} == set(work0)
    after = _records(sub.results_dir)
    assert {k: after[k] for k in done} == done   # their records (time, job, host) are untouched
    assert all(after[k]["status"] == "done" for k in ALL_WORK)


# ---------------------------------------------------------------------- (a) array == debug run
def test_array_completes_and_equals_debug_run(launched, reference):
    sub = launched["array"]
    assert len(sub.submitted) == 1                       # one array for the one (model, template)
    arr = sub.submitted[0]
    assert [t.work for t in arr.plan.tasks] == [ALL_WORK[:5], ALL_WORK[5:]]
    script = (sub.results_dir / SWEEP / "slurm" / arr.array_id / f"{arr.array_id}_submission.sh").read_text()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --partition=debug" in script
    assert "#SBATCH --cpus-per-task=1" in script and "#SBATCH --signal=USR2@60" in script

    results = INTERRUPT.get("results") or _wait(sub, 180)
    assert all(isinstance(r, dict) for r in results), results
    assert sorted(tuple(w) for r in results for w in r["done"] + r["skipped"]) == sorted(ALL_WORK)
    assert all(not r["deepspeed_loaded"] for r in results)
    # the tasks group their shards differently from the one-task reference (task 0: icl_die:0 alone),
    # and another batch composition moves float32 log-probs by ~1e-5 (measured 1.2e-5; grouping: bayesflip.job)
    _assert_same(_arrays(sub.results_dir, MODEL), reference, atol=5e-5)

    manifest = Manifest.load(SWEEP, sub.results_dir)
    subm = manifest.submissions[-1]
    assert subm.command == "submit" and subm.arrays[0].array_id == arr.array_id
    assert [t.work for t in subm.arrays[0].tasks] == [list(ALL_WORK[:5]), list(ALL_WORK[5:])]
    st = _settled_status(sub.results_dir)
    assert st.totals() == {"done": 6, "running": 0, "pending": 0, "failed": 0, "corrupt": 0}
    assert sorted(st.tasks) == [f"{arr.array_id}_0", f"{arr.array_id}_1"]
    assert set(st.tasks.values()) == {"COMPLETED"}


# ---------------------------------------------------------------------- (c) failure → status → resubmit
def test_failed_shard_reported_then_resubmit_completes_only_it(launched, reference, capsys):
    from bayesflip.cli import main

    sub = launched["fail"]
    (res,) = _wait(sub, 180)
    assert isinstance(res, Exception) and "injected failure" in str(res) and "icl_coin:1" in str(res)
    root = sub.results_dir
    recs = _records(root)
    assert recs[("icl_coin", 1)]["status"] == "failed"
    assert sum(r["status"] == "done" for r in recs.values()) == 5

    _settled_status(root)
    assert main(["status", "--sweep", SWEEP, "--results-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "injected failure" in out and "icl_coin:1" in out
    st = sweep_status(Manifest.load(SWEEP, root), results_dir=root)
    coin = next(u for u in st.units if u.experiment == "icl_coin")
    assert coin.shards == {0: "done", 1: "failed", 2: "done", 3: "done"}
    assert "injected failure" in coin.errors[1]
    assert list(st.tasks.values()) == ["FAILED"]
    assert "injected failure" in next(iter(st.task_errors.values()))   # the task's stderr tail

    assert FAIL_ENV not in os.environ
    done_before = {k: v for k, v in recs.items() if v["status"] == "done"}
    lines: list[str] = []
    sub2 = resubmit_sweep(SWEEP, results_dir=root, out=lines.append)
    assert [t.work for a in sub2.submitted for t in a.plan.tasks] == [[("icl_coin", 1)]], lines
    (res2,) = _wait(sub2, 150)
    assert res2["done"] == [["icl_coin", 1]] and res2["skipped"] == []
    after = _records(root)
    assert {k: after[k] for k in done_before} == done_before       # nothing recomputed
    assert after[("icl_coin", 1)]["status"] == "done"
    _assert_same(_arrays(root, MODEL), reference, atol=5e-5)     # icl_coin:1 recomputed alone, not in its group
    st = _settled_status(root)
    assert st.totals()["done"] == 6 and st.totals()["failed"] == 0
    assert [ln for ln in render(st).splitlines() if ln.startswith("total")][0].split()[1] == "6/6"


# ---------------------------------------------------------------------- (d) DeepSpeed inside a task
def test_deepspeed_backend_in_slurm_task_matches_hf(launched, reference):
    sub = launched["ds"]
    (res,) = _wait(sub, 180)
    assert isinstance(res, dict), res
    assert res["deepspeed_loaded"] is True and res["model"] == DS_MODEL and res["job_id"]
    assert sorted(map(tuple, res["done"])) == sorted(ALL_WORK)
    got = _arrays(sub.results_dir, DS_MODEL)
    for exp in EXPS:
        assert np.abs(got[exp]["logprobs"] - reference[exp]["logprobs"]).max() <= 1e-6
        assert np.array_equal(got[exp]["outcomes"], reference[exp]["outcomes"])
