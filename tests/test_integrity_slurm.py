"""Faults injected on the REAL local SLURM cluster with real Zarr stores (tiny-random model).

One test per defect of issue 11; each failed on the code before it:

* ``submit --overwrite`` (seed changed) while the old array runs → refused; with
  ``--cancel-running`` the old jobs are cancelled and the new store holds only new-config data,
  equal to a clean run, with no record of the old identity;
* a deleted chunk, a flipped byte and a deleted ``.zarr`` (records left) → ``status --json``
  reports them corrupt, reduce does not trust them, ``resubmit`` recomputes exactly those and
  the arrays equal an uninterrupted run (1 thread, np.array_equal);
* the registry's dtype changed between a kill and the resume → refused, the field named, no job;
  a job of the old identity refuses to write;
* a second ``submit`` of a running sweep → every shard is computed once (task log lines);
* bad configs → exit 2, one line, no traceback, nothing under the results dir, no job in sacct;
  ``--dry-run`` writes nothing; more tasks than MaxArraySize are split before anything is created.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
    pytest.skip("SLURM client tools not installed; start the local cluster with `make slurm-up`",
                allow_module_level=True)

from bayesflip.hpc.manifest import Manifest  # noqa: E402
from bayesflip.hpc.slurm import ACTIVE, QUEUED, task_states  # noqa: E402
from bayesflip.store import ResultStore, store_path  # noqa: E402
from conftest import private_configs as configs  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MODEL = "tiny-random"
SLOW = """models: [tiny-random]
experiments:
  icl_coin: {{seed: {seed}, shard_size: 2, params: {{thetas: [0.1, 0.2, 0.3, 0.5, 0.6, 0.8, 0.9, 1.0], n_flips: 150, samples: 4}}}}
