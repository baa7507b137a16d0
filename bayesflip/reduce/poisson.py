"""Reducer of the ``poisson`` family (E: does generated text carry markers at rate λ per word gap?).

Per store (experiment × model; ``mode`` = explicit or icl from the store's config; ``temperature`` =
its sampling temperature, ``protocol: paper`` defaults filled in) and cell (marker, λ, sample) the
family stored the counts of the analysed text (see
:mod:`bayesflip.experiments.poisson`): ``n_markers`` (markers between the first and last word),
``n_attached`` (those sharing a whitespace token with a word), ``n_gaps`` (words − 1). Over the
samples s of one condition (marker, λ) — or of all markers at one λ (marker ``all``):

* pooled ``λ̂ = Σ_s n_markers,s / Σ_s n_gaps,s`` (NaN if ``Σ n_gaps = 0``);
* attached markers excluded: ``λ̂_excl = Σ_s (n_markers,s − n_attached,s) / Σ_s n_gaps,s``;
* mean ± std (ddof = 1) over samples of the per-sample ``λ̂_s = n_markers,s / n_gaps,s`` (samples
  with ``n_gaps = 0`` have no λ̂ and are left out; ``n_no_gaps`` counts them);
* Poisson standard error of the pooled estimate under the stated rate, ``se = √(λ / Σ n_gaps)``,
  and ``z = (λ̂ − λ) / se`` (NaN for λ = 0);
* icl only: the prefix's own pooled rate ``Σ prefix_n_markers / Σ prefix_n_gaps`` (the realised
  rate of the stimulus, which scatters around λ).

Per store: least-squares line ``λ̂ = a λ + c`` (``numpy.polyfit``, degree 1) through the
per-(marker, λ) pooled points, and their Pearson correlation ``r`` (NaN with fewer than two
distinct λ); the same for ``λ̂_excl``; icl also the line of the per-sample ``λ̂_s`` on the
prefix's own ``λ̂`` of the same cell. A perfect simulator has slope 1, intercept 0.

``protocol: paper`` stores hold the coin-flip study's counts in the same arrays (``n_markers`` =
every marker character of the continuation, ``n_gaps`` = its words once the markers are removed),
so the same formulas give the paper's λ̂ = count(marker) / words; their icl cells carry the story
length ``prefix_words``, which becomes part of the mode (``icl_100w``, ``icl_250w``, ...).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..experiments.poisson import PoissonParams
from . import figures as F
from .base import Figure, FamilyInput, ReducedFamily, Section, Table, Text, protocol_of, register_reducer
from .load import StoreData

KEY = ["experiment", "model", "mode"]
ALL = "all"


# ---------------------------------------------------------------------------- tables
def sample_table(st: StoreData) -> pd.DataFrame:
    """One row per trusted cell: coords, the stored counts, per-sample λ̂ and λ̂ with attached markers excluded."""
    a, c = st.arrays, st.cells
    mode = str(st.params.get("mode", "explicit"))
    modes = np.full(len(c), mode, dtype=object)
    if "prefix_words" in c:  # paper protocol, icl: one condition per story length ("icl_100w", ...)
        modes = np.array([f"{mode}_{int(n)}w" for n in c["prefix_words"].to_numpy()], dtype=object)
    gaps = a["n_gaps"].astype(np.int64)
    markers = a["n_markers"].astype(np.int64)
    attached = a["n_attached"].astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        excl = np.where(gaps > 0, (markers - attached) / np.maximum(gaps, 1), np.nan)
        lhat = np.where(gaps > 0, markers / np.maximum(gaps, 1), np.nan)
    df = pd.DataFrame({
        "experiment": st.experiment, "model": st.model, "protocol": protocol_of(st), "mode": modes,
        "temperature": _temperature(st),
        "cell": c["cell"].to_numpy(), "marker": c["marker"].astype(str).to_numpy(),
        "lam": c["lam"].to_numpy(dtype=float), "sample": c["sample"].to_numpy(),
        "n_markers": markers, "n_attached": attached, "n_gaps": gaps,
        "lambda_hat": lhat, "lambda_hat_excl_attached": excl,
        "n_tokens": a["n_tokens"].astype(np.int64),
    })
    if mode == "icl":
        df["prefix_n_markers"] = a["prefix_n_markers"].astype(np.int64)
        df["prefix_n_gaps"] = a["prefix_n_gaps"].astype(np.int64)
        df["prefix_lambda_hat"] = a["prefix_lambda_hat"].astype(float)
    df["text"] = [str(x) for x in a["text"]]
    return df


def _temperature(st: StoreData) -> float:
    """The sampling temperature of a store's config (``protocol: paper`` defaults filled in; NaN when unset)."""
    p = PoissonParams(**{k: v for k, v in st.params.items() if k in PoissonParams.model_fields})
    return float(p.temperature) if p.temperature is not None else np.nan


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else np.nan


