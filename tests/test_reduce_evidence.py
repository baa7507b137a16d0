"""Evidence kinds: priors, fitted priors and bayesflip's γ only from statement-free evidence (issue 21).

Synthetic paper-protocol ICL stores of the real family (``tests/conftest.py: synthetic_store``) for one
model, with and without a bias statement, whose 'model' is a known learner:

* statement-free curves (paper ``statement: none`` and clean): the Beta(2, 5) Bayesian learner;
* curves after the statement of θ: a learner whose prior is centred near the stated θ,
  P(heads | N = 0) = (1 + 8θ) / 10 — very different from Beta(2, 5);
* a statement-free shift store: the discounted learner (γ = 0.7, prior Beta(2, 5)).

The fitted prior must be the fit on the statement-free curves alone, the statement store must appear
in its own table (``icl_statement_n0``) and never in the prior table, and γ must be recovered with the
statement-free prior. A second model with only statement curves has no prior ("not measured").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import synthetic_store
from bayesflip import bayes
from bayesflip.config import SweepConfig, load_experiment
from bayesflip.engine import choice_distribution
from bayesflip.experiments.icl import per_flip_probs
from bayesflip.reduce import reduce_sweep
from bayesflip.reduce.base import FamilyInput
from bayesflip.reduce.chains import icl_priors
from bayesflip.reduce.icl import reduce_icl
from bayesflip.reduce.load import UNKNOWN_EVIDENCE, infer_evidence, load_sweep_data
from bayesflip.store import ResultStore, store_path

MODEL, ONLY_STATED = "synthetic-model", "stated-only-model"
QUERIES = ["I tossed a coin and it landed on ", "I flipped a coin and it came up "]
INSTRUCT = ["Please complete this sentence: I tossed a coin and it came up "]
PAPER = {"protocol": "paper", "process": "coin", "queries": QUERIES, "instruct_prompts": INSTRUCT, "n_flips": 20,
         "samples": 1}
FREE = {**PAPER, "thetas": [0.2, 0.7], "statement": "none"}
STATED = {**PAPER, "thetas": [0.2, 0.7], "statement": "theta"}
CLEAN = {"process": "coin", "thetas": [0.3, 0.6], "n_flips": 20, "samples": 2}
SHIFT = {**PAPER, "thetas": [0.75], "theta2s": [0.25], "shift": "switch", "cutoff": 10, "n_flips": 30,
         "statement": "none"}
SHIFT_STATED = {**SHIFT, "statement": "theta2"}
A, B, GAMMA = 2.0, 5.0, 0.7
LOW_OFF = 0.95     # the clean store's off-choice mass: on-choice 5 % < 10 %, flagged


def heads(outs):
    return (outs == 0).astype(int)


def write_icl(root, exp, params, learner, model=MODEL, off=0.1):
    """A store of the real ICL family whose 'model' is ``learner(outcomes, cells) -> (C, N+1) P(heads)``."""
    st, fam, p, cells = synthetic_store(root, "ev", exp, "icl", params, 4, 7, model)
    outs = np.stack([fam.sample_outcomes(p, c, 7) for c in cells])
    ph = learner(outs, cells)
    p_true = np.stack([np.vstack([r, r[-1:]]) for r in (per_flip_probs(p, c) for c in cells)]).astype(np.float32)
    arrays = {"logprobs": np.log((1 - off) * bayes.coin_dist(ph)).astype(np.float32), "outcomes": outs,
              "p_true": p_true}
    for s in range(st.n_shards):
        sl = st.shard_slice(s)
        st.write_shard(s, {k: v[sl] for k, v in arrays.items()})
    return st


def beta_learner(outs, cells):
    return bayes.coin_curve_predictive(heads(outs), A, B)


def stated_learner(outs, cells):
    """Prior (1 + 8θ, 1 + 8(1 − θ)) around the stated θ: P(heads | N = 0) = (1 + 8θ) / 10."""
    return np.stack([bayes.coin_curve_predictive(heads(o), 1 + 8 * c["theta"], 1 + 8 * (1 - c["theta"]))
                     for o, c in zip(outs, cells)])


def theta2_learner(outs, cells):
    return np.stack([bayes.coin_curve_predictive(heads(o), 1 + 8 * c["theta2"], 1 + 8 * (1 - c["theta2"]))
                     for o, c in zip(outs, cells)])


def discounted_learner(outs, cells):
    return np.stack([bayes.discounted_predictive(heads(o), GAMMA, A, B) for o in outs])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("evidence")
    write_icl(root, "icl_clean", CLEAN, beta_learner, off=LOW_OFF)
    write_icl(root, "icl_free", FREE, beta_learner)
    write_icl(root, "icl_stated", STATED, stated_learner)
    write_icl(root, "shift_free", SHIFT, discounted_learner)
    write_icl(root, "icl_stated", STATED, stated_learner, model=ONLY_STATED)
    write_icl(root, "shift_stated", SHIFT_STATED, theta2_learner, model=ONLY_STATED)
    st, fam, p, cells = synthetic_store(root, "ev", "prior_coin", "paraphrase",
                                        {"process": "coin", "paraphrases": ["A coin:", "B coin:", "C coin:"]}, 3, 7,
                                        MODEL)
    on = np.array([[0.9], [0.9], [0.03]])        # the third paraphrase keeps 3 % on the choices
    st.write_shard(0, {"logprobs": np.log(on * bayes.coin_dist(np.array([0.4, 0.6, 0.8]))).astype(np.float32)})
    report = reduce_sweep("ev", results_dir=root, strict=True)
    return root, report, report.parent / "tables"


def _reads(root, exp, model=MODEL):
    """(counts (R, 2), P(model) (R, 2)) of every read of a store, straight from its arrays."""
    st = ResultStore(store_path("ev", exp, model, root))
    probs, _ = choice_distribution(st.read("logprobs"))
    seen = np.eye(2)[st.read("outcomes").astype(np.int64)]
    counts = np.concatenate([np.zeros((len(seen), 1, 2)), np.cumsum(seen, axis=1)], axis=1)
    return counts.reshape(-1, 2), probs.reshape(-1, 2)


def test_fitted_prior_is_the_fit_on_statement_free_curves_alone(sweep):
    root, _, tables = sweep
    fits = pd.read_csv(tables / "icl_prior_fits.csv").set_index(["model", "process"])
    row = fits.loc[(MODEL, "coin")]
    assert row["fitted_on"] == "icl_clean,icl_free"       # i.i.d. statement-free; not icl_stated, not the shift
    parts = [_reads(root, e) for e in ("icl_clean", "icl_free")]
    counts, probs = np.concatenate([c for c, _ in parts]), np.concatenate([p for _, p in parts])
    f = bayes.fit_beta_prior(counts[:, 0], counts[:, 1], probs[:, 0])
    assert abs(row["alpha"] - f.alpha) < 1e-9 and abs(row["beta"] - f.beta) < 1e-9
    assert row["alpha"] == pytest.approx(A, rel=1e-3) and row["beta"] == pytest.approx(B, rel=1e-3)
    # with the statement curves pooled in (the old behaviour) the fit would differ
    sc, sp = _reads(root, "icl_stated")
    pooled = bayes.fit_beta_prior(np.r_[counts[:, 0], sc[:, 0]], np.r_[counts[:, 1], sc[:, 1]],
                                  np.r_[probs[:, 0], sp[:, 0]])
    assert abs(pooled.alpha - f.alpha) > 0.1
    # bayesflip's γ uses it: the discounted learner's γ is recovered; the paper's γ sits beside it
    pg = pd.read_csv(tables / "icl_paper_gamma.csv").set_index(["experiment", "model"])
    assert pg.loc[("shift_free", MODEL), "gamma_bayesflip"] == pytest.approx(GAMMA, abs=1e-4)
    g = pd.read_csv(tables / "icl_gamma_fits.csv").set_index(["experiment", "model"])
    assert g.loc[("shift_free", MODEL), "prior_fitted_on"] == "icl_clean,icl_free"


def test_statement_store_in_its_own_table_not_in_the_prior_table(sweep):
    _, report, tables = sweep
    prior = pd.read_csv(tables / "icl_priors.csv")
    assert set(zip(prior["experiment"], prior["model"])) == {("icl_clean", MODEL), ("icl_free", MODEL),
                                                             ("shift_free", MODEL)}
    h = prior[prior["choice"] == "heads"].set_index("experiment")
    assert h.loc["icl_free", "p_mean"] == pytest.approx(A / (A + B), abs=1e-6)
    assert h.loc["icl_free", "spread_over"] == "query" and h.loc["icl_clean", "spread_over"] == "none (one prompt)"
    assert h.loc["icl_clean", "on_choice_mass"] == pytest.approx(1 - LOW_OFF, abs=1e-5)
    assert h.loc["icl_clean", "low_on_choice_mass"] and not h.loc["icl_free", "low_on_choice_mass"]
    st = pd.read_csv(tables / "icl_statement_n0.csv")
    assert set(zip(st["experiment"], st["model"], st["statement"])) == {
        ("icl_stated", MODEL, "theta"), ("icl_stated", ONLY_STATED, "theta"), ("shift_stated", ONLY_STATED, "theta2")}
    s = st[(st["experiment"] == "icl_stated") & (st["model"] == MODEL)].set_index("stated_bias")
    for th in (0.2, 0.7):
        assert s.loc[th, "p_after_statement"] == pytest.approx((1 + 8 * th) / 10, abs=1e-6)
        assert s.loc[th, "p_stated"] == pytest.approx(th)
        assert s.loc[th, "tvd_to_stated"] == pytest.approx(abs((1 + 8 * th) / 10 - th), abs=1e-6)
        assert s.loc[th, "n_cells"] == 2
    sh = st[st["experiment"] == "shift_stated"].iloc[0]
    assert sh["stated_bias"] == 0.25 and sh["p_after_statement"] == pytest.approx((1 + 8 * 0.25) / 10, abs=1e-6)
    # statement curves get no fitted-prior reference; the statement is a column of the summary
    summ = pd.read_csv(tables / "icl_summary.csv").set_index(["experiment", "model"])
    assert np.isnan(summ.loc[("icl_stated", MODEL), "tvd_fitted"])
    assert summ.loc[("icl_stated", MODEL), "statement"] == "theta"
    assert summ.loc[("icl_free", MODEL), "tvd_fitted"] < 1e-5
    md = report.read_text()
    priors = md.split("## Priors")[1].split("\n## ")[0]
    assert not [ln for ln in priors.splitlines() if ln.startswith("| icl_stated")]   # in no table of the section
    assert "in `icl_clean` every cell has the same prompt, so that spread is numerical only" in priors
    assert "`icl_free`" in priors and "numerical only" not in priors.split("in `icl_free`")[1].split(".")[0]
    assert "Flagged: the position-0 P(heads) of `icl_clean`" in priors
    assert "## ICL learning curves" in md and "After a bias statement (N = 0)" in md


def test_model_with_only_statement_curves_has_no_prior(sweep, tmp_path):
    root, report, tables = sweep
    fits = pd.read_csv(tables / "icl_prior_fits.csv").set_index(["model", "process"])
    row = fits.loc[(ONLY_STATED, "coin")]
    assert np.isnan(row["alpha"]) and (pd.isna(row["fitted_on"]) or row["fitted_on"] == "")
    assert row["note"].startswith("not measured") and "statement: none" in row["note"]
    assert "icl_stated (statement: theta)" in row["note"] and "shift_stated (statement: theta2)" in row["note"]
    pg = pd.read_csv(tables / "icl_paper_gamma.csv").set_index(["experiment", "model"])
    r = pg.loc[("shift_stated", ONLY_STATED)]
    assert np.isfinite(r["gamma_paper"]) and np.isnan(r["gamma_bayesflip"])
    assert r["gamma_bayesflip_note"].startswith("not reported: the prompts state a bias (statement: theta2)")
    assert f"Fitted prior of {ONLY_STATED} (coin): not measured" in report.read_text()
    # the iterated-learning references take only the statement-free prior
    stores = [s for s in load_sweep_data("ev", root).stores if s.family == "icl"]
    res = reduce_icl(FamilyInput("icl", "ev", stores, tmp_path / "f", tmp_path / "t"))
    pri = icl_priors(FamilyInput("chains", "ev", [], tmp_path / "f", tmp_path / "t", earlier={"icl": res}))
    assert set(pri) == {(MODEL, "coin")}
    assert pri[(MODEL, "coin")].alpha == pytest.approx([fits.loc[(MODEL, "coin"), "alpha"],
                                                        fits.loc[(MODEL, "coin"), "beta"]], abs=1e-12)


def test_evidence_attribute_and_inference_for_older_stores(sweep, tmp_path):
    root, _, _ = sweep
    data = {(s.experiment, s.model): s for s in load_sweep_data("ev", root).stores}
    free, stated, clean = data[("icl_free", MODEL)], data[("icl_stated", MODEL)], data[("icl_clean", MODEL)]
    assert free.attrs["evidence"] == {"statement": "none", "context": "outcomes"}
    assert stated.attrs["evidence"] == {"statement": "theta", "context": "outcomes"}
    assert clean.statement == "none" and stated.statement == "theta" and free.statement == "none"
    for st in data.values():   # a store written before the attribute: the family's kind from its params
        ev = st.attrs.pop("evidence")
        assert st.evidence == ev == infer_evidence(st.family, st.params)
    assert (stated.cell_evidence()["statement"] == "theta").all() and len(stated.cell_evidence()) == len(stated.cells)
    # default statements of the paper protocol: theta without shift, none with one
    assert infer_evidence("icl", {"protocol": "paper", "process": "coin"})["statement"] == "theta"
    assert infer_evidence("icl", {"protocol": "paper", "shift": "switch", "theta2s": [0.2]})["statement"] == "none"
    assert infer_evidence("no-such-family", {}) == UNKNOWN_EVIDENCE
    assert infer_evidence("paraphrase", {"process": "coin", "paraphrases": ["A coin:"]}) == {"statement": "none",
                                                                                               "context": "none"}
    # needle: the kind follows the condition coordinate
    st, fam, p, cells = synthetic_store(tmp_path, "nd", "needle_coin", "needle",
                                        {"process": "coin", "lengths": [10], "depths": [0.5], "biases": [30],
                                         "samples": 1}, 8, 7)
    for s in range(st.n_shards):
        st.write_record(s, "failed", error="not run")   # cells untrusted: read every cell
    nd = load_sweep_data("nd", tmp_path, trusted_only=False).stores[0]
    ev = nd.cell_evidence()
    kinds = {c: (s, x) for c, s, x in zip(nd.cells["condition"], ev["statement"], ev["context"])}
    assert kinds == {"needle": ("theta", "filler"), "no_needle": ("none", "filler"), "no_context": ("none", "none")}


def test_plan_writes_the_evidence_attribute(tmp_path):
    from bayesflip.plan import plan_sweep

    exps = [load_experiment("paper_icl_coin", {"params": {"thetas": [0.5], "queries": QUERIES[:1]}}),
            load_experiment("paper_shift_coin", {"params": {"queries": QUERIES[:1]}}),
            load_experiment("paper_prior_coin", {"params": {"queries": QUERIES[:1]}})]
    plan_sweep(SweepConfig(name="pl", models=["tiny-random"], experiments=exps), validate=False, results_dir=tmp_path)
    ev = {e.name: ResultStore(store_path("pl", e.name, "tiny-random", tmp_path)).attrs["evidence"] for e in exps}
    assert ev == {"paper_icl_coin": {"statement": "theta", "context": "outcomes"},
                  "paper_shift_coin": {"statement": "none", "context": "outcomes"},
                  "paper_prior_coin": {"statement": "none", "context": "none"}}


def test_paraphrase_prior_shows_on_choice_mass(sweep):
    _, report, tables = sweep
    pr = pd.read_csv(tables / "paraphrase_prior.csv")
    h = pr[pr["choice"] == "heads"].iloc[0]
    assert h["p_mean"] == pytest.approx(0.6, abs=1e-6) and h["on_choice_mass"] == pytest.approx(0.61, abs=1e-6)
    assert not h["low_on_choice_mass"]
    cells = pd.read_csv(tables / "paraphrase_cells.csv")
    assert len(cells) == 6      # every cell of the family is statement-free and context-free
    md = report.read_text()
    assert "| prior_coin | synthetic-model | highest | 2 | C coin: | 0.8 | 0.03 | True |" in md
    assert "Flagged: `prior_coin` paraphrase 2 (synthetic-model: P(heads) 0.8, on-choice mass 0.03)" in md