"""
N = 16   # shards (32 cells, 2 per shard); the old arrays run 2 shards per task, one task at a time


# ---------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def cluster():
    r = subprocess.run(["bash", str(REPO / "hpc" / "slurm_status.sh")], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.fail(f"local SLURM cluster not usable ({r.stdout.strip()}); run `make slurm-up`")


def bf(args: list[str], cfg: Path | None = None, timeout: float = 300, env: dict | None = None):
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    if cfg is not None:
        e["BAYESFLIP_CONFIG_DIR"] = str(cfg)
    return subprocess.run([PY, "-m", "bayesflip.cli", *args], env=e, capture_output=True, text=True, timeout=timeout)


def manifest(root: Path, sweep: str) -> Manifest:
    return Manifest.load(sweep, root)


def wait_sweep(root: Path, sweep: str, deadline_s: float = 300) -> dict[str, str]:
    """Wait until no task of any submission of the sweep is queued/running; cancel on expiry."""
    end = time.time() + deadline_s
    while True:
        arrays = manifest(root, sweep).slurm_array_ids()
        states = task_states(arrays)
        if states and not any(v in ACTIVE | QUEUED for v in states.values()):
            return states
        if time.time() > end:
            subprocess.run(["scancel", *arrays], capture_output=True)
            pytest.fail(f"jobs of {sweep} not finished after {deadline_s} s: {states}")
        time.sleep(1)


def sacct_since(since: str, prefixes: tuple[str, ...]) -> set[str]:
    """Job ids (sacct since ``since`` + squeue) whose name starts with one of ``prefixes`` (other
    helpers' tests share the cluster: only our job names count)."""
    r = subprocess.run(["sacct", "-a", "-X", "-n", "-P", "-S", since, "-o", "JobID,JobName%100"],
                       capture_output=True, text=True, timeout=30, check=True)
    q = subprocess.run(["squeue", "-h", "-o", "%i|%j"], capture_output=True, text=True, timeout=30, check=True)
    return {ln.split("|")[0] for ln in r.stdout.splitlines() + q.stdout.splitlines()
            if "|" in ln and ln.split("|", 1)[1].startswith(prefixes)}


def task_log_lines(root: Path, sweep: str, what: str = "computed") -> list[str]:
    out = []
    for p in (root / sweep / "slurm").rglob("*_log.out"):
        out += [ln.split(f"bayesflip: {what} ", 1)[1].strip() for ln in p.read_text(errors="replace").splitlines()
                if f"bayesflip: {what} " in ln]
    return out


def arrays_of(root: Path, sweep: str, exp: str) -> dict[str, np.ndarray]:
    st = ResultStore(store_path(sweep, exp, MODEL, root))
    return {k: st.read(k) for k in st.attrs["arrays"]}


def assert_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k


def status_json(root: Path, sweep: str) -> dict:
    r = bf(["status", "--sweep", sweep, "--results-dir", str(root), "--json"])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_records(st_path: Path, n: int, deadline_s: float = 240) -> None:
    end = time.time() + deadline_s
    recs = st_path.with_suffix(".records")
    while len(list(recs.glob("shard-*.json"))) < n:
        assert time.time() < end, f"fewer than {n} records under {recs} after {deadline_s} s"
        time.sleep(0.3)


# ---------------------------------------------------------------------- 1. overwrite while the old array runs
def test_overwrite_while_old_array_runs_keeps_only_new_config(cluster, tmp_path):
    cfg = configs(tmp_path, {"ow": SLOW.format(seed=1)})
    root = tmp_path / "res"
    # 8 tasks of 2 shards, one at a time: the old array stays active while we act
    r = bf(["submit", "--exp", "ow", "--results-dir", str(root), "--shards-per-task", "2", "--array-throttle", "1"], cfg)
    assert r.returncode == 0, r.stderr
    path = store_path("ow", "icl_coin", MODEL, root)
    wait_records(path, 1)                                    # the old task runs, with the old config loaded
    configs(tmp_path, {"ow": SLOW.format(seed=2)})           # the user changes the seed ...
    r = bf(["submit", "--exp", "ow", "--results-dir", str(root), "--overwrite"], cfg)
    assert r.returncode == 2 and "still active" in r.stderr and "--cancel-running" in r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    r = bf(["submit", "--exp", "ow", "--results-dir", str(root), "--overwrite", "--cancel-running",
            "--shards-per-task", str(N)], cfg)
    assert r.returncode == 0, r.stderr
    assert "cancelled" in r.stdout
    states = wait_sweep(root, "ow")
    assert list(states.values()).count("COMPLETED") >= 1 and "CANCELLED" in states.values(), states
    st = ResultStore(path)
    ident = st.attrs["identity_hash"]
    recs = st.records()
    assert len(recs) == N and all(r["status"] == "done" and r["identity_hash"] == ident and
                                  r["store_uid"] == st.uid for r in recs.values())
    assert st.attrs["seed"] == 2 and st.done_shards() == set(range(N))
    # a clean run of the new config (1 thread, like the tasks)
    clean = tmp_path / "clean"
    r = bf(["debug", "--exp", "ow", "--results-dir", str(clean)], cfg, timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert_equal(arrays_of(root, "ow", "icl_coin"), arrays_of(clean, "ow", "icl_coin"))


# ---------------------------------------------------------------------- 2. damaged stores are detected and repaired
def test_deleted_chunk_flipped_byte_deleted_store_reported_and_repaired(cluster, tmp_path, tiny):
    import torch

    from bayesflip.config import load_sweep
    from bayesflip.job import run_task
    from bayesflip.plan import TaskPlan, plan_sweep
    from bayesflip.reduce.load import load_sweep_data

    root = tmp_path / "res"
    r = bf(["submit", "--exp", "test_slurm", "--model-type", MODEL, "--results-dir", str(root),
            "--shards-per-task", "6"])
    assert r.returncode == 0, r.stderr
    wait_sweep(root, "test_slurm")
    coin = ResultStore(store_path("test_slurm", "icl_coin", MODEL, root))
    die = store_path("test_slurm", "icl_die", MODEL, root)
    assert coin.done_shards() == {0, 1, 2, 3}
    before = coin.records()
    gone = coin.path / "logprobs" / "c" / "1" / "0" / "0"
    gone.unlink()                                                       # a deleted chunk
    flipped = coin.path / "logprobs" / "c" / "2" / "0" / "0"
    b = bytearray(flipped.read_bytes())
    b[-3] ^= 0x10                                                       # a flipped byte
    flipped.write_bytes(bytes(b))
    shutil.rmtree(die)                                                  # a deleted store, records left

    doc = status_json(root, "test_slurm")
    by = {s["experiment"]: s for s in doc["stores"]}
    assert by["icl_coin"]["done"] == 2 and by["icl_coin"]["corrupt"] == 2
    probs = {p["shard"]: p for p in by["icl_coin"]["problems"]}
    assert probs[1]["state"] == "corrupt" and str(gone) in probs[1]["message"] and "missing" in probs[1]["message"]
    assert probs[2]["state"] == "corrupt" and str(flipped) in probs[2]["message"]
    assert by["icl_die"]["done"] == 0 and by["icl_die"]["corrupt"] + by["icl_die"]["pending"] == 2
    assert "missing" in by["icl_die"]["problems"][0]["message"]

    data = load_sweep_data("test_slurm", root)                          # reduce: never trusts them
    cov = {(r.experiment, r.shard): r.status for r in data.coverage.itertuples()}
    assert cov[("icl_coin", 1)] == cov[("icl_coin", 2)] == "corrupt-chunk" and cov[("icl_die", -1)] == "missing-store"
    s = next(x for x in data.stores if x.experiment == "icl_coin")
    assert sorted(s.cells["shard"]) == [0, 3] and not np.isnan(s.arrays["logprobs"]).any()

    r = bf(["resubmit", "--sweep", "test_slurm", "--results-dir", str(root)])
    assert r.returncode == 0, r.stderr
    assert "4 to submit" in r.stdout, r.stdout
    wait_sweep(root, "test_slurm")
    assert sorted(task_log_lines(root, "test_slurm")) == sorted(
        ["icl_coin:0", "icl_coin:1", "icl_coin:2", "icl_coin:3", "icl_die:0", "icl_die:1",    # first run
         "icl_coin:1", "icl_coin:2", "icl_die:0", "icl_die:1"])                                # the repairs
    after = coin.records()
    assert after[0] == before[0] and after[3] == before[3]              # intact shards untouched
    doc = status_json(root, "test_slurm")
    assert doc["totals"] == {"total": 6, "done": 6, "running": 0, "pending": 0, "failed": 0, "corrupt": 0}

    ref = tmp_path / "ref"                                              # the uninterrupted run, 1 thread
    plan_sweep(load_sweep("test_slurm", MODEL), results_dir=ref)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        work = [("icl_coin", s) for s in range(4)] + [("icl_die", 0), ("icl_die", 1)]
        rr = run_task(TaskPlan.resolve("test_slurm", MODEL, work, ref), device="cpu", progress=False, lm=tiny)
    finally:
        torch.set_num_threads(n)
    assert len(rr.done) == 6
    for exp in ("icl_coin", "icl_die"):
        assert_equal(arrays_of(root, "test_slurm", exp), arrays_of(ref, "test_slurm", exp))


# ---------------------------------------------------------------------- 3. identity changed between kill and resume
def test_registry_dtype_changed_between_kill_and_resume_is_refused(cluster, tmp_path):
    cfg = configs(tmp_path, {"dt": SLOW.format(seed=3)})
    root = tmp_path / "res"
    r = bf(["submit", "--exp", "dt", "--results-dir", str(root), "--shards-per-task", "2", "--array-throttle", "1"], cfg)
    assert r.returncode == 0, r.stderr
    path = store_path("dt", "icl_coin", MODEL, root)
    wait_records(path, 1)
    subprocess.run(["scancel", *manifest(root, "dt").slurm_array_ids()], check=True)   # the kill
    wait_sweep(root, "dt")
    assert 1 <= len(ResultStore(path).done_shards()) < N
    recs_before = ResultStore(path).records()
    reg = cfg / "models" / "local.yaml"
    text = reg.read_text()
    i = text.index("tiny-random:")
    reg.write_text(text[:i] + text[i:].replace("dtype: float32", "dtype: bfloat16", 1))   # registry changed

    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
    jobs = sacct_since(since, ("bf-dt-",))
    r = bf(["resubmit", "--sweep", "dt", "--results-dir", str(root)], cfg)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "dtype: store='float32' now='bfloat16'" in r.stderr
    # a job resolved from the new registry (a script, or a task pickled by an older bayesflip) refuses to
    # write into the float32 store (a task submitted now carries the ModelSpec it was planned with)
    code = ("from bayesflip.job import run_task\nfrom bayesflip.plan import TaskPlan\n"
            f"run_task(TaskPlan.resolve('dt', '{MODEL}', [('icl_coin', s) for s in range({N})], '{root}'), "
            "progress=False)")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "BAYESFLIP_CONFIG_DIR": str(cfg)})
    assert p.returncode != 0 and "StoreIdentityError" in p.stderr and "dtype: store='float32'" in p.stderr
    assert ResultStore(path).records() == recs_before                  # nothing written
    time.sleep(1.5)
    old = set(manifest(root, "dt").slurm_array_ids())   # the cancelled array may reach sacct late: not a new job
    assert not {j for j in sacct_since(since, ("bf-dt-",)) - jobs if j.split("_")[0] not in old}   # nothing submitted
    assert len(manifest(root, "dt").submissions) == 1


