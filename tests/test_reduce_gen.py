"""reduce: the poisson (E) and chain-of-thought (H) reducers.

Synthetic stores are built with the real families (cells, arrays, coords, stated distributions)
and known counts / log-probs in place of the model, so pooled λ̂, the fitted slopes and the TVDs
have exact hand-computed values. The integration test runs the demo sweep's poisson_explicit,
poisson_icl and cot_coin on the real SmolLM2 through ``bayesflip.job.run_local`` and checks the
reducers' numbers against the raw stored arrays.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import synthetic_store

from bayesflip.reduce import reduce_sweep
from bayesflip.store import ResultStore, store_path

MODEL = "synthetic-model"
SMOL = "smollm2-135m-instruct"
OFF = 0.1


def make_store(root, sweep, exp, family, params: dict, arrays_fn, shard_size=4, seed=3) -> ResultStore:
    """A store of the real ``family`` (cells, arrays, coords); ``arrays_fn(fam, p, cells)`` gives the arrays."""
    st, fam, p, cells = synthetic_store(root, sweep, exp, family, params, shard_size, seed, MODEL)
    arrays = arrays_fn(fam, p, cells)
    assert set(arrays) == set(fam.arrays(p))
    for s in range(st.n_shards):
        sl = st.shard_slice(s)
        st.write_shard(s, {k: v[sl] for k, v in arrays.items()})
    return st


# ---------------------------------------------------------------------------- synthetic poisson
EXPLICIT = {"mode": "explicit", "markers": ["#", "!"], "lambdas": [0.2, 0.6], "samples": 3}
ICL = {"mode": "icl", "markers": ["*"], "lambdas": [0.3, 0.9], "samples": 2, "prefix_words": 100}
GAPS = [10, 20, 0]                                    # per sample; sample 2 has no word gap (no λ̂)
MARKS = {0.2: [3, 9, 0], 0.6: [9, 21, 0]}             # per-sample λ̂ 0.3, 0.45 | 0.9, 1.05; pooled 0.4 | 1.0
ATTACHED = {"#": [0, 0, 0], "!": [1, 2, 0]}
PREFIX_MARKS = {0.3: [30, 27], 0.9: [88, 92]}         # of 99 prefix gaps


def explicit_arrays(fam, p, cells):
    m = np.array([MARKS[c["lam"]][c["sample"]] for c in cells])
    g = np.array([GAPS[c["sample"]] for c in cells])
    with np.errstate(invalid="ignore", divide="ignore"):
        lhat = np.where(g > 0, m / np.maximum(g, 1), np.nan)
    return {"lambda_hat": lhat, "n_markers": m.astype(np.int32), "n_gaps": g.astype(np.int32),
            "n_attached": np.array([ATTACHED[c["marker"]][c["sample"]] for c in cells], dtype=np.int32),
            "n_tokens": np.full(len(cells), 24, dtype=np.int32),
            "text": np.array([f"text {c['marker']} {i}" for i, c in enumerate(cells)], dtype=str)}


def icl_arrays(fam, p, cells):
    pm = np.array([PREFIX_MARKS[c["lam"]][c["sample"]] for c in cells])
    g = np.full(len(cells), 99)
    return {"lambda_hat": pm / 99, "n_markers": pm.astype(np.int32), "n_gaps": g.astype(np.int32),
            "n_attached": np.zeros(len(cells), dtype=np.int32), "n_tokens": np.full(len(cells), 30, dtype=np.int32),
            "text": np.array(["x"] * len(cells), dtype=str), "prefix_lambda_hat": pm / 99,
            "prefix_n_markers": pm.astype(np.int32), "prefix_n_gaps": g.astype(np.int32)}


# ---------------------------------------------------------------------------- synthetic cot
COT = {"biases": [20, 80], "no_needle": True, "samples": 2}
DIE = {"process": "die", "biases": [50], "faces": [2], "no_needle": False, "samples": 1}
HEADS = {(-1, 0): 0.5, (-1, 1): 0.7, (20, 0): 0.1, (20, 1): 0.4, (80, 0): 0.9, (80, 1): 0.6}  # with CoT
BASE_HEADS = {-1: 0.55, 20: 0.5, 80: 0.65}                                                    # without
DIE_P = np.array([0.1, 0.3, 0.2, 0.1, 0.2, 0.1])


def coin_arrays(fam, p, cells):
    h = np.array([HEADS[(c["bias"], c["sample"])] for c in cells])
    h0 = np.array([BASE_HEADS[c["bias"]] for c in cells])
    return {"logprobs": np.log((1 - OFF) * np.stack([h, 1 - h], axis=1)),
            "logprobs_baseline": np.log(np.stack([h0, 1 - h0], axis=1)) + np.log(0.8),   # off-choice mass 0.2
            "p_stated": np.stack([fam.p_stated(p, c) for c in cells]),
            "cot": np.array([f"reasoning {i}" for i in range(len(cells))], dtype=str),
            "cot_tokens": np.arange(len(cells), dtype=np.int32), "stopped": np.arange(len(cells)) % 2 == 0}


def die_arrays(fam, p, cells):
    n = len(cells)
    return {"logprobs": np.log(np.tile(DIE_P, (n, 1))), "logprobs_baseline": np.log(np.full((n, 6), 1 / 6)),
            "p_stated": np.stack([fam.p_stated(p, c) for c in cells]), "cot": np.array(["r"] * n, dtype=str),
            "cot_tokens": np.ones(n, dtype=np.int32), "stopped": np.ones(n, dtype=bool)}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    make_store(root, "gen", "poisson_explicit", "poisson", EXPLICIT, explicit_arrays, shard_size=5)
    make_store(root, "gen", "poisson_icl", "poisson", ICL, icl_arrays)
    make_store(root, "gen", "cot_coin", "cot", COT, coin_arrays)
    make_store(root, "gen", "cot_die", "cot", DIE, die_arrays)
    report = reduce_sweep("gen", results_dir=root, strict=True)
    return root, report


def test_poisson_pooled_lambda_hat_matches_hand_computation(synthetic):
    _, report = synthetic
    tab = pd.read_csv(report.parent / "tables" / "poisson_by_condition.csv")
    ex = tab[tab["experiment"] == "poisson_explicit"].set_index(["marker", "lam"])
    for marker in ("#", "!"):
        for lam, pooled, mean in ((0.2, 0.4, 0.375), (0.6, 1.0, 0.975)):
            r = ex.loc[(marker, lam)]
            assert r["lambda_hat"] == pytest.approx(sum(MARKS[lam]) / sum(GAPS)) == pytest.approx(pooled)
            excl = (sum(MARKS[lam]) - sum(ATTACHED[marker])) / sum(GAPS)
            assert r["lambda_hat_excl_attached"] == pytest.approx(excl)
            assert r["lambda_hat_mean"] == pytest.approx(mean)                   # sample 2 (no gaps) left out
            assert r["lambda_hat_std"] == pytest.approx(np.std([MARKS[lam][0] / 10, MARKS[lam][1] / 20], ddof=1))
            assert r["n_samples"] == 3 and r["n_no_gaps"] == 1 and r["sum_gaps"] == 30
            se = np.sqrt(lam / 30)
            assert r["se_poisson"] == pytest.approx(se) and r["z"] == pytest.approx((pooled - lam) / se)
            assert np.isnan(r["prefix_lambda_hat"])
    # marker "all" pools both markers: Σ markers / Σ gaps over 6 samples, attached only from "!"
    assert ex.loc[("all", 0.2), "lambda_hat"] == pytest.approx(24 / 60)
    assert ex.loc[("all", 0.2), "lambda_hat_excl_attached"] == pytest.approx((24 - 3) / 60)
    assert ex.loc[("all", 0.6), "n_samples"] == 6
    icl = tab[(tab["experiment"] == "poisson_icl") & (tab["marker"] == "*")].set_index("lam")
    assert icl.loc[0.3, "prefix_lambda_hat"] == pytest.approx(57 / 198)
    assert icl.loc[0.9, "prefix_lambda_hat"] == pytest.approx(180 / 198)
    assert icl.loc[0.9, "lambda_hat"] == pytest.approx(180 / 198)
    samples = pd.read_parquet(report.parent / "tables" / "poisson_samples.parquet")
    assert len(samples) == 12 + 4 and samples["text"].str.startswith(("text", "x")).all()


def test_poisson_fits_and_summary(synthetic):
    _, report = synthetic
    fits = pd.read_csv(report.parent / "tables" / "poisson_fits.csv").set_index("experiment")
    # pooled λ̂ = 1.5 λ + 0.1 exactly at both λ for both markers
    assert fits.loc["poisson_explicit", "slope"] == pytest.approx(1.5)
    assert fits.loc["poisson_explicit", "intercept"] == pytest.approx(0.1)
    assert fits.loc["poisson_explicit", "r"] == pytest.approx(1.0)
    assert fits.loc["poisson_explicit", "n_points"] == 4
    assert fits.loc["poisson_explicit", "frac_no_gaps"] == pytest.approx(1 / 3)
    assert np.isnan(fits.loc["poisson_explicit", "slope_on_prefix"])
    # icl: the continuation copies the prefix's realised rate, so its line on the prefix λ̂ is the identity
    assert fits.loc["poisson_icl", "slope_on_prefix"] == pytest.approx(1.0)
    assert fits.loc["poisson_icl", "intercept_on_prefix"] == pytest.approx(0.0, abs=1e-12)
    slope = (180 / 198 - 57 / 198) / 0.6
    assert fits.loc["poisson_icl", "slope"] == pytest.approx(slope)
    summary = json.loads((report.parent / "summary.json").read_text())
    m = summary["models"][MODEL]["poisson"]
    assert m["poisson_explicit"]["mode"] == "explicit" and m["poisson_explicit"]["slope"] == pytest.approx(1.5)
    assert m["poisson_explicit"]["lambda_hat_pooled"] == {"0.2": pytest.approx(0.4), "0.6": pytest.approx(1.0)}
    assert m["poisson_icl"]["prefix_lambda_hat"]["0.3"] == pytest.approx(57 / 198)
    assert summary["families"]["poisson"]["status"] == "reduced"


def test_cot_tvd_matches_hand_computation(synthetic):
    _, report = synthetic
    s = pd.read_parquet(report.parent / "tables" / "cot_samples.parquet")
    coin = s[s["experiment"] == "cot_coin"]
    for r in coin.itertuples():
        h, h0 = HEADS[(r.bias, r.sample)], BASE_HEADS[r.bias]
        assert r.p_target_cot == pytest.approx(h) and r.p_target_base == pytest.approx(h0)
        assert r.off_cot == pytest.approx(OFF) and r.off_base == pytest.approx(0.2)
        if r.bias == -1:
            assert np.isnan(r.tvd_cot) and np.isnan(r.tvd_base) and np.isnan(r.stated)
        else:   # coin: ½(|h − b| + |(1 − h) − (1 − b)|) = |h − b|
            assert r.tvd_cot == pytest.approx(abs(h - r.bias / 100))
            assert r.tvd_base == pytest.approx(abs(h0 - r.bias / 100))
    die = s[s["experiment"] == "cot_die"].iloc[0]
    q = np.full(6, 0.1)
    q[1] = 0.5
    assert die["p_target_cot"] == pytest.approx(0.3) and die["p_target_stated"] == pytest.approx(0.5)
    assert die["tvd_cot"] == pytest.approx(0.5 * np.abs(DIE_P - q).sum())
    assert die["tvd_base"] == pytest.approx(0.5 * np.abs(1 / 6 - q).sum())
    cond = pd.read_csv(report.parent / "tables" / "cot_by_condition.csv")
    c80 = cond[(cond["experiment"] == "cot_coin") & (cond["bias"] == 80)].iloc[0]
    assert c80["tvd_cot"] == pytest.approx((0.1 + 0.2) / 2)
    assert c80["tvd_cot_marginal"] == pytest.approx(abs(0.75 - 0.8))        # TVD of the averaged answer
    assert c80["p_target_cot_mean"] == pytest.approx(0.75)
    assert c80["p_target_cot_std"] == pytest.approx(np.std([0.9, 0.6], ddof=1))
    summ = pd.read_csv(report.parent / "tables" / "cot_summary.csv").set_index("experiment")
    # per-sample points (0.2, 0.1), (0.2, 0.4), (0.8, 0.9), (0.8, 0.6): slope (0.75 − 0.25) / 0.6
    assert summ.loc["cot_coin", "slope_cot"] == pytest.approx(0.5 / 0.6)
    assert summ.loc["cot_coin", "slope_base"] == pytest.approx(0.15 / 0.6)
    assert summ.loc["cot_coin", "tvd_cot"] == pytest.approx(np.mean([0.1, 0.2, 0.1, 0.2]))
    assert summ.loc["cot_coin", "tvd_base"] == pytest.approx(np.mean([0.3, 0.15]))
    assert summ.loc["cot_coin", "p_target_cot_no_needle"] == pytest.approx(0.6)
    assert summ.loc["cot_coin", "stopped_frac"] == pytest.approx(0.5)
    summary = json.loads((report.parent / "summary.json").read_text())
    assert summary["models"][MODEL]["cot"]["cot_coin"]["slope_cot"] == pytest.approx(0.5 / 0.6)


def test_report_sections_and_figures(synthetic):
    _, report = synthetic
    out = report.parent
    md = report.read_text()
    for title in ("## Poisson processes (λ̂ vs λ)", "## Chain of thought"):
        assert title in md
    assert "Reducer errors" not in md
    figs = {f.stem for f in (out / "figures").glob("*.png")}
    assert figs == {"poisson_lambda_hat", "poisson_lambda_hat_by_marker", "cot_cot_coin", "cot_cot_die"}
    for f in (out / "figures").glob("*.png"):
        assert f.read_bytes()[:4] == b"\x89PNG" and f.with_suffix(".pdf").stat().st_size > 1000
        assert f"figures/{f.name}" in md


# ---------------------------------------------------------------------------- real model
@pytest.mark.integration
def test_real_poisson_and_cot(smol, tmp_path):
    from bayesflip.config import load_sweep
    from bayesflip.job import run_local

    sweep = load_sweep("demo", model_type=SMOL)
    sweep.experiments = [e for e in sweep.experiments if e.name in ("poisson_explicit", "poisson_icl", "cot_coin")]
    assert len(sweep.experiments) == 3
    assert run_local(sweep, results_dir=tmp_path, lm=smol, progress=False).n_failed == 0
    report = reduce_sweep("demo", results_dir=tmp_path, strict=True)
    out = report.parent

    cond = pd.read_csv(out / "tables" / "poisson_by_condition.csv", keep_default_na=False, na_values=[""])
    for exp in ("poisson_explicit", "poisson_icl"):
        st = ResultStore(store_path("demo", exp, SMOL, tmp_path))
        m, g = st.read("n_markers"), st.read("n_gaps")
        allrows = cond[(cond["experiment"] == exp) & (cond["marker"] == "all")]
        assert allrows["sum_gaps"].sum() == g.sum() and allrows["sum_markers"].sum() == m.sum()
        cells = st.cells()
        for key in {(c["marker"], c["lam"]) for c in cells}:
            idx = [i for i, c in enumerate(cells) if (c["marker"], c["lam"]) == key]
            row = cond[(cond["experiment"] == exp) & (cond["marker"] == key[0]) & (cond["lam"] == key[1])].iloc[0]
            hand = m[idx].sum() / g[idx].sum() if g[idx].sum() > 0 else np.nan
            assert row["lambda_hat"] == pytest.approx(hand, nan_ok=True)
    icl = ResultStore(store_path("demo", "poisson_icl", SMOL, tmp_path))
    cells, pm, pg = icl.cells(), icl.read("prefix_n_markers"), icl.read("prefix_n_gaps")
    assert (pg == 59).all()                                     # prefix_words 60
    for lam in (0.3, 0.9):
        idx = [i for i, c in enumerate(cells) if c["lam"] == lam]
        row = cond[(cond["experiment"] == "poisson_icl") & (cond["marker"] == "all") & (cond["lam"] == lam)].iloc[0]
        assert row["prefix_lambda_hat"] == pytest.approx(pm[idx].sum() / pg[idx].sum())

    s = pd.read_parquet(out / "tables" / "cot_samples.parquet")
    st = ResultStore(store_path("demo", "cot_coin", SMOL, tmp_path))
    lp, lp0 = st.read("logprobs"), st.read("logprobs_baseline")
    s = s.sort_values("cell")
    ph = 1 / (1 + np.exp(lp[:, 1] - lp[:, 0]))
    np.testing.assert_allclose(s["p_target_cot"], ph, atol=1e-9)
    np.testing.assert_allclose(s["tvd_cot"], np.abs(ph - s["bias"] / 100), atol=1e-9)
    np.testing.assert_allclose(s["off_base"], 1 - np.exp(lp0).sum(1), atol=1e-9)
    assert s.groupby("bias")["p_target_base"].nunique().eq(1).all()   # the baseline does not depend on the sample
    md = report.read_text()
    assert "## Poisson processes (λ̂ vs λ)" in md and "## Chain of thought" in md
    figs = {f.stem for f in (out / "figures").glob("*.png")}
    assert figs == {"poisson_lambda_hat", "poisson_lambda_hat_by_marker", "cot_cot_coin"}
