"""reduce: the coin-flip paper's metrics next to ours, exchangeability, and the "Against the papers" section.

Synthetic stores of the real ICL / needle / paraphrase families with known 'models', so every paper
number has a closed form: constant or symmetric predictions around θ (TVD of the mean vs mean of
the TVDs), the paper's γ learner (recovered γ), filler samples that straddle the stated
distribution (the sample-mean TVD is 0 while the per-sample TVD is not). ICL stores with a
``paraphrase`` axis, ``protocol: paper`` and permutation arrays are written with an extended
cell list / array spec, since the ICL params of this branch do not have them yet.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import synthetic_store
from bayesflip import bayes
from bayesflip.config import config_hash
from bayesflip.experiments import get_family
from bayesflip.experiments.base import ArraySpec
from bayesflip.experiments.icl import ICLParams, per_flip_probs
from bayesflip.paths import REPO_ROOT
from bayesflip.reduce import reduce_sweep
from bayesflip.reduce.published import load_published
from bayesflip.store import ResultStore, store_path

MODEL = "llama-3.1-8b"   # a registry name with published values
OFF = 0.1


def icl_store(root, sweep, exp, params: dict, cells: list[dict], probs: np.ndarray, outcomes: np.ndarray,
              extra: dict | None = None, shard_size=4) -> ResultStore:
    """An ICL store with a free cell list (e.g. a ``paraphrase`` axis) and optional extra arrays
    ``{name: (ArraySpec, values)}``; ``params`` may hold keys the ICL params do not know (``protocol``)."""
    fam = get_family("icl")
    p = ICLParams(**{k: v for k, v in params.items() if k in ICLParams.model_fields})
    specs = dict(fam.arrays(p))
    specs.update({k: spec for k, (spec, _) in (extra or {}).items()})
    raw = {"family": "icl", "seed": 7, "shard_size": shard_size, "params": {**p.model_dump(mode="json"), **params}}
    attrs = {"experiment": exp, "family": "icl", "config": raw, "config_hash": config_hash(raw), "seed": 7,
             "shard_size": shard_size, "model": MODEL, "model_id": "synthetic", "model_revision": "r1",
             "git_commit": "test", "created": "now", "versions": {"python": "3"}}
    st = ResultStore.create(store_path(sweep, exp, MODEL, root), specs, cells, shard_size, fam.coords(p), attrs)
    p_true = np.stack([np.vstack([r, r[-1:]]) for r in (per_flip_probs(p, c) for c in cells)]).astype(np.float32)
    arrays = {"logprobs": np.log((1 - OFF) * probs).astype(np.float32), "outcomes": outcomes.astype(np.int32),
              "p_true": p_true, **{k: v for k, (_, v) in (extra or {}).items()}}
    for s in range(st.n_shards):
        sl = st.shard_slice(s)
        st.write_shard(s, {k: v[sl] for k, v in arrays.items()})
    return st


def write(st: ResultStore, arrays: dict) -> None:
    for s in range(st.n_shards):
        sl = st.shard_slice(s)
        st.write_shard(s, {k: v[sl] for k, v in arrays.items()})


# ---------------------------------------------------------------------------- stores
N_FLIPS = 24
THETAS = [0.2, 0.7]
DELTA = 0.1        # the two paraphrases predict θ ± DELTA at every position


def coin_paper_store(root):
    """coin i.i.d., protocol paper, 2 sequences × 2 paraphrases; paraphrase j predicts θ + (−1)^j DELTA."""
    params = {"process": "coin", "thetas": THETAS, "n_flips": N_FLIPS, "samples": 2, "protocol": "paper"}
    cells = [{"theta": t, "sample": s, "paraphrase": j} for t in THETAS for s in range(2) for j in range(2)]
    rng = np.random.default_rng(0)
    outs = {(t, s): (rng.random(N_FLIPS) > t).astype(int) for t in THETAS for s in range(2)}
    ph = np.array([[c["theta"] + (DELTA if c["paraphrase"] == 0 else -DELTA)] * (N_FLIPS + 1) for c in cells])
    return icl_store(root, "syn", "icl_coin_paper", params, cells, bayes.coin_dist(ph),
                     np.stack([outs[(c["theta"], c["sample"])] for c in cells]))


def coin_clean_store(root):
    """coin i.i.d. without paraphrase axis: the Laplace learner; 3 samples (the averaging axis)."""
    fam = get_family("icl")
    params = {"process": "coin", "thetas": THETAS, "n_flips": N_FLIPS, "samples": 3}
    p = ICLParams(**params)
    cells = fam.cells(p)
    outs = np.stack([fam.sample_outcomes(p, c, 7) for c in cells])
    probs = bayes.coin_dist(bayes.coin_curve_predictive((outs == 0).astype(int)))
    return icl_store(root, "syn", "icl_coin_clean", params, cells, probs, outs), outs, cells


GAMMA = 0.5


def shift_paper_store(root):
    """coin shift 0.75 → 0.25, 2 sequences × 3 paraphrases; paraphrases = the paper's γ learner ± noise
    that cancels in the mean over paraphrases."""
    params = {"process": "coin", "thetas": [0.75], "theta2s": [0.25], "shift": "switch", "cutoff": 20,
              "n_flips": 40, "samples": 2, "protocol": "paper"}
    cells = [{"theta": 0.75, "theta2": 0.25, "sample": s, "paraphrase": j} for s in range(2) for j in range(3)]
    rng = np.random.default_rng(5)
    seqs = [np.concatenate([rng.random(20) < 0.75, rng.random(20) < 0.25]).astype(int) for _ in range(2)]
    noise = np.array([-0.05, 0.0, 0.05])
    ph = np.stack([np.clip(bayes.paper_gamma_predictive(seqs[c["sample"]], GAMMA) + noise[c["paraphrase"]], 0.01, 0.99)
                   for c in cells])
    outs = np.stack([1 - seqs[c["sample"]] for c in cells])       # choice 0 = heads
    return icl_store(root, "syn", "shift_paper", params, cells, bayes.coin_dist(ph), outs), seqs


PERMS = 3


def perm_store(root, exp, learner):
    """coin i.i.d. with permutation arrays: perm j = the cell's outcomes rolled by j + 1."""
    fam = get_family("icl")
    params = {"process": "coin", "thetas": [0.5], "n_flips": 10, "samples": 2, "permutations": PERMS}
    p = ICLParams(**{k: v for k, v in params.items() if k in ICLParams.model_fields})
    cells = fam.cells(p)
    outs = np.stack([fam.sample_outcomes(p, c, 7) for c in cells])
    perm_outs = np.stack([[np.roll(o, j + 1) for j in range(PERMS)] for o in outs])
    perm_probs = np.stack([[learner(po) for po in pos] for pos in perm_outs])
    extra = {"perm_logprobs": (ArraySpec(("perm", "position", "choice"), (PERMS, 11, 2)),
                               np.log((1 - OFF) * perm_probs).astype(np.float32)),
             "perm_outcomes": (ArraySpec(("perm", "flip"), (PERMS, 10), "int32"), perm_outs.astype(np.int32))}
    probs = np.stack([learner(o) for o in outs])
    icl_store(root, "syn", exp, params, cells, probs, outs, extra=extra)
    return outs, perm_outs, probs, perm_probs


