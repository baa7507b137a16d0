"""Faults of the job boundary, second round (issue 19): NaN never counts as done, the manifest is edited
under a lock and exists before sbatch, resubmit without sacct, fenced leases, status/reduce verify what
they read. Each test reproduces the fault on tiny-random or a synthetic store."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from bayesflip.config import load_sweep
from bayesflip.store import ResultStore, store_path

MODEL = "tiny-random"


def _small_sweep(name: str, exps=("icl_coin", "needle_coin")):
    sw = load_sweep("test_group", MODEL)
    return dataclasses.replace(sw, name=name, experiments=[e for e in sw.experiments if e.name in exps])


# ---------------------------------------------------------------------- a. NaN never counts as done
def test_nan_logits_are_recorded_failed_and_status_names_them(tmp_path, tiny):
    import torch
    from torch.nn.modules.module import register_module_forward_hook

    from bayesflip.hpc.manifest import Manifest
    from bayesflip.hpc.status import render, sweep_status
    from bayesflip.job import run_local

    def nan_logits(mod, args, out):     # a broken checkpoint / fp16 overflow: every logit NaN
        lg = getattr(out, "logits", None)
        if isinstance(lg, torch.Tensor):
            out["logits"] = torch.full_like(lg, float("nan"))
        return out

    sweep = _small_sweep("nan")
    handle = register_module_forward_hook(nan_logits)
    try:
        run = run_local(sweep, results_dir=tmp_path, lm=tiny, progress=False, out=lambda s: None)
    finally:
        handle.remove()
    assert run.rc == 1 and run.n_failed > 0
    for e in sweep.experiments:
        st = ResultStore(store_path("nan", e.name, MODEL, tmp_path))
        states = st.shard_states()
        assert states and all(s.state == "failed" for s in states.values()), (e.name, states)
        msg = states[0].message
        assert "NonFiniteValues" in msg and "'logprobs'" in msg, msg
        assert not st.read("verified").any()
    s = sweep_status(Manifest.load("nan", tmp_path), use_sacct=False, results_dir=tmp_path)
    text = render(s)
    assert s.totals()["done"] == 0 and "NonFiniteValues" in text, text
    # the same sweep without the hook: every shard done (the check does not refuse finite numbers)
    run2 = run_local(sweep, results_dir=tmp_path, lm=tiny, progress=False, out=lambda s: None)
    assert run2.rc == 0
    s2 = sweep_status(Manifest.load("nan", tmp_path), use_sacct=False, results_dir=tmp_path)
    assert s2.totals()["done"] == sum(u.n_shards for u in s2.units)


def test_nonfinite_rules():
    from bayesflip.experiments.base import ArraySpec, nonfinite

    padded = np.array([[[-0.1, -2.0], [np.nan, np.nan]], [[-0.3, -1.0], [-0.2, -1.5]]])
    assert nonfinite("lp", ArraySpec(("p", "c"), (2, 2), finite="cell"), padded) is None
    assert "1 of 2 cells" in nonfinite("lp", ArraySpec(("p", "c"), (2, 2), finite="all"), padded)
    allnan = np.full((3, 2), np.nan)
    assert "3 of 3 cells" in nonfinite("lp", ArraySpec(("c",), (2,), finite="cell"), allnan)
    assert "first: cell 1" in nonfinite("lp", ArraySpec(("c",), (2,), finite="cell"),
                                        np.array([[0.0, -1.0], [-np.inf, -1.0]]))
    assert nonfinite("x", ArraySpec(("c",), (2,)), allnan) is None      # NaN is a value here


# ---------------------------------------------------------------------- b. the manifest: lock, pending before sbatch
def test_file_lock_excludes_a_second_holder_then_times_out(tmp_path):
    """The one lock under the manifest and the shard leases: a second holder (another open file, as in
    another process) waits; with ``wait_s`` it gives up with LockTimeout, and gets the lock once freed."""
    from bayesflip.atomic import LockTimeout, file_lock

    lock = tmp_path / "sub" / "x.lock"
    with file_lock(lock):
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match="x.lock"):
            with file_lock(lock, wait_s=0.2):
                pass
        assert time.monotonic() - t0 >= 0.2
    with file_lock(lock, wait_s=0.2):
        assert lock.exists()


_EDIT = """
import sys
from bayesflip.hpc.manifest import Manifest, Submission
root, tag = sys.argv[1], sys.argv[2]
for i in range(50):
    with Manifest.edit("race", root) as m:
        m.submissions.append(Submission(command=f"{tag}-{i}"))
