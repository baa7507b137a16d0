"""Reducer of the ``attention`` family (G: attention mass of the read position vs the Bayesian error).

Per store (experiment × model), cell, layer set and read position n (n outcomes seen):

* the stored attention masses ``mass(n, K)`` on every key group K (outcomes, heads_outcomes /
  tails_outcomes, recent_k, prompt, separators; see :mod:`bayesflip.experiments.attention`) and
  two derived shares, defined for n ≥ 1 where ``mass(outcomes) > 0``:
  ``heads_share = mass(heads_outcomes) / mass(outcomes)`` (coin) and
  ``recent_share = mass(recent_k) / mass(outcomes)``;
* the model distribution ``p_n = softmax(logprobs_n)`` (:func:`bayesflip.engine.choice_distribution`)
  and the uniform-prior posterior predictive ``q_n = (1 + c_n) / (K + n)`` with ``c_n`` the counts of
  the n seen outcomes (:func:`bayesflip.bayes.dirichlet_predictive`; coin: ``(1 + h) / (2 + n)``);
* the Bayesian error ``e_n = TVD(p_n, q_n) = ½ Σ_c |p_nc − q_nc|`` (coin: ``|p_n(heads) − q_n(heads)|``)
  and the signed error of the tracked choice ``p_n(c*) − q_n(c*)`` (heads; the biased face);
* per (layer set, measure): Pearson r and Spearman ρ (:mod:`scipy.stats`) between the measure and
  ``e_n`` over all (cell, n ≥ 1) points ("pooled"), and the same on the residuals after subtracting
  each position's mean over cells from both ("within position"; removes the shared trend in n, since
  both the mass on outcomes and the error change with n), and Pearson r on the residuals from each
  (θ, position) mean ("within θ"; the generating θ drives both the heads mass and, for a model with a
  fixed bias, the error; NaN with one sample per θ).

Stores with ``attn_max`` (the coin-flip study's metric: per key, max over heads then over the layers
of the set; summed over the group) add one measure ``max_<group>`` per group, reduced and
correlated exactly like the mean masses (the mass figure shows the mean masses only).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .. import bayes
from ..engine import choice_distribution
from . import figures as F
from .base import Figure, FamilyInput, ReducedFamily, Section, Table, Text, register_reducer
from .load import StoreData

DERIVED = ("heads_share", "recent_share")
MAX = "max_"  # prefix of the attn_max measures


def _labels(st: StoreData, dim: str) -> list[str]:
    return [str(x).strip() for x in st.labels[dim]]


def _points(st: StoreData) -> pd.DataFrame:
    """Long table: one row per (cell, layer set, read position) with every measure and the Bayesian error."""
    mass = st.arrays["mass"].astype(np.float64)                  # (C, L, R, G)
    C, L, R, G = mass.shape
    groups, sets = _labels(st, "group"), _labels(st, "layer_set")
    n_seen = np.asarray(st.labels["position"], dtype=np.int64)    # read index = outcomes seen
    outcomes = st.arrays["outcomes"].astype(np.int64)
    probs, off = choice_distribution(st.arrays["logprobs"])      # (C, R, K)
    K = probs.shape[-1]
    seen = np.concatenate([np.zeros((C, 1, K)), np.cumsum(np.eye(K)[outcomes], axis=1)], axis=1)[:, n_seen]
    q = bayes.dirichlet_predictive(seen, 1.0)                     # (C, R, K)
    err = np.asarray(bayes.tvd(probs, q))                         # (C, R)
    cells = st.cells
    process = str(st.params.get("process", "coin"))
    track = (cells["face"].to_numpy(dtype=np.int64) - 1 if process == "die" and "face" in cells
             else np.zeros(C, dtype=np.int64))
    pt = np.take_along_axis(probs, track[:, None, None], axis=2)[..., 0]
    qt = np.take_along_axis(q, track[:, None, None], axis=2)[..., 0]
    lr = st.arrays["layer_range"][0]

    def rep(a):  # (C, R) -> (C, L, R) flattened
        return np.broadcast_to(np.asarray(a)[:, None, :], (C, L, R)).reshape(-1)

    df = pd.DataFrame({
        "experiment": st.experiment, "model": st.model, "process": process,
        "cell": np.repeat(cells["cell"].to_numpy(dtype=int), L * R),
        "theta": np.repeat(cells["theta"].to_numpy(dtype=float), L * R),
        "sample": np.repeat(cells["sample"].to_numpy(dtype=int), L * R),
        "layer_set": np.tile(np.repeat(sets, R), C),
        "layers": np.tile(np.repeat([f"{int(a)}-{int(b) - 1}" for a, b in lr], R), C),
        "position": np.tile(n_seen, C * L),
        "p_model": rep(pt), "p_uniform": rep(qt), "error": rep(err), "error_signed": rep(pt - qt),
        "off_choice_mass": rep(off),
    })
    for gi, g in enumerate(groups):
        df[g] = mass[..., gi].reshape(-1)
    if "attn_max" in st.arrays:  # the coin-flip study's max-over-heads-then-layers metric, per group
        amax = st.arrays["attn_max"].astype(np.float64)
        for gi, g in enumerate(groups):
            df[MAX + g] = amax[..., gi].reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tot = df["outcomes"].to_numpy() if "outcomes" in df else None
        if tot is not None and "heads_outcomes" in df:
            df["heads_share"] = np.where(tot > 0, df["heads_outcomes"] / tot, np.nan)
        rk = next((g for g in groups if g.startswith("recent_")), None)
        if tot is not None and rk is not None:
            df["recent_share"] = np.where(tot > 0, df[rk] / tot, np.nan)
    return df


def measures(points: pd.DataFrame) -> list[str]:
    """The mass / share columns of a points table, in a fixed order."""
    fixed = ["experiment", "model", "process", "cell", "theta", "sample", "layer_set", "layers", "position",
             "p_model", "p_uniform", "error", "error_signed", "off_choice_mass"]
    return [c for c in points.columns if c not in fixed]


def _mass_table(points: pd.DataFrame) -> pd.DataFrame:
    """Mean / std over cells per (experiment, model, layer set, position, measure)."""
    ms = measures(points)
    long = points.melt(id_vars=["experiment", "model", "layer_set", "layers", "position"], value_vars=ms,
                       var_name="measure", value_name="value")
    g = long.groupby(["experiment", "model", "layer_set", "layers", "measure", "position"], sort=False)["value"]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n_cells": g.count()}).reset_index()


def _corr(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """(Pearson r, p, Spearman ρ, p) over the finite pairs; NaN when either side is constant or n < 3."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan, np.nan, np.nan
    pr, sr = stats.pearsonr(x, y), stats.spearmanr(x, y)
    return float(pr.statistic), float(pr.pvalue), float(sr.statistic), float(sr.pvalue)