def bayes_coin(o):
    return bayes.coin_dist(bayes.coin_curve_predictive((o == 0).astype(int)))


def recency_coin(o):
    return bayes.coin_dist(bayes.discounted_predictive((o == 0).astype(int), 0.5))


def die_store(root):
    """die i.i.d. at b = 0.6, faces 2 and 5; the model predicts uniform: TVD to the stated die = 0.6 − 1/6."""
    fam = get_family("icl")
    params = {"process": "die", "thetas": [0.6], "faces": [2, 5], "n_flips": 12, "samples": 2}
    p = ICLParams(**params)
    cells = fam.cells(p)
    outs = np.stack([fam.sample_outcomes(p, c, 7) for c in cells])
    return icl_store(root, "syn", "icl_die", params, cells, np.full((len(cells), 13, 6), 1 / 6), outs)


NEEDLE = {"process": "coin", "lengths": [10], "depths": [0.5], "biases": [30, 60], "samples": 2}


def needle_arrays(p, cells, seed):
    """needle: sample 0 predicts b + 0.1, sample 1 b − 0.1 (mean = stated); baselines: (0.8, 0.2) / (0.6, 0.4)."""
    rows = []
    for c in cells:
        sign = 1 if c["sample"] == 0 else -1
        h = c["bias"] / 100 + 0.1 * sign if c["condition"] == "needle" else 0.7 + 0.1 * sign
        rows.append([h, 1 - h])
    probs = np.array(rows)
    stated = np.array([[c["bias"] / 100, 1 - c["bias"] / 100] if c["condition"] == "needle" else [np.nan, np.nan]
                       for c in cells])
    return {"logprobs": np.log((1 - OFF) * probs).astype(np.float32), "p_stated": stated.astype(np.float32),
            "token_length": np.array([c["length"] for c in cells], dtype=np.int32),
            "token_depth": np.full(len(cells), 3, dtype=np.int32), "prompt_tokens": np.full(len(cells), 30, dtype=np.int32)}


