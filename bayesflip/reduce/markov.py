"""Reducer of the ``markov`` family (F: in-context learning of a Markov chain's transition row).

Per store (experiment × model), cell and read position i (i = 0..N; the read before state i):

* model distribution ``p_i = softmax(logprobs_i)`` over the S states and off-choice mass
  ``1 − Σ_s exp(logprob_is)`` (:func:`bayesflip.engine.choice_distribution`);
* the true next-state distribution ``r_i`` (the store's ``true_row``: ``π_0`` at i = 0,
  ``P[x_{i−1}]`` at i ≥ 1);
* ``TVD(p_i, r_i) = ½ Σ_s |p_is − r_is|`` and ``KL(r_i ‖ p_i)`` (nats, the true row first);
* a reference in-context learner: independent Dirichlet(1) priors on the rows of P, so
  ``b_i = (1 + n_{x_{i−1}, s}) / (S + Σ_s' n_{x_{i−1}, s'})`` with ``n_{a, s}`` the number of
  transitions a → s among x_0..x_{i−1} (:func:`bayesflip.bayes.dirichlet_predictive`); ``b_0``
  = uniform. ``TVD(b_i, r_i)`` is how fast an ideal learner approaches the true row, and
  ``TVD(p_i, b_i)`` how far the model is from it;
* summary: early = mean over positions 1..q, late = mean over positions N − q + 1..N,
  q = max(1, ⌊N / 4⌋).

Two aggregations of the TVD to the true row, side by side and named apart:

* ``tvd_traj`` (bayesflip's): the mean over trajectories of each trajectory's TVD(p_i, r_i) at a
  position, the current states pooled (``tvd_true`` per cell; ``tvd_traj_early`` / ``_late``);
* ``tvd_paper`` (the coin-flip study's, ``analysis/explore_mdp.ipynb`` cell 4;
  :func:`mean_prediction_tvd`): per matrix, current state a and position i ≥ 1 (the study's local
  index i − 1), the model distributions of the trajectories whose state x_(i−1) is a are **averaged
  first**, then one TVD against the row P[a]; by position, the mean over the (matrix, state) groups
  present there (the non-uniform notebook averages its four state curves); ``tvd_paper_early`` /
  ``_late`` average that curve over the windows. The study's ``explore_mdp_nonuniform.ipynb`` scored
  every non-uniform matrix against ``simple_mdp``'s rows; here every group is scored against its own
  matrix.

By Jensen the TVD of the mean is ≤ the mean TVD within a group; they are equal for groups of one
trajectory. Table ``markov_paper_curves``: one row per (matrix, state, position) group with both.

Tables group by ``kind``: the generated kinds (uniform, sticky, random — the random matrices
pooled) by kind, every named / non-uniform / custom matrix by its ``matrix_name`` (the cell
coordinate; ``matrix`` is the stored transition-matrix array).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import bayes
from ..engine import choice_distribution
from . import figures as F
from .base import Figure, FamilyInput, ReducedFamily, Section, Table, Text, register_reducer
from .load import StoreData

POOLED_KINDS = ("uniform", "sticky", "random")
METRICS = ["tvd_true", "kl_true", "tvd_bayes", "tvd_bayes_true", "off_choice_mass", "p_next"]


def transition_learner(states: np.ndarray, n_states: int) -> np.ndarray:
    """(N+1, S) predictive of the Dirichlet(1)-per-row transition learner for one trajectory (see module doc)."""
    x = np.asarray(states, dtype=np.int64)
    n = len(x)
    counts = np.zeros((n_states, n_states))
    out = np.full((n + 1, n_states), 1.0 / n_states)
    for i in range(1, n + 1):
        if i >= 2:
            counts[x[i - 2], x[i - 1]] += 1.0
        out[i] = bayes.dirichlet_predictive(counts[x[i - 1]], 1.0)
    return out


def early_late(n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the early (1..q) and late (N − q + 1..N) windows, q = max(1, ⌊N/4⌋)."""
    q = max(1, n_steps // 4)
    return np.arange(1, q + 1), np.arange(n_steps - q + 1, n_steps + 1)


def mean_prediction_tvd(probs: np.ndarray, true: np.ndarray, states: np.ndarray):
    """The study's Markov metric for the C trajectories of **one** matrix (``explore_mdp.ipynb``, cell 4).

    ``probs`` (C, N+1, S): model next-state distributions, read i after states x_0..x_(i−1);
    ``true`` (C, N+1, S): the true rows; ``states`` (C, N): the trajectories. For current state a and
    position i = 1..N, with G(a, i) = {c : x_(c, i−1) = a}:

        p̄(a, i) = (1/|G|) Σ_(c∈G) probs[c, i],   tvd_paper(a, i) = ½ Σ_s |p̄(a, i)_s − r̄(a, i)_s|,
        tvd_traj(a, i) = (1/|G|) Σ_(c∈G) ½ Σ_s |probs[c, i, s] − true[c, i, s]|

    with r̄(a, i) the mean of ``true[c, i]`` over G (= P[a], the same row for every c). Returns
    ``(tvd_paper, tvd_traj, count)``, each (N, S) indexed [i − 1, a]; NaN where G(a, i) is empty.
    """
    probs = np.asarray(probs, dtype=np.float64)[:, 1:]
    true = np.asarray(true, dtype=np.float64)[:, 1:]
    S = probs.shape[-1]
    onehot = np.eye(S)[np.asarray(states, dtype=np.int64)]            # (C, N, a)
    count = onehot.sum(axis=0)                                         # (N, a)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.einsum("cna,cns->nas", onehot, probs) / count[..., None]
        mean_r = np.einsum("cna,cns->nas", onehot, true) / count[..., None]
        per = 0.5 * np.abs(probs - true).sum(axis=-1)                  # (C, N)
        traj = np.einsum("cna,cn->na", onehot, per) / count
    paper = 0.5 * np.abs(mean_p - mean_r).sum(axis=-1)
    empty = count == 0
    return np.where(empty, np.nan, paper), np.where(empty, np.nan, traj), count.astype(np.int64)


def _paper_table(st: StoreData) -> pd.DataFrame:
    """One row per (matrix, current state, position ≥ 1) group: the study's tvd_paper and tvd_traj."""
    probs, _ = choice_distribution(st.arrays["logprobs"])
    true = st.arrays["true_row"]
    states = st.arrays["states"].astype(np.int64)
    cells = st.cells
    kind = cells["kind"].astype(str).to_numpy()
    name = cells["matrix_name"].astype(str).to_numpy() if "matrix_name" in cells else kind
    labels = [str(x).strip() for x in st.labels["state"]]
    frames = []
    for nm in dict.fromkeys(name):
        sel = np.flatnonzero(name == nm)
        paper, traj, count = mean_prediction_tvd(probs[sel], true[sel], states[sel])
        n, a = np.nonzero(count)
        k = kind[sel[0]]
        frames.append(pd.DataFrame({
            "experiment": st.experiment, "model": st.model, "kind": k if k in POOLED_KINDS else nm,
            "matrix_name": nm, "state": np.asarray(labels, dtype=object)[a], "position": n + 1,
            "n_traj": count[n, a], "tvd_paper": paper[n, a], "tvd_traj": traj[n, a]}))
    return pd.concat(frames, ignore_index=True)


def _curve_table(st: StoreData) -> pd.DataFrame:
    probs, off = choice_distribution(st.arrays["logprobs"])      # (C, P, S)
    true = st.arrays["true_row"].astype(np.float64)
    states = st.arrays["states"].astype(np.int64)
    C, P, S = probs.shape
    bayes_ref = np.stack([transition_learner(x, S) for x in states])
    nxt = np.concatenate([states, np.full((C, 1), -1)], axis=1)  # the state that followed read i (−1 after the last)
    p_next = np.where(nxt >= 0, np.take_along_axis(probs, np.clip(nxt, 0, None)[..., None], axis=2)[..., 0], np.nan)
    prev = np.concatenate([np.full((C, 1), -1), states], axis=1)
    cells = st.cells
    kind = cells["kind"].astype(str).to_numpy()
    name = (cells["matrix_name"].astype(str).to_numpy() if "matrix_name" in cells
            else kind)  # stores written before the rename carry an integer "matrix" index
    # group label: the generated kinds pool their matrices; named / non-uniform / custom matrices stand alone
    group = np.where(np.isin(kind, list(POOLED_KINDS)), kind, name)
    return pd.DataFrame({
        "experiment": st.experiment, "model": st.model,
        "kind": np.repeat(group, P),
        "matrix_name": np.repeat(name, P),
        "sample": np.repeat(cells["sample"].to_numpy(dtype=int), P),
        "cell": np.repeat(cells["cell"].to_numpy(dtype=int), P),
        "position": np.tile(np.arange(P), C), "prev_state": prev.reshape(-1), "next_state": nxt.reshape(-1),
        "tvd_true": np.asarray(bayes.tvd(probs, true)).reshape(-1),
        "kl_true": np.asarray(bayes.kl(true, probs)).reshape(-1),
        "tvd_bayes": np.asarray(bayes.tvd(probs, bayes_ref)).reshape(-1),
        "tvd_bayes_true": np.asarray(bayes.tvd(bayes_ref, true)).reshape(-1),
        "off_choice_mass": off.reshape(-1), "p_next": p_next.reshape(-1),
    })


def _paper_curve(paper: pd.DataFrame, by: list[str]) -> pd.Series:
    """tvd_paper by position: the mean over the (matrix, state) groups present at that position."""
    return paper.groupby(by + ["position"], sort=True)["tvd_paper"].mean()


def _by_position(curves: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Mean per (experiment, model, kind, position) of every metric, with the s.e. of tvd_true, and the
    study's tvd_paper curve (NaN at position 0, which the study did not read)."""
    by = ["experiment", "model", "kind", "position"]
    g = curves.groupby(by, sort=True)
    out = g[METRICS].mean()
    out.insert(1, "tvd_true_se", g["tvd_true"].std(ddof=1) / np.sqrt(g.size()))
    out.insert(2, "tvd_paper", _paper_curve(paper, by[:-1]).reindex(out.index))
    out["n_cells"] = g.size()
    return out.reset_index()


def _summary_table(curves: pd.DataFrame, paper: pd.DataFrame, n_steps: dict[str, int]) -> pd.DataFrame:
    rows = []
    for (exp, m), g in curves.groupby(["experiment", "model"], sort=True):
        early, late = early_late(n_steps[exp])
        gp = paper[(paper["experiment"] == exp) & (paper["model"] == m)]
        for kind, gk in [("all", g)] + list(g.groupby("kind", sort=True)):
            e, la = gk[gk["position"].isin(early)], gk[gk["position"].isin(late)]
            pc = _paper_curve(gp if kind == "all" else gp[gp["kind"] == kind], [])
            rows.append({"experiment": exp, "model": m, "kind": kind, "n_cells": int(gk["cell"].nunique()),
                         "early_positions": f"{early[0]}-{early[-1]}", "late_positions": f"{late[0]}-{late[-1]}",
                         "tvd_paper_early": float(pc[pc.index.isin(early)].mean()),
                         "tvd_paper_late": float(pc[pc.index.isin(late)].mean()),
                         "tvd_traj_early": float(e["tvd_true"].mean()), "tvd_traj_late": float(la["tvd_true"].mean()),
                         "bayes_tvd_early": float(e["tvd_bayes_true"].mean()),
                         "bayes_tvd_late": float(la["tvd_bayes_true"].mean()),
                         "kl_early": float(e["kl_true"].mean()), "kl_late": float(la["kl_true"].mean()),
                         "tvd_to_bayes": float(gk[gk["position"] >= 1]["tvd_bayes"].mean()),
                         "off_choice_mass": float(gk["off_choice_mass"].mean())})
    return pd.DataFrame(rows)


def _fig_tvd(inp: FamilyInput, exp: str, curves: pd.DataFrame, pos: pd.DataFrame) -> Figure:
    d = curves[curves["experiment"] == exp]
    dp = pos[pos["experiment"] == exp]
    models = sorted(d["model"].unique())
    kinds = sorted(d["kind"].unique(), key=lambda k: (POOLED_KINDS.index(k), k) if k in POOLED_KINDS else (9, k))
    cmap = F.plt.get_cmap("tab10")
    fig, axes = F.grid(len(models), ncols=3)
    for ax, m in zip(axes, models):
        for j, kind in enumerate(kinds):
            g = d[(d["model"] == m) & (d["kind"] == kind)]
            wide = g.pivot(index="cell", columns="position", values="tvd_true")
            F.band(ax, wide.columns.to_numpy(), wide.to_numpy(), color=cmap(j), lw=1.8, label=f"model, {kind}")
            ref = g.groupby("position")["tvd_bayes_true"].mean()
            ax.plot(ref.index, ref.to_numpy(), color=cmap(j), lw=1.1, ls="--",
                    label=f"Dirichlet(1) transition learner, {kind}")
            pk = dp[(dp["model"] == m) & (dp["kind"] == kind)]
            ax.plot(pk["position"], pk["tvd_paper"], color=cmap(j), lw=1.1, ls=":",
                    label=f"TVD of the mean prediction (study's metric), {kind}")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("position i (states seen)")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("TVD(next-state dist., true row)")
    F.suptitle(fig, f"{exp}: TVD to the true transition row vs position, per matrix kind "
                    "(model solid, mean ± s.e. over cells; ideal learner dashed; study's metric dotted)")
    rows = F.legend_below(fig, axes, ncol=2)
    return Figure(F.save(fig, inp.figures_dir, f"markov_tvd_{exp}", rows),
                  f"{exp}: TVD between the model's next-state distribution and the true transition row P[x_(i−1)] "
                  "vs the number of states seen, per matrix kind. Solid with band: bayesflip's per-trajectory mean "
                  "TVD (± one standard error over cells); dotted: the study's metric (TVD of the prediction averaged "
                  "over the trajectories in the same state at that position, mean over states); dashed: the "
                  "per-trajectory TVD of a Bayesian learner with Dirichlet(1) priors on the rows.")


def _models_summary(summ: pd.DataFrame) -> dict:
    models: dict[str, dict] = {}
    for r in summ.itertuples(index=False):
        models.setdefault(r.model, {}).setdefault(r.experiment, {})[r.kind] = {
            "tvd_paper_early": r.tvd_paper_early, "tvd_paper_late": r.tvd_paper_late,
            "tvd_traj_early": r.tvd_traj_early, "tvd_traj_late": r.tvd_traj_late, "bayes_tvd_early": r.bayes_tvd_early,
            "bayes_tvd_late": r.bayes_tvd_late, "tvd_to_bayes": r.tvd_to_bayes, "n_cells": r.n_cells}
    return models


@register_reducer("markov")
def reduce_markov(inp: FamilyInput) -> ReducedFamily:
    curves = pd.concat([_curve_table(st) for st in inp.stores], ignore_index=True)
    paper = pd.concat([_paper_table(st) for st in inp.stores], ignore_index=True)
    n_steps = {st.experiment: int(st.arrays["states"].shape[1]) for st in inp.stores}
    pos = _by_position(curves, paper)
    summ = _summary_table(curves, paper, n_steps)
    figs = [_fig_tvd(inp, exp, curves, pos) for exp in sorted(curves["experiment"].unique())]
    section = Section("Markov chains", [
        Text("At every position i of a trajectory the model's next-state distribution p_i (softmax over the state "
             "tokens) is compared with the true transition row r_i = P[x_(i−1)] (π_0 at i = 0): "
             "`TVD = ½ Σ|p − r|`, `KL(r ‖ p)` in nats. Two aggregations over trajectories are reported side by side: "
             "**tvd_paper** is the coin-flip study's metric (`explore_mdp.ipynb`): the predictions of all "
             "trajectories in the same current state at the same position are averaged first, then one TVD to "
             "that state's row, then the mean over states; **tvd_traj** is bayesflip's mean of the per-trajectory "
             "TVDs (states pooled). Averaging first cancels trajectory-to-trajectory scatter, so tvd_paper ≤ "
             "tvd_traj within a group; they agree for groups of one trajectory. Reference: a Bayesian learner with "
             "a Dirichlet(1) prior on every row, predicting `(1 + n_(a,s)) / (S + n_a)` from the transitions a → s "
             "seen so far. Early = positions 1..q, late = positions N − q + 1..N with q = max(1, ⌊N/4⌋)."),
        Table(summ, "TVD / KL to the true row in the early and late windows, per matrix kind ('all' pools the "
                    "kinds): tvd_paper_* = the study's metric (TVD of the mean prediction per state and position), "
                    "tvd_traj_* = bayesflip's mean per-trajectory TVD; bayes_* = the Dirichlet(1) learner "
                    "(per trajectory); tvd_to_bayes = mean TVD(model, learner)."),
        *figs,
    ])
    return ReducedFamily(
        tables={"markov_curves": curves, "markov_by_position": pos, "markov_summary": summ,
                "markov_paper_curves": paper},
        figures=[f.path for f in figs],
        summary={"models": _models_summary(summ)},
        sections=[section],
    )