# ---------------------------------------------------------------------- 4. a second submit while the sweep runs
def test_second_submit_of_running_sweep_computes_each_shard_once(cluster, tmp_path):
    cfg = configs(tmp_path, {"twice": SLOW.format(seed=4)})
    root = tmp_path / "res"
    # one shard (2 cells) per engine call, so the sweep still runs when the second submit comes
    # (sbatch copies the environment; grouped, the tasks can finish before it)
    r = bf(["submit", "--exp", "twice", "--results-dir", str(root), "--shards-per-task", "8"], cfg,
           env={"BAYESFLIP_GROUP_CELLS": "2"})
    assert r.returncode == 0, r.stderr
    r2 = bf(["submit", "--exp", "twice", "--results-dir", str(root), "--shards-per-task", "8"], cfg)
    assert r2.returncode == 0, r2.stderr
    # whatever the first array has reached by now, nothing of it is submitted again: its shards are
    # queued/running (manifest), held by a live lease, or already done
    assert "nothing to submit" in r2.stdout and re.search(
        r"\d+ (still queued/running|held by a live job), skipped|; 0 of \d+ shard\(s\) pending", r2.stdout), r2.stdout
    wait_sweep(root, "twice")
    r3 = bf(["resubmit", "--sweep", "twice", "--results-dir", str(root)], cfg)     # and a resubmit after it
    assert r3.returncode == 0 and "nothing to submit" in r3.stdout, r3.stdout + r3.stderr
    computed = task_log_lines(root, "twice")
    assert sorted(computed) == sorted(f"icl_coin:{s}" for s in range(N)), computed
    assert ResultStore(store_path("twice", "icl_coin", MODEL, root)).done_shards() == set(range(N))