PARA_P = [0.6, 0.7, 0.8, 0.9]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    coin_paper_store(root)
    clean = coin_clean_store(root)
    shift = shift_paper_store(root)
    perm_exact = perm_store(root, "perm_bayes", bayes_coin)
    perm_recent = perm_store(root, "perm_recency", recency_coin)
    die_store(root)
    st, fam, p, cells = synthetic_store(root, "syn", "needle_coin", "needle", NEEDLE, 3, 7, MODEL)
    write(st, needle_arrays(p, cells, 7))
    st, fam, p, cells = synthetic_store(root, "syn", "prior_coin", "paraphrase",
                                        {"process": "coin", "paraphrases": [f"Query {i}:" for i in range(4)]}, 2, 7,
                                        MODEL)
    write(st, {"logprobs": np.log((1 - OFF) * bayes.coin_dist(np.array(PARA_P))).astype(np.float32)})
    st, fam, p, cells = synthetic_store(root, "syn", "poisson_explicit", "poisson",
                                        {"mode": "explicit", "markers": ["*"], "lambdas": [0.5], "samples": 2}, 2, 7,
                                        MODEL)
    write(st, {"lambda_hat": np.array([0.3, 0.25]), "n_markers": np.array([3, 5], dtype=np.int32),
               "n_attached": np.zeros(2, dtype=np.int32), "n_gaps": np.array([10, 20], dtype=np.int32),
               "n_tokens": np.array([15, 30], dtype=np.int32), "text": np.array(["a * b", "c * d"])})
    report = reduce_sweep("syn", results_dir=root, strict=True)
    return {"root": root, "report": report, "tables": report.parent / "tables", "clean": clean, "shift": shift,
            "perm_exact": perm_exact, "perm_recent": perm_recent}


# ---------------------------------------------------------------------------- ICL
def test_ngrid_paraphrase_axis_mean_of_tvds_vs_tvd_of_mean(sweep):
    ng = pd.read_csv(sweep["tables"] / "icl_paper_ngrid.csv")
    d = ng[ng["experiment"] == "icl_coin_paper"].set_index("N")
    assert list(d.index) == [0, 1, 3, 5, 10, 20]          # the paper's grid ∩ 0..24
    assert (d["protocol"] == "paper").all()
    np.testing.assert_allclose(d["tvd_paper"], DELTA, atol=1e-6)    # each paraphrase is DELTA off θ
    np.testing.assert_allclose(d["tvd_of_mean"], 0.0, atol=1e-6)    # their mean is θ
    bt = pd.read_csv(sweep["tables"] / "icl_paper_by_theta.csv")
    b = bt[bt["experiment"] == "icl_coin_paper"]
    assert set(b["averaged_over"]) == {"paraphrase"} and (b["n_prompts"] == 2).all() and (b["n_groups"] == 2).all()


