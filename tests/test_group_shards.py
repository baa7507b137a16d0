"""A task scores its pending shards of one experiment through the engine together (one
``fam.run`` over the cells of several shards, split back per shard; :class:`bayesflip.job.ShardRunner`).

configs/sweeps/test_group.yaml: small icl / needle / markov / poisson (sampled) / cot (sampled)
experiments of several shards each, plus a generational chain (never grouped), on tiny-random
(real model, real Zarr stores, in-process like ``bayesflip debug``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from bayesflip.config import load_sweep
from bayesflip.experiments import family_names, get_family
from bayesflip.job import FAIL_ENV, group_shards, run_task
from bayesflip.plan import TaskPlan, plan_sweep
from bayesflip.store import ResultStore, store_path

SWEEP = "test_group"
MODEL = "tiny-random"


def _work(sweep: str, model: str) -> list[tuple[str, int]]:
    sw = load_sweep(sweep, model)
    out = []
    for e in sw.experiments:
        n = len(get_family(e.family).cells(e.params))
        out += [(e.name, s) for s in range(-(-n // e.shard_size))]
    return out


def _arrays(root: Path, sweep: str, model: str) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for e in load_sweep(sweep, model).experiments:
        st = ResultStore(store_path(sweep, e.name, model, root))
        out[e.name] = {k: st.read(k) for k in st.attrs["arrays"]}
    return out


def _records(root: Path, exp: str) -> dict[int, dict]:
    return ResultStore(store_path(SWEEP, exp, MODEL, root)).records()


def _run(root: Path, lm, sweep=SWEEP, model=MODEL, work=None, **kw):
    from bayesflip.backends import backend_for

    be = backend_for(lm)
    if not (root / sweep).exists():
        plan_sweep(load_sweep(sweep, model), results_dir=root)
    t0 = time.time()
    r = run_task(TaskPlan.resolve(sweep, model, work or _work(sweep, model), root), device="cpu", progress=False,
                 lm=be, **kw)
    return r, be.stats.forward_calls, time.time() - t0


def assert_same(got: dict, ref: dict, atol: float = 1e-5) -> None:
    for exp, arrays in ref.items():
        assert set(got[exp]) == set(arrays), exp
        for k, a in arrays.items():
            b = got[exp][k]
            assert b.shape == a.shape, (exp, k)
            if a.dtype.kind == "f":
                assert np.array_equal(np.isnan(a), np.isnan(b)), (exp, k)
                assert np.allclose(b, a, rtol=0, atol=atol, equal_nan=True), (exp, k, float(np.nanmax(np.abs(b - a))))
            else:
                assert np.array_equal(b, a), (exp, k)       # sampled texts, counts, outcomes: identical


def test_only_generational_families_are_not_batched_across_shards():
    no = {n for n in family_names() if not get_family(n).batch_across_shards}
    assert no == {"chains", "rules", "acronym"}


def test_group_shards_bounds_and_family_rule():
    from bayesflip.job import _Shard

    fams = {"a": get_family("icl"), "c": get_family("chains")}
    todo = [_Shard("a", i, 3 * i, 3 * i + 3, "") for i in range(5)] + [_Shard("c", i, i, i + 1, "") for i in range(3)]
    groups = group_shards(todo, fams, group_cells=7)
    assert [[(s.exp, s.shard) for s in g] for g in groups] == [
        [("a", 0), ("a", 1)], [("a", 2), ("a", 3)], [("a", 4)], [("c", 0)], [("c", 1)], [("c", 2)]]
    assert [len(g) for g in group_shards(todo, fams, group_cells=1)] == [1] * 8      # one shard per call
    assert [len(g) for g in group_shards(todo[:5], fams, group_cells=2)] == [1] * 5  # a shard larger than the bound


@pytest.fixture(scope="module")
def per_shard(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("per_shard")
    r, calls, secs = _run(root, tiny, group_cells=1)
    assert not r.failed and len(r.done) == len(_work(SWEEP, MODEL))
    return root, r, calls


def test_grouped_run_equals_per_shard_run_with_fewer_engine_calls(tiny, per_shard, tmp_path):
    ref_root, ref, ref_calls = per_shard
    r, calls, _ = _run(tmp_path, tiny)
    assert not r.failed and sorted(r.done) == sorted(ref.done)
    assert_same(_arrays(tmp_path, SWEEP, MODEL), _arrays(ref_root, SWEEP, MODEL))
    n_shards = len(ref.done)
    n_chain = sum(1 for e, _ in ref.done if e == "chain_coin")
    assert ref.runs == n_shards
    assert r.runs == 5 + n_chain                      # one run per batchable experiment, chain shards alone
    assert calls < ref_calls, (calls, ref_calls)
    for exp in ("icl_coin", "needle_coin", "poisson_icl"):
        recs = _records(tmp_path, exp)
        assert all(rec["status"] == "done" and rec["group_shards"] == len(recs) for rec in recs.values())
        assert all(rec["writer_rank"] == 0 and rec["world_size"] == 1 for rec in recs.values())
    assert all("group_shards" not in rec for rec in _records(tmp_path, "chain_coin").values())


def test_failed_shard_inside_a_group_fails_alone_then_resume(tiny, per_shard, tmp_path, monkeypatch):
    ref_root, ref, _ = per_shard
    monkeypatch.setenv(FAIL_ENV, "icl_coin:3")
    r, _, _ = _run(tmp_path, tiny)
    assert [(e, s) for e, s, _ in r.failed] == [("icl_coin", 3)] and "injected failure" in r.failed[0][2]
    recs = _records(tmp_path, "icl_coin")
    assert recs[3]["status"] == "failed" and "icl_coin:3" in recs[3]["error"]
    assert all(rec["status"] == "done" for s, rec in recs.items() if s != 3) and len(recs) == 6
    assert len(r.done) == len(ref.done) - 1
    monkeypatch.delenv(FAIL_ENV)
    before = {s: rec for s, rec in recs.items() if s != 3}
    r2, _, _ = _run(tmp_path, tiny)                  # resume: only the failed shard is computed
    assert r2.done == [("icl_coin", 3)] and len(r2.skipped) == len(ref.done) - 1 and r2.runs == 1
    after = _records(tmp_path, "icl_coin")
    assert {s: after[s] for s in before} == before
    assert_same(_arrays(tmp_path, SWEEP, MODEL), _arrays(ref_root, SWEEP, MODEL))


def test_crash_mid_group_leaves_unwritten_shards_pending(tiny, per_shard, tmp_path, monkeypatch):
    """The process dies while writing a group (after 2 of its 6 shard writes): exactly those 2
    are done, the rest have no record (pending); a re-run computes only the rest."""
    ref_root, ref, _ = per_shard
    real = ResultStore.write_shard
    n = {"writes": 0}

    def dying_write(self, shard, arrays, **kw):
        if n["writes"] == 2:
            raise KeyboardInterrupt("killed mid-group")      # not an Exception: the task dies here
        n["writes"] += 1
        return real(self, shard, arrays, **kw)

    monkeypatch.setattr(ResultStore, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny, work=[("icl_coin", s) for s in range(6)])
    monkeypatch.setattr(ResultStore, "write_shard", real)
    recs = _records(tmp_path, "icl_coin")
    assert sorted(recs) == [0, 1] and all(r["status"] == "done" for r in recs.values())
    st = ResultStore(store_path(SWEEP, "icl_coin", MODEL, tmp_path))
    assert st.leases.live_holders() == {}                   # the group's leases were released
    r, _, _ = _run(tmp_path, tiny, work=[("icl_coin", s) for s in range(6)])
    assert r.skipped == [("icl_coin", 0), ("icl_coin", 1)] and r.done == [("icl_coin", s) for s in range(2, 6)]
    assert {s: _records(tmp_path, "icl_coin")[s] for s in (0, 1)} == recs       # not recomputed
    got = _arrays(tmp_path, SWEEP, MODEL)["icl_coin"]
    assert_same({"icl_coin": got}, {"icl_coin": _arrays(ref_root, SWEEP, MODEL)["icl_coin"]})
