"""reduce: the iterated-learning reducers (chains, rules, acronym).

Synthetic stores are built with the real families (cells, arrays, coords, ``initial_outcomes``)
and, in place of the LLM, an exact Bayesian learner simulated with numpy: its read after data with
counts n_i is the posterior predictive ``(α_i + n_i) / (Σα + n)`` and it passes data on as a ``pm``
learner (n i.i.d. draws) or a ``sampler`` (Polya urn), with the family's filter/redraw rule. An ICL
store of the same Bayesian learner lets the ICL reducer fit the prior that the chains reducer then
uses. The reference means are checked against a transition matrix written out here with
scipy.stats.binom; the rules metrics against loops over the 243 hypotheses.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from conftest import synthetic_store
from scipy import stats

from bayesflip import bayes
from bayesflip.experiments.chains import initial_outcomes
from bayesflip.experiments.icl import per_flip_probs
from bayesflip.experiments.rules import OBJECTS, hypotheses, rule_output
from bayesflip.reduce import reduce_sweep
from bayesflip.reduce.base import FamilyInput, ReducedFamily
from bayesflip.reduce.chains import reduce_chains
from bayesflip.reduce.load import load_sweep_data
from bayesflip.store import ResultStore, store_path

MODEL = "bayes-pm"
OFF = 0.05
A, B = 2.0, 6.0                                   # the coin learner's prior
DIE_ALPHA = np.array([3.0, 1.0, 1.0, 1.0, 1.0, 1.0])
COIN = {"learners": ["pm", "sampler"], "n": [10], "inits": [5], "min_counts": [0, 2], "chains": 400,
        "generations": 8}
DIE = {"process": "die", "learners": ["pm"], "n": [12], "inits": [2], "min_counts": [0], "chains": 200,
       "generations": 5}
ICL = {"thetas": [0.2, 0.5, 0.8], "n_flips": 20, "samples": 2}
RULES = {"biases": ["strong", "none"], "interactions": ["none", "refine", "self_check"], "chains": 3,
         "generations": 2}
ACRO = {"filters": ["most", "least"], "chains": 3, "generations": 3, "pool": 4, "keep": 4, "shots": 3}


def make_store(root, sweep, exp, family, params: dict, arrays_fn, shard_size, seed=7) -> ResultStore:
    st, fam, p, cells = synthetic_store(root, sweep, exp, family, params, shard_size, seed, MODEL)
    arrays = arrays_fn(fam, p, cells, seed)
    for s in range(st.n_shards):
        sl = st.shard_slice(s)
        st.write_shard(s, {k: v[sl] for k, v in arrays.items()})
    return st


# ---------------------------------------------------------------------------- synthetic Bayesian chains
def bayes_chain_arrays(alpha):
    alpha = np.asarray(alpha, dtype=float)

    def fn(fam, p, cells, seed):
        K, G = len(alpha), p.generations
        out = {k: np.full((len(cells), *s.shape), s.fill, dtype=s.dtype) for k, s in fam.arrays(p).items()}
        for i, c in enumerate(cells):
            rng = np.random.default_rng([seed, i])
            n = c["n"]
            seq = initial_outcomes(K, n, c["init"], p.init_choice, rng)
            tries = 0
            for g in range(G + 1):
                cnt = np.bincount(seq, minlength=K)
                q = (alpha + cnt) / (alpha.sum() + n)
                out["logprobs"][i, g] = np.log((1 - OFF) * q)
                out["probs"][i, g] = q
                out["entropy"][i, g] = -(q * np.log(q)).sum()
                out["off_mass"][i, g] = OFF
                out["counts"][i, g] = cnt
                out["outcomes"][i, g, :n] = seq
                out["redraws"][i, g] = tries
                out["accepted"][i, g] = np.sum(seq == p.filter_choice) >= c["min_count"]
                if g == G:
                    break
                tries = 0
                while True:
                    if c["learner"] == "pm":
                        new = rng.choice(K, size=n, p=q)
                    else:  # sampler: Polya urn, each outcome from the predictive given data + own outputs
                        own = np.zeros(K)
                        new = np.empty(n, dtype=np.int64)
                        for j in range(n):
                            new[j] = rng.choice(K, p=(alpha + cnt + own) / (alpha.sum() + n + j))
                            own[new[j]] += 1
                    if np.sum(new == p.filter_choice) >= c["min_count"] or tries >= p.max_redraws:
                        break
                    tries += 1
                seq = new
        return out

    return fn


def icl_arrays(fam, p, cells, seed):
    outs = np.stack([fam.sample_outcomes(p, c, seed) for c in cells])
    q = bayes.coin_dist(bayes.coin_curve_predictive((outs == 0).astype(int), A, B))
    p_true = np.stack([np.vstack([r, r[-1:]]) for r in (per_flip_probs(p, c) for c in cells)])
    return {"logprobs": np.log((1 - OFF) * q).astype(np.float32), "outcomes": outs,
            "p_true": p_true.astype(np.float32)}


def hand_chain(learner, a, b, n, G, init, min_count=0):
    """Exact distribution of the head count per generation, transition matrix written out here."""
    ks = np.arange(n + 1)
    if learner == "pm":
        T = np.array([stats.binom.pmf(ks, n, (a + k) / (a + b + n)) for k in ks])
    else:
        T = np.array([stats.betabinom.pmf(ks, n, a + k, b + n - k) for k in ks])
    T = T * (ks >= min_count)[None, :]
    T /= T.sum(1, keepdims=True)
    dist = [np.eye(n + 1)[init]]
    for _ in range(G):
        dist.append(dist[-1] @ T)
    return np.array(dist)


# ---------------------------------------------------------------------------- synthetic rules / acronym
def rules_arrays(fam, p, cells, seed):
    rng = np.random.default_rng(seed)
    out = {k: np.full((len(cells), *s.shape), s.fill, dtype=s.dtype) for k, s in fam.arrays(p).items()}
    G1, H = p.generations + 1, len(hypotheses())
    out["probs"][:] = rng.dirichlet(np.full(H, 0.3), size=(len(cells), G1))
    for i, c in enumerate(cells):
        if c["interaction"] == "self_check":
            out["check_yes"][i] = rng.uniform(0.05, 1.0, size=(G1, H))
    out["on_mass"][:] = rng.uniform(0.1, 0.9, size=(len(cells), G1))
    out["rule"][:] = rng.integers(0, H, size=(len(cells), G1))
    # the stored metric arrays are left at their fill (NaN): the reducer must recompute them from P(h)
    return out


def acro_arrays(fam, p, cells, seed):
    rng = np.random.default_rng(seed)
    out = {k: np.full((len(cells), *s.shape), s.fill, dtype=object if s.dtype == "str" else s.dtype)
           for k, s in fam.arrays(p).items()}
    shape = (len(cells), p.generations + 1)
    for pre in ("", "prod_"):
        out[pre + "share_common"] = rng.uniform(0, 1, shape)
        out[pre + "mean_rank"] = rng.uniform(1, 5000, shape)
        out[pre + "mean_zipf"] = rng.uniform(2, 7, shape)
    out["n_valid"] = rng.integers(0, p.pool + 1, shape).astype(np.int32)
    out["carried"] = rng.random(shape) < 0.2
    for k in ("replies", "kept"):
        out[k] = np.full(out[k].shape, "", dtype=object).astype(str)
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("il")
    make_store(root, "il", "icl_coin", "icl", ICL, icl_arrays, shard_size=4)
    make_store(root, "il", "chain_coin", "chains", COIN, bayes_chain_arrays([A, B]), shard_size=400)
    make_store(root, "il", "chain_die", "chains", DIE, bayes_chain_arrays(DIE_ALPHA), shard_size=200)
    make_store(root, "il", "rules", "rules", RULES, rules_arrays, shard_size=3)
    make_store(root, "il", "acronym", "acronym", ACRO, acro_arrays, shard_size=2)
    report = reduce_sweep("il", results_dir=root, strict=True)
    tables = report.parent / "tables"
    return root, report, {n: pd.read_parquet(tables / f"{n}.parquet") for n in
                          ("chains_reference", "chains_diagnostic", "chains_priors", "chains_by_generation",
                           "chains_stationary", "rules_by_generation", "acronym_by_generation")}


# ---------------------------------------------------------------------------- chains
def test_priors_recovered_from_icl_and_from_the_chains(synthetic):
    _, _, t = synthetic
    pr = t["chains_priors"]
    coin = pr[pr["process"] == "coin"].set_index("source")
    assert set(coin.index) == {"icl", "chain", "uniform"} and bool(coin.loc["icl", "primary"])
    for src in ("icl", "chain"):
        assert coin.loc[src, "alpha_heads"] == pytest.approx(A, rel=2e-3)
        assert coin.loc[src, "alpha_tails"] == pytest.approx(B, rel=2e-3)
    die = pr[pr["process"] == "die"].set_index("source")
    assert set(die.index) == {"chain", "uniform"} and bool(die.loc["uniform", "primary"])   # no ICL die: fallback
    cols = [f"alpha_{f}" for f in range(1, 7)]
    assert die.loc["chain", cols].to_numpy(dtype=float) == pytest.approx(DIE_ALPHA, rel=5e-3)


@pytest.mark.parametrize("learner,mc", [("pm", 0), ("pm", 2), ("sampler", 0), ("sampler", 2)])
def test_reference_mean_matches_hand_chain_and_llm(synthetic, learner, mc):
    _, _, t = synthetic
    ref = t["chains_reference"]
    r = ref[(ref["experiment"] == "chain_coin") & (ref["learner"] == learner) & (ref["min_count"] == mc)
            & (ref["prior"] == "icl") & (ref["ref_learner"] == learner)].sort_values("generation")
    dist = hand_chain(learner, A, B, 10, 8, 5, mc)
    ks = np.arange(11)
    assert r["ref_mean"].to_numpy() == pytest.approx(dist @ ks / 10, abs=2e-4)
    assert r["ref_entropy"].to_numpy() == pytest.approx(bayes.entropy(dist), abs=2e-3)
    # the simulated Bayesian chains follow their exact reference: mean within 4 s.e., TVD near the N-chain floor
    gen = t["chains_by_generation"]
    g = gen[(gen["experiment"] == "chain_coin") & (gen["learner"] == learner) & (gen["min_count"] == mc)]
    g = g.sort_values("generation")
    assert (np.abs(g["mean_prop"].to_numpy() - dist @ ks / 10)[1:] < 4 * g["mean_prop_se"].to_numpy()[1:]).all()
    assert r["tvd"].iloc[0] == pytest.approx(0.0)
    assert r["tvd"].iloc[1:].mean() < r["tvd_floor"].iloc[1:].mean() + 0.03
    assert r["tvd"].iloc[1:].max() < 0.12
    # the reads are exactly the Bayesian predictive under the fitted prior
    assert g["tvd_read_icl"].max() < 1e-3 and g["tvd_read_uniform"].min() > 0.01
    assert g["off_choice_mass"].to_numpy() == pytest.approx(OFF, abs=1e-6)


@pytest.mark.parametrize("learner,mc", [("pm", 0), ("pm", 2), ("sampler", 0), ("sampler", 2)])
def test_best_matching_learner(synthetic, learner, mc):
    _, _, t = synthetic
    d = t["chains_diagnostic"]
    for prior in ("icl", "chain"):
        row = d[(d["experiment"] == "chain_coin") & (d["learner"] == learner) & (d["min_count"] == mc)
                & (d["prior"] == prior)].iloc[0]
        assert row["best_learner"] == learner and row["best_clear"], row.to_dict()
        assert row["mean_tvd_own"] == row[f"mean_tvd_{learner}"]
        others = [row[f"mean_tvd_{x}"] for x in ("sampler", "pm", "map") if x != learner]
        assert row[f"mean_tvd_{learner}"] < min(others) - 0.01
        assert row["prior_mean"] == pytest.approx(A / (A + B), rel=2e-3)
    # bias amplification: a MAP chain drifts to the prior's mode (0.25 -> 1/6 with n = 10), a sampler does not
    row = d[(d["experiment"] == "chain_coin") & (d["learner"] == learner) & (d["min_count"] == 0)
            & (d["prior"] == "icl")].iloc[0]
    assert abs(row["amplification_sampler"]) < 1e-3
    assert row["amplification_map"] > 0.05
    assert abs(row["amplification_llm"]) < 0.03


def test_die_uses_tracked_face_and_fallback(synthetic):
    _, _, t = synthetic
    ref = t["chains_reference"]
    r = ref[(ref["experiment"] == "chain_die") & (ref["prior"] == "chain") & (ref["ref_learner"] == "pm")]
    a = DIE_ALPHA[0]
    dist = hand_chain("pm", a, DIE_ALPHA.sum() - a, 12, 5, 2)
    assert r.sort_values("generation")["ref_mean"].to_numpy() == pytest.approx(dist @ np.arange(13) / 12, abs=1e-3)
    m = ref[(ref["experiment"] == "chain_die") & (ref["ref_learner"] == "map")]
    assert m["ref_mean"].isna().all() and m["note"].str.contains("die").all()
    d = t["chains_diagnostic"]
    row = d[(d["experiment"] == "chain_die") & (d["prior"] == "chain")].iloc[0]
    assert row["best_learner"] == "pm"


def test_fallback_without_icl_prior(synthetic, tmp_path):
    root, _, _ = synthetic
    data = load_sweep_data("il", root)
    stores = [s for s in data.stores if s.family == "chains"]
    res = reduce_chains(FamilyInput("chains", "il", stores, tmp_path / "f", tmp_path / "t"))   # no earlier ICL
    pr = res.tables["chains_priors"]
    assert set(pr["source"]) == {"chain", "uniform"}
    assert pr[pr["primary"]]["source"].eq("uniform").all()
    txt = res.sections[0].blocks[0].md
    assert "falls back to the uniform" in txt and "Beta(1, 1)" in txt
    d = res.tables["chains_diagnostic"]
    assert (d[d["prior"] == "chain"]["best_learner"] == d[d["prior"] == "chain"]["learner"]).all()


def test_earlier_icl_prior_is_used_and_strong_prior_gives_no_winner(synthetic, tmp_path):
    """A prior with α + β = 10^6 (a model that never updates): every learner is i.i.d. Binomial(n, 0.3)."""
    root, _, _ = synthetic
    stores = [s for s in load_sweep_data("il", root).stores if s.experiment == "chain_coin"]
    fits = pd.DataFrame([{"model": MODEL, "process": "coin", "alpha": 3e5, "beta": 7e5, "alpha_sum": 1e6,
                          "neg_log_lik": 0.0, "n_points": 10, "converged": True, "at_bound": True,
                          "fitted_on": "icl_x"}])
    res = reduce_chains(FamilyInput("chains", "il", stores, tmp_path / "f", tmp_path / "t",
                                    earlier={"icl": ReducedFamily(tables={"icl_prior_fits": fits})}))
    d = res.tables["chains_diagnostic"]
    icl = d[d["prior"] == "icl"]
    assert icl["primary"].all() and icl["prior_mean"].to_numpy() == pytest.approx(0.3)
    assert (icl["ref_separation"] < 1e-3).all() and (icl["best_learner"] == "indistinguishable").all()
    ref = res.tables["chains_reference"]
    r = ref[(ref["prior"] == "icl") & (ref["learner"] == "pm") & (ref["min_count"] == 0)
            & (ref["ref_learner"] == "map")]
    assert r["ref_mean"].iloc[1:].to_numpy() == pytest.approx(0.3, abs=1e-4)
    assert "at the fit's bound" in res.sections[0].blocks[0].md


# ---------------------------------------------------------------------------- rules / acronym
def hand_rules(P, yes, interaction):
    true = {"A": "off", "B": "on", "C": "off", "D": "und", "E": "off"}
    init = [("A", "B"), ("C",), ("D", "E"), ("C", "E")]
    acc = np.array([np.mean([rule_output(dict(zip(OBJECTS, h)), s) == rule_output(true, s) for s in init])
                    for h in hypotheses()])
    off = np.array([h[0] == "off" for h in hypotheses()])
    if interaction == "self_check":
        E = P * yes / (P * yes).sum()
    elif interaction == "refine":
        E = P * (acc == 1) / (P * (acc == 1)).sum()
    else:
        E = P
    def f(Q):
        return [-(Q[Q > 0] * np.log(Q[Q > 0])).sum(), Q[off].sum(), (Q * acc).sum(), Q[(acc == 1) & off].sum()]

    return f(P) + f(E)


def test_rules_metrics_equal_hand_computation(synthetic):
    root, _, t = synthetic
    st = ResultStore(store_path("il", "rules", MODEL, root))
    P, yes, on = st.read("probs"), st.read("check_yes"), st.read("on_mass")
    cells = st.cells()
    tab = t["rules_by_generation"]
    names = ["entropy", "p_screen_off", "acc_d0", "both", "eff_entropy", "eff_p_screen_off", "eff_acc_d0", "eff_both"]
    checked = 0
    for bias in RULES["biases"]:
        for inter in RULES["interactions"]:
            idx = [i for i, c in enumerate(cells) if c["bias"] == bias and c["interaction"] == inter]
            for g in range(RULES["generations"] + 1):
                hand = np.mean([hand_rules(P[i, g], yes[i, g], inter) for i in idx], axis=0)
                row = tab[(tab["bias"] == bias) & (tab["interaction"] == inter) & (tab["generation"] == g)].iloc[0]
                assert row[names].to_numpy(dtype=float) == pytest.approx(hand, abs=1e-9)
                assert row["on_mass"] == pytest.approx(on[idx, g].mean())
                assert row["n_chains"] == len(idx)
                checked += 1
    assert checked == 2 * 3 * 3
    # refinement keeps only rules consistent with d0: accuracy on d0 of P_eff is exactly 1
    assert tab[tab["interaction"] == "refine"]["eff_acc_d0"].to_numpy() == pytest.approx(1.0)


def test_acronym_metrics_are_chain_means(synthetic):
    root, _, t = synthetic
    st = ResultStore(store_path("il", "acronym", MODEL, root))
    cells = st.cells()
    tab = t["acronym_by_generation"]
    for f in ACRO["filters"]:
        idx = [i for i, c in enumerate(cells) if c["filter"] == f]
        rows = tab[tab["filter"] == f].sort_values("generation")
        for k in ("share_common", "mean_rank", "prod_mean_zipf"):
            v = st.read(k)[idx]
            assert rows[k].to_numpy() == pytest.approx(v.mean(0))
            assert rows[f"{k}_se"].to_numpy() == pytest.approx(v.std(0, ddof=1) / math.sqrt(len(idx)))
        assert rows["carried"].to_numpy() == pytest.approx(st.read("carried")[idx].mean(0))


def test_report_sections_figures_summary(synthetic):
    root, report, _ = synthetic
    md = report.read_text()
    titles = [ln[3:] for ln in md.splitlines() if ln.startswith("## ")]
    il = [t for t in titles if t.startswith("Iterated learning")]
    assert il == ["Iterated learning", "Iterated learning: rule induction",
                  "Iterated learning: word preference (acronyms)"]
    figs = report.parent / "figures"
    for name in ("chains_mean_chain_coin", "chains_entropy_chain_coin", "chains_mean_chain_die",
                 "chains_entropy_chain_die", f"rules_rules_{MODEL}", "acronym_acronym"):
        assert (figs / f"{name}.png").stat().st_size > 10_000, name
        assert f"figures/{name}.png" in md
    summary = json.loads((report.parent / "summary.json").read_text())
    assert summary["errors"] == []
    assert {f: summary["families"][f]["status"] for f in ("icl", "chains", "rules", "acronym")} == \
        dict.fromkeys(("icl", "chains", "rules", "acronym"), "reduced")
    cond = summary["models"][MODEL]["chains"]["conditions"]
    pm = next(v for k, v in cond.items() if k.startswith("chain_coin: pm") and "filter none" in k)
    assert pm["icl"]["best_learner"] == "pm" and pm["icl"]["primary"] is True
