"""Reducer of the ``chains`` family: LLM iterated-learning chains vs exact Bayesian reference chains.

Conditions: per store (experiment × model), the cells are grouped by (learner, τ, n, init,
min_count); the N chains of a group are its samples. The tracked choice ``c`` is heads for a
coin (choice 0) and ``init_choice`` for a die; ``k_g`` = the count of ``c`` in ``data[g]``.

LLM, per generation g (``chains_by_generation``):

* ``mean_prop`` = mean over chains of ``k_g / n`` (± s.e. = std / √N);
* ``count_entropy`` = ``−Σ_k f_g(k) log f_g(k)`` (nats) of the empirical distribution ``f_g`` of
  ``k_g`` over the chains — the definition of :class:`bayesflip.reference_chains.ReferenceChain`
  ``entropy``; its ± is a bootstrap s.e. (200 resamples of the chains, seed 0);
* mean ``p_t(c)`` (the renormalised read after ``data[g]``), mean ``H(p_t) = −Σ p log p`` (nats),
  mean off-choice mass, share of accepted draws, mean redraws;
* one-step read check per prior source s: ``p_bayes_s`` = mean over chains of the posterior
  predictive ``(α_c + k_g) / (Σα + n)`` at the chain's own data and ``tvd_read_s`` = mean
  ``TVD(p_t, q_t)``, ``q_t`` the full K-choice predictive ``(α_i + n_i) / (Σα + n)``.

Priors (``chains_priors``), per (model, process):

* ``icl`` — the prior the ICL reducer fitted to the model (``earlier["icl"]`` table
  ``icl_prior_fits``; Beta(α, β) for a coin, Dirichlet(α) for a die), when the sweep has
  statement-free ICL results of that process for the model (the ICL reducer never fits a prior on
  curves after a bias statement; such a model's row has NaN α and a ``note``, and is skipped here);
* ``chain`` — fitted here the same way (:func:`bayes.fit_beta_prior` /
  :func:`bayes.fit_dirichlet_prior`) on every read of the model's chains of that process:
  ``p_t`` against the counts of ``data[g]``;
* ``uniform`` — Beta(1, 1) / Dirichlet(1).

The **primary** prior is ``icl`` if present, else ``uniform`` (the fallback is stated in the
report). The tracked choice's marginal prior is Beta(α_c, Σα − α_c).

References (``chains_reference``), for every prior source and learner in {sampler, pm, map} ∪
{the chain's own learner (tempered τ, greedy)}: the exact chain of
:func:`bayesflip.reference_chains.run_reference_chain` with the same n, G, init and filter
(``k ≥ min_count`` on ``filter_choice``, tails = ``n − k``). Per generation: ``ref_mean``,
``ref_entropy``, ``tvd = ½ Σ_k |f_g(k) − π_g(k)|`` (LLM empirical vs reference distribution of
``k_g``) and ``tvd_floor`` = E[TVD] between the empirical distribution of N draws from
``π_g`` and ``π_g`` and ``ref_entropy_plugin`` = E[its plug-in entropy] (Monte Carlo, 200 sets,
seed 0) — what a perfect match would show with N chains. Caveats (column ``note``): ``greedy``
keeps a rejected draw, so its reference has no filter, and on an exact tie the LLM takes the first
maximum while the reference uses ½; for a die only ``pm`` and ``sampler`` reduce exactly to a chain
on ``k`` (Polya urn / Binomial on c vs the rest), the other learners are left out; a filter that
some count could never pass under a learner (e.g. MAP at a mode of 0) leaves that reference out
(:func:`transition_matrix` raises, the message is the note).

Diagnostic (``chains_diagnostic``), per condition × prior: ``mean_tvd_<learner>`` = mean of
``tvd`` over generations 1..G; ``best_learner`` = the one of sampler / pm / map with the smallest
``mean_tvd`` (``margin`` = second smallest − smallest, ``margin_se`` its bootstrap s.e. with the
chains resampled, ``best_clear`` = margin > 2 margin_se), or ``indistinguishable`` when
``ref_separation`` (the largest mean-over-generations TVD between two of those references) is
below ``SEP_MIN`` = 0.01 — e.g. a prior so strong that every learner is i.i.d. Binomial.
Bias amplification, with centre ``u = 1/K`` (½ for a coin):
``amplification_llm = |m_late − u| − |α_c/Σα − u|`` (``m_late`` = the LLM's mean proportion
over the last half of the generations, ``g ≥ ⌈G/2⌉``), and for each reference
``amplification_<learner> = |stationary_mean − u| − |α_c/Σα − u|`` (≈ 0 for a sampler, > 0 when
the chain drifts to the prior's mode like MAP). Stationary distributions: ``chains_stationary``
(mean, kind, entropy) and ``chains_stationary_dist`` (``π(k)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from .. import bayes
from ..reference_chains import run_reference_chain
from . import figures as F
from .base import Figure, FamilyInput, ReducedFamily, Section, Table, Text, register_reducer
from .load import StoreData

DIAG = ("sampler", "pm", "map")
SOURCES = ("icl", "chain", "uniform")
KEYS = ["experiment", "model", "process", "learner", "tau", "n", "init", "min_count"]
N_BOOT = 200
N_FLOOR = 200
SEP_MIN = 0.01   # below this the sampler / pm / MAP references coincide: no "best" learner
LLM_STYLE = {**F.MODEL_STYLE, "label": "LLM chains"}
REF_STYLE = {"sampler": {"color": "tab:blue", "ls": "--", "lw": 1.3},
             "pm": {"color": "tab:green", "ls": "-.", "lw": 1.4},
             "map": {"color": "tab:red", "ls": ":", "lw": 1.6},
             "own": {"color": "tab:purple", "ls": "--", "lw": 1.6}}


# ---------------------------------------------------------------------------- data
@dataclass
class Prior:
    source: str
    alpha: np.ndarray           # (K,) Beta (α, β) for a coin, Dirichlet α for a die
    converged: bool = True
    at_bound: bool = False
    n_points: int = 0
    fitted_on: str = ""

    def marginal(self, c: int) -> tuple[float, float]:
        """Beta(α_c, Σα − α_c): the tracked choice's prior."""
        return float(self.alpha[c]), float(self.alpha.sum() - self.alpha[c])

    def mean(self, c: int) -> float:
        return float(self.alpha[c] / self.alpha.sum())