"""


def test_manifest_edits_of_two_processes_are_all_kept(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from bayesflip.hpc.manifest import Manifest

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    ps = [subprocess.Popen([sys.executable, "-c", _EDIT, str(tmp_path), tag], env=env) for tag in ("a", "b")]
    assert [p.wait(timeout=300) for p in ps] == [0, 0]
    cmds = [s.command for s in Manifest.load("race", tmp_path).submissions]
    assert len(cmds) == 100 and sorted(cmds) == sorted(f"{t}-{i}" for t in "ab" for i in range(50))


class _FakeJob:
    def __init__(self, array: int, i: int, folder):
        from types import SimpleNamespace

        self.job_id = f"{array}_{i}"
        self.paths = SimpleNamespace(stdout=f"{folder}/{self.job_id}.out", stderr=f"{folder}/{self.job_id}.err")


def test_manifest_failure_after_sbatch_leaves_a_pending_submission(tmp_path, monkeypatch):
    """sbatch succeeded, then writing the manifest failed (disk full): the submission recorded before sbatch
    stays, marked pending; status reports it and a resubmit plans from that manifest."""
    from bayesflip.errors import StoreWriteError
    from bayesflip.hpc import launch
    from bayesflip.hpc.manifest import Manifest
    from bayesflip.hpc.status import render, sweep_status

    sent = []

    class FakeExecutor:                # what sbatch would do: ids for every task, nothing runs
        def map_array(self, fn, tasks):
            sent.append(list(tasks))
            return [_FakeJob(9000 + len(sent), i, tmp_path) for i in range(len(tasks))]

    monkeypatch.setattr(launch, "make_executor", lambda *a, **k: FakeExecutor())
    real = Manifest.update_submission

    def disk_full(*a, **k):
        raise StoreWriteError(f"cannot write {Manifest.path('test_group', tmp_path)}: No space left on device")

    monkeypatch.setattr(Manifest, "update_submission", classmethod(lambda cls, *a, **k: disk_full()))
    sweep = _small_sweep("test_group", exps=("icl_coin",))
    with pytest.raises(StoreWriteError, match="No space left"):
        launch.submit_sweep("test_group", sweep=sweep, results_dir=tmp_path, executor="local", out=lambda s: None)
    assert len(sent) == 1                                   # sbatch went out
    m = Manifest.load("test_group", tmp_path)               # and the manifest is there
    assert [s.state for s in m.submissions] == ["pending"] and m.units and m.units[0].n_shards == 6
    s = sweep_status(m, use_sacct=False, results_dir=tmp_path)
    text = render(s)
    assert "is pending" in text and f"submission {m.submissions[0].uid}" in text, text
    monkeypatch.setattr(Manifest, "update_submission", real)
    sub = launch.resubmit_sweep("test_group", MODEL, results_dir=tmp_path, executor="local", out=lambda s: None)
    assert len(sent) == 2 and sub.arrays                  # the pending shards, from the recovered manifest
    m2 = Manifest.load("test_group", tmp_path)
    assert [s.state for s in m2.submissions] == ["pending", "submitted"]
    assert m2.submissions[1].arrays[0].array_id == "9002"


# ---------------------------------------------------------------------- d. fenced leases: a paused writer
_WRITER = """
import json, os, socket, sys, time
root, host, marker = sys.argv[1], sys.argv[2], sys.argv[3]
socket.gethostname = lambda: host                 # another "host": its pid means nothing to the other one
from bayesflip import store
from bayesflip.job import run_task
from bayesflip.models.loader import load_model
from bayesflip.plan import TaskPlan

if marker != "-":
    def pause(where, shard):                      # after its last unlocked lease check, before the record
        open(marker, "w").write(where)
        while not os.path.exists(marker + ".go"):
            time.sleep(0.05)
    store.FENCE_HOOK = pause
lm = load_model("tiny-random", device="cpu")
r = run_task(TaskPlan.resolve("test_group", "tiny-random", [("icl_coin", 0)], root), lm=lm, progress=False,
             device="cpu")
