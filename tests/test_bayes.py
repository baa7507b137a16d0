"""Tests for bayesflip.bayes (Bayesian reference layer)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bayesflip import bayes


# ---------------------------------------------------------------------------
# Predictives
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("h,t", [(0, 0), (1, 0), (0, 1), (3, 2), (10, 0), (7, 13)])
def test_uniform_prior_predictive_is_laplace_rule(h: int, t: int) -> None:
    assert bayes.beta_binomial_predictive(h, t) == pytest.approx((1 + h) / (2 + h + t), abs=1e-15)


def test_beta_binomial_predictive_vectorised_and_prior() -> None:
    h = np.array([0, 2, 5])
    t = np.array([0, 3, 1])
    got = bayes.beta_binomial_predictive(h, t, 2.0, 5.0)
    np.testing.assert_allclose(got, (2 + h) / (7 + h + t))
    assert isinstance(bayes.beta_binomial_predictive(1, 1, 2.0, 3.0), float)
    with pytest.raises(ValueError, match="alpha"):
        bayes.beta_binomial_predictive(1, 1, 0.0, 1.0)
    with pytest.raises(ValueError):
        bayes.beta_binomial_predictive(-1, 1)


def test_dirichlet_predictive_closed_form() -> None:
    counts = np.array([[0, 0, 0], [3, 1, 0], [2, 2, 6]], dtype=float)
    alpha = np.array([1.0, 2.0, 0.5])
    got = bayes.dirichlet_predictive(counts, alpha)
    want = (alpha + counts) / (alpha.sum() + counts.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(got.sum(axis=1), 1.0)
    # symmetric scalar prior
    np.testing.assert_allclose(bayes.dirichlet_predictive([2, 0, 0, 0, 0, 0], 1.0)[0], 3 / 8)


def test_coin_curve_predictive() -> None:
    x = [1, 1, 0, 1]
    curve = bayes.coin_curve_predictive(x, 2.0, 1.0)
    assert curve.shape == (5,)
    np.testing.assert_allclose(curve, [2 / 3, 3 / 4, 4 / 5, 4 / 6, 5 / 7])
    # batched over sequences
    batch = bayes.coin_curve_predictive(np.array([x, [0, 0, 0, 0]]), 1.0, 1.0)
    np.testing.assert_allclose(batch[1], [1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6])
    with pytest.raises(ValueError):
        bayes.coin_curve_predictive([0, 2, 1])


def test_die_curve_predictive() -> None:
    alpha = np.ones(6)
    curve = bayes.die_curve_predictive([5, 5, 0], alpha)
    assert curve.shape == (4, 6)
    np.testing.assert_allclose(curve[0], np.full(6, 1 / 6))
    np.testing.assert_allclose(curve[2, 5], 3 / 8)
    np.testing.assert_allclose(curve[3, 0], 2 / 9)
    np.testing.assert_allclose(curve.sum(axis=1), 1.0)
    with pytest.raises(ValueError):
        bayes.die_curve_predictive([6], alpha)


# ---------------------------------------------------------------------------
# Divergences and entropy
# ---------------------------------------------------------------------------


def test_tvd_closed_forms() -> None:
    assert bayes.tvd([0.3, 0.7], [0.3, 0.7]) == 0.0
    assert bayes.tvd([1, 0, 0], [0, 0.5, 0.5]) == pytest.approx(1.0)
    assert bayes.tvd([0.5, 0.5], [0.8, 0.2]) == pytest.approx(0.3)
    got = bayes.tvd(np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([0.5, 0.5]))
    np.testing.assert_allclose(got, [0.0, 0.5])
    np.testing.assert_allclose(bayes.tvd([[0.2], [0.8]], [[0.6], [0.4]], axis=0), [0.4])


def test_kl_closed_forms_and_edges() -> None:
    assert bayes.kl([0.2, 0.8], [0.2, 0.8]) == pytest.approx(0.0, abs=1e-15)
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert bayes.kl([0.5, 0.5], [0.25, 0.75]) == pytest.approx(want)
    # 0 log 0 = 0
    assert bayes.kl([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))
    # zero in q with p > 0: finite, large (clipped)
    v = bayes.kl([0.5, 0.5], [1.0, 0.0])
    assert math.isfinite(v) and v > 10
    batch = bayes.kl(np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([[0.5, 0.5], [0.5, 0.5]]))
    np.testing.assert_allclose(batch, [0.0, math.log(2)])


def test_entropy() -> None:
    assert bayes.entropy([0.5, 0.5]) == pytest.approx(math.log(2))
    assert bayes.entropy([1.0, 0.0, 0.0]) == 0.0
    np.testing.assert_allclose(bayes.entropy(np.full((2, 4), 0.25)), [math.log(4)] * 2)


# ---------------------------------------------------------------------------
# Prior fitting
# ---------------------------------------------------------------------------


def _synthetic_coin_points(alpha: float, beta: float, seed: int, n_seq: int = 10, length: int = 30):
    rng = np.random.default_rng(seed)
    H, T, P = [], [], []
    for _ in range(n_seq):
        x = (rng.random(length) < rng.random()).astype(int)
        h = np.concatenate([[0], np.cumsum(x)])
        n = np.arange(length + 1)
        H.append(h)
        T.append(n - h)
        P.append(bayes.coin_curve_predictive(x, alpha, beta))
    return np.concatenate(H), np.concatenate(T), np.concatenate(P)


@pytest.mark.parametrize("alpha,beta", [(2.0, 5.0), (0.5, 0.5), (10.0, 3.0)])
def test_fit_beta_prior_recovers_truth(alpha: float, beta: float) -> None:
    h, t, p = _synthetic_coin_points(alpha, beta, seed=int(alpha * 10 + beta))
    fit = bayes.fit_beta_prior(h, t, p)
    assert fit.alpha == pytest.approx(alpha, rel=1e-3)
    assert fit.beta == pytest.approx(beta, rel=1e-3)
    assert fit.n_points == h.size
    assert fit.converged and not fit.at_bound
    # neg_log_lik is the soft cross-entropy = sum of binary entropies at the exact fit
    ent = float(np.sum(bayes.entropy(bayes.coin_dist(p))))
    assert fit.neg_log_lik == pytest.approx(ent, rel=1e-8)


def test_fit_beta_prior_input_checks() -> None:
    with pytest.raises(ValueError):
        bayes.fit_beta_prior([0, 1], [0], [0.5, 0.5])


def test_fit_dirichlet_prior_recovers_truth() -> None:
    rng = np.random.default_rng(3)
    alpha = np.array([2.0, 0.5, 5.0, 1.0])
    C, P = [], []
    for _ in range(10):
        x = rng.choice(4, size=30, p=rng.dirichlet(np.ones(4)))
        P.append(bayes.die_curve_predictive(x, alpha))
        onehot = np.zeros((31, 4))
        onehot[np.arange(1, 31), x] = 1
        C.append(onehot.cumsum(axis=0))
    fit = bayes.fit_dirichlet_prior(np.concatenate(C), np.concatenate(P))
    np.testing.assert_allclose(fit.alpha, alpha, rtol=1e-3)
    assert fit.converged and fit.n_points == 310


# ---------------------------------------------------------------------------
# Discounted learner
# ---------------------------------------------------------------------------


def test_discounted_predictive_limits() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random(40) < 0.6).astype(int)
    np.testing.assert_allclose(
        bayes.discounted_predictive(x, 1.0, 2.0, 3.0), bayes.coin_curve_predictive(x, 2.0, 3.0), atol=1e-15
    )
    # gamma = 0 remembers only the last outcome: (alpha + x)/(alpha + beta + 1)
    d0 = bayes.discounted_predictive(x, 0.0, 1.0, 1.0)
    np.testing.assert_allclose(d0[1:], (1 + x) / 3)
    # hand computation with gamma = 0.5, x = [1, 1, 0]
    d = bayes.discounted_predictive([1, 1, 0], 0.5)
    a, b = [0, 1, 1.5, 0.75], [0, 0, 0, 1]
    np.testing.assert_allclose(d, [(1 + ai) / (2 + ai + bi) for ai, bi in zip(a, b)])
    with pytest.raises(ValueError):
        bayes.discounted_predictive(x, 1.5)


@pytest.mark.parametrize("gamma", [0.8, 0.873, 0.95, 1.0])
def test_fit_gamma_recovers_truth(gamma: float) -> None:
    rng = np.random.default_rng(int(gamma * 1000))
    seqs, curves = [], []
    for _ in range(4):
        x = np.concatenate([rng.random(50) < 0.75, rng.random(50) < 0.25]).astype(int)
        seqs.append(x)
        curves.append(bayes.discounted_predictive(x, gamma, 1.0, 1.0))
    fit = bayes.fit_gamma(seqs, curves)
    assert fit.gamma == pytest.approx(gamma, abs=1e-4)
    assert fit.n_points == 4 * 101
    with pytest.raises(ValueError, match="N\\+1"):
        bayes.fit_gamma([seqs[0]], [curves[0][:-1]])


class _NotebookFlipper:
    """BayesianCoinFlipperGamma of the coin-flip paper's posterior_chain_vis.ipynb, transcribed."""

    def __init__(self, gamma):
        self.gamma, self.wa, self.wb, self.alpha, self.beta = gamma, 1.0, 1.0, 1.0, 1.0

    def add_result(self, heads):
        self.wa *= self.gamma
        self.wb *= self.gamma
        if heads:
            self.wa += 1
        else:
            self.wb += 1
        self.alpha, self.beta = max(1, self.wa), max(1, self.wb)

    def mean(self):
        return self.alpha / (self.alpha + self.beta)