@dataclass
class Condition:
    """The N chains of one (experiment, model, learner, τ, n, init, min_count)."""

    store: StoreData
    process: str
    learner: str
    tau: float
    n: int
    init: int
    min_count: int
    track: int
    filter_choice: int
    init_choice: int
    labels: list[str]
    counts: np.ndarray          # (N, G+1, K)
    probs: np.ndarray           # (N, G+1, K)
    h_read: np.ndarray          # (N, G+1)
    off: np.ndarray             # (N, G+1)
    accepted: np.ndarray        # (N, G+1)
    redraws: np.ndarray         # (N, G+1)
    refs: dict = field(default_factory=dict)   # (source, learner) -> (ReferenceChain | None, note)
    finite: dict = field(default_factory=dict)  # (source, learner) -> finite_sample(...) at N chains
    boot: np.ndarray | None = None              # bootstrap_dists of the chains

    @property
    def k(self) -> np.ndarray:
        return self.counts[..., self.track]

    @property
    def G(self) -> int:
        return self.counts.shape[1] - 1

    @property
    def K(self) -> int:
        return self.counts.shape[2]

    def choice_name(self, i: int) -> str:
        return self.labels[i] if self.process == "coin" else f"face {self.labels[i]}"

    @property
    def label(self) -> str:
        lab = self.learner + (f" τ={self.tau:g}" if self.learner == "tempered" else "")
        filt = f"≥{self.min_count} {self.choice_name(self.filter_choice)}" if self.min_count else "none"
        return f"{lab}, n={self.n}, init={self.init} {self.choice_name(self.init_choice)}, filter {filt}"

    def keys(self) -> dict:
        return {"experiment": self.store.experiment, "model": self.store.model, "process": self.process,
                "learner": self.learner, "tau": self.tau, "n": self.n, "init": self.init,
                "min_count": self.min_count}


def conditions(st: StoreData) -> list[Condition]:
    p = st.params
    process = str(p.get("process", "coin"))
    init_choice, filter_choice = int(p.get("init_choice", 0)), int(p.get("filter_choice", 0))
    track = 0 if process == "coin" else init_choice
    labels = [str(x).strip() for x in st.labels.get("choice", range(st.arrays["counts"].shape[-1]))]
    out = []
    cells = st.cells
    for key, g in cells.groupby(["learner", "tau", "n", "init", "min_count"], sort=True):
        idx = g.index.to_numpy()
        learner, tau, n, init, mc = key
        out.append(Condition(
            store=st, process=process, learner=str(learner), tau=float(tau), n=int(n), init=int(init),
            min_count=int(mc), track=track, filter_choice=filter_choice, init_choice=init_choice, labels=labels,
            counts=st.arrays["counts"][idx].astype(np.int64), probs=st.arrays["probs"][idx].astype(np.float64),
            h_read=st.arrays["entropy"][idx].astype(np.float64), off=st.arrays["off_mass"][idx].astype(np.float64),
            accepted=st.arrays["accepted"][idx].astype(bool), redraws=st.arrays["redraws"][idx].astype(np.float64)))
    return out


