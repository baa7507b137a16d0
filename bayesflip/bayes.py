"""Bayesian reference layer (EXPERIMENTS.md section 4).

Pure numpy/scipy. Every function states its formula in its docstring.

Conventions
-----------
* A coin outcome is ``1`` for heads and ``0`` for tails. A coin "curve" is the
  predictive P(next = heads) after every prefix ``0..N`` of an outcome sequence
  of length ``N`` (so it has ``N + 1`` entries; entry ``n`` is the prediction
  made after seeing outcomes ``x_0 .. x_{n-1}``).
* A die outcome is an integer category ``0..K-1``; a die curve has shape
  ``(N + 1, K)``.
* Distributions live on the last axis unless ``axis`` says otherwise.
* Logarithms are natural (nats).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize

FloatArray = NDArray[np.float64]

__all__ = [
    "beta_binomial_predictive",
    "dirichlet_predictive",
    "coin_curve_predictive",
    "die_curve_predictive",
    "coin_dist",
    "tvd",
    "kl",
    "entropy",
    "BetaPriorFit",
    "DirichletPriorFit",
    "GammaFit",
    "fit_beta_prior",
    "fit_dirichlet_prior",
    "discounted_predictive",
    "fit_gamma",
    "PaperGammaFit",
    "paper_gamma_predictive",
    "fit_gamma_paper",
    "mixture_reference",
    "block_mixture_reference",
    "martingale_gap",
    "martingale_gap_from_branches",
    "ExchangeabilityGap",
    "exchangeability_gap",
]

# Probabilities are clipped to [_PCLIP, 1 - _PCLIP] inside log-likelihoods.
_PCLIP = 1e-12
# Bounds for log(alpha), log(beta) in prior fits: alpha in [~4.5e-5, ~3.3e6].
_LOG_BOUNDS = (-10.0, 15.0)


def _scalar_or_array(x: FloatArray) -> FloatArray | float:
    """Return a Python float for 0-d results, the array otherwise."""
    return float(x) if np.ndim(x) == 0 else x


def _check_positive(name: str, value: ArrayLike) -> None:
    arr = np.asarray(value, dtype=float)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def _check_outcomes_binary(outcomes: ArrayLike) -> NDArray[np.int64]:
    x = np.asarray(outcomes)
    if x.ndim == 0:
        raise ValueError("outcomes must be a sequence (at least 1-D), got a scalar")
    if x.size and not np.all((x == 0) | (x == 1)):
        raise ValueError("coin outcomes must be 0 (tails) or 1 (heads)")
    return x.astype(np.int64)


# ---------------------------------------------------------------------------
# Posterior predictives
# ---------------------------------------------------------------------------


def beta_binomial_predictive(
    heads: ArrayLike, tails: ArrayLike, alpha: ArrayLike = 1.0, beta: ArrayLike = 1.0
) -> FloatArray | float:
    """Posterior predictive of a Beta(alpha, beta)-Bernoulli coin.

    ``P(next = heads | h heads, t tails) = (alpha + h) / (alpha + beta + h + t)``.

    All arguments broadcast against each other (numpy rules); a 0-d result is
    returned as a float. Counts may be non-integer (pseudo-counts).
    """
    _check_positive("alpha", alpha)
    _check_positive("beta", beta)
    h = np.asarray(heads, dtype=float)
    t = np.asarray(tails, dtype=float)
    if np.any(h < 0) or np.any(t < 0):
        raise ValueError("heads and tails must be >= 0")
    a = np.asarray(alpha, dtype=float)
    b = np.asarray(beta, dtype=float)
    return _scalar_or_array((a + h) / (a + b + h + t))


def dirichlet_predictive(counts: ArrayLike, alpha: ArrayLike) -> FloatArray:
    """Posterior predictive of a Dirichlet(alpha)-categorical die.

    ``P(next = i | counts n) = (alpha_i + n_i) / (sum_j alpha_j + sum_j n_j)``.

    ``counts`` has shape ``(..., K)``; ``alpha`` is a scalar (symmetric prior)
    or shape ``(K,)`` (or anything broadcastable to ``counts``). Returns shape
    ``(..., K)``.
    """
    n = np.asarray(counts, dtype=float)
    if n.ndim == 0:
        raise ValueError("counts must have a category axis (shape (..., K))")
    if np.any(n < 0):
        raise ValueError("counts must be >= 0")
    a = np.broadcast_to(np.asarray(alpha, dtype=float), n.shape)
    _check_positive("alpha", a)
    num = a + n
    return num / num.sum(axis=-1, keepdims=True)


def coin_curve_predictive(outcomes: ArrayLike, alpha: float = 1.0, beta: float = 1.0) -> FloatArray:
    """Bayesian learning curve for a coin.

    For outcomes ``x_0..x_{N-1}`` (1 = heads) returns ``p`` of length ``N + 1``
    with ``p[n] = (alpha + h_n) / (alpha + beta + n)``, ``h_n = sum_{s<n} x_s``.
    ``p[0] = alpha / (alpha + beta)`` is the prior predictive. Works on the
    last axis of an ``(..., N)`` array (returns ``(..., N + 1)``).
    """
    x = _check_outcomes_binary(outcomes)
    h = np.concatenate([np.zeros(x.shape[:-1] + (1,)), np.cumsum(x, axis=-1)], axis=-1)
    n = np.arange(x.shape[-1] + 1, dtype=float)
    return np.asarray(beta_binomial_predictive(h, n - h, alpha, beta), dtype=float)


def die_curve_predictive(outcomes: ArrayLike, alpha_vec: ArrayLike) -> FloatArray:
    """Bayesian learning curve for a K-sided die.

    For outcomes ``x_0..x_{N-1}`` in ``0..K-1`` (``K = len(alpha_vec)``)
    returns shape ``(N + 1, K)`` with
    ``P[n, i] = (alpha_i + c_{n,i}) / (sum_j alpha_j + n)``, where
    ``c_{n,i} = #{s < n : x_s = i}``.
    """
    a = np.asarray(alpha_vec, dtype=float)
    if a.ndim != 1 or a.size < 2:
        raise ValueError("alpha_vec must be a 1-D vector with K >= 2 entries")
    _check_positive("alpha_vec", a)
    x = np.asarray(outcomes)
    if x.ndim != 1:
        raise ValueError("die outcomes must be a 1-D sequence of category indices")
    k = a.size
    if x.size and (not np.all(np.equal(np.mod(x, 1), 0)) or x.min() < 0 or x.max() >= k):
        raise ValueError(f"die outcomes must be integers in 0..{k - 1}")
    onehot = np.zeros((x.size + 1, k))
    if x.size:
        onehot[np.arange(1, x.size + 1), x.astype(np.int64)] = 1.0
    counts = np.cumsum(onehot, axis=0)
    return dirichlet_predictive(counts, a)


def coin_dist(p_heads: ArrayLike) -> FloatArray:
    """Turn P(heads) of shape ``S`` into a distribution ``[p, 1 - p]`` of shape ``S + (2,)``."""
    p = np.asarray(p_heads, dtype=float)
    return np.stack([p, 1.0 - p], axis=-1)


# ---------------------------------------------------------------------------
# Divergences
# ---------------------------------------------------------------------------


def tvd(p: ArrayLike, q: ArrayLike, axis: int = -1) -> FloatArray | float:
    """Total variation distance ``TVD(p, q) = 1/2 * sum_i |p_i - q_i|`` along ``axis``.

    Inputs broadcast; no renormalisation is done (pass full distributions; for
    a coin use :func:`coin_dist`). Identical -> 0, disjoint supports -> 1.
    """
    pa = np.asarray(p, dtype=float)
    qa = np.asarray(q, dtype=float)
    return _scalar_or_array(0.5 * np.abs(pa - qa).sum(axis=axis))


def kl(p: ArrayLike, q: ArrayLike, axis: int = -1, eps: float = 1e-12) -> FloatArray | float:
    """Kullback-Leibler divergence ``KL(p || q) = sum_i p_i log(p_i / q_i)`` in nats.

    Terms with ``p_i = 0`` contribute 0 (``0 log 0 = 0``); ``q`` is clipped to
    ``[eps, 1]`` so a zero in ``q`` where ``p > 0`` gives a large finite value
    (``p_i log(p_i / eps)``) instead of ``inf``. No renormalisation is done.
    """
    pa = np.asarray(p, dtype=float)
    qa = np.clip(np.asarray(q, dtype=float), eps, None)
    pa, qa = np.broadcast_arrays(pa, qa)
    safe_p = np.where(pa > 0, pa, 1.0)
    terms = np.where(pa > 0, pa * (np.log(safe_p) - np.log(qa)), 0.0)
    return _scalar_or_array(terms.sum(axis=axis))


def entropy(p: ArrayLike, axis: int = -1) -> FloatArray | float:
    """Shannon entropy ``H(p) = -sum_i p_i log p_i`` in nats (``0 log 0 = 0``)."""
    pa = np.asarray(p, dtype=float)
    safe_p = np.where(pa > 0, pa, 1.0)
    return _scalar_or_array(0.0 - np.where(pa > 0, pa * np.log(safe_p), 0.0).sum(axis=axis))


# ---------------------------------------------------------------------------
# Prior fitting (soft-label maximum likelihood)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BetaPriorFit:
    """Result of :func:`fit_beta_prior`.

    ``neg_log_lik`` is the soft cross-entropy
    ``-sum_i [p_i log q_i + (1 - p_i) log(1 - q_i)]`` at the optimum (nats).
    ``at_bound`` is True if log(alpha) or log(beta) ended on the search bound
    (``alpha, beta`` in ``[e^-10, e^15]``), i.e. the data prefer a degenerate
    prior (e.g. a model that never updates -> alpha, beta -> infinity).
    """

    alpha: float
    beta: float
    neg_log_lik: float
    n_points: int
    converged: bool
    at_bound: bool = False


@dataclass(frozen=True)
class DirichletPriorFit:
    """Result of :func:`fit_dirichlet_prior` (``neg_log_lik`` = soft cross-entropy, nats)."""

    alpha: FloatArray
    neg_log_lik: float
    n_points: int
    converged: bool
    at_bound: bool = False


@dataclass(frozen=True)
class GammaFit:
    """Result of :func:`fit_gamma` (``neg_log_lik`` = soft cross-entropy, nats)."""

    gamma: float
    neg_log_lik: float
    n_points: int


def _binary_entropy_sum(p: FloatArray) -> float:
    return float(np.sum(entropy(coin_dist(p))))


def _binary_kl_sum(p: FloatArray, q: FloatArray) -> float:
    """``sum KL(Bern(p) || Bern(q))`` computed term-wise (exactly 0 when q == p)."""
    qc = np.clip(q, _PCLIP, 1.0 - _PCLIP)
    return float(np.sum(kl(coin_dist(p), coin_dist(qc))))


def _converged(res: optimize.OptimizeResult, at_bound: bool, n_points: int) -> bool:
    """Success flag, also accepting L-BFGS-B line-search stops at a (numerically) zero gradient."""
    if res.success:
        return True
    return (not at_bound) and bool(np.max(np.abs(res.jac)) <= 1e-6 * max(n_points, 1))


def fit_beta_prior(heads: ArrayLike, tails: ArrayLike, p_model: ArrayLike) -> BetaPriorFit:
    """Fit the Beta(alpha, beta) prior that best explains a model's predictions.

    Each point i is an ICL prefix with ``h_i`` heads and ``t_i`` tails and the
    model's predicted ``p_i = P(heads)``. With the Bayesian predictive
    ``q_i = (alpha + h_i) / (alpha + beta + h_i + t_i)`` we maximise the
    soft-label log-likelihood

        L(alpha, beta) = sum_i [p_i log q_i + (1 - p_i) log(1 - q_i)]

    over ``(log alpha, log beta)`` with L-BFGS-B (analytic gradient, several
    starts; the best is kept). Internally the equivalent objective
    ``sum_i KL(Bern(p_i) || Bern(q_i)) = -L - sum_i H(p_i)`` is minimised for
    numerical precision; ``neg_log_lik`` reports ``-L``. Inputs are flattened;
    points with non-finite ``p_i`` are dropped; ``p_i`` is clipped to [0, 1].
    If the model's predictions are exactly Bayesian for some prior, that prior
    is the unique optimum (given at least two distinct prefix lengths).
    """
    h = np.asarray(heads, dtype=float).ravel()
    t = np.asarray(tails, dtype=float).ravel()
    p = np.asarray(p_model, dtype=float).ravel()
    if not (h.shape == t.shape == p.shape):
        raise ValueError(f"heads, tails, p_model must have the same size, got {h.size}, {t.size}, {p.size}")
    keep = np.isfinite(p) & np.isfinite(h) & np.isfinite(t)
    h, t, p = h[keep], t[keep], np.clip(p[keep], 0.0, 1.0)
    if p.size == 0:
        raise ValueError("fit_beta_prior needs at least one finite point")
    if np.any(h < 0) or np.any(t < 0):
        raise ValueError("heads and tails must be >= 0")
    m = h + t
    h_p = _binary_entropy_sum(p)

    def objective(z: FloatArray) -> tuple[float, FloatArray]:
        a, b = np.exp(z)
        s = a + b + m
        q = np.clip((a + h) / s, _PCLIP, 1.0 - _PCLIP)
        f = _binary_kl_sum(p, q)
        # d(-L)/dq = (q - p) / (q (1 - q)); dq/da = (1 - q)/s; dq/db = -q/s
        r = q - p
        ga = np.sum(r / (q * s)) * a
        gb = -np.sum(r / ((1.0 - q) * s)) * b
        return f, np.array([ga, gb])

    starts = [(np.log(a0), np.log(b0)) for a0 in (0.3, 1.0, 5.0, 30.0) for b0 in (0.3, 1.0, 5.0, 30.0)]
    best = None
    for z0 in starts:
        res = optimize.minimize(
            objective,
            np.array(z0),
            jac=True,
            method="L-BFGS-B",
            bounds=[_LOG_BOUNDS, _LOG_BOUNDS],
            options={"ftol": 1e-15, "gtol": 1e-11, "maxiter": 2000},
        )
        if best is None or res.fun < best.fun:
            best = res
    assert best is not None
    a, b = np.exp(best.x)
    at_bound = bool(np.any(np.isclose(best.x, _LOG_BOUNDS[0]) | np.isclose(best.x, _LOG_BOUNDS[1])))
    return BetaPriorFit(
        alpha=float(a),
        beta=float(b),
        neg_log_lik=float(best.fun + h_p),
        n_points=int(p.size),
        converged=_converged(best, at_bound, int(p.size)),
        at_bound=at_bound,
    )


def fit_dirichlet_prior(counts: ArrayLike, p_model: ArrayLike) -> DirichletPriorFit:
    """Fit the Dirichlet(alpha) prior (alpha in R_+^K) that best explains a model's predictions.

    ``counts`` and ``p_model`` have shape ``(..., K)`` (flattened to ``(M, K)``).
    Each row ``m`` is an ICL prefix with category counts ``n_m`` and the model's
    predicted distribution ``p_m`` (rows are renormalised to sum to 1). With
    ``q_{m,i} = (alpha_i + n_{m,i}) / (sum_j alpha_j + sum_j n_{m,j})`` we
    maximise ``L(alpha) = sum_m sum_i p_{m,i} log q_{m,i}`` over ``log alpha``
    with L-BFGS-B (analytic gradient, several starts). ``neg_log_lik`` = ``-L``.
    Rows with any non-finite entry are dropped.
    """
    n = np.asarray(counts, dtype=float)
    p = np.asarray(p_model, dtype=float)
    if n.shape != p.shape or n.ndim < 1 or n.shape[-1] < 2:
        raise ValueError(f"counts and p_model must have the same shape (..., K>=2), got {n.shape} and {p.shape}")
    k = n.shape[-1]
    n = n.reshape(-1, k)
    p = p.reshape(-1, k)
    keep = np.all(np.isfinite(n), axis=1) & np.all(np.isfinite(p), axis=1)
    n, p = n[keep], np.clip(p[keep], 0.0, None)
    if n.shape[0] == 0:
        raise ValueError("fit_dirichlet_prior needs at least one finite row")
    if np.any(n < 0):
        raise ValueError("counts must be >= 0")
    row = p.sum(axis=1, keepdims=True)
    if np.any(row <= 0):
        raise ValueError("every p_model row must have positive mass")
    p = p / row
    tot = n.sum(axis=1)
    h_p = float(np.sum(entropy(p)))

    def objective(z: FloatArray) -> tuple[float, FloatArray]:
        a = np.exp(z)
        num = a + n
        den = a.sum() + tot
        q = np.clip(num / den[:, None], _PCLIP, None)
        f = float(np.sum(kl(p, q)))
        # d(-L)/d a_j = -sum_m [p_mj / (a_j + n_mj) - 1 / (A + N_m)]   (rows of p sum to 1)
        g = -(p / num).sum(axis=0) + np.sum(1.0 / den)
        return f, g * a

    pbar = p.mean(axis=0)
    starts = [np.full(k, np.log(s)) for s in (0.3, 1.0, 5.0, 30.0)]
    starts += [np.log(np.clip(s * k * pbar, 1e-3, None)) for s in (0.3, 1.0, 5.0, 30.0)]
    best = None
    for z0 in starts:
        res = optimize.minimize(
            objective,
            z0,
            jac=True,
            method="L-BFGS-B",
            bounds=[_LOG_BOUNDS] * k,
            options={"ftol": 1e-15, "gtol": 1e-11, "maxiter": 5000},
        )
        if best is None or res.fun < best.fun:
            best = res
    assert best is not None
    at_bound = bool(np.any(np.isclose(best.x, _LOG_BOUNDS[0]) | np.isclose(best.x, _LOG_BOUNDS[1])))
    return DirichletPriorFit(
        alpha=np.exp(best.x),
        neg_log_lik=float(best.fun + h_p),
        n_points=int(n.shape[0]),
        converged=_converged(best, at_bound, int(n.shape[0])),
        at_bound=at_bound,
    )


# ---------------------------------------------------------------------------
# Discounted (forgetting) learner
# ---------------------------------------------------------------------------


def discounted_predictive(
    outcomes: ArrayLike, gamma: float, alpha: float = 1.0, beta: float = 1.0
) -> FloatArray:
    """Learning curve of a Beta-Bernoulli learner whose counts decay by ``gamma``.

    Pseudo-counts start at ``a_0 = b_0 = 0`` and, for each outcome ``x_t``
    (1 = heads), decay *before* the new outcome is added:

        a_{t+1} = gamma * a_t + x_t,      b_{t+1} = gamma * b_t + (1 - x_t)

    The predictive after prefix ``t`` is
    ``p_t = (alpha + a_t) / (alpha + beta + a_t + b_t)``. The prior
    (alpha, beta) is NOT discounted, only the observed counts are.
    ``gamma = 1`` reproduces :func:`coin_curve_predictive` exactly; ``gamma = 0``
    remembers only the last outcome. Returns length ``N + 1`` (works on the last
    axis of an ``(..., N)`` array).
    """
    if not (0.0 <= gamma <= 1.0) or not np.isfinite(gamma):
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    _check_positive("alpha", alpha)
    _check_positive("beta", beta)
    x = _check_outcomes_binary(outcomes).astype(float)
    n_steps = x.shape[-1]
    a = np.zeros(x.shape[:-1])
    b = np.zeros(x.shape[:-1])
    out = np.empty(x.shape[:-1] + (n_steps + 1,))
    out[..., 0] = alpha / (alpha + beta)
    for t in range(n_steps):
        a = gamma * a + x[..., t]
        b = gamma * b + (1.0 - x[..., t])
        out[..., t + 1] = (alpha + a) / (alpha + beta + a + b)
    return out


def fit_gamma(
    outcome_seqs: Sequence[ArrayLike],
    p_model_curves: Sequence[ArrayLike],
    alpha: float = 1.0,
    beta: float = 1.0,
) -> GammaFit:
    """Fit the discount ``gamma`` in [0, 1] of :func:`discounted_predictive` to model curves.

    ``outcome_seqs[j]`` is a 0/1 sequence of length ``N_j`` and
    ``p_model_curves[j]`` the model's P(heads) after every prefix ``0..N_j``
    (length ``N_j + 1``; NaN entries are skipped). With the discounted-learner
    curve ``q_{j,n}(gamma)`` we maximise the soft-label log-likelihood

        L(gamma) = sum_j sum_n [p_{j,n} log q_{j,n} + (1 - p_{j,n}) log(1 - q_{j,n})]

    by a coarse grid (gamma = 0, 0.01, ..., 1) followed by bounded Brent
    minimisation around the best grid point; the grid endpoints compete with the
    refined optimum so gamma = 1 (exact Bayes) or 0 can be returned exactly.
    ``neg_log_lik`` = ``-L``.
    """
    if len(outcome_seqs) != len(p_model_curves):
        raise ValueError("outcome_seqs and p_model_curves must have the same length")
    if len(outcome_seqs) == 0:
        raise ValueError("fit_gamma needs at least one sequence")
    seqs: list[NDArray[np.int64]] = []
    curves: list[FloatArray] = []
    masks: list[NDArray[np.bool_]] = []
    for j, (xs, ps) in enumerate(zip(outcome_seqs, p_model_curves)):
        x = _check_outcomes_binary(xs)
        p = np.asarray(ps, dtype=float)
        if x.ndim != 1 or p.shape != (x.size + 1,):
            raise ValueError(
                f"sequence {j}: curve must have length N+1 = {x.size + 1} for N = {x.size} outcomes, got shape {p.shape}"
            )
        mask = np.isfinite(p)
        seqs.append(x)
        curves.append(np.clip(p, 0.0, 1.0))
        masks.append(mask)
    n_points = int(sum(int(m.sum()) for m in masks))
    if n_points == 0:
        raise ValueError("fit_gamma: no finite model predictions")
    h_p = sum(_binary_entropy_sum(c[m]) for c, m in zip(curves, masks))

    def objective(g: float) -> float:
        total = 0.0
        for x, p, m in zip(seqs, curves, masks):
            q = discounted_predictive(x, float(np.clip(g, 0.0, 1.0)), alpha, beta)
            total += _binary_kl_sum(p[m], q[m])
        return total

    grid = np.linspace(0.0, 1.0, 101)
    vals = np.array([objective(g) for g in grid])
    i = int(np.argmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    res = optimize.minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    cands = [(float(vals[i]), float(grid[i])), (float(res.fun), float(res.x))]
    best_f, best_g = min(cands)
    return GammaFit(gamma=best_g, neg_log_lik=best_f + h_p, n_points=n_points)


@dataclass(frozen=True)
class PaperGammaFit:
    """Result of :func:`fit_gamma_paper`.

    ``gamma``: the best of all starts (the fitted discount). ``gamma_x0``: L-BFGS-B started at
    0.5 alone, exactly the original notebook's call (can stop in a local optimum of the
    piecewise-linear L1 loss). ``l1``: the summed absolute error at ``gamma``; ``mean_abs_error``
    = ``l1 / n_points``.
    """

    gamma: float
    gamma_x0: float
    l1: float
    mean_abs_error: float
    n_points: int


def paper_gamma_predictive(outcomes: ArrayLike, gamma: float) -> FloatArray:
    """The coin-flip paper's discounted learner (``BayesianCoinFlipperGamma``, posterior_chain_vis.ipynb).

    Pseudo-counts start at the Beta(1, 1) prior, ``a_0 = b_0 = 1``, and the prior decays with the
    data: for each outcome ``x_t`` (1 = heads), first decay, then add,

        a_{t+1} = gamma * a_t + x_t,      b_{t+1} = gamma * b_t + (1 - x_t),

    and the prediction clamps each pseudo-count at 1:

        p_{t+1} = max(1, a_{t+1}) / (max(1, a_{t+1}) + max(1, b_{t+1})),    p_0 = 1/2.

    Unlike :func:`discounted_predictive` the prior itself is discounted and the counts are
    clamped, so ``gamma = 1`` is the Laplace rule ``(1 + h) / (2 + n)`` and ``gamma = 0`` gives
    ``1/2`` after every outcome (``max(1, 1) / (1 + 1)``). Returns length ``N + 1`` (works on
    the last axis of an ``(..., N)`` array).
    """
    if not (0.0 <= gamma <= 1.0) or not np.isfinite(gamma):
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    x = _check_outcomes_binary(outcomes).astype(float)
    a = np.ones(x.shape[:-1])
    b = np.ones(x.shape[:-1])
    out = np.empty(x.shape[:-1] + (x.shape[-1] + 1,))
    out[..., 0] = 0.5
    for t in range(x.shape[-1]):
        a = gamma * a + x[..., t]
        b = gamma * b + (1.0 - x[..., t])
        ca, cb = np.maximum(1.0, a), np.maximum(1.0, b)
        out[..., t + 1] = ca / (ca + cb)
    return out


def fit_gamma_paper(outcome_seqs: Sequence[ArrayLike], mean_curves: Sequence[ArrayLike]) -> PaperGammaFit:
    """Fit ``gamma`` of :func:`paper_gamma_predictive` as the coin-flip paper did.

    ``outcome_seqs[j]`` is a 0/1 sequence of length ``N_j`` and ``mean_curves[j]`` the model's
    mean P(heads) (over prompt paraphrases) after every prefix ``0..N_j`` (length ``N_j + 1``).
    The loss is the **L1** error over the positions after at least one outcome (position 0 is
    not scored, as in the original ``fit_quality``), summed over sequences:

        L(gamma) = sum_j sum_{n=1..N_j} | q_{j,n}(gamma) - m_{j,n} |     (NaN entries skipped)

    minimised over ``gamma in [0, 1]`` with L-BFGS-B (finite-difference gradient) started at 0.5
    (the original's only start, reported as ``gamma_x0``) and at the best point of a grid
    ``0, 0.01, ..., 1``; the best of the starts and the grid is ``gamma``.
    """
    if len(outcome_seqs) != len(mean_curves):
        raise ValueError("outcome_seqs and mean_curves must have the same length")
    if len(outcome_seqs) == 0:
        raise ValueError("fit_gamma_paper needs at least one sequence")
    seqs, curves, masks = [], [], []
    for j, (xs, ms) in enumerate(zip(outcome_seqs, mean_curves)):
        x = _check_outcomes_binary(xs)
        m = np.asarray(ms, dtype=float)
        if x.ndim != 1 or m.shape != (x.size + 1,):
            raise ValueError(f"sequence {j}: curve must have length N+1 = {x.size + 1}, got shape {m.shape}")
        mask = np.isfinite(m)
        mask[0] = False
        seqs.append(x)
        curves.append(np.where(mask, m, 0.0))
        masks.append(mask)
    n_points = int(sum(int(k.sum()) for k in masks))
    if n_points == 0:
        raise ValueError("fit_gamma_paper: no finite model predictions after position 0")

    def loss(g) -> float:
        gg = float(np.clip(np.ravel(g)[0], 0.0, 1.0))
        return float(sum(np.abs(paper_gamma_predictive(x, gg) - m)[k].sum() for x, m, k in zip(seqs, curves, masks)))

    def lbfgs(x0: float) -> tuple[float, float]:
        res = optimize.minimize(loss, x0=[x0], bounds=[(0.0, 1.0)], method="L-BFGS-B")
        return float(res.fun), float(np.clip(res.x[0], 0.0, 1.0))

    grid = np.linspace(0.0, 1.0, 101)
    vals = np.array([loss(g) for g in grid])
    f0, g0 = lbfgs(0.5)
    i = int(np.argmin(vals))
    cands = [(float(vals[i]), float(grid[i])), (f0, g0), lbfgs(float(grid[i]))]
    best_f, best_g = min(cands)
    return PaperGammaFit(gamma=best_g, gamma_x0=g0, l1=best_f, mean_abs_error=best_f / n_points, n_points=n_points)


# ---------------------------------------------------------------------------
# Mixture references for distribution shift
# ---------------------------------------------------------------------------


def mixture_reference(theta1: float, theta2: float, cutoff: int, N: int) -> FloatArray:
    """Empirical-mixture reference for a shift from theta1 to theta2 at ``cutoff``.

    Flips ``0..cutoff-1`` come from theta1 and flips ``cutoff..N-1`` from
    theta2. After a prefix of ``n`` flips, ``c_n = min(n, cutoff)`` of them came
    from theta1 and the reference prediction is

        r_n = (c_n / n) * theta1 + (1 - c_n / n) * theta2,     n = 1..N.

    For ``n = 0`` (nothing seen) we use the generating probability of the
    first flip: theta1 if ``cutoff >= 1`` else theta2 (the n -> 0 limit of the
    formula). Returns length ``N + 1``.
    """
    return block_mixture_reference(theta1, theta2, start=cutoff, end=max(N, cutoff + 1), N=N)


def block_mixture_reference(theta1: float, theta2: float, start: int, end: int, N: int) -> FloatArray:
    """Empirical-mixture reference for a theta2 block inside a theta1 sequence.

    Flips with index in ``[start, end)`` come from theta2, all others from
    theta1. After ``n`` flips, ``c2_n = clip(min(n, end) - start, 0, None)``
    came from theta2 and

        r_n = (1 - c2_n / n) * theta1 + (c2_n / n) * theta2,     n = 1..N.

    ``r_0`` is the generating probability of the first flip (theta2 if
    ``start == 0 < end`` else theta1). Returns length ``N + 1``.
    """
    for name, th in (("theta1", theta1), ("theta2", theta2)):
        if not (0.0 <= th <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {th!r}")
    if N < 0 or start < 0 or end < start:
        raise ValueError(f"need N >= 0 and 0 <= start <= end, got N={N}, start={start}, end={end}")
    n = np.arange(N + 1, dtype=float)
    c2 = np.clip(np.minimum(n, end) - start, 0.0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        w2 = np.where(n > 0, c2 / np.where(n > 0, n, 1.0), 0.0)
    out = (1.0 - w2) * theta1 + w2 * theta2
    out[0] = theta2 if (start == 0 and end > 0) else theta1
    return out


# ---------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------


def martingale_gap_from_branches(
    p_t: ArrayLike, p_next_heads: ArrayLike, p_next_tails: ArrayLike
) -> FloatArray | float:
    """Exact one-step martingale gap from both branches.

    A coherent Bayesian predictive is a martingale under its own predictive:
    ``E[p_{t+1} | past] = p_t``, where the expectation uses the model's own
    ``p_t``:

        gap_t = p_t * p_{t+1 | heads} + (1 - p_t) * p_{t+1 | tails} - p_t.

    Zero for any exact Beta-Bernoulli learner. Requires the model's prediction
    after the prefix extended by heads AND by tails, so the experiment must
    score both branches (two continuations per position). Vectorised.
    """
    p = np.asarray(p_t, dtype=float)
    ph = np.asarray(p_next_heads, dtype=float)
    pt = np.asarray(p_next_tails, dtype=float)
    return _scalar_or_array(p * ph + (1.0 - p) * pt - p)


def martingale_gap(p_curve: ArrayLike, outcomes: ArrayLike, theta: ArrayLike | None = None) -> FloatArray:
    """Single-branch (noisy, unbiased) estimates of the martingale gap along one curve.

    ``p_curve`` has length ``N + 1`` (P(heads) after prefixes ``0..N``) and
    ``outcomes`` length ``N``. Only the realised branch is observed, so the
    per-step estimate is importance weighted:

        g_t = w_t * p_{t+1} - p_t,    w_t = P_model(x_t) / P_gen(x_t)

    with ``P_model(heads) = p_t`` and ``P_gen(heads) = theta_t``. Then
    ``E_gen[g_t | past] = gap_t`` of :func:`martingale_gap_from_branches`.
    If ``theta`` is None the outcomes are assumed to be sampled from the
    model's own predictive (``w_t = 1``, e.g. self-generated sequences).
    Each ``g_t`` is one noisy sample: average over many sequences. The exact
    per-position gap needs both branches (:func:`martingale_gap_from_branches`).
    Returns length ``N``.
    """
    p = np.asarray(p_curve, dtype=float)
    x = _check_outcomes_binary(outcomes).astype(float)
    if p.ndim != 1 or x.ndim != 1 or p.size != x.size + 1:
        raise ValueError(f"p_curve must be 1-D of length N+1 for N outcomes, got {p.shape} and {x.shape}")
    pt, pn = p[:-1], p[1:]
    if theta is None:
        w = np.ones_like(pt)
    else:
        th = np.broadcast_to(np.asarray(theta, dtype=float), pt.shape)
        p_gen = np.where(x == 1, th, 1.0 - th)
        if np.any(p_gen <= 0):
            raise ValueError("an observed outcome has zero generating probability under theta")
        w = np.where(x == 1, pt, 1.0 - pt) / p_gen
    return w * pn - pt


@dataclass(frozen=True)
class ExchangeabilityGap:
    """Spread of a model's predictions over permutations of the same evidence.

    ``max_tvd``/``mean_tvd``: max/mean over permutations of TVD(prediction, mean
    prediction). ``std``: population standard deviation (ddof=0) over
    permutations, per category (shape ``(K,)``) or of P(heads) (float) for 1-D
    input.
    """

    max_tvd: float
    mean_tvd: float
    std: FloatArray | float


def exchangeability_gap(p_by_permutation: ArrayLike) -> ExchangeabilityGap:
    """Exchangeability diagnostic.

    Input ``(n_perm, K)`` distributions or ``(n_perm,)`` P(heads) values (each
    treated as ``[p, 1 - p]``), one per permutation of the same evidence. With
    ``pbar = mean_j p_j``: ``max_tvd = max_j 1/2 sum_i |p_{j,i} - pbar_i|``.
    An exchangeable (Bayesian i.i.d.) learner gives 0.
    """
    arr = np.asarray(p_by_permutation, dtype=float)
    if arr.ndim == 1:
        dists = coin_dist(arr)
        std: FloatArray | float = float(arr.std())
    elif arr.ndim == 2:
        dists = arr
        std = arr.std(axis=0)
    else:
        raise ValueError(f"p_by_permutation must be (n_perm,) or (n_perm, K), got shape {arr.shape}")
    if dists.shape[0] == 0:
        raise ValueError("need at least one permutation")
    d = np.asarray(tvd(dists, dists.mean(axis=0, keepdims=True)), dtype=float)
    return ExchangeabilityGap(max_tvd=float(d.max()), mean_tvd=float(d.mean()), std=std)