def test_paper_gamma_predictive_matches_the_notebook_learner() -> None:
    rng = np.random.default_rng(3)
    x = (rng.random(60) < 0.7).astype(int)
    for g in (0.0, 0.3, 0.88, 1.0):
        nb = _NotebookFlipper(g)
        ref = [0.5]
        for xi in x:
            nb.add_result(xi)
            ref.append(nb.mean())
        np.testing.assert_allclose(bayes.paper_gamma_predictive(x, g), ref, atol=1e-15)
    np.testing.assert_allclose(bayes.paper_gamma_predictive(x, 1.0), bayes.coin_curve_predictive(x), atol=1e-15)
    np.testing.assert_allclose(bayes.paper_gamma_predictive(x, 0.0)[1:], 0.5)   # max(1, 1) / (1 + 1)
    # gamma = 0.5, x = [1, 1, 0]: a = 1.5, 1.75, 0.875; b = 0.5, 0.25, 1.125
    np.testing.assert_allclose(bayes.paper_gamma_predictive([1, 1, 0], 0.5),
                               [0.5, 1.5 / 2.5, 1.75 / 2.75, 1 / 2.125])
    with pytest.raises(ValueError):
        bayes.paper_gamma_predictive(x, -0.1)


@pytest.mark.parametrize("gamma", [0.5, 0.88])
def test_fit_gamma_paper_recovers_truth(gamma: float) -> None:
    rng = np.random.default_rng(11)
    # the paper's posterior chain: one sequence, theta 0.75 for 50 flips then 0.25
    x = np.concatenate([rng.random(50) < 0.75, rng.random(50) < 0.25]).astype(int)
    curve = bayes.paper_gamma_predictive(x, gamma)
    fit = bayes.fit_gamma_paper([x], [curve])
    assert fit.gamma == pytest.approx(gamma, abs=0.02)
    assert fit.l1 < 0.05 and fit.n_points == 100            # position 0 is not scored
    noisy = np.clip(curve + rng.normal(0, 0.02, curve.shape), 0, 1)
    assert bayes.fit_gamma_paper([x], [noisy]).gamma == pytest.approx(gamma, abs=0.02)
    with pytest.raises(ValueError, match="N\\+1"):
        bayes.fit_gamma_paper([x], [curve[:-1]])