# ---------------------------------------------------------------------- 5. bad configs: one line, nothing made
BAD = {
    "bad_utf8": b"models: [tiny-random]\nexperiments:\n  icl_coin: {seed: 1}\n# caf\xe9\n",
    "bad_list": "models: [tiny-random]\nexperiments: [icl_coin]\n",
    "bad_override": "models: [tiny-random]\nexperiments:\n  icl_coin: [1, 2]\n",
    "bad_shard_bool": "models: [tiny-random]\nexperiments:\n  icl_coin: {shard_size: true}\n",
    "bad_param_bool": "models: [tiny-random]\nexperiments:\n  icl_coin: {params: {n_flips: true}}\n",
    "bad_dup": "models: [tiny-random]\nexperiments:\n  icl_coin: {seed: 1}\n  icl_coin: {seed: 2}\n",
    "bad_exp_path": "models: [tiny-random]\nexperiments:\n  ../experiments/icl_coin: {}\n",
    "bad_models": "models: {tiny-random: 1}\nexperiments:\n  icl_coin: {}\n",
}
EXPECT = {"bad_utf8": "not UTF-8", "bad_list": "'experiments': must be a mapping", "bad_override":
          "'experiments.icl_coin': must be a mapping", "bad_shard_bool": "'experiments.icl_coin.shard_size'",
          "bad_param_bool": "'experiments.icl_coin.params.n_flips': expected a number, got a boolean",
          "bad_dup": "duplicate key 'icl_coin'", "bad_exp_path": "not a plain name",
          "bad_models": "'models': must be"}