print(json.dumps({"done": r.done, "held": [h[:2] for h in r.held], "failed": r.failed}))
"""


@pytest.mark.integration
def test_paused_writer_never_replaces_the_record_of_the_writer_that_took_over(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from bayesflip.plan import plan_sweep

    ttl = 4
    plan_sweep(_small_sweep("test_group", exps=("icl_coin",)), results_dir=tmp_path)
    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(repo), BAYESFLIP_LEASE_TTL=str(ttl))
    marker = tmp_path / "paused"
    a = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), "hostA", str(marker)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 240
        while not marker.exists():
            assert a.poll() is None and time.time() < end, a.communicate()
            time.sleep(0.1)
        os.kill(a.pid, signal.SIGSTOP)          # A stops (its heartbeat too) right before writing its record
        time.sleep(ttl + 1.5)                   # its lease goes stale
        b = subprocess.run([sys.executable, "-c", _WRITER, str(tmp_path), "hostB", "-"], env=env,
                           capture_output=True, text=True, timeout=300)
        assert b.returncode == 0, b.stderr
        assert json.loads(b.stdout.strip().splitlines()[-1])["done"] == [["icl_coin", 0]], b.stdout + b.stderr
        st = ResultStore(store_path("test_group", "icl_coin", MODEL, tmp_path))
        rec_b = st.records()[0]
        assert rec_b["host"] == "hostB" and st.shard_state(0).state == "done"
    finally:
        (tmp_path / "paused.go").write_text("")
        os.kill(a.pid, signal.SIGCONT)
    out, err = a.communicate(timeout=300)
    assert a.returncode == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["done"] == [] and got["held"] == [["icl_coin", 0]], out + err     # A wrote nothing
    rec = st.records()[0]
    assert rec == rec_b and st.shard_state(0).state == "done"                   # B's record kept, verified
    assert rec["lease_token"] and not list(st.leases.dir.glob("shard-*.lease"))  # and no lease left behind


# ---------------------------------------------------------------------- e. status/reduce verify what they read
@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny):
    """One small sweep run in-process (6 shards of icl_coin, every one done)."""
    from bayesflip.job import run_local

    root = tmp_path_factory.mktemp("verify")
    assert run_local(_small_sweep("test_group", ("icl_coin",)), results_dir=root, lm=tiny, progress=False,
                     out=lambda s: None).rc == 0
    return root


def _copy(ran, tmp_path):
    import shutil

    shutil.copytree(ran, tmp_path / "r")
    root = tmp_path / "r"
    return root, ResultStore(store_path("test_group", "icl_coin", MODEL, root))


def _status(root):
    from bayesflip.hpc.manifest import Manifest
    from bayesflip.hpc.status import sweep_status

    (u,) = sweep_status(Manifest.load("test_group", root), use_sacct=False, results_dir=root).units
    return u


def _reduce_rows(st):
    from bayesflip.reduce.load import load_store

    return load_store("test_group", "icl_coin", MODEL, st.path)


def test_untampered_store_is_read(ran, tmp_path):
    root, st = _copy(ran, tmp_path)
    assert st.integrity() is None and _status(root).count("done") == 6
    data, rows = _reduce_rows(st)
    assert data is not None and {r["status"] for r in rows} == {"done"}


def test_edited_n_shards_and_deleted_record_are_reported(ran, tmp_path):
    root, st = _copy(ran, tmp_path)
    st.update_attrs(n_shards=3)
    (st.records_dir / "shard-000005.json").unlink()
    u = _status(root)
    assert u.count("done") == 0 and u.count("corrupt") == 6, u.shards
    assert "n_shards=3 does not match n_cells=12 / shard_size=2" in u.errors[0]
    data, rows = _reduce_rows(st)
    assert data is None and rows[0]["status"] == "unreadable-store" and "n_shards=3" in rows[0]["error"]


def test_edited_identity_is_reported_by_status_and_reduce(ran, tmp_path):
    root, st = _copy(ran, tmp_path)
    ident = dict(st.read_attrs()["identity"], dtype="bfloat16")
    st.update_attrs(identity=ident)
    u = _status(root)
    assert u.count("done") == 0 and "is not the hash of its identity" in u.errors[0], u.errors
    data, rows = _reduce_rows(st)
    assert data is None and "is not the hash of its identity" in rows[0]["error"]


def test_future_layout_refused_with_one_message_by_status_reduce_and_migrate(ran, tmp_path):
    from bayesflip.errors import ConfigError
    from bayesflip.migrate import migrate_store

    import zarr

    from bayesflip import store_layout

    root, st = _copy(ran, tmp_path)
    g = zarr.open_group(st.path, mode="r+", use_consolidated=False)
    g.attrs.update({"store_layout": 4, "store_format": 3})
    store_layout.consolidate(st.path)
    msg = "written by a newer bayesflip (store_layout=4, store_format=3"
    u = _status(root)
    assert u.count("done") == 0 and msg in u.errors[0], u.errors
    data, rows = _reduce_rows(st)
    assert data is None and msg in rows[0]["error"]
    with pytest.raises(ConfigError, match=r"written by a newer bayesflip \(store_layout=4, store_format=3"):
        migrate_store(st.path)