def _corr_table(points: pd.DataFrame) -> pd.DataFrame:
    rows = []
    pts = points[points["position"] >= 1]
    for (exp, m, ls), g in pts.groupby(["experiment", "model", "layer_set"], sort=False):
        err = g["error"].to_numpy(float)
        by_n, by_tn = g.groupby("position"), g.groupby(["theta", "position"])
        err_n = err - by_n["error"].transform("mean").to_numpy(float)
        err_tn = err - by_tn["error"].transform("mean").to_numpy(float)
        for meas in measures(points):
            x = g[meas].to_numpy(float)
            r, rp, rho, rhop = _corr(x, err)
            wr, wrp, wrho, wrhop = _corr(x - by_n[meas].transform("mean").to_numpy(float), err_n)
            tr, trp, _, _ = _corr(x - by_tn[meas].transform("mean").to_numpy(float), err_tn)
            rows.append({"experiment": exp, "model": m, "layer_set": ls, "layers": g["layers"].iloc[0],
                         "measure": meas, "n_points": int(np.isfinite(x).sum()), "pearson_r": r, "pearson_p": rp,
                         "spearman_rho": rho, "spearman_p": rhop, "within_pearson_r": wr, "within_pearson_p": wrp,
                         "within_spearman_rho": wrho, "within_spearman_p": wrhop,
                         "within_theta_pearson_r": tr, "within_theta_pearson_p": trp})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- figures
