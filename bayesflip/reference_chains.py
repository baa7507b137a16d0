"""Exact iterated-learning reference chains for Bayesian coin learners (EXPERIMENTS.md section 3).

Generation t: a learner with prior Beta(alpha, beta) sees the previous
generation's ``n`` outcomes, ``k`` of them heads, so its posterior is
``Beta(alpha + k, beta + n - k)`` with posterior mean
``p_k = (alpha + k) / (alpha + beta + n)``. It then produces ``n`` new outcomes.
The head count is a Markov chain on ``k in {0..n}`` with closed-form rows:

* ``sampler``  : ``k' ~ BetaBinomial(n, alpha + k, beta + n - k)`` (the learner
  continues autoregressively: each new outcome is drawn from the predictive
  given the context AND its own earlier outputs, a Polya urn; equivalently
  ``theta ~ Beta(alpha + k, beta + n - k)`` then ``Binomial(n, theta)``).
* ``pm``       : ``k' ~ Binomial(n, p_k)`` (n i.i.d. draws from the predictive).
* ``map``      : ``k' ~ Binomial(n, mode_k)``, ``mode_k`` = argmax of the
  posterior density, see :func:`learner_probability` for the edge cases.
* ``tempered`` : ``k' ~ Binomial(n, p_k^(1/tau) / (p_k^(1/tau) + (1 - p_k)^(1/tau)))``.
* ``greedy``   : the ``tau -> 0`` limit: 1 if ``p_k > 1/2``, 0 if ``p_k < 1/2``, 1/2 if equal.

An optional filter (the "interaction phase") accepts only some next counts;
a rejected draw is redrawn, so each row is restricted to the accepted counts
and renormalised.

CLI: ``bayesflip reference il ...`` -> :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import sparse, special, stats
from scipy.sparse.csgraph import connected_components

from .bayes import entropy

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

LEARNERS: tuple[str, ...] = ("sampler", "pm", "map", "tempered", "greedy")

#: A filter over next head counts: a boolean mask of length n+1 or a predicate
#: ``f(k) -> bool`` (called with the array ``0..n``, or element-wise if that fails).
Accept = Union[ArrayLike, Callable[..., object], None]

__all__ = [
    "LEARNERS",
    "ReferenceChain",
    "learner_probability",
    "accept_mask",
    "transition_matrix",
    "limiting_distribution",
    "run_reference_chain",
    "simulate_chain_mc",
    "main",
]


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _validate(learner: str, alpha: float, beta: float, n: int, tau: float | None) -> None:
    if learner not in LEARNERS:
        raise ValueError(f"unknown learner {learner!r}; allowed values: {', '.join(LEARNERS)}")
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not (isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if learner == "tempered":
        if tau is None or not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"learner 'tempered' needs tau > 0 (finite), got {tau!r}")
    elif tau is not None:
        raise ValueError(f"tau only applies to learner 'tempered', not {learner!r}")


def accept_mask(accept: Accept, n: int) -> NDArray[np.bool_] | None:
    """Turn a filter into a boolean mask over next counts ``0..n`` (None = accept all)."""
    if accept is None:
        return None
    ks = np.arange(n + 1)
    if callable(accept):
        try:
            mask = np.asarray(accept(ks), dtype=bool)
            if mask.shape != ks.shape:
                raise ValueError
        except (ValueError, TypeError):
            mask = np.array([bool(accept(int(k))) for k in ks], dtype=bool)
    else:
        mask = np.asarray(accept, dtype=bool)
        if mask.shape != ks.shape:
            raise ValueError(f"accept mask must have length n+1 = {n + 1}, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("the filter accepts no head count at all")
    return mask


# ---------------------------------------------------------------------------
# Learner probabilities and transition matrices
# ---------------------------------------------------------------------------


def _map_probability(a: FloatArray, b: FloatArray) -> FloatArray:
    """Mode (argmax of the density) of Beta(a, b), element-wise.

    * ``a > 1, b > 1``: ``(a - 1) / (a + b - 2)`` (interior mode);
    * ``a <= 1 <= b`` (not both 1): 0, the density is non-increasing and maximal at 0;
    * ``b <= 1 <= a`` (not both 1): 1;
    * ``a = b = 1`` (flat) or ``a < 1, b < 1`` (U-shaped, two infinite
      modes): no unique mode -> the posterior mean ``a / (a + b)``.
    In the region ``a + b > 2`` this equals ``(a-1)/(a+b-2)`` clipped to [0, 1].
    """
    mean = a / (a + b)
    with np.errstate(divide="ignore", invalid="ignore"):
        interior = (a - 1.0) / (a + b - 2.0)
    out = np.where((a > 1) & (b > 1), interior, mean)
    both_one = (a == 1) & (b == 1)
    out = np.where((a <= 1) & (b >= 1) & ~both_one, 0.0, out)
    out = np.where((b <= 1) & (a >= 1) & ~both_one, 1.0, out)
    return out


def learner_probability(
    learner: str, alpha: float, beta: float, n: int, k: ArrayLike, tau: float | None = None
) -> FloatArray:
    """Per-outcome P(heads) the learner uses to produce the next generation after seeing k of n heads.

    With ``a = alpha + k``, ``b = beta + n - k`` and posterior mean ``p = a / (a + b)``:
    ``pm`` -> ``p``; ``map`` -> mode of Beta(a, b) (see :func:`_map_probability`);
    ``tempered`` -> ``p^(1/tau) / (p^(1/tau) + (1-p)^(1/tau)) = expit(logit(p) / tau)``
    (computed in logit space, no underflow); ``greedy`` -> 1, 0 or 1/2 as
    ``p >, <, = 1/2`` (equality tested as ``|2a - (a+b)| <= 1e-12 (a+b)``).
    ``sampler`` has no single probability (each outcome updates the predictive);
    for it this returns the posterior mean of the first draw.
    """
    _validate(learner, alpha, beta, n, tau)
    kk = np.asarray(k, dtype=float)
    a = alpha + kk
    b = beta + n - kk
    p = a / (a + b)
    if learner in ("pm", "sampler"):
        return p
    if learner == "map":
        return _map_probability(a, b)
    if learner == "tempered":
        assert tau is not None
        return special.expit(special.logit(p) / tau)
    # greedy
    tie = np.abs(2.0 * a - (a + b)) <= 1e-12 * (a + b)
    return np.where(tie, 0.5, np.where(p > 0.5, 1.0, 0.0))


def transition_matrix(
    learner: str,
    alpha: float,
    beta: float,
    n: int,
    tau: float | None = None,
    accept: Accept = None,
) -> FloatArray:
    """Row-stochastic ``(n+1, n+1)`` matrix ``T[k, k'] = P(next count k' | current count k)``.

    Rows are BetaBinomial(n, alpha+k, beta+n-k) for ``sampler`` and
    Binomial(n, learner_probability(k)) otherwise. With a filter ``accept``
    (mask or predicate over k'), ``T[k, k'] <- T[k, k'] 1[accept(k')] / sum_j T[k, j] 1[accept(j)]``
    (rejection = redraw). Raises ``ValueError`` if some row puts zero mass on the
    accepted counts (the redraw loop would never end), naming those rows.
    """
    _validate(learner, alpha, beta, n, tau)
    ks = np.arange(n + 1)
    if learner == "sampler":
        T = stats.betabinom.pmf(ks[None, :], n, alpha + ks[:, None], beta + n - ks[:, None])
    else:
        p = learner_probability(learner, alpha, beta, n, ks, tau)
        T = stats.binom.pmf(ks[None, :], n, p[:, None])
    T = np.asarray(T, dtype=float)
    T = T / T.sum(axis=1, keepdims=True)
    mask = accept_mask(accept, n)
    if mask is not None:
        T = T * mask[None, :]
        rows = T.sum(axis=1)
        bad = np.flatnonzero(rows <= 0)
        if bad.size:
            raise ValueError(
                f"filter has zero acceptance probability from current head count(s) {bad.tolist()} "
                f"(learner {learner!r}, alpha={alpha}, beta={beta}, n={n}); the redraw would never end"
            )
        T = T / rows[:, None]
    return T


# ---------------------------------------------------------------------------
# Stationary / limiting distributions
# ---------------------------------------------------------------------------


def _class_stationary(P: FloatArray) -> FloatArray:
    """Stationary distribution of an irreducible stochastic matrix: solve pi (P - I) = 0, sum pi = 1."""
    m = P.shape[0]
    A = P.T - np.eye(m)
    A[-1, :] = 1.0
    rhs = np.zeros(m)
    rhs[-1] = 1.0
    pi = np.linalg.solve(A, rhs)
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def limiting_distribution(T: FloatArray, init: ArrayLike) -> tuple[FloatArray, str]:
    """Long-run distribution of the chain with transition matrix ``T`` started from ``init``.

    The closed communicating classes of ``T`` (strongly connected components of
    the graph ``T > 0`` with no exit) are found. If there is exactly one, the
    chain has a unique stationary distribution ``pi`` (``pi T = pi``, zero on
    transient states), returned with kind ``"unique"``; it does not depend on
    ``init``. If there are several (e.g. MAP/greedy chains with several
    absorbing counts), the limit depends on the start and we return
    ``sum_c P(absorbed in class c | init) pi_c`` with kind ``"limit_from_init"``
    (absorption probabilities from ``(I - Q) B = R``). Both are Cesaro limits of
    ``init T^g``, so they are well defined even for periodic classes.
    """
    T = np.asarray(T, dtype=float)
    m = T.shape[0]
    x0 = np.asarray(init, dtype=float)
    adj = T > 0
    ncomp, labels = connected_components(sparse.csr_matrix(adj), directed=True, connection="strong")
    classes: list[NDArray[np.bool_]] = []
    for c in range(ncomp):
        members = labels == c
        if not adj[np.ix_(members, ~members)].any():
            classes.append(members)
    pis = []
    for members in classes:
        pi = np.zeros(m)
        idx = np.flatnonzero(members)
        pi[idx] = _class_stationary(T[np.ix_(idx, idx)])
        pis.append(pi)
    if len(classes) == 1:
        return pis[0], "unique"
    in_closed = np.any(np.stack(classes), axis=0)
    tr = np.flatnonzero(~in_closed)
    weights = np.array([x0[members].sum() for members in classes])
    if tr.size:
        Q = T[np.ix_(tr, tr)]
        R = np.stack([T[np.ix_(tr, np.flatnonzero(members))].sum(axis=1) for members in classes], axis=1)
        B = np.linalg.solve(np.eye(tr.size) - Q, R)
        weights = weights + x0[tr] @ B
    out = np.tensordot(weights, np.stack(pis), axes=1)
    out = np.clip(out, 0.0, None)
    return out / out.sum(), "limit_from_init"


# ---------------------------------------------------------------------------
# Exact chains
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceChain:
    """Exact per-generation distribution of an iterated-learning chain.

    * ``dist``: ``(G+1, n+1)``, row g = distribution of the head count at generation g
      (row 0 = point mass at ``init_heads``);
    * ``mean``: ``(G+1,)`` expected proportion of heads ``E[k] / n``;
    * ``entropy``: ``(G+1,)`` Shannon entropy in nats of the distribution over
      counts ``dist[g]`` (0 at generation 0);
    * ``stationary``: ``(n+1,)`` long-run distribution (see
      :func:`limiting_distribution`; ``stationary_kind`` says ``"unique"`` or
      ``"limit_from_init"``); ``stationary_mean`` = its ``E[k] / n``;
    * ``transition``: the ``(n+1, n+1)`` transition matrix.
    """

    learner: str
    alpha: float
    beta: float
    n: int
    tau: float | None
    init_heads: int
    dist: FloatArray
    mean: FloatArray
    entropy: FloatArray
    stationary: FloatArray
    stationary_mean: float
    stationary_kind: str
    transition: FloatArray


def run_reference_chain(
    learner: str,
    alpha: float,
    beta: float,
    n: int,
    generations: int,
    init_heads: int,
    tau: float | None = None,
    accept: Accept = None,
) -> ReferenceChain:
    """Iterate ``dist_{g+1} = dist_g T`` for ``generations`` steps from a point mass at ``init_heads``.

    The filter applies to produced data only (generation 0 is the given
    initial data and need not pass it).
    """
    _validate(learner, alpha, beta, n, tau)
    if not (isinstance(generations, (int, np.integer)) and generations >= 0):
        raise ValueError(f"generations must be an integer >= 0, got {generations!r}")
    if not (isinstance(init_heads, (int, np.integer)) and 0 <= init_heads <= n):
        raise ValueError(f"init_heads must be an integer in 0..n = 0..{n}, got {init_heads!r}")
    T = transition_matrix(learner, alpha, beta, n, tau=tau, accept=accept)
    ks = np.arange(n + 1, dtype=float)
    dist = np.zeros((generations + 1, n + 1))
    dist[0, init_heads] = 1.0
    for g in range(generations):
        d = dist[g] @ T
        dist[g + 1] = d / d.sum()
    stationary, kind = limiting_distribution(T, dist[0])
    return ReferenceChain(
        learner=learner,
        alpha=float(alpha),
        beta=float(beta),
        n=int(n),
        tau=None if tau is None else float(tau),
        init_heads=int(init_heads),
        dist=dist,
        mean=dist @ ks / n,
        entropy=np.asarray(entropy(dist), dtype=float),
        stationary=stationary,
        stationary_mean=float(stationary @ ks / n),
        stationary_kind=kind,
        transition=T,
    )


# ---------------------------------------------------------------------------
# Monte-Carlo simulation of the same learners
# ---------------------------------------------------------------------------


def simulate_chain_mc(
    learner: str,
    alpha: float,
    beta: float,
    n: int,
    generations: int,
    init_heads: int,
    n_chains: int,
    seed: int | None = None,
    tau: float | None = None,
    accept: Accept = None,
    max_redraws: int = 10_000,
) -> IntArray:
    """Simulate ``n_chains`` independent chains; returns head counts of shape ``(n_chains, G+1)``.

    Column 0 is ``init_heads``. ``sampler`` really draws outcomes one at a time
    from the sequential predictive ``P(x_i = 1) = (alpha + k + h_i) / (alpha + beta + n + i)``
    (context k of n heads plus the ``h_i`` heads among its own ``i`` earlier
    outputs; a Polya urn). The other learners draw ``Binomial(n, learner_probability(k))``.
    With a filter, chains whose draw is rejected redraw (only those chains)
    until accepted; more than ``max_redraws`` rounds raises ``ValueError``.
    Uses ``numpy.random.default_rng(seed)``; vectorised over chains.
    """
    _validate(learner, alpha, beta, n, tau)
    if not (isinstance(generations, (int, np.integer)) and generations >= 0):
        raise ValueError(f"generations must be an integer >= 0, got {generations!r}")
    if not (isinstance(init_heads, (int, np.integer)) and 0 <= init_heads <= n):
        raise ValueError(f"init_heads must be an integer in 0..{n}, got {init_heads!r}")
    if not (isinstance(n_chains, (int, np.integer)) and n_chains >= 1):
        raise ValueError(f"n_chains must be an integer >= 1, got {n_chains!r}")
    rng = np.random.default_rng(seed)
    mask = accept_mask(accept, n)
    probs = learner_probability(learner, alpha, beta, n, np.arange(n + 1), tau) if learner != "sampler" else None

    def draw(k: IntArray) -> IntArray:
        if learner == "sampler":
            h = np.zeros(k.shape, dtype=np.int64)
            for i in range(n):
                p = (alpha + k + h) / (alpha + beta + n + i)
                h += rng.random(k.shape) < p
            return h
        assert probs is not None
        return rng.binomial(n, probs[k]).astype(np.int64)

    counts = np.empty((n_chains, generations + 1), dtype=np.int64)
    counts[:, 0] = init_heads
    for g in range(generations):
        k = counts[:, g]
        new = draw(k)
        if mask is not None:
            pending = np.flatnonzero(~mask[new])
            rounds = 0
            while pending.size:
                rounds += 1
                if rounds > max_redraws:
                    raise ValueError(
                        f"filter still rejecting {pending.size} chain(s) after {max_redraws} redraws "
                        f"at generation {g + 1}"
                    )
                new[pending] = draw(k[pending])
                pending = pending[~mask[new[pending]]]
        counts[:, g + 1] = new
    return counts


# ---------------------------------------------------------------------------
# CLI: bayesflip reference il
# ---------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bayesflip reference il",
        description="Exact iterated-learning reference chain for a Beta(alpha, beta) coin learner.",
    )
    p.add_argument("--learner", required=True, choices=LEARNERS, help="how each generation produces data")
    p.add_argument("--alpha", type=float, default=1.0, help="Beta prior alpha (> 0), default 1")
    p.add_argument("--beta", type=float, default=1.0, help="Beta prior beta (> 0), default 1")
    p.add_argument("--n", type=int, required=True, help="outcomes per generation (>= 1)")
    p.add_argument("--generations", type=int, required=True, help="number of generations (>= 0)")
    p.add_argument("--init-heads", type=int, default=0, help="heads in the generation-0 data (0..n)")
    p.add_argument("--tau", type=float, default=None, help="temperature (> 0), required for --learner tempered")
    p.add_argument("--min-heads", type=int, default=None, help="filter: accept only data with >= K heads")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _finite_list(a: FloatArray) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=float).ravel()]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 usage/validation error)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse already printed usage + message to stderr
        return int(exc.code) if isinstance(exc.code, int) else 2
    accept = None
    if args.min_heads is not None:
        if not (0 <= args.min_heads <= args.n):
            print(f"error: --min-heads must be in 0..n = 0..{args.n}, got {args.min_heads}", file=sys.stderr)
            return 2
        k_min = args.min_heads
        accept = np.arange(args.n + 1) >= k_min
    try:
        chain = run_reference_chain(
            args.learner,
            args.alpha,
            args.beta,
            args.n,
            args.generations,
            args.init_heads,
            tau=args.tau,
            accept=accept,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        obj = {
            "learner": chain.learner,
            "alpha": chain.alpha,
            "beta": chain.beta,
            "n": chain.n,
            "generations": int(args.generations),
            "init_heads": chain.init_heads,
            "tau": chain.tau,
            "min_heads": args.min_heads,
            "mean": _finite_list(chain.mean),
            "entropy": _finite_list(chain.entropy),
            "entropy_definition": "Shannon entropy (nats) of the distribution over head counts",
            "stationary": _finite_list(chain.stationary),
            "stationary_mean": chain.stationary_mean,
            "stationary_kind": chain.stationary_kind,
        }
        print(json.dumps(obj, allow_nan=False))
        return 0
    tau_txt = f" tau={chain.tau:g}" if chain.tau is not None else ""
    filt_txt = f" filter: heads>={args.min_heads}" if args.min_heads is not None else ""
    print(
        f"learner={chain.learner} alpha={chain.alpha:g} beta={chain.beta:g} n={chain.n}"
        f"{tau_txt} init_heads={chain.init_heads}{filt_txt}"
    )
    print(f"{'gen':>5} {'mean(k/n)':>10} {'H(counts)':>10}")
    G = int(args.generations)
    shown = range(G + 1) if G <= 25 else sorted(set(np.linspace(0, G, 21).round().astype(int).tolist()))
    for g in shown:
        print(f"{g:>5d} {chain.mean[g]:>10.4f} {chain.entropy[g]:>10.4f}")
    print(f"stationary ({chain.stationary_kind}) mean = {chain.stationary_mean:.4f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