def test_bad_configs_exit_2_one_line_nothing_created_or_submitted(cluster, tmp_path):
    cfg = configs(tmp_path, {**BAD, "big": "models: [tiny-random]\nexperiments:\n"
                             "  icl_coin: {shard_size: 1, params: {thetas: [0.5], n_flips: 4, samples: 1002}}\n"})
    res = tmp_path / "res"
    res.mkdir()
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
    mine = ("bf-bad_", "bf-big-", "bf-test_slurm-tiny-random")
    jobs = sacct_since(since, mine)
    calls = [[name] for name in BAD] + [["../sweeps/test_slurm"], ["/etc/passwd"]]
    # every call in one process (start-up dominates): main() per call, stderr captured per call
    driver = ("import contextlib, io, json, sys\nfrom bayesflip.cli import main\nout = []\n"
              "for exp in json.loads(sys.argv[1]):\n"
              "    err, std = io.StringIO(), io.StringIO()\n"
              "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):\n"
              "        rc = main(['submit', '--exp', exp, '--results-dir', sys.argv[2]])\n"
              "    out.append([exp, rc, err.getvalue(), std.getvalue()])\n"
              "print(json.dumps(out))\n")
    p = subprocess.run([PY, "-c", driver, json.dumps([c[0] for c in calls]), str(res)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": str(REPO), "BAYESFLIP_CONFIG_DIR": str(cfg)})
    assert p.returncode == 0, p.stderr[-3000:]
    for exp, rc, err, _std in json.loads(p.stdout):
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("bayesflip: error:"), (exp, rc, err)
        assert "Traceback" not in err
        if exp in EXPECT:
            assert EXPECT[exp] in err and f"{exp}.yaml" in err, (exp, err)
        else:
            assert "not a plain name" in err, (exp, err)
    # a dry run writes nothing; more tasks than MaxArraySize are split (planned, nothing created)
    r = bf(["submit", "--exp", "test_slurm", "--model-type", MODEL, "--results-dir", str(res), "--dry-run"], cfg)
    assert r.returncode == 0 and "would submit" in r.stdout, r.stderr
    r = bf(["submit", "--exp", "big", "--results-dir", str(res), "--shards-per-task", "1", "--dry-run"], cfg)
    assert r.returncode == 0, r.stderr
    assert re.search(r"MaxArraySize \(1001\): split into 2 arrays", r.stdout), r.stdout
    assert "1001 task(s)" in r.stdout and "1 task(s)" in r.stdout
    assert list(res.iterdir()) == []                                    # nothing under the results dir
    time.sleep(1.5)
    assert not sacct_since(since, mine) - jobs                          # nothing submitted