# ---------------------------------------------------------------------------- priors
def icl_priors(inp: FamilyInput) -> dict[tuple[str, str], Prior]:
    """(model, process) -> the prior the ICL reducer fitted on the model's statement-free ICL curves (empty if
    ICL was not reduced in this run; a not-measured row, NaN α, is left out)."""
    res = inp.earlier.get("icl")
    tab = res.tables.get("icl_prior_fits") if res is not None else None
    out: dict[tuple[str, str], Prior] = {}
    if tab is None or tab.empty:
        return out
    for _, r in tab.iterrows():
        if r["process"] == "coin":
            alpha = np.array([r["alpha"], r["beta"]], dtype=float)
        else:
            cols = [c for c in tab.columns if c.startswith("alpha_") and c != "alpha_sum"]
            alpha = r[cols].to_numpy(dtype=float)
        if np.all(np.isfinite(alpha)):
            out[(str(r["model"]), str(r["process"]))] = Prior("icl", alpha, bool(r["converged"]), bool(r["at_bound"]),
                                                              int(r["n_points"]), str(r["fitted_on"]))
    return out


def chain_prior(conds: list[Condition]) -> Prior:
    """Prior fitted to every read of these chains: p_t against the counts of data[g]."""
    counts = np.concatenate([c.counts.reshape(-1, c.K) for c in conds]).astype(float)
    probs = np.concatenate([c.probs.reshape(-1, c.K) for c in conds])
    f: bayes.BetaPriorFit | bayes.DirichletPriorFit
    if counts.shape[1] == 2:
        f = bayes.fit_beta_prior(counts[:, 0], counts[:, 1], probs[:, 0])
        alpha = np.array([f.alpha, f.beta])
    else:
        f = bayes.fit_dirichlet_prior(counts, probs)
        alpha = np.asarray(f.alpha, dtype=float)
    return Prior("chain", alpha, bool(f.converged), bool(f.at_bound), int(f.n_points),
                 ",".join(sorted({c.store.experiment for c in conds})))


# ---------------------------------------------------------------------------- statistics
def empirical_dist(k: np.ndarray, n: int) -> np.ndarray:
    """(N, G+1) counts -> (G+1, n+1): share of chains with count k at each generation."""
    N, G1 = k.shape
    out = np.zeros((G1, n + 1))
    for g in range(G1):
        out[g] = np.bincount(k[:, g], minlength=n + 1)[: n + 1] / N
    return out


def bootstrap_dists(k: np.ndarray, n: int, rng: np.random.Generator, B: int = N_BOOT) -> np.ndarray:
    """(B, G+1, n+1): empirical count distributions of B resamples (with replacement) of the N chains."""
    N, G1 = k.shape
    kk = k[rng.integers(0, N, size=(B, N))]                                  # (B, N, G+1)
    flat = (np.arange(B)[:, None, None] * G1 + np.arange(G1)[None, None, :]) * (n + 1) + kk
    return np.bincount(flat.ravel(), minlength=B * G1 * (n + 1)).reshape(B, G1, n + 1) / N


def count_entropy_se(boot: np.ndarray) -> np.ndarray:
    """Bootstrap s.e. of the entropy of the empirical count distribution, per generation (NaN for N < 2)."""
    return np.asarray(bayes.entropy(boot), dtype=float).std(axis=0, ddof=1)