# ---------------------------------------------------------------------------
# Mixture references
# ---------------------------------------------------------------------------


def test_mixture_reference() -> None:
    r = bayes.mixture_reference(0.75, 0.25, cutoff=50, N=100)
    assert r.shape == (101,)
    assert r[0] == 0.75
    np.testing.assert_allclose(r[1:51], 0.75)
    assert r[100] == pytest.approx(0.5)
    assert r[75] == pytest.approx((50 / 75) * 0.75 + (25 / 75) * 0.25)
    assert bayes.mixture_reference(0.75, 0.25, cutoff=0, N=3)[0] == 0.25


def test_block_mixture_reference() -> None:
    r = bayes.block_mixture_reference(0.8, 0.2, start=10, end=20, N=40)
    np.testing.assert_allclose(r[:11], 0.8)
    assert r[20] == pytest.approx(0.5)
    assert r[40] == pytest.approx(0.75 * 0.8 + 0.25 * 0.2)
    # a block running to the end equals the single-shift reference
    np.testing.assert_allclose(
        bayes.block_mixture_reference(0.7, 0.1, 30, 60, 60), bayes.mixture_reference(0.7, 0.1, 30, 60)
    )


# ---------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------


def test_martingale_gap_from_branches_is_zero_for_bayes() -> None:
    h = np.arange(0, 8)[:, None]
    t = np.arange(0, 8)[None, :]
    p = bayes.beta_binomial_predictive(h, t, 2.0, 3.0)
    ph = bayes.beta_binomial_predictive(h + 1, t, 2.0, 3.0)
    pt = bayes.beta_binomial_predictive(h, t + 1, 2.0, 3.0)
    np.testing.assert_allclose(bayes.martingale_gap_from_branches(p, ph, pt), 0.0, atol=1e-15)
    # a learner that over-reacts to heads has a positive gap
    assert bayes.martingale_gap_from_branches(0.5, 0.9, 0.5) == pytest.approx(0.2)