def _fig_mass(inp: FamilyInput, exp: str, points: pd.DataFrame) -> Figure:
    d = points[points["experiment"] == exp]
    models = sorted(d["model"].unique())
    sets = list(dict.fromkeys(d["layer_set"]))
    groups = [g for g in measures(d) if g not in DERIVED and not g.startswith(MAX)]
    cmap = F.plt.get_cmap("tab10")
    fig, axes = F.grid(len(models) * len(sets), ncols=len(sets), squeeze_cols=False, panel=(3.6, 2.8))
    for i, m in enumerate(models):
        for j, ls in enumerate(sets):
            ax = axes[i * len(sets) + j]
            g = d[(d["model"] == m) & (d["layer_set"] == ls)]
            for k, grp in enumerate(groups):
                wide = g.pivot(index="cell", columns="position", values=grp)
                F.band(ax, wide.columns.to_numpy(), wide.to_numpy(), color=cmap(k), lw=1.5, label=grp)
            ax.set_title(f"{m}\nlayer set {ls} (layers {g['layers'].iloc[0]})", fontsize=8)
            ax.set_xlabel("n = outcomes seen")
            ax.set_ylim(0, 1)
        axes[i * len(sets)].set_ylabel("attention mass")
    F.suptitle(fig, f"{exp}: attention mass of the read position on each key group vs n, per layer set "
                    "(mean ± s.e. over cells)")
    rows = F.legend_below(fig, axes, ncol=len(groups))
    return Figure(F.save(fig, inp.figures_dir, f"attention_mass_{exp}", rows),
                  f"{exp}: attention mass (mean over the layers of the set and over heads) from the read position "
                  "after n outcomes onto each key group, mean ± s.e. over cells.")


def _scatter_measures(d: pd.DataFrame) -> list[str]:
    ms = measures(d)
    out = [m for m in ms if m.startswith("recent_") and not m.endswith("share")]
    out += [m for m in ("heads_outcomes", "outcomes") if m in ms]
    return out or ms[:1]


def corr_title(layer_set: str, c) -> str:
    """Panel title: pooled r and ρ, then r within n and within (θ, n); an undefined r (constant side, fewer
    than three points, one cell per θ) is left out and named."""
    def r(v) -> str | None:
        return None if v is None or not np.isfinite(v) else f"{v:.2f}"

    first = [f"{k} = {v}" for k, v in (("r", r(c["pearson_r"])), ("ρ", r(c["spearman_rho"]))) if v is not None]
    second = [f"{k}: r = {v}" for k, v in (("within n", r(c["within_pearson_r"])),
                                            ("within θ, n", r(c["within_theta_pearson_r"]))) if v is not None]
    undefined = [k for k, v in (("pooled", c["pearson_r"]), ("within n", c["within_pearson_r"]),
                                ("within θ, n", c["within_theta_pearson_r"])) if r(v) is None]
    if undefined:
        second.append(f"{', '.join(undefined)}: undefined")
    return f"{layer_set}: {', '.join(first) or 'r undefined'}\n{'; '.join(second)}"


def _fig_scatter(inp: FamilyInput, exp: str, model: str, points: pd.DataFrame, corr: pd.DataFrame) -> Figure:
    d = points[(points["experiment"] == exp) & (points["model"] == model) & (points["position"] >= 1)]
    sets = list(dict.fromkeys(d["layer_set"]))
    meas = _scatter_measures(d)
    fig, axes = F.grid(len(meas) * len(sets), ncols=len(sets), squeeze_cols=False, panel=(3.4, 2.9), sharey=True)
    sc = None
    vmax = float(d["position"].max())
    for i, ms in enumerate(meas):
        for j, ls in enumerate(sets):
            ax = axes[i * len(sets) + j]
            g = d[d["layer_set"] == ls]
            sc = ax.scatter(g[ms], g["error"], c=g["position"], cmap="viridis", vmin=1, vmax=vmax, s=7, alpha=0.7)
            c = corr[(corr["experiment"] == exp) & (corr["model"] == model) & (corr["layer_set"] == ls)
                     & (corr["measure"] == ms)].iloc[0]
            ax.set_title(corr_title(ls, c), fontsize=8)
            ax.set_xlabel(f"mass on {ms}", fontsize=8)
        axes[i * len(sets)].set_ylabel("|p_model − Bayes (uniform)|", fontsize=8)
    h = fig.get_figheight()
    top = 1 - 1.1 / h
    fig.subplots_adjust(top=top, bottom=0.55 / h + 0.05, left=0.07, right=0.88, hspace=0.75, wspace=0.25)
    if sc is not None:
        cax = fig.add_axes((0.9, 0.55 / h + 0.05, 0.015, top - 0.55 / h - 0.05))
        fig.colorbar(sc, cax=cax, label="n = outcomes seen")
    F.suptitle(fig, f"{exp} ({model}): attention mass vs Bayesian error |p_model(heads) − uniform-prior posterior "
                    "predictive| at the same read positions (n ≥ 1), per layer set")
    out = inp.figures_dir
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{F.slug(f'attention_scatter_{exp}_{model}')}.png"
    fig.savefig(png, dpi=110)
    fig.savefig(png.with_suffix(".pdf"))
    F.plt.close(fig)
    return Figure(png, f"{exp}, {model}: each dot is one (cell, read position n ≥ 1); x = attention mass on the "
                       "key group, y = Bayesian error TVD(p_model, (1 + c) / (K + n)); colour = n. Titles: pooled "
                       "Pearson r and Spearman ρ, and Pearson r within position (position means removed) and within "
                       "(θ, position); a correlation is 'undefined' when one side is constant, there are fewer than "
                       "three points, or (within θ, n) each θ has a single cell.")