def test_ngrid_without_paraphrase_axis_averages_samples(sweep):
    outs, cells = sweep["clean"][1], sweep["clean"][2]
    ng = pd.read_csv(sweep["tables"] / "icl_paper_ngrid.csv")
    d = ng[ng["experiment"] == "icl_coin_clean"].set_index("N")
    assert (d["protocol"] == "clean").all()
    theta = np.array([c["theta"] for c in cells])
    for n in (0, 1, 5, 20):
        heads = (outs[:, :n] == 0).sum(axis=1)
        p = (1 + heads) / (2 + n)                            # the Laplace learner after n flips
        per_theta_paper = [np.mean(np.abs(p[theta == t] - t)) for t in THETAS]
        per_theta_mean = [abs(np.mean(p[theta == t]) - t) for t in THETAS]
        assert d.loc[n, "tvd_paper"] == pytest.approx(np.mean(per_theta_paper), abs=1e-6)
        assert d.loc[n, "tvd_of_mean"] == pytest.approx(np.mean(per_theta_mean), abs=1e-6)
    assert d.loc[0, "tvd_paper"] == pytest.approx((0.3 + 0.2) / 2, abs=1e-6)
    bt = pd.read_csv(sweep["tables"] / "icl_paper_by_theta.csv")
    assert set(bt.loc[bt["experiment"] == "icl_coin_clean", "averaged_over"]) == {"sample"}


def test_die_paper_tvd(sweep):
    bt = pd.read_csv(sweep["tables"] / "icl_paper_by_theta.csv")
    d = bt[bt["experiment"] == "icl_die"]
    assert set(d["N"]) == {0, 1, 3, 5, 10}
    np.testing.assert_allclose(d["tvd_paper"], 0.6 - 1 / 6, atol=1e-6)


def test_paper_gamma_recovered_next_to_ours(sweep):
    g = pd.read_csv(sweep["tables"] / "icl_paper_gamma.csv").set_index("experiment")
    assert g.loc["shift_paper", "gamma_paper"] == pytest.approx(GAMMA, abs=0.02)
    assert g.loc["shift_paper", "protocol"] == "paper"
    assert g.loc["shift_paper", "n_points"] == 2 * 40           # 2 sequences (paraphrases averaged), positions 1..40
    assert np.isfinite(g.loc["shift_paper", "gamma_bayesflip"])
    s = pd.read_csv(sweep["tables"] / "icl_summary.csv").set_index("experiment")
    assert s.loc["shift_paper", "gamma_paper"] == pytest.approx(g.loc["shift_paper", "gamma_paper"])
    summ = json.loads((sweep["report"].parent / "summary.json").read_text())
    assert summ["models"][MODEL]["icl"]["gamma_paper"]["shift_paper"] == pytest.approx(GAMMA, abs=0.02)


def test_exchangeability_gap_from_perm_arrays(sweep):
    s = pd.read_csv(sweep["tables"] / "icl_summary.csv").set_index("experiment")
    assert s.loc["perm_bayes", "exchangeability_gap"] == pytest.approx(0.0, abs=1e-6)   # counts only: exchangeable
    assert s.loc["perm_bayes", "exchangeability_cells"] == 2
    outs, perm_outs, probs, perm_probs = sweep["perm_recent"]
    want = []
    for i in range(len(outs)):
        keep = [j for j in range(PERMS) if not np.array_equal(perm_outs[i, j], outs[i])]
        want.append(bayes.exchangeability_gap(np.vstack([probs[i, -1][None], perm_probs[i, keep, -1]])).mean_tvd)
    assert s.loc["perm_recency", "exchangeability_gap"] == pytest.approx(np.mean(want), abs=1e-6)
    assert s.loc["perm_recency", "exchangeability_gap"] > 0.01
    assert np.isnan(s.loc["icl_coin_clean", "exchangeability_gap"])                     # no perm arrays
    md = sweep["report"].read_text()
    assert "exchangeability_gap" in md and "martingale_gap" in md