def test_martingale_gap_single_branch_unbiased() -> None:
    rng = np.random.default_rng(1)
    theta = 0.7
    gaps = []
    for _ in range(3000):
        x = (rng.random(10) < theta).astype(int)
        curve = bayes.coin_curve_predictive(x, 1.0, 1.0)
        gaps.append(bayes.martingale_gap(curve, x, theta=theta))
    g = np.array(gaps)
    assert g.shape == (3000, 10)
    se = g.std(axis=0) / np.sqrt(g.shape[0])
    assert np.all(np.abs(g.mean(axis=0)) < 5 * se + 1e-12)
    # without importance weights the raw innovation is biased towards theta: mean drift > 0 at t = 0
    raw = np.array([bayes.martingale_gap(bayes.coin_curve_predictive(s, 1, 1), s) for s in
                    (rng.random((2000, 5)) < theta).astype(int)])
    assert raw[:, 0].mean() > 0.05


def test_exchangeability_gap() -> None:
    same = bayes.exchangeability_gap(np.tile([0.2, 0.3, 0.5], (4, 1)))
    assert same.max_tvd == 0.0 and np.allclose(same.std, 0.0)
    g = bayes.exchangeability_gap([0.4, 0.6])
    assert g.max_tvd == pytest.approx(0.1)
    assert g.mean_tvd == pytest.approx(0.1)
    assert g.std == pytest.approx(0.1)
    g2 = bayes.exchangeability_gap([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert g2.max_tvd == pytest.approx(0.5)
    np.testing.assert_allclose(g2.std, np.std([1.0, 0.0, 0.5]))