# ---------------------------------------------------------------------------- reducer
def _models_summary(points: pd.DataFrame, corr: pd.DataFrame) -> dict:
    models: dict[str, dict] = {}
    pts = points[points["position"] >= 1]
    for (exp, m), g in pts.groupby(["experiment", "model"], sort=True):
        ent: dict[str, Any] = {"mean_error": float(g.drop_duplicates(["cell", "position"])["error"].mean()),
               "mean_outcome_mass": ({ls: float(gl["outcomes"].mean()) for ls, gl in g.groupby("layer_set")}
                                     if "outcomes" in g else {}),
               "correlation": {}}
        for r in corr[(corr["experiment"] == exp) & (corr["model"] == m)].itertuples(index=False):
            ent["correlation"].setdefault(r.layer_set, {})[r.measure] = {
                "pearson_r": r.pearson_r, "spearman_rho": r.spearman_rho, "within_pearson_r": r.within_pearson_r}
        models.setdefault(m, {})[exp] = ent
    return models


@register_reducer("attention")
def reduce_attention(inp: FamilyInput) -> ReducedFamily:
    points = pd.concat([_points(st) for st in inp.stores], ignore_index=True)
    mass = _mass_table(points)
    corr = _corr_table(points)
    figs: list[Figure] = []
    for exp in sorted(points["experiment"].unique()):
        figs.append(_fig_mass(inp, exp, points))
        for m in sorted(points.loc[points["experiment"] == exp, "model"].unique()):
            figs.append(_fig_scatter(inp, exp, m, points, corr))
    overview = (mass[(mass["measure"] == "outcomes")].groupby(["experiment", "model", "layer_set", "layers"],
                                                               sort=False)["mean"].agg(["mean", "max"])
                .rename(columns={"mean": "mean over n", "max": "max over n"}).reset_index()
                if (mass["measure"] == "outcomes").any() else pd.DataFrame())
    shown = _scatter_measures(points) + list(DERIVED)
    show = corr[corr["measure"].isin(shown + [MAX + m for m in shown])]
    section = Section("Attention", [
        Text("The attention mass of the read position after n outcomes on each key group (mean over the heads and "
             "the layers of a layer set) is compared with the Bayesian error at the same position, "
             "`e_n = TVD(p_n, q_n)` with `q_n = (1 + c_n) / (K + n)` the uniform-prior posterior predictive "
             "(coin: `|p_n(heads) − (1 + h) / (2 + n)|`). Pearson r and Spearman ρ are over all (cell, n ≥ 1) "
             "points; 'within' removes each position's mean over cells from both sides first, so a common trend "
             "in n does not count; 'within θ' removes each (θ, n) mean, so neither a trend in n nor the "
             "generating θ (which drives both the mass on heads and a biased model's error) counts. heads_share = "
             "mass on heads outcomes / mass on all outcomes; recent_share = mass on the last k outcomes / mass "
             "on all outcomes."),
        *([Table(overview, "Attention mass on all outcome tokens, mean over cells, then mean / max over n.")]
          if len(overview) else []),
        Table(show, "Correlation of attention measures with the Bayesian error (full table: attention_correlation).",
              max_rows=80),
        *figs,
    ])
    return ReducedFamily(
        tables={"attention_points": points, "attention_mass": mass, "attention_correlation": corr},
        figures=[f.path for f in figs],
        summary={"models": _models_summary(points, corr)},
        sections=[section],
    )