def finite_sample(dist: np.ndarray, N: int, rng: np.random.Generator, R: int = N_FLOOR
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per generation, over R Monte Carlo sets of N draws from π_g (empirical distribution f̂):
    (E[TVD(f̂, π_g)], E[H(f̂)]) — what a perfect match shows with N chains (the plug-in entropy is biased low)."""
    p = np.clip(dist, 0.0, None)
    p = p / p.sum(axis=1, keepdims=True)
    draws = rng.multinomial(N, p, size=(R, p.shape[0])) / N                   # (R, G+1, n+1)
    return (np.asarray(bayes.tvd(draws, p[None]), dtype=float).mean(axis=0),
            np.asarray(bayes.entropy(draws), dtype=float).mean(axis=0))


def reference_setup(c: Condition, learner: str) -> tuple[int, np.ndarray | None, str]:
    """(init count of the tracked choice, filter mask over k or None, note); raises ValueError if not exact."""
    if c.process != "coin" and learner not in ("pm", "sampler"):
        raise ValueError(f"no exact chain on one face's count for a die {learner!r} learner (pm/sampler only)")
    if c.init_choice == c.track:
        init = c.init
    elif c.K == 2:
        init = c.n - c.init
    else:
        raise ValueError("die: tracked face differs from init_choice")
    ks = np.arange(c.n + 1)
    note = ""
    if c.min_count == 0:
        mask = None
    elif learner == "greedy":
        mask, note = None, "greedy keeps a rejected draw: reference without filter"
    elif c.filter_choice == c.track:
        mask = ks >= c.min_count
    elif c.K == 2:
        mask = (c.n - ks) >= c.min_count
    else:
        raise ValueError("die: filter on a face other than the tracked one has no exact chain on k")
    if learner == "greedy" and not note:
        note = "ties: the LLM takes the first maximum, the reference ½"
    return init, mask, note


def ref_learners(c: Condition) -> list[str]:
    """sampler, pm, map and the chain's own learner (if another one)."""
    return list(DIAG) + ([c.learner] if c.learner not in DIAG else [])


def add_references(c: Condition, priors: dict[str, Prior], rng: np.random.Generator) -> None:
    """Reference chains (and their N-chain finite-sample TVD / plug-in entropy) for every prior and learner."""
    for src, pr in priors.items():
        a, b = pr.marginal(c.track)
        for lr in ref_learners(c):
            try:
                init, mask, note = reference_setup(c, lr)
                ch = run_reference_chain(lr, a, b, c.n, c.G, init, tau=c.tau if lr == "tempered" else None,
                                         accept=mask)
            except ValueError as e:  # recorded in the tables' note column; the figure leaves it out
                c.refs[(src, lr)] = (None, str(e))
            else:
                c.refs[(src, lr)] = (ch, note)
                c.finite[(src, lr)] = finite_sample(ch.dist, len(c.k), rng)


# ---------------------------------------------------------------------------- tables
def generation_table(c: Condition, priors: dict[str, Prior]) -> pd.DataFrame:
    N = len(c.k)
    assert c.boot is not None   # bootstrapped by the reducer before the tables
    prop = c.k / c.n
    emp = empirical_dist(c.k, c.n)
    df = pd.DataFrame({"generation": np.arange(c.G + 1), "n_chains": N,
                       "mean_prop": prop.mean(0),
                       "mean_prop_se": prop.std(0, ddof=1) / math.sqrt(N) if N > 1 else np.nan,
                       "count_entropy": np.asarray(bayes.entropy(emp), dtype=float),
                       "count_entropy_se": count_entropy_se(c.boot) if N > 1 else np.nan,
                       "p_read": c.probs[..., c.track].mean(0), "p_read_se": (c.probs[..., c.track].std(0, ddof=1)
                                                                               / math.sqrt(N) if N > 1 else np.nan),
                       "read_entropy": c.h_read.mean(0), "off_choice_mass": c.off.mean(0),
                       "accept_rate": c.accepted.mean(0), "mean_redraws": c.redraws.mean(0)})
    for src in SOURCES:
        pr = priors.get(src)
        if pr is None:
            df[f"p_bayes_{src}"] = np.nan
            df[f"tvd_read_{src}"] = np.nan
            continue
        q = bayes.dirichlet_predictive(c.counts.astype(float), pr.alpha)          # (N, G+1, K)
        df[f"p_bayes_{src}"] = q[..., c.track].mean(0)
        df[f"tvd_read_{src}"] = np.asarray(bayes.tvd(c.probs, q), dtype=float).mean(0)
    for k, v in reversed(list(c.keys().items())):
        df.insert(0, k, v)
    df.insert(len(KEYS), "condition", c.label)
    return df


def reference_table(c: Condition) -> pd.DataFrame:
    emp = empirical_dist(c.k, c.n)
    llm_mean, llm_h = (c.k / c.n).mean(0), np.asarray(bayes.entropy(emp), dtype=float)
    rows = []
    for (src, lr), (ch, note) in c.refs.items():
        G1 = c.G + 1
        if ch is None:
            d = dict(ref_mean=np.full(G1, np.nan), ref_entropy=np.full(G1, np.nan), tvd=np.full(G1, np.nan),
                     tvd_floor=np.full(G1, np.nan), ref_entropy_plugin=np.full(G1, np.nan))
        else:
            floor, h_n = c.finite[(src, lr)]
            d = dict(ref_mean=ch.mean, ref_entropy=ch.entropy, tvd=np.asarray(bayes.tvd(emp, ch.dist), dtype=float),
                     tvd_floor=floor, ref_entropy_plugin=h_n)
        rows.append(pd.DataFrame({**c.keys(), "condition": c.label, "prior": src, "ref_learner": lr,
                                  "generation": np.arange(G1), "llm_mean": llm_mean, "llm_entropy": llm_h, **d,
                                  "note": note}))
    return pd.concat(rows, ignore_index=True)


def late_generations(G: int) -> np.ndarray:
    """The last half of the generations: g = ⌈G/2⌉..G (just 0 when G = 0)."""
    return np.arange(math.ceil(G / 2), G + 1)


def stationary_tables(c: Condition, priors: dict[str, Prior]) -> tuple[pd.DataFrame, pd.DataFrame]:
    u = 1.0 / c.K
    late = late_generations(c.G)
    emp_late = empirical_dist(c.k[:, late].reshape(-1, 1), c.n)[0]
    rows, dist_rows = [], []
    for (src, lr), (ch, note) in c.refs.items():
        pm = priors[src].mean(c.track)
        row = {**c.keys(), "condition": c.label, "prior": src, "ref_learner": lr, "prior_mean": pm}
        if ch is None:
            row.update(stationary_mean=np.nan, stationary_kind="", stationary_entropy=np.nan,
                       amplification=np.nan, tvd_llm_late=np.nan, note=note)
        else:
            row.update(stationary_mean=ch.stationary_mean, stationary_kind=ch.stationary_kind,
                       stationary_entropy=float(bayes.entropy(ch.stationary)),
                       amplification=abs(ch.stationary_mean - u) - abs(pm - u),
                       tvd_llm_late=float(bayes.tvd(emp_late, ch.stationary)), note=note)
            dist_rows.append(pd.DataFrame({**c.keys(), "condition": c.label, "prior": src, "ref_learner": lr,
                                           "k": np.arange(c.n + 1), "prob": ch.stationary}))
        rows.append(row)
    dist_rows.append(pd.DataFrame({**c.keys(), "condition": c.label, "prior": "llm_late", "ref_learner": "llm",
                                   "k": np.arange(c.n + 1), "prob": emp_late}))
    return pd.DataFrame(rows), pd.concat(dist_rows, ignore_index=True)


def separation(c: Condition, src: str) -> float:
    """Largest mean-over-generations-1..G TVD between two of the sampler / pm / MAP reference chains."""
    dists = [c.refs[(src, lr)][0].dist for lr in DIAG if c.refs.get((src, lr), (None,))[0] is not None]
    if len(dists) < 2 or c.G == 0:
        return np.nan
    return max(float(np.mean(np.asarray(bayes.tvd(a[1:], b[1:])))) for i, a in enumerate(dists) for b in dists[i + 1:])


def margin_se(c: Condition, src: str, best: str, second: str) -> float:
    """Bootstrap s.e. (chains resampled) of mean_tvd(second) − mean_tvd(best) over generations 1..G."""
    if c.boot is None or len(c.k) < 2 or c.G == 0:
        return np.nan
    t = {lr: np.asarray(bayes.tvd(c.boot[:, 1:], c.refs[(src, lr)][0].dist[None, 1:]), dtype=float).mean(axis=1)
         for lr in (best, second)}
    return float(np.std(t[second] - t[best], ddof=1))


def diagnostic_table(c: Condition, priors: dict[str, Prior], ref: pd.DataFrame, stat: pd.DataFrame,
                     primary: str) -> pd.DataFrame:
    u = 1.0 / c.K
    late = late_generations(c.G)
    prop = c.k / c.n
    rows = []
    for src, pr in priors.items():
        pm = pr.mean(c.track)
        a, b = pr.marginal(c.track)
        m_late = float(prop[:, late].mean())
        row = {**c.keys(), "condition": c.label, "prior": src, "primary": src == primary, "alpha_c": a, "beta_c": b,
               "prior_mean": pm, "n_chains": len(prop), "generations": c.G,
               "llm_mean_final": float(prop[:, -1].mean()), "llm_mean_late": m_late,
               "amplification_llm": abs(m_late - u) - abs(pm - u)}
        tvds: dict[str, float] = {}
        for lr in ref_learners(c):
            r = ref[(ref["prior"] == src) & (ref["ref_learner"] == lr) & (ref["generation"] >= 1)]
            t = float(r["tvd"].mean()) if len(r) and r["tvd"].notna().all() else np.nan
            name = lr if lr in DIAG else "own"
            row[f"mean_tvd_{name}"] = t
            row[f"mean_tvd_floor_{name}"] = float(r["tvd_floor"].mean()) if len(r) else np.nan
            s = stat[(stat["prior"] == src) & (stat["ref_learner"] == lr)]
            row[f"stationary_mean_{name}"] = float(s["stationary_mean"].iloc[0]) if len(s) else np.nan
            row[f"amplification_{name}"] = float(s["amplification"].iloc[0]) if len(s) else np.nan
            if lr in DIAG and np.isfinite(t):
                tvds[lr] = t
        row["mean_tvd_own"] = row["mean_tvd_" + (c.learner if c.learner in DIAG else "own")]
        row["own_learner"] = c.learner
        row["ref_separation"] = separation(c, src)
        ranked = sorted(tvds, key=lambda lr: tvds[lr])
        row["margin"] = tvds[ranked[1]] - tvds[ranked[0]] if len(ranked) > 1 else np.nan
        row["margin_se"] = margin_se(c, src, ranked[0], ranked[1]) if len(ranked) > 1 else np.nan
        row["best_clear"] = bool(row["margin"] > 2 * row["margin_se"]) if len(ranked) > 1 else False
        if not ranked:
            row["best_learner"] = ""
        elif len(ranked) > 1 and not row["ref_separation"] >= SEP_MIN:
            row["best_learner"] = "indistinguishable"
        else:
            row["best_learner"] = ranked[0]
        rows.append(row)
    return pd.DataFrame(rows)


def prior_table(priors: dict[tuple[str, str], dict[str, Prior]], primary: dict, labels: dict) -> pd.DataFrame:
    rows = []
    for (model, process), by_src in sorted(priors.items()):
        for src, pr in by_src.items():
            row = {"model": model, "process": process, "source": src, "primary": primary[(model, process)] == src,
                   "alpha_sum": float(pr.alpha.sum()), "converged": pr.converged, "at_bound": pr.at_bound,
                   "n_points": pr.n_points, "fitted_on": pr.fitted_on}
            for lab, a in zip(labels[process], pr.alpha):
                row[f"alpha_{lab}"] = float(a)
            row[f"prior_mean_{labels[process][0]}"] = float(pr.alpha[0] / pr.alpha.sum())
            rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- figures
def _fig(inp: FamilyInput, exp: str, conds: list[Condition], primary: dict, what: str) -> Figure:
    """``what`` = "mean" (proportion of the tracked choice) or "entropy" (of the count distribution)."""
    fig, axes = F.grid(len(conds), ncols=3, sharey=(what == "mean"))
    for ax, c in zip(axes, conds):
        x = np.arange(c.G + 1)
        if what == "mean":
            F.band(ax, x, c.k / c.n, **LLM_STYLE)
            ax.set_ylim(0, 1)
        else:
            h = np.asarray(bayes.entropy(empirical_dist(c.k, c.n)), dtype=float)
            assert c.boot is not None   # bootstrapped by the reducer before the figures
            se = count_entropy_se(c.boot) if len(c.k) > 1 else np.zeros(c.G + 1)
            (line,) = ax.plot(x, h, **LLM_STYLE)
            ax.fill_between(x, h - se, h + se, color=line.get_color(), alpha=0.18, lw=0)
        src = primary[(c.store.model, c.process)]
        for lr in ref_learners(c):
            ch, _ = c.refs[(src, lr)]
            if ch is None:
                continue
            name = lr if lr in DIAG else "own"
            lab = f"{lr}{f' τ={c.tau:g}' if lr == 'tempered' else ''}, {src} prior"
            ax.plot(x, ch.mean if what == "mean" else ch.entropy, label=lab, **REF_STYLE[name])
        fin = c.finite.get((src, c.learner))
        if what == "entropy" and fin is not None:
            ax.plot(x, fin[1], color=REF_STYLE[c.learner if c.learner in DIAG else "own"]["color"], lw=0.9,
                    ls=(0, (1, 3)), label=f"own learner, {src} prior: E[plug-in entropy] at N chains")
        ch, _ = c.refs.get(("chain", c.learner), (None, ""))
        if ch is not None and src != "chain":
            ax.plot(x, ch.mean if what == "mean" else ch.entropy, color="grey", lw=1.0, ls="-",
                    label="own learner, chain-fitted prior")
        ax.set_title(f"{c.store.model}\n{c.label}", fontsize=8)
        ax.set_xlabel("generation")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ylab = (f"mean proportion of {conds[0].choice_name(conds[0].track)}" if what == "mean"
            else "entropy of counts (nats)")
    axes[0].set_ylabel(ylab)
    title = ("mean proportion vs generation" if what == "mean" else
             "entropy of the distribution over counts vs generation")
    F.suptitle(fig, f"{exp}: {title} — LLM chains (orange, ± s.e.) vs exact Bayesian reference chains")
    rows = F.legend_below(fig, axes)
    cap = ("LLM: mean over chains ± s.e." if what == "mean" else
           "LLM: plug-in entropy of the empirical count distribution ± bootstrap s.e. (chains resampled)")
    return Figure(F.save(fig, inp.figures_dir, f"chains_{what}_{exp}", rows),
                  f"{exp}: {title}. {cap}; reference chains (same n, init and filter) for sampler, pm and MAP "
                  "learners under the primary prior (and the chain's own learner), grey: own learner under the prior "
                  "fitted to the chain's reads."
                  + (" Sparse dots: the expected plug-in entropy of N draws from the own learner's reference (the "
                     "LLM's plug-in entropy is biased low by the same amount)." if what == "entropy" else ""))


# ---------------------------------------------------------------------------- reducer
def _summary(diag: pd.DataFrame, ptab: pd.DataFrame) -> dict:
    models: dict[str, dict] = {}
    for model, g in diag.groupby("model"):
        m = models.setdefault(str(model), {"priors": {}, "conditions": {}})
        for _, r in ptab[ptab["model"] == model].iterrows():
            m["priors"][f"{r['process']}/{r['source']}"] = {
                k: r[k] for k in ptab.columns if k.startswith("alpha_") or k in ("primary", "at_bound")}
        for _, r in g.iterrows():
            cond = m["conditions"].setdefault(f"{r['experiment']}: {r['condition']}", {})
            cond[r["prior"]] = {"best_learner": r["best_learner"], "mean_tvd_own": r["mean_tvd_own"],
                                "llm_mean_late": r["llm_mean_late"], "prior_mean": r["prior_mean"],
                                "amplification_llm": r["amplification_llm"], "primary": bool(r["primary"])}
    return models


@register_reducer("chains")
def reduce_chains(inp: FamilyInput) -> ReducedFamily:
    conds = [c for st in inp.stores for c in conditions(st)]
    icl = icl_priors(inp)
    priors: dict[tuple[str, str], dict[str, Prior]] = {}
    primary: dict[tuple[str, str], str] = {}
    labels: dict[str, list[str]] = {}
    for key in sorted({(c.store.model, c.process) for c in conds}):
        group = [c for c in conds if (c.store.model, c.process) == key]
        K = group[0].K
        by_src = {}
        if key in icl:
            by_src["icl"] = icl[key]
        by_src["chain"] = chain_prior(group)
        by_src["uniform"] = Prior("uniform", np.ones(K))
        priors[key] = by_src
        primary[key] = "icl" if "icl" in by_src else "uniform"
        labels[key[1]] = group[0].labels
    rng = np.random.default_rng(0)
    gen, ref, stat, sdist, diag = [], [], [], [], []
    for c in conds:
        pr = priors[(c.store.model, c.process)]
        c.boot = bootstrap_dists(c.k, c.n, rng)
        add_references(c, pr, rng)
        gen.append(generation_table(c, pr))
        r = reference_table(c)
        s, sd = stationary_tables(c, pr)
        ref.append(r)
        stat.append(s)
        sdist.append(sd)
        diag.append(diagnostic_table(c, pr, r, s, primary[(c.store.model, c.process)]))
    gen_t, ref_t = pd.concat(gen, ignore_index=True), pd.concat(ref, ignore_index=True)
    stat_t, sdist_t = pd.concat(stat, ignore_index=True), pd.concat(sdist, ignore_index=True)
    diag_t = pd.concat(diag, ignore_index=True)
    ptab = prior_table(priors, primary, labels)

    figs = []
    for exp in sorted({c.store.experiment for c in conds}):
        ce = [c for c in conds if c.store.experiment == exp]
        figs += [_fig(inp, exp, ce, primary, "mean"), _fig(inp, exp, ce, primary, "entropy")]

    fallback = sorted(f"{m} ({p})" for (m, p), s in primary.items() if s == "uniform")
    prim_txt = ("The primary prior is the one the ICL reducer fitted to each model's statement-free ICL curves."
                if not fallback else
                f"No ICL prior for {', '.join(fallback)} in this sweep (it is fitted on statement-free ICL curves "
                "only, never on curves after a bias statement): the primary prior falls back to the uniform "
                "Beta(1, 1) / Dirichlet(1); the prior fitted to the chains' own reads is reported beside it.")
    show = diag_t[diag_t["primary"]][["experiment", "model", "condition", "prior", "n_chains", "prior_mean",
                                      "llm_mean_final", "llm_mean_late", "mean_tvd_sampler", "mean_tvd_pm",
                                      "mean_tvd_map", "mean_tvd_own", "mean_tvd_floor_pm", "ref_separation",
                                      "margin", "margin_se", "best_learner", "best_clear",
                                      "amplification_llm", "amplification_sampler", "amplification_map"]]
    show_chain = diag_t[diag_t["prior"] == "chain"][["experiment", "model", "condition", "alpha_c", "beta_c",
                                                     "mean_tvd_sampler", "mean_tvd_pm", "mean_tvd_map",
                                                     "mean_tvd_own", "ref_separation", "best_learner", "best_clear",
                                                     "amplification_llm"]]
    st_show = stat_t[stat_t["prior"].isin(set(primary.values()))][
        ["experiment", "model", "condition", "prior", "ref_learner", "stationary_mean", "stationary_kind",
         "stationary_entropy", "tvd_llm_late", "note"]]
    bound = sorted(f"{m} ({p}, {s}: α+β = {pr.alpha.sum():.3g})" for (m, p), by in priors.items()
                   for s, pr in by.items() if pr.at_bound and s == primary[(m, p)])
    bound_txt = ("" if not bound else
                 f" The primary prior of {', '.join(bound)} is at the fit's bound: the model barely updates on the "
                 "ICL evidence, so every reference is close to i.i.d. Binomial(n, prior mean) and the learners "
                 "cannot be told apart under it; see the chain-fitted prior.")
    sec = Section("Iterated learning", [
        Text("Each LLM chain passes n outcomes from generation to generation (family `chains`). For the tracked "
             "choice (coin: heads) `k_g` is its count in generation g. The LLM curves are over the N chains of a "
             "condition: mean proportion `k_g / n` (± s.e.) and the entropy (nats) of the empirical distribution of "
             "`k_g` (± bootstrap s.e.). The references are exact Bayesian chains on `k` "
             "(`bayesflip.reference_chains`, same n, init and filter) under a prior fitted to the model. "
             f"{prim_txt}{bound_txt} `tvd` = ½ Σ_k |f_g(k) − π_g(k)| between the LLM's and the reference's "
             "count distributions; "
             "`mean_tvd_*` averages it over generations 1..G and `mean_tvd_floor_*` is what a perfect match would "
             "show with N chains. `best_learner` = the Bayesian learner (sampler / pm / MAP) closest to the LLM "
             f"chain (`indistinguishable` when the three references are within `ref_separation` < {SEP_MIN} of each "
             "other; `margin` = second-best − best mean TVD, `best_clear` = margin > 2 × its bootstrap s.e.). "
             "A reference left out "
             "(shown as —, reason in the `note` column of chains_reference) is e.g. a filter that a learner "
             "could never satisfy from some count. Bias amplification: `|m − ½| − |prior mean − ½|` "
             "(die: ½ → 1/K) with m the LLM's mean over the "
             "last half of the generations (`amplification_llm`) or a reference's stationary mean; ≈ 0 for a "
             "sampler, > 0 for a MAP-like learner that drifts to the prior's mode."),
        Table(ptab, "Priors per model: fitted by the ICL reducer on statement-free ICL curves (icl), fitted to "
                    "the chains' own reads "
                    "(chain: p_t against the counts of data[g]), uniform."),
        Table(show, "Sampler vs MAP diagnostic under the primary prior, per condition."),
        Table(show_chain, "The same under the prior fitted to the chains' own reads."),
        Table(st_show, "Stationary (long-run) distribution of the reference chains under the primary prior, and "
                       "the TVD of the LLM's counts pooled over the last half of the generations to it."),
        *figs,
    ])
    return ReducedFamily(
        tables={"chains_by_generation": gen_t, "chains_reference": ref_t, "chains_stationary": stat_t,
                "chains_stationary_dist": sdist_t, "chains_diagnostic": diag_t, "chains_priors": ptab},
        figures=[f.path for f in figs],
        summary={"models": _summary(diag_t, ptab)},
        sections=[sec],
    )
