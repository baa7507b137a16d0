"""Store integrity without SLURM: records, checksums, identity, leases, disk faults, coordinates.

Unit checks on synthetic stores, plus real ``bayesflip debug`` processes (tiny-random model,
private config dir) for concurrency and a full disk. The SLURM scenarios are in
tests/test_integrity_slurm.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bayesflip.errors import ConfigError, StoreIdentityError
from bayesflip.store import Leases, ResultStore

from conftest import private_configs, synthetic_store

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

SLOW_SWEEP = """models: [tiny-random]
experiments:
  icl_coin: {seed: 1, shard_size: 2, params: {thetas: [0.2, 0.5, 0.8, 0.9], n_flips: 150, samples: 4}}
"""


def cli(args: list[str], cfg: Path, env: dict | None = None, **kw) -> subprocess.Popen:
    e = {**os.environ, "BAYESFLIP_CONFIG_DIR": str(cfg), "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen([PY, "-m", "bayesflip.cli", *args], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _icl_store(tmp: Path, n_shards: int = 3):
    """A synthetic icl store with every shard written through write_shard (checksummed records)."""
    st, fam, p, cells = synthetic_store(tmp, "sw", "icl_coin", "icl",
                                        {"thetas": [0.5], "n_flips": 4, "samples": n_shards}, 1, 0)
    arrays = st.attrs["arrays"]
    shapes = {k: st.group[k].shape[1:] for k in arrays}
    for s in range(n_shards):
        data = {k: (np.full((1, *shapes[k]), s + 0.5, dtype=np.float32) if arrays[k]["dtype"].startswith("float")
                    else np.full((1, *shapes[k]), s, dtype=arrays[k]["dtype"])) for k in arrays}
        st.write_shard(s, data)
    return st


# ---------------------------------------------------------------------- records and checksums
def test_record_without_shard_key_is_corrupt_for_that_shard_only(tmp_path):
    from bayesflip.reduce.load import load_store

    st = _icl_store(tmp_path)
    p = st.records_dir / "shard-000001.json"
    rec = json.loads(p.read_text())
    del rec["shard"]
    p.write_text(json.dumps(rec))
    states = st.shard_states()
    assert [states[s].state for s in range(3)] == ["done", "corrupt", "done"]
    assert "missing field" in states[1].message and "shard-000001.json" in states[1].message
    data, cov = load_store("sw", "icl_coin", "synthetic-model", st.path)
    assert data is not None and sorted(data.cells["cell"]) == [0, 2]      # the store is not dropped
    assert {r["shard"]: r["status"] for r in cov} == {0: "done", 1: "corrupt-record", 2: "done"}


def test_deleted_and_flipped_chunks_are_corrupt_and_never_read(tmp_path):
    from bayesflip.reduce.load import load_store

    st = _icl_store(tmp_path)
    files = st.chunk_files(1)
    name = next(iter(files))
    files[name].unlink()                                      # deleted chunk
    f2 = st.chunk_files(2)[name]
    b = bytearray(f2.read_bytes())
    b[len(b) // 2] ^= 0x01                                    # one flipped bit
    f2.write_bytes(bytes(b))
    states = st.shard_states()
    assert states[0].state == "done"
    assert states[1].state == "corrupt" and "is missing" in states[1].message and str(files[name]) in states[1].message
    assert states[2].state == "corrupt" and "does not match its checksum" in states[2].message
    assert st.pending_shards() == [1, 2]
    data, cov = load_store("sw", "icl_coin", "synthetic-model", st.path)
    assert sorted(data.cells["cell"]) == [0]
    assert {r["shard"]: r["status"] for r in cov} == {0: "done", 1: "corrupt-chunk", 2: "corrupt-chunk"}


def test_records_of_a_deleted_store_are_not_trusted(tmp_path):
    st = _icl_store(tmp_path)
    old_uid = st.uid
    shutil.rmtree(st.path)
    st2, *_ = synthetic_store(tmp_path, "sw", "icl_coin", "icl", {"thetas": [0.5], "n_flips": 4, "samples": 3}, 1, 0)
    assert st2.uid != old_uid
    states = st2.shard_states()
    assert all(s.state == "corrupt" and s.kind == "stale-record" for s in states.values())
    assert st2.pending_shards() == [0, 1, 2]


def test_identity_mismatch_is_refused_naming_the_field(tmp_path):
    st = _icl_store(tmp_path)
    attrs = dict(st.attrs)
    ident = {**attrs["identity"], "dtype": "bfloat16"}
    with pytest.raises(StoreIdentityError, match=r"dtype: store=None now='bfloat16'|dtype"):
        st.check_writable(st.uid, ident)
    with pytest.raises(StoreIdentityError, match="replaced while this job ran"):
        st.check_writable("another-uid", attrs["identity"])


def test_per_cell_coordinates_disjoint_from_arrays(tmp_path):
    from bayesflip.experiments import get_family
    from bayesflip.experiments.base import ArraySpec

    fam = get_family("markov")
    p = fam.Params()
    cells = fam.cells(p)
    assert "matrix_name" in cells[0] and "matrix" not in cells[0] and "matrix" in fam.arrays(p)
    with pytest.raises(ConfigError, match=r"coordinate\(s\) \['x'\].*data array"):
        ResultStore.create(tmp_path / "a.zarr", {"x": ArraySpec((), ())}, [{"x": 1}], 1, {},
                           {"config_hash": "h"})


def test_lease_of_a_dead_process_is_broken_live_one_is_not(tmp_path):
    st = _icl_store(tmp_path, 2)
    lz = Leases(st.path)
    proc = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    try:
        from bayesflip.store import _proc_start

        info = {"token": "other", "host": os.uname().nodename, "pid": proc.pid, "pid_start": _proc_start(proc.pid),
                "job_id": None, "time": "t"}
        lz.dir.mkdir(parents=True, exist_ok=True)
        lz.path(0).write_text(json.dumps(info))
        ok, holder = lz.acquire(0)
        assert not ok and holder["pid"] == proc.pid                # live holder: not taken
    finally:
        proc.kill()
        proc.wait()
    ok, holder = lz.acquire(0)                                     # holder gone: broken and taken
    assert ok and lz.holds(0)
    lz.release(0)
    assert not lz.path(0).exists()


def test_huge_grid_warns_with_cells_and_memory(tmp_path, monkeypatch):
    import bayesflip.plan as plan
    from bayesflip.config import load_sweep

    monkeypatch.setattr(plan, "HUGE_GRID", 10)
    msgs = []
    plan.plan_sweep(load_sweep("test_resume", "tiny-random"), results_dir=tmp_path, create=False, warn=msgs.append,
                    validate=False)
    assert len(msgs) == 1 and "12 cells" in msgs[0] and "GB" in msgs[0]
    assert not any(tmp_path.iterdir())                             # create=False writes nothing


# ---------------------------------------------------------------------- real processes
@pytest.mark.integration
def test_two_concurrent_debug_runs_compute_each_shard_once(tmp_path):
    cfg = private_configs(tmp_path, {"slowx": SLOW_SWEEP})
    res = tmp_path / "res"
    args = ["debug", "--exp", "slowx", "--results-dir", str(res), "--list-shards"]
    a = cli(args, cfg)
    time.sleep(0.5)
    b = cli(args, cfg)
    out_a, err_a = a.communicate(timeout=600)
    out_b, err_b = b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, err_a[-2000:] + err_b[-2000:]
    computed = [ln.split()[-1] for ln in (out_a + out_b).splitlines() if ln.strip().startswith("computed ")]
    assert sorted(computed) == sorted(f"icl_coin:{s}" for s in range(8)), (out_a, out_b)   # once each
    # status reads the stores under the results dir given now: a moved sweep works
    moved = tmp_path / "moved"
    shutil.move(str(res), str(moved))
    p = cli(["status", "--sweep", "slowx", "--results-dir", str(moved), "--json"], cfg)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    doc = json.loads(out)
    assert doc["totals"] == {"total": 8, "done": 8, "running": 0, "pending": 0, "failed": 0, "corrupt": 0}
    assert not list(moved.rglob("*.lease"))                        # every lease released


@pytest.mark.integration
def test_full_disk_one_line_no_temp_files_shard_not_done(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        cfg = private_configs(tmp_path, {"slowx": SLOW_SWEEP})
        res = mnt / "res"
        p = cli(["plan", "--exp", "slowx", "--results-dir", str(res)], cfg)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        filler = mnt / "filler"
        with open(filler, "wb", buffering=0) as f:          # fill the disk to the last byte
            for size in (65536, 4096, 512, 64, 1):
                try:
                    while True:
                        f.write(b"\0" * size)
                except OSError:
                    pass
        p = cli(["debug", "--exp", "slowx", "--results-dir", str(res)], cfg)
        out, err = p.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip() and "shard/s" not in ln and "%|" not in ln]
        assert p.returncode == 2, out + err
        assert "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith("bayesflip: error:") and "No space left on device" in lines[0] and str(res) in lines[0]
        leftovers = [q for q in res.rglob("*") if ".partial" in q.name or ".tmp-" in q.name or q.name.startswith(".rec-")]
        assert leftovers == []
        st = ResultStore(res / "slowx" / "icl_coin" / "tiny-random.zarr")
        assert st.done_shards() == set()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_store_with_damaged_metadata_is_moved_aside_and_rebuilt(tmp_path):
    st = _icl_store(tmp_path)
    name = next(iter(st.attrs["arrays"]))
    (st.path / name / "zarr.json").unlink()
    assert st.damage() and "KeyError" in st.damage()
    st2, *_ = synthetic_store(tmp_path, "sw", "icl_coin", "icl", {"thetas": [0.5], "n_flips": 4, "samples": 3}, 1, 0)
    aside = list(st.path.parent.glob(f"{st.path.name}.damaged-*"))
    assert len(aside) == 1 and not (aside[0] / name / "zarr.json").exists()     # kept, not deleted
    assert st2.damage() is None and st2.pending_shards() == [0, 1, 2]          # old records not trusted