def pool(g: pd.DataFrame) -> dict:
    """Pooled and per-sample λ̂ statistics of one group of samples (formulas in the module docstring)."""
    lam = float(g["lam"].iloc[0])
    m, a, n = int(g["n_markers"].sum()), int(g["n_attached"].sum()), int(g["n_gaps"].sum())
    per = g["lambda_hat"].to_numpy(dtype=float)
    per = per[np.isfinite(per)]
    pooled = _ratio(m, n)
    se = np.sqrt(lam / n) if n > 0 and lam > 0 else np.nan
    row = {"n_samples": int(len(g)), "n_no_gaps": int((g["n_gaps"] <= 0).sum()),
           "sum_markers": m, "sum_attached": a, "sum_gaps": n,
           "lambda_hat": pooled, "lambda_hat_excl_attached": _ratio(m - a, n),
           "lambda_hat_mean": float(per.mean()) if per.size else np.nan,
           "lambda_hat_std": float(per.std(ddof=1)) if per.size > 1 else np.nan,
           "se_poisson": se, "z": (pooled - lam) / se if np.isfinite(se) else np.nan,
           "n_tokens_mean": float(g["n_tokens"].mean())}
    if "prefix_n_gaps" in g and g["prefix_n_gaps"].notna().any():
        row["prefix_lambda_hat"] = _ratio(g["prefix_n_markers"].sum(), g["prefix_n_gaps"].sum())
    else:
        row["prefix_lambda_hat"] = np.nan
    return row


def by_condition(samples: pd.DataFrame) -> pd.DataFrame:
    """Pooled statistics per (experiment, model, mode, marker, λ), plus marker ``all`` (every marker at that λ)."""
    rows = []
    for (exp, model, mode, lam), g in samples.groupby([*KEY, "lam"], sort=True):
        for marker, gm in [(ALL, g), *sorted(g.groupby("marker"))]:
            rows.append({"experiment": exp, "model": model, "mode": mode, "marker": marker, "lam": float(lam),
                         **pool(gm)})
    return pd.DataFrame(rows)


