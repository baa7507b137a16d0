"""reduce: the needle, paraphrase, markov and attention reducers.

Synthetic stores are built with the real families (cells, coords, stated distributions, Markov
sampler) and a known 'model' in place of the LLM, so TVDs, slopes and the Bayesian transition
learner have exact values. The integration test runs a tiny sweep of all four families on the real
SmolLM2 through ``bayesflip.job.run_local`` (the sweep is built in memory and handed over as a
``SweepConfig``; nothing is replaced) and checks the reducers' numbers against hand
computations from the raw stored arrays.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import synthetic_store
from scipy import stats

from bayesflip.config import SweepConfig, load_experiment
from bayesflip.experiments import get_family
from bayesflip.experiments.needle import stated_distribution
from bayesflip.reduce import reduce_sweep
from bayesflip.store import ResultStore, store_path

MODEL = "synthetic-model"
SMOL = "smollm2-135m-instruct"


def make_store(root, sweep, exp, family, params: dict, arrays_fn, shard_size=3, seed=7) -> ResultStore:
    """A store of the real ``family`` (cells, arrays, coords); ``arrays_fn(p, cells, seed)`` gives the arrays."""
    st, fam, p, cells = synthetic_store(root, sweep, exp, family, params, shard_size, seed, MODEL)
    arrays = arrays_fn(p, cells, seed)
    for s in range(st.n_shards):
        sl = st.shard_slice(s)
        st.write_shard(s, {k: v[sl] for k, v in arrays.items()})
    return st


# ---------------------------------------------------------------------------- synthetic: needle die
DIE = {"process": "die", "lengths": [10], "depths": [0.5], "faces": [2, 5], "biases": [0, 60], "samples": 1}
OFF = 0.1


def half_follower(p, cells, seed):
    """Needle cells: p = ½ stated + ½ uniform; baselines: uniform; off-choice mass OFF."""
    u = np.full(6, 1 / 6)
    probs = np.stack([0.5 * stated_distribution("die", c) + 0.5 * u if c["condition"] == "needle" else u
                      for c in cells])
    return {"logprobs": np.log((1 - OFF) * probs).astype(np.float32),
            "p_stated": np.stack([stated_distribution("die", c) for c in cells]).astype(np.float32),
            "token_length": np.array([c["length"] for c in cells], dtype=np.int32),
            "token_depth": np.array([5 if c["condition"] == "needle" else -1 for c in cells], dtype=np.int32),
            "prompt_tokens": np.full(len(cells), 40, dtype=np.int32)}


# ---------------------------------------------------------------------------- synthetic: markov
MARKOV = {"kinds": ["sticky", "random"], "random_matrices": 1, "n_steps": 12, "samples": 2}


def hand_transition_learner(x, S):
    """Dirichlet(1) per row, written out: position i predicts from state x[i-1] and the pairs seen in x[:i]."""
    out = [np.full(S, 1 / S)]
    for i in range(1, len(x) + 1):
        n = np.zeros(S)
        for a, b in zip(x[: i - 1], x[1:i]):
            if a == x[i - 1]:
                n[b] += 1
        out.append((1 + n) / (S + n.sum()))
    return np.array(out)


def markov_learner_arrays(p, cells, seed):
    fam = get_family("markov")
    trajs = [fam.trajectory(p, c, seed) for c in cells]
    S = len(p.states)
    learn = np.stack([hand_transition_learner(list(x), S) for _, _, x in trajs])
    return {"logprobs": np.log(0.8 * learn).astype(np.float32), "states": np.stack([x for _, _, x in trajs]),
            "true_row": np.stack([np.vstack([i[None], m[x]]) for m, i, x in trajs]).astype(np.float32),
            "matrix": np.stack([m for m, _, _ in trajs]).astype(np.float32)}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synfam")
    make_store(root, "syn", "needle_die", "needle", DIE, half_follower)
    make_store(root, "syn", "markov", "markov", MARKOV, markov_learner_arrays)
    report = reduce_sweep("syn", results_dir=root, strict=True)
    return root, report


def test_synthetic_needle_die_values(synthetic):
    root, report = synthetic
    t = report.parent / "tables"
    cells = pd.read_parquet(t / "needle_cells.parquet")
    nd = cells[cells["condition"] == "needle"].set_index("needle")
    # TVD(½q + ½u, q) = ½ TVD(u, q); TVD(u, q) = 1/6 for b = 0 and ½(|1/6 − .6| + 5|1/6 − .08|) = 13/30 for b = .6
    assert nd.loc["face 2 0%", "tvd"] == pytest.approx(1 / 12, abs=1e-6)
    assert nd.loc["face 5 60%", "tvd"] == pytest.approx(13 / 60, abs=1e-6)
    # KL(q ‖ p) for b = 0: q = 1/5 on five faces, p = 0.1 + 1/12 there
    assert nd.loc["face 2 0%", "kl"] == pytest.approx(np.log(0.2 / (0.1 + 1 / 12)), abs=1e-5)
    assert nd.loc["face 5 60%", "p_target"] == pytest.approx(0.3 + 1 / 12, abs=1e-6)
    assert np.allclose(cells["off_choice_mass"], OFF, atol=1e-6)
    assert np.isnan(cells.loc[cells["condition"] != "needle", "tvd"]).all()   # nothing stated
    ld = pd.read_csv(t / "needle_by_length_depth.csv")
    row = ld[ld["condition"] == "needle"].iloc[0]
    assert (row["length"], row["depth"], row["n_values"]) == (10, 0.5, 4)
    assert row["tvd"] == pytest.approx((1 / 12 + 13 / 60) / 2, abs=1e-6)
    assert row["target_slope"] == pytest.approx(0.5, abs=1e-6)                 # p_target = ½ b + 1/12
    for cond in ("no_needle", "no_context"):                                  # uniform vs every stated q
        b = ld[ld["condition"] == cond].iloc[0]
        assert b["tvd"] == pytest.approx((1 / 6 + 13 / 30) / 2, abs=1e-6) and b["n_values"] == 4
    by_bias = pd.read_csv(t / "needle_by_bias.csv")
    r = by_bias[(by_bias["condition"] == "no_needle") & (by_bias["needle"] == "face 5 60%")].iloc[0]
    assert r["tvd"] == pytest.approx(13 / 30, abs=1e-6) and r["p_target"] == pytest.approx(1 / 6, abs=1e-6)
    s = json.loads((report.parent / "summary.json").read_text())["models"][MODEL]["needle"]["needle_die"]
    assert s["target_slope"] == pytest.approx(0.5, abs=1e-6) and s["mean_tvd"] == pytest.approx(0.15, abs=1e-6)


def test_synthetic_markov_learner_and_windows(synthetic):
    root, report = synthetic
    t = report.parent / "tables"
    cur = pd.read_parquet(t / "markov_curves.parquet")
    assert cur["tvd_bayes"].max() < 1e-6                                       # the model is the learner
    np.testing.assert_allclose(cur["tvd_bayes_true"], cur["tvd_true"], atol=1e-6)
    np.testing.assert_allclose(cur["off_choice_mass"], 0.2, atol=1e-6)
    st = ResultStore(store_path("syn", "markov", MODEL, root))
    m, x = st.read("matrix").astype(float), st.read("states")
    c, i = 2, 7
    learn = hand_transition_learner(list(x[c]), 4)
    row = cur[(cur["cell"] == c) & (cur["position"] == i)].iloc[0]
    assert row["tvd_true"] == pytest.approx(0.5 * np.abs(learn[i] - m[c][x[c][i - 1]]).sum(), abs=1e-6)
    assert row["p_next"] == pytest.approx(learn[i][x[c][i]], abs=1e-6)
    summ = pd.read_csv(t / "markov_summary.csv").set_index("kind")
    # N = 12 → q = 3: early = positions 1..3, late = 10..12
    hand = cur[cur["kind"] == "sticky"]
    assert summ.loc["sticky", "tvd_traj_early"] == pytest.approx(hand[hand["position"].between(1, 3)]["tvd_true"].mean())
    assert summ.loc["sticky", "tvd_traj_late"] == pytest.approx(hand[hand["position"].between(10, 12)]["tvd_true"].mean())
    assert (summ.loc["all", "n_cells"], summ.loc["random", "n_cells"]) == (4, 2)
    assert summ.loc["all", "early_positions"] == "1-3" and summ.loc["all", "late_positions"] == "10-12"
    s = json.loads((report.parent / "summary.json").read_text())["models"][MODEL]["markov"]["markov"]
    assert s["sticky"]["tvd_traj_early"] == pytest.approx(summ.loc["sticky", "tvd_traj_early"])


# ---------------------------------------------------------------------------- real model
REAL = {
    "needle_coin": {"shard_size": 8, "params": {"lengths": [10, 40], "depths": [0.0, 1.0], "biases": [0, 50, 100],
                                                "samples": 1}},
    "paraphrase_coin": {"shard_size": 8, "params": {"limit": 8}},
    "markov": {"shard_size": 3, "params": {"random_matrices": 1, "n_steps": 20, "samples": 1}},
    "attention_coin": {"shard_size": 2, "params": {"thetas": [0.2, 0.8], "n_flips": 8, "samples": 1}},
}


@pytest.fixture(scope="module")
def real(smol, tmp_path_factory):
    """All four families, tiny grids, on SmolLM2 through run_local (a sweep built in memory), then reduce."""
    from bayesflip.job import run_local

    root = tmp_path_factory.mktemp("realfam")
    sweep = SweepConfig(name="fam", models=[SMOL],
                        experiments=[load_experiment(e, ov, prefix=f"experiments.{e}.") for e, ov in REAL.items()])
    run = run_local(sweep, results_dir=root, lm=smol, progress=False)
    assert run.n_failed == 0, [r.failed for _, r in run.tasks]
    report = reduce_sweep("fam", results_dir=root, strict=True)
    return root, report


def _softmax(lp):
    e = np.exp(np.asarray(lp, dtype=float))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.integration
def test_real_needle_and_paraphrase_by_hand(real):
    root, report = real
    t = report.parent / "tables"
    st = ResultStore(store_path("fam", "needle_coin", SMOL, root))
    cells, lp = st.cells(), st.read("logprobs")
    cur = pd.read_parquet(t / "needle_cells.parquet").set_index("cell")
    i = next(k for k, c in enumerate(cells) if c["condition"] == "needle" and c["bias"] == 50 and c["length"] == 40)
    p = _softmax(lp[i])
    assert cur.loc[i, "tvd"] == pytest.approx(0.5 * (abs(p[0] - 0.5) + abs(p[1] - 0.5)), abs=1e-9)
    assert cur.loc[i, "kl"] == pytest.approx(0.5 * np.log(0.5 / p[0]) + 0.5 * np.log(0.5 / p[1]), abs=1e-6)
    assert cur.loc[i, "off_choice_mass"] == pytest.approx(1 - np.exp(lp[i].astype(float)).sum(), abs=1e-9)
    j = next(k for k, c in enumerate(cells) if c["condition"] == "needle" and c["bias"] == 100)
    assert cur.loc[j, "tvd"] == pytest.approx(1 - _softmax(lp[j])[0], abs=1e-9)   # stated (1, 0)
    # the (L = 10, d = 1) heatmap value is the mean over the three biases of the hand TVDs
    idx = [k for k, c in enumerate(cells) if c["condition"] == "needle" and c["length"] == 10 and c["depth"] == 1.0]
    hand = np.mean([abs(_softmax(lp[k])[0] - cells[k]["bias"] / 100) for k in idx])
    ld = pd.read_csv(t / "needle_by_length_depth.csv")
    row = ld[(ld["condition"] == "needle") & (ld["length"] == 10) & (ld["depth"] == 1.0)].iloc[0]
    assert row["tvd"] == pytest.approx(hand, abs=1e-9) and row["n_values"] == 3
    # no-needle baseline at L = 40 against "heads 100%": TVD = P(tails)
    base = pd.read_parquet(t / "needle_baselines.parquet")
    k = next(k for k, c in enumerate(cells) if c["condition"] == "no_needle" and c["length"] == 40)
    b = base[(base["cell"] == k) & (base["needle"] == "heads 100%")].iloc[0]
    assert b["tvd"] == pytest.approx(_softmax(lp[k])[1], abs=1e-9)
    assert set(ld["condition"]) == {"needle", "no_needle", "no_context"}

    ps = ResultStore(store_path("fam", "paraphrase_coin", SMOL, root))
    heads = _softmax(ps.read("logprobs"))[:, 0]
    prior = pd.read_csv(t / "paraphrase_prior.csv")
    h = prior[prior["choice"] == "heads"].iloc[0]
    assert h["n_paraphrases"] == 8
    assert h["p_mean"] == pytest.approx(heads.mean(), abs=1e-9)
    assert h["p_std"] == pytest.approx(heads.std(ddof=1), abs=1e-9)
    assert (h["p_min"], h["p_max"]) == pytest.approx((heads.min(), heads.max()), abs=1e-9)
    assert h["p_std"] > 1e-3   # the wording matters: paraphrases do not give one number
    s = json.loads((report.parent / "summary.json").read_text())["models"][SMOL]
    assert s["paraphrase"]["paraphrase_coin"]["p_heads_mean"] == pytest.approx(heads.mean(), abs=1e-9)
    assert s["needle"]["needle_coin"]["n_needle_cells"] == 12


@pytest.mark.integration
def test_real_markov_and_attention_by_hand(real):
    root, report = real
    t = report.parent / "tables"
    st = ResultStore(store_path("fam", "markov", SMOL, root))
    lp, x, m = st.read("logprobs"), st.read("states"), st.read("matrix").astype(float)
    cur = pd.read_parquet(t / "markov_curves.parquet")
    for c, i in ((0, 5), (2, 17)):
        p = _softmax(lp[c, i])
        row = cur[(cur["cell"] == c) & (cur["position"] == i)].iloc[0]
        assert row["tvd_true"] == pytest.approx(0.5 * np.abs(p - m[c][x[c][i - 1]]).sum(), abs=1e-6)
        assert row["tvd_bayes"] == pytest.approx(0.5 * np.abs(p - hand_transition_learner(list(x[c]), 4)[i]).sum(),
                                                 abs=1e-6)
    pos = pd.read_csv(t / "markov_by_position.csv")
    assert set(pos["kind"]) == {"uniform", "sticky", "random"} and pos["position"].max() == 20
    assert cur["tvd_true"].between(0, 1).all()

    at = ResultStore(store_path("fam", "attention_coin", SMOL, root))
    mass, alp, outs = at.read("mass").astype(float), at.read("logprobs"), at.read("outcomes")
    labels = at.labels()
    assert [str(g) for g in labels["group"][:1]] == ["outcomes"] and str(labels["layer_set"][3]) == "late"
    pts = pd.read_parquet(t / "attention_points.parquet")
    # the Bayesian error by hand: |P(heads) − (1 + h) / (2 + n)|
    err = np.zeros((2, 9))
    for c in range(2):
        for n in range(9):
            err[c, n] = abs(_softmax(alp[c, n])[0] - (1 + np.sum(outs[c, :n] == 0)) / (2 + n))
    p0 = pts[(pts["layer_set"] == "all")].sort_values(["cell", "position"])
    np.testing.assert_allclose(p0["error"].to_numpy().reshape(2, 9), err, atol=1e-9)
    # correlation of the mass on outcomes (group 0) with the error, layer set 0 = "all", n ≥ 1
    xs, ys = mass[:, 0, 1:, 0].ravel(), err[:, 1:].ravel()
    corr = pd.read_csv(t / "attention_correlation.csv")
    r = corr[(corr["layer_set"] == "all") & (corr["measure"] == "outcomes")].iloc[0]
    assert r["n_points"] == 16
    assert r["pearson_r"] == pytest.approx(stats.pearsonr(xs, ys).statistic, abs=1e-6)
    assert r["spearman_rho"] == pytest.approx(stats.spearmanr(xs, ys).statistic, abs=1e-6)
    am = pd.read_csv(t / "attention_mass.csv")
    a = am[(am["layer_set"] == "late") & (am["measure"] == "outcomes") & (am["position"] == 8)].iloc[0]
    assert a["mean"] == pytest.approx(mass[:, 3, 8, 0].mean(), abs=1e-6) and a["n_cells"] == 2
    s = json.loads((report.parent / "summary.json").read_text())["models"][SMOL]["attention"]["attention_coin"]
    assert s["correlation"]["all"]["outcomes"]["pearson_r"] == pytest.approx(r["pearson_r"])


@pytest.mark.integration
def test_real_report_sections_figures_tables(real):
    root, report = real
    out = report.parent
    md = report.read_text()
    for title in ("## Attention", "## Markov chains", "## Explicit bias in context (needle)", "## Priors"):
        assert md.count(title) == 1, title
    assert "### Prior over prompt paraphrases (family B)" in md.split("## Priors")[1].split("\n## ")[0]
    figs = {f.stem for f in (out / "figures").glob("*.png")}
    assert figs == {"needle_heatmap_needle_coin", "needle_response_needle_coin", "paraphrase_prior_coin",
                    "markov_tvd_markov", "attention_mass_attention_coin",
                    f"attention_scatter_attention_coin_{SMOL}",
                    "papers_prior"}   # "Against the papers": the paraphrase prior next to the published ones
    for f in figs:
        png = out / "figures" / f"{f}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.with_suffix(".pdf").stat().st_size > 1000
        assert f"figures/{f}.png" in md
    summary = json.loads((out / "summary.json").read_text())
    for fam in ("needle", "paraphrase", "markov", "attention"):
        assert summary["families"][fam]["status"] == "reduced"
    assert not summary["errors"]
    for name in ("needle_cells", "needle_by_length_depth", "needle_by_bias", "paraphrase_prior", "markov_curves",
                 "markov_summary", "attention_points", "attention_correlation"):
        a, b = pd.read_csv(out / "tables" / f"{name}.csv"), pd.read_parquet(out / "tables" / f"{name}.parquet")
        assert len(a) == len(b) > 0 and list(a.columns) == list(b.columns)