# ---------------------------------------------------------------------------- needle, paraphrase
def test_needle_sample_mean_tvd(sweep):
    t = pd.read_csv(sweep["tables"] / "needle_paper.csv")
    nd = t[t["condition"] == "needle"].set_index("bias")
    np.testing.assert_allclose(nd["tvd_paper"], 0.0, atol=1e-6)     # the sample mean is the stated distribution
    b = 0.3                                                          # KL per sample, then the mean
    kl = np.mean([b * np.log(b / h) + (1 - b) * np.log((1 - b) / (1 - h)) for h in (b + 0.1, b - 0.1)])
    assert nd.loc[30, "kl_paper"] == pytest.approx(kl, abs=1e-5)
    assert nd.loc[30, "kl_of_mean"] == pytest.approx(0.0, abs=1e-6)
    nn = t[t["condition"] == "no_needle"].iloc[0]
    assert nn["tvd_paper"] == pytest.approx(0.2, abs=1e-6)          # mean (0.7, 0.3) vs uniform
    cells = pd.read_csv(sweep["tables"] / "needle_cells.csv")       # ours: per cell, 0.1 off the stated
    np.testing.assert_allclose(cells.loc[cells["condition"] == "needle", "tvd"], 0.1, atol=1e-6)
    ld = pd.read_csv(sweep["tables"] / "needle_paper_by_length_depth.csv")
    assert ld.loc[ld["condition"] == "needle", "n_needles"].iloc[0] == 2


def test_paraphrase_prior_population_std(sweep):
    pr = pd.read_csv(sweep["tables"] / "paraphrase_prior.csv")
    h = pr[pr["choice"].str.strip() == "heads"].iloc[0]
    assert h["p_mean"] == pytest.approx(0.75, abs=1e-6)
    assert h["p_std_paper"] == pytest.approx(np.std(PARA_P), abs=1e-6)
    assert h["p_std"] == pytest.approx(np.std(PARA_P, ddof=1), abs=1e-6)


# ---------------------------------------------------------------------------- against the papers
def test_published_file_maps_to_registry():
    pub = load_published()
    reg = {name for f in ("paper.yaml", "large.yaml", "pythia.yaml")
           for name in yaml.safe_load((REPO_ROOT / "configs" / "models" / f).read_text())["models"]}
    assert set(pub["models"].values()) <= reg
    assert pub["source"]["repository"] == "rcorona/llm-coin-flips"
    prior = {r["published_name"]: (r["mean"], r["std"]) for r in pub["prior"]}
    assert prior["Llama-3.1-8B"] == (0.757, 0.124) and prior["Mistral-7B-Instruct"] == (0.969, 0.063)
    g = {r["model"]: r["gamma"] for r in pub["gamma"]}
    assert g["llama-3.1-8b"] == 0.881 and g["mistral-7b-instruct-v0.3"] == 0.0 and len(g) == 8
    assert pub["icl_coin_tvd"][0]["tvd"] == {1: 0.528, 3: 0.287, 5: 0.217, 10: 0.143, 20: 0.088, 100: 0.045}