def fit_line(x, y) -> tuple[float, float, float, int]:
    """(slope, intercept, Pearson r, n points) of ``y = slope x + intercept`` by ``numpy.polyfit`` over the
    finite pairs; NaNs with fewer than two distinct x (r is NaN too when y is constant)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(np.unique(x)) < 2:
        return np.nan, np.nan, np.nan, int(len(x))
    slope, icpt = np.polyfit(x, y, 1)
    r = float(np.corrcoef(x, y)[0, 1]) if np.std(y) > 0 else np.nan
    return float(slope), float(icpt), r, int(len(x))


def fit_table(cond: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """Per (experiment, model, mode): the lines of pooled λ̂ (and λ̂_excl) on λ over the per-marker points,
    icl also per-sample λ̂ on the prefix's own λ̂."""
    rows = []
    for key, g in cond[cond["marker"] != ALL].groupby(KEY, sort=True):
        s, i, r, n = fit_line(g["lam"], g["lambda_hat"])
        se, ie, re_, _ = fit_line(g["lam"], g["lambda_hat_excl_attached"])
        row = dict(zip(KEY, key), slope=s, intercept=i, r=r, n_points=n, slope_excl_attached=se,
                   intercept_excl_attached=ie, r_excl_attached=re_,
                   mean_abs_error=float(np.nanmean(np.abs(g["lambda_hat"] - g["lam"])))
                   if g["lambda_hat"].notna().any() else np.nan)
        sm = samples[(samples["experiment"] == key[0]) & (samples["model"] == key[1]) & (samples["mode"] == key[2])]
        if str(key[2]).startswith("icl"):
            ps, pi, pr, pn = fit_line(sm["prefix_lambda_hat"], sm["lambda_hat"])
        else:
            ps = pi = pr = np.nan
            pn = 0
        row.update(slope_on_prefix=ps, intercept_on_prefix=pi, r_on_prefix=pr, n_points_on_prefix=pn,
                   n_samples=int(len(sm)), frac_no_gaps=float((sm["n_gaps"] <= 0).mean()))
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- figures
def _fig_lambda(inp: FamilyInput, cond: pd.DataFrame, fits: pd.DataFrame) -> Figure:
    exps = sorted(cond[["experiment", "mode"]].drop_duplicates().itertuples(index=False), key=lambda t: (t[1], t[0]))
    models = sorted(cond["model"].unique())
    colors = {m: F.plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    fig, axes = F.grid(len(exps), ncols=2, panel=(4.8, 3.8))
    top = 0.0
    for ax, (exp, mode) in zip(axes, exps):
        d = cond[(cond["experiment"] == exp) & (cond["mode"] == mode)]
        lams = np.sort(d["lam"].unique())
        top = max(top, float(lams.max()))
        for k, m in enumerate(models):
            dm = d[d["model"] == m]
            if dm.empty:
                continue
            col = colors[m]
            per = dm[dm["marker"] != ALL]
            jit = np.random.default_rng(k).uniform(-0.012, 0.012, len(per)) * max(float(lams.max()), 0.1)
            ax.scatter(per["lam"] + jit, per["lambda_hat"], s=10, alpha=0.35, color=col,
                       label="pooled λ̂ per marker")
            al = dm[dm["marker"] == ALL].sort_values("lam")
            f = fits[(fits["experiment"] == exp) & (fits["model"] == m) & (fits["mode"] == mode)]
            slope = f["slope"].iloc[0] if len(f) else np.nan
            if np.isfinite(slope):
                ax.text(0.03, 0.97 - 0.07 * k, f"{m}: slope {slope:.2f}, r {f['r'].iloc[0]:.2f}", color=col,
                        transform=ax.transAxes, fontsize=7, va="top")
            ax.plot(al["lam"], al["lambda_hat"], "o-", color=col, lw=1.8, ms=5, label=f"{m}: pooled λ̂, all markers")
            ax.plot(al["lam"], al["lambda_hat_excl_attached"], "o--", color=col, lw=1.0, ms=4, mfc="none",
                    label=f"{m}: attached markers excluded")
            if str(mode).startswith("icl"):
                ax.plot(al["lam"], al["prefix_lambda_hat"], "x", color="grey", ms=7, mew=1.5,
                        label="ICL prefix's own λ̂")
            top = max(top, float(np.nanmax(np.r_[al["lambda_hat"].to_numpy(float), 0.0])))
        ax.set_title(f"{exp} ({mode})", fontsize=9)
        ax.set_xlabel("λ (markers per word gap)")
    lim = 1.08 * max(top, 0.1)
    for ax in axes:
        ax.plot([0, lim], [0, lim], color="black", ls=":", lw=1.2, label="identity λ̂ = λ")
        ax.set_xlim(-0.02 * lim, lim)
        ax.set_ylim(-0.02 * lim, lim)
    axes[0].set_ylabel("λ̂ = Σ markers / Σ word gaps")
    F.suptitle(fig, "Poisson markers: estimated rate λ̂ vs the target λ, one panel per experiment (mode)")
    rows = F.legend_below(fig, axes, ncol=2)
    return Figure(F.save(fig, inp.figures_dir, "poisson_lambda_hat", rows),
                  "λ̂ vs λ: pooled λ̂ over all samples and markers (solid), with markers attached to a word excluded "
                  "(dashed), per marker (faint points); icl: the realised rate of the prefix shown to the model "
                  "(grey ×). Dotted: the identity a perfect simulator would follow.")


def _fig_markers(inp: FamilyInput, cond: pd.DataFrame) -> Figure:
    panels = sorted(cond[["experiment", "mode", "model"]].drop_duplicates().itertuples(index=False),
                    key=lambda t: (t[1], t[0], t[2]))
    markers = sorted(m for m in cond["marker"].unique() if m != ALL)
    colors = {mk: F.plt.get_cmap("tab10")(i % 10) for i, mk in enumerate(markers)}
    fig, axes = F.grid(len(panels), ncols=3, panel=(4.0, 3.2))
    per = cond[cond["marker"] != ALL]
    lim = 1.08 * max(float(np.nanmax(np.r_[per["lambda_hat"].to_numpy(float), per["lam"].to_numpy(float)])), 0.1)
    for ax, (exp, mode, model) in zip(axes, panels):
        d = per[(per["experiment"] == exp) & (per["model"] == model) & (per["mode"] == mode)]
        for mk in markers:
            g = d[d["marker"] == mk].sort_values("lam")
            if len(g):
                ax.plot(g["lam"], g["lambda_hat"], "o-", color=colors[mk], lw=1.2, ms=4, label=f"marker {mk}")
        ax.plot([0, lim], [0, lim], color="black", ls=":", lw=1.2, label="identity λ̂ = λ")
        ax.set_xlim(-0.02 * lim, lim)
        ax.set_ylim(-0.02 * lim, lim)
        ax.set_title(f"{model}\n{exp} ({mode})", fontsize=8)
        ax.set_xlabel("λ")
    axes[0].set_ylabel("pooled λ̂")
    F.suptitle(fig, "Poisson markers: pooled λ̂ vs λ per marker character")
    rows = F.legend_below(fig, axes, ncol=5)
    return Figure(F.save(fig, inp.figures_dir, "poisson_lambda_hat_by_marker", rows),
                  "Pooled λ̂ per marker character vs λ, one panel per model and experiment.")


# ---------------------------------------------------------------------------- reducer
def _models_summary(cond: pd.DataFrame, fits: pd.DataFrame) -> dict:
    out: dict[str, dict] = {}
    for f in fits.itertuples(index=False):
        al = cond[(cond["experiment"] == f.experiment) & (cond["model"] == f.model) & (cond["mode"] == f.mode)
                  & (cond["marker"] == ALL)]
        e = {"mode": f.mode, "slope": f.slope, "intercept": f.intercept, "r": f.r,
             "slope_excl_attached": f.slope_excl_attached, "mean_abs_error": f.mean_abs_error,
             "lambda_hat_pooled": {f"{lam:g}": v for lam, v in zip(al["lam"], al["lambda_hat"])},
             "n_samples": f.n_samples, "frac_no_gaps": f.frac_no_gaps}
        if str(f.mode).startswith("icl"):
            e.update(slope_on_prefix=f.slope_on_prefix, r_on_prefix=f.r_on_prefix,
                     prefix_lambda_hat={f"{lam:g}": v for lam, v in zip(al["lam"], al["prefix_lambda_hat"])})
        name = f.experiment if f.mode in ("icl", "explicit") else f"{f.experiment}/{f.mode}"
        out.setdefault(f.model, {})[name] = e
    return out


@register_reducer("poisson")
def reduce_poisson(inp: FamilyInput) -> ReducedFamily:
    samples = pd.concat([sample_table(st) for st in inp.stores], ignore_index=True)
    if "prefix_lambda_hat" not in samples:
        for col in ("prefix_n_markers", "prefix_n_gaps", "prefix_lambda_hat"):
            samples[col] = np.nan
    cond = by_condition(samples)
    fits = fit_table(cond, samples)
    figs = [_fig_lambda(inp, cond, fits)]
    if cond.loc[cond["marker"] != ALL, "marker"].nunique() > 1:
        figs.append(_fig_markers(inp, cond))
    short = cond[cond["marker"] == ALL][["experiment", "model", "mode", "lam", "n_samples", "sum_gaps",
                                         "lambda_hat", "lambda_hat_excl_attached", "lambda_hat_mean",
                                         "lambda_hat_std", "z", "prefix_lambda_hat"]]
    fit_cols = ["experiment", "model", "mode", "slope", "intercept", "r", "slope_excl_attached", "mean_abs_error",
                "slope_on_prefix", "r_on_prefix", "n_samples", "frac_no_gaps"]
    sec = Section("Poisson processes (λ̂ vs λ)", [
        Text("The model writes text (explicit: told to insert the marker between words at Poisson rate λ; icl: "
             "continuing a prose prefix whose every word gap holds k ~ Poisson(λ) markers). Over the samples of a "
             "condition, pooled `λ̂ = Σ markers / Σ word gaps`; markers attached to a word (`word#`) are also "
             "excluded in a second estimate; mean ± std are over the per-sample `λ̂_s = markers_s / gaps_s`. "
             "`z = (λ̂ − λ) / √(λ / Σ gaps)` is the deviation in Poisson standard errors. The line "
             "`λ̂ = slope · λ + intercept` is fitted (least squares) through the per-marker pooled points; "
             "a perfect simulator has slope 1; icl also fits per-sample λ̂ on the prefix's own realised λ̂."),
        Table(fits[fit_cols], "Fitted λ̂ on λ per experiment and model."),
        Table(short, "Pooled over markers, per λ (per-marker rows in the poisson_by_condition table)."),
        *figs,
    ])
    return ReducedFamily(
        tables={"poisson_samples": samples, "poisson_by_condition": cond, "poisson_fits": fits},
        figures=[f.path for f in figs],
        summary={"models": _models_summary(cond, fits)},
        sections=[sec],
    )