def test_against_the_papers_section(sweep):
    out = sweep["report"].parent
    md = sweep["report"].read_text()
    assert "## Against the papers" in md
    sec = md.split("## Against the papers", 1)[1].split("\n## ", 1)[0]
    for h in ("B. Prior over paraphrases", "C. Coin ICL", "C. Die ICL", "D. Distribution shift"):
        assert h in sec
    assert "E. Poisson" in sec
    po = pd.read_csv(out / "tables" / "papers_poisson.csv")
    mine = po[po["source"] == "ours"].iloc[0]
    assert (mine["mode"], mine["lam"]) == ("explicit", 0.5)
    assert mine["lambda_hat"] == pytest.approx(8 / 30) and mine["lambda_hat_mean"] == pytest.approx(0.275)
    # the published λ̂ is a mean of per-sample λ̂ at temperature 1.0 (not the old mean over four temperatures)
    llama = po[(po["source"] == "published") & (po["model"] == MODEL)]
    assert dict(zip(llama["mode"], llama["lambda_hat_mean"])) == {"explicit": 0.716, "icl": 0.48}
    assert set(llama["temperature"]) == {1.0} and llama["published_source"].str.contains("stats").all()
    conds = dict(zip(llama["mode"], llama["conditions"]))
    assert conds["icl"].startswith("conditions ambiguous") and "ambiguous" not in conds["explicit"]
    assert "clean protocol" in mine["conditions"] and "temperature not set" in mine["conditions"]
    assert "| published | llama-3.1-8b | Llama-3.1-8B |" in sec
    prior = pd.read_csv(out / "tables" / "papers_prior.csv")
    ref = prior[(prior["source"] == "published") & (prior["model"] == "llama-3.1-8b")].iloc[0]
    assert (ref["mean"], ref["std"]) == (0.757, 0.124)
    ours = prior[prior["source"] == "ours"].iloc[0]
    assert ours["mean"] == pytest.approx(0.75, abs=1e-6) and ours["protocol"] == "clean"
    icl = pd.read_csv(out / "tables" / "papers_icl_coin_tvd.csv")
    pub = icl[(icl["source"] == "published") & (icl["model"] == "llama-3.1-8b")].iloc[0]
    # the sweep ran θ = 0.2, 0.7: the published reference is the mean over the same θ, not over all 11
    per = {r["theta"]: r["tvd"] for r in load_published()["icl_coin_tvd_theta"] if r["model"] == MODEL}
    assert pub["thetas"] == "0.2, 0.7"
    assert pub["N=1"] == pytest.approx((per[0.2][1] + per[0.7][1]) / 2) and pub["N=1"] != 0.528
    mine = icl[(icl["source"] == "ours") & (icl["experiment"] == "icl_coin_paper")].iloc[0]
    assert mine["protocol"] == "paper" and mine["N=1"] == pytest.approx(DELTA, abs=1e-6)
    gam = pd.read_csv(out / "tables" / "papers_gamma.csv")
    assert gam.loc[(gam["source"] == "ours"), "gamma_paper"].iloc[0] == pytest.approx(GAMMA, abs=0.02)
    assert len(gam[gam["source"] == "published"]) == 8
    die = pd.read_csv(out / "tables" / "papers_icl_die_tvd.csv")
    assert die.loc[(die["source"] == "published") & (die["model"] == MODEL), "N=1"].iloc[0] == 0.381
    assert die.loc[die["source"] == "ours", "N=1"].iloc[0] == pytest.approx(0.6 - 1 / 6, abs=1e-6)
    for f in ("papers_prior", "papers_icl_coin_tvd", "papers_icl_die_tvd", "papers_gamma"):
        assert (out / "figures" / f"{f}.png").exists() and (out / "figures" / f"{f}.pdf").exists()
        assert f"figures/{f}.png" in md
    html = (out / "report.html").read_text()
    assert "Against the papers" in html and html.count("data:image/png;base64,") == len(list((out / "figures").glob("*.png")))
    summ = json.loads((out / "summary.json").read_text())["against_papers"]
    assert summ["source"]["repository"] == "rcorona/llm-coin-flips"
    assert {"prior", "icl_coin_tvd", "icl_die_tvd", "gamma", "poisson"} <= set(summ)
    assert any(r["source"] == "published" and r["model"] == "llama-3.1-8b" for r in summ["prior"])
    assert (out / "tables" / "papers_published.csv").exists()


def test_no_section_without_relevant_stores(tmp_path):
    st, fam, p, cells = synthetic_store(tmp_path, "only", "needle_coin", "needle", NEEDLE, 3, 7, MODEL)
    write(st, needle_arrays(p, cells, 7))
    md = reduce_sweep("only", results_dir=tmp_path, strict=True).read_text()
    assert "## Against the papers" not in md
