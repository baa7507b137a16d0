"""The "Against the papers" report section: the user's models next to the studies' published values.

The published numbers, their sources and the check against the original repository live in
:mod:`bayesflip.reduce.published_values` (``published.yaml``; re-exported here: :func:`load_published`,
:func:`published_table`). :func:`against_papers` takes the results of the family reducers of a run and,
for every comparison whose quantity the sweep measured, shows one table — our rows (``source = ours``,
with experiment and protocol) and the published rows (``source = published``, each with its short
source in ``published_source``) — and one figure in which **every published model's series** is drawn
(grey-to-black stars, one shade per model) next to ours:

* A. needle heatmap cells (``needle_paper_by_length_depth``, ``protocol: paper`` stores) vs ``needle_coin`` / ``needle_die`` /
  ``needle_number`` at the same (length, depth), plus filler-only and query-alone points;
* A. the statement alone (needle rows with length 0, per bias) vs ``explicit_coin_tvd`` /
  ``explicit_die_tvd``;
* B. prior P(heads) mean ± std over paraphrases (``paraphrase_prior``, ``p_std_paper`` = ddof 0);
* C. coin ICL TVD to θ on the paper's N grid (``icl_paper_ngrid``); when the sweep ran a subset of the
  11 θ, the published reference is the mean over the same θ (``icl_coin_tvd_theta``);
* C. die ICL TVD per bias (``icl_paper_by_theta``, mean over faces);
* D. the paper's γ (``icl_paper_gamma``; bayesflip's own γ beside it);
* E. Poisson λ̂ per (mode, λ) from ``poisson_samples``: mean and median of the per-sample λ̂ (the
  published estimator) and the pooled λ̂ (``lambda_hat``), every row labelled with its conditions (temperature, story
  length; the published rows' conditions come from ``published.yaml``);
* H. chain of thought (``cot_by_condition``) vs ``cot_coin_tvd`` — a table only (the original scored
  with length-normalised sequence log-probabilities).

The section ends with the sources of the published values (one row per family: path, key, aggregation,
commit) and what is absent. Comparisons with no data in the sweep are left out; the section is absent
when none has data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import figures as F
from .base import Figure, Heading, ReducedFamily, Section, Table, Text
from .published_values import PUBLISHED_PATH, cite, load_published, published_table, sources_table

__all__ = ["LABEL", "PUBLISHED_PATH", "against_papers", "load_published", "published_table"]

LABEL = "published"
NS = [0, 1, 3, 5, 10, 20, 100]


def _table(res: dict[str, ReducedFamily], family: str, name: str) -> pd.DataFrame:
    r = res.get(family)
    t = r.tables.get(name) if r is not None else None
    return t if t is not None else pd.DataFrame()


def _ours(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(source="ours", published_name="", published_source="")


def _pub(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows).assign(source=LABEL, experiment="", protocol=LABEL)


def _ref(r: dict, **values) -> dict:
    """One published table row: model, published name, short source, values."""
    return {"model": r["model"], "published_name": r["published_name"], "published_source": cite(r), **values}


def _order(models_ours: list[str], models_pub: list[str]) -> list[str]:
    return list(dict.fromkeys(sorted(models_ours) + [m for m in models_pub if m not in models_ours]))


def _sort(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Our rows first, then the published ones; by model within each."""
    rank = {"ours": 0, LABEL: 1}
    return df.sort_values(["source", "model", *by], key=lambda s: s.map(rank) if s.name == "source" else s,
                          kind="stable").reset_index(drop=True)


def _wide(long: pd.DataFrame, index: list[str], columns: str, values: str, fmt) -> pd.DataFrame:
    long = long.copy()
    for c in index:
        if long[c].dtype == object or long[c].isna().all():
            long[c] = long[c].fillna("").astype(str)
    wide = long.pivot_table(index=index, columns=columns, values=values, sort=True)
    wide.columns = [fmt(c) for c in wide.columns]
    return _sort(wide.reset_index(), [c for c in index if c not in ("model", "source")])


# ---------------------------------------------------------------------------- published series in figures
def _shades(models: list[str]) -> dict[str, tuple]:
    """One grey level per published model (light to dark), the same in every panel of a figure."""
    levels = np.linspace(0.35, 0.9, max(len(models), 1))
    return {m: F.plt.cm.Greys(levels[i]) for i, m in enumerate(models)}


def _draw_published(ax, ref: pd.DataFrame, x: str, y: str, shades: dict, highlight: str | None = None,
                    line: bool = True) -> None:
    """Every published model's series as star markers (dashed line between them), one grey per model;
    ``highlight`` (the panel's own model) in black and larger."""
    for m in shades:
        r = ref[ref["model"] == m].dropna(subset=[y]).sort_values(x)
        if r.empty:
            continue
        hi = m == highlight
        color = "black" if hi else shades[m]
        if line and len(r) > 1:
            ax.plot(r[x], r[y], ls="--", lw=1.1 if hi else 0.7, color=color, zorder=4)
        ax.scatter(r[x], r[y], marker="*", s=120 if hi else 60, color=color, edgecolor="white", linewidth=0.4,
                   zorder=6 if hi else 5, label=f"{LABEL}: {m}")


def _n_axis(ax, label: str) -> None:
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(NS, [str(n) for n in NS])
    ax.set_ylim(0, 1)
    ax.set_xlabel(label)


# ---------------------------------------------------------------------------- per-model axis (B, D)
def _per_model_axes(ours: pd.DataFrame, ref: pd.DataFrame):
    """One axis with a slot per model (ours first, then the published ones); per (experiment,
    protocol) of ours its rows and their x positions, dodged within the slot."""
    models = _order(list(ours["model"].unique()), list(ref["model"]))
    fig, ax = F.plt.subplots(figsize=(max(7.0, 0.9 * len(models) + 3), 4.0))
    keys = sorted({(e, p) for e, p in zip(ours["experiment"], ours["protocol"])})
    width = 0.6 / max(len(keys), 1)
    groups = []
    for j, (e, p) in enumerate(keys):
        d = ours[(ours["experiment"] == e) & (ours["protocol"] == p)]
        groups.append((e, p, d, np.array([models.index(m) for m in d["model"]]) + (j - (len(keys) - 1) / 2) * width))
    return fig, ax, models, groups


def _finish_per_model(fig, ax, models, ylim, ylabel, title, figs_dir, name, caption) -> Figure:
    ax.set_xticks(range(len(models)), models, rotation=25, ha="right", fontsize=8)
    ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    rows = F.legend_below(fig, [ax], ncol=2)
    return Figure(F.save(fig, figs_dir, name, rows), caption)


# ---------------------------------------------------------------------------- A. needle
_PROCESS_KEY = {"coin": "needle_coin", "die": "needle_die", "number": "needle_number"}


def _needle(res, pub, figs_dir) -> tuple[pd.DataFrame, list]:
    ld = _table(res, "needle", "needle_paper_by_length_depth")
    if ld.empty:
        return pd.DataFrame(), []
    ld = ld[ld["process"].isin(list(_PROCESS_KEY)) & (ld["length"] > 0) & (ld["protocol"] == "paper")]
    nd = ld[ld["condition"] == "needle"]
    if nd.empty:
        return pd.DataFrame(), []
    long, figs_rows = [], []
    for process, g in nd.groupby("process", sort=True):
        cells = sorted({(int(a), float(b)) for a, b in zip(g["length"], g["depth"])})
        lengths = sorted({c[0] for c in cells})
        depths = sorted({c[1] for c in cells})
        for _, r in g.iterrows():
            long.append({"source": "ours", "model": r["model"], "published_name": "", "experiment": r["experiment"],
                         "protocol": r["protocol"], "process": process, "cell": f"L={int(r['length'])}, d={r['depth']:g}",
                         "tvd": r["tvd_paper"], "published_source": ""})
        base = ld[(ld["process"] == process) & (ld["condition"] == "no_needle")]
        for _, r in base.iterrows():
            long.append({"source": "ours", "model": r["model"], "published_name": "", "experiment": r["experiment"],
                         "protocol": r["protocol"], "process": process, "cell": f"no needle L={int(r['length'])}",
                         "tvd": r["tvd_paper"], "published_source": ""})
        nc = _table(res, "needle", "needle_paper")
        if not nc.empty:
            nc = nc[(nc["process"] == process) & (nc["condition"] == "no_context") & (nc["protocol"] == "paper")]
            for _, r in nc.iterrows():
                long.append({"source": "ours", "model": r["model"], "published_name": "",
                             "experiment": r["experiment"], "protocol": r["protocol"], "process": process,
                             "cell": "query alone", "tvd": r["tvd_paper"], "published_source": ""})
        for pr in pub.get(_PROCESS_KEY[process], []):
            li = {int(v): i for i, v in enumerate(pr["lengths"])}
            di = {round(float(v), 6): j for j, v in enumerate(pr["depths"])}
            common = dict(source=LABEL, model=pr["model"], published_name=pr["published_name"], experiment="",
                          protocol=LABEL, process=process, published_source=cite(pr))
            for length, depth in cells:
                if length in li and round(depth, 6) in di:
                    long.append({**common, "cell": f"L={length}, d={depth:g}",
                                 "tvd": pr["tvd"][li[length]][di[round(depth, 6)]]})
            for length in lengths:
                v = {int(k): x for k, x in pr["no_needle"].items()}.get(length)
                if v is not None and not base.empty:
                    long.append({**common, "cell": f"no needle L={length}", "tvd": v})
            if any(x["cell"] == "query alone" and x["process"] == process for x in long if x["source"] == "ours"):
                long.append({**common, "cell": "query alone", "tvd": pr["no_context"]})
            # the figure's published curve: mean over our depths at every published length
            dj = [di[round(d, 6)] for d in depths if round(d, 6) in di]
            if dj:
                for i, length in enumerate(pr["lengths"]):
                    figs_rows.append({"process": process, "model": pr["model"], "length": int(length),
                                      "tvd": float(np.mean([pr["tvd"][i][j] for j in dj]))})
    df = pd.DataFrame(long)
    order = list(dict.fromkeys(df["cell"]))
    wide = df.pivot_table(index=["source", "model", "published_name", "experiment", "protocol", "process",
                                 "published_source"], columns="cell", values="tvd", sort=False).reset_index()
    wide = wide[[c for c in wide.columns if c not in order] + [c for c in order if c in wide.columns]]
    wide = _sort(wide, ["process", "experiment"])
    wide = wide[[c for c in wide.columns if c != "published_source"] + ["published_source"]]
    # figure: per process, TVD (mean over the depths) against the length
    ref = pd.DataFrame(figs_rows)
    procs = sorted(nd["process"].unique())
    fig, axes = F.grid(len(procs), ncols=3)
    shades = _shades(list(dict.fromkeys(ref["model"]))) if len(ref) else {}
    for ax, process in zip(axes, procs):
        g = nd[nd["process"] == process]
        for (m, e, p), d in g.groupby(["model", "experiment", "protocol"], sort=True):
            d = d.groupby("length", as_index=False)["tvd_paper"].mean()
            ax.plot(d["length"], d["tvd_paper"], "o-", ms=5, label=f"ours: {m}, {e} ({p} protocol)", zorder=7)
        if len(ref):
            _draw_published(ax, ref[ref["process"] == process], "length", "tvd", shades)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("filler length L (tokens)")
        ax.set_title(f"{process}: needle TVD, mean over needles and the sweep's depths", fontsize=9)
    axes[0].set_ylabel("TVD to the stated distribution")
    rows = F.legend_below(fig, axes, ncol=3)
    fig_ = Figure(F.save(fig, figs_dir, "papers_needle_tvd", rows),
                  "Needle in a haystack: the heatmap's TVD (mean over needles, then over the sweep's depths) against "
                  "the filler length, ours (circles) and every published model (stars, one grey per model).")
    return wide, [fig_]


# ---------------------------------------------------------------------------- A. statement alone
def _explicit(res, pub, figs_dir) -> tuple[pd.DataFrame, list]:
    npd = _table(res, "needle", "needle_paper")
    if npd.empty:
        return pd.DataFrame(), []
    sel = npd[(npd["condition"] == "needle") & (npd["length"] == 0) & npd["process"].isin(["coin", "die"])
              & (npd["protocol"] == "paper")]
    if sel.empty:
        return pd.DataFrame(), []
    ours = (sel.groupby(["experiment", "model", "protocol", "process", "bias"], as_index=False)["tvd_paper"].mean()
            .rename(columns={"tvd_paper": "tvd"}))
    ours = _ours(ours.assign(theta=ours["bias"] / 100.0))
    refs = []
    for process, key in (("coin", "explicit_coin_tvd"), ("die", "explicit_die_tvd")):
        if not (ours["process"] == process).any():
            continue
        for r in pub.get(key, []):
            refs += [_ref(r, process=process, theta=int(b) / 100, tvd=v) for b, v in r["tvd"].items()]
    ref = _pub(refs)
    long = pd.concat([ours, ref], ignore_index=True)
    wide = _wide(long, ["source", "model", "published_name", "experiment", "protocol", "process", "published_source"],
                 "theta", "tvd", lambda t: f"θ={t:g}")
    wide = wide[[c for c in wide.columns if c != "published_source"] + ["published_source"]]
    procs = sorted(ours["process"].unique())
    fig, axes = F.grid(len(procs), ncols=3)
    shades = _shades(list(dict.fromkeys(ref["model"])))
    for ax, process in zip(axes, procs):
        for (m, e, p), d in ours[ours["process"] == process].groupby(["model", "experiment", "protocol"]):
            d = d.sort_values("theta")
            ax.plot(d["theta"], d["tvd"], "o-", ms=5, label=f"ours: {m}, {e} ({p} protocol)", zorder=7)
        _draw_published(ax, ref[ref["process"] == process], "theta", "tvd", shades)
        ax.set_ylim(0, 1)
        ax.set_xlabel("stated probability (heads / the named face)")
        ax.set_title(f"{process}: the statement alone (no filler)", fontsize=9)
    axes[0].set_ylabel("TVD to the stated distribution")
    rows = F.legend_below(fig, axes, ncol=3)
    fig_ = Figure(F.save(fig, figs_dir, "papers_explicit_tvd", rows),
                  "Explicit bias with no filler: TVD to the stated distribution per stated probability, ours and "
                  "every published model (stars; die: mean over faces).")
    return wide, [fig_]


# ---------------------------------------------------------------------------- B. prior
def _prior(res, pub, figs_dir) -> tuple[pd.DataFrame, list]:
    pr = _table(res, "paraphrase", "paraphrase_prior")
    if pr.empty:
        return pd.DataFrame(), []
    pr = pr[(pr["process"] == "coin") & (pr["choice"].astype(str).str.strip() == "heads")]
    if pr.empty:
        return pd.DataFrame(), []
    ours = _ours(pr[["experiment", "model", "protocol", "p_mean", "p_std_paper", "n_paraphrases"]]
                 .rename(columns={"p_mean": "mean", "p_std_paper": "std"}))
    ref = _pub([_ref(r, mean=r["mean"], std=r["std"]) for r in pub["prior"]])
    df = pd.concat([ours, ref], ignore_index=True)[["source", "model", "published_name", "experiment", "protocol",
                                                     "mean", "std", "n_paraphrases", "published_source"]]
    fig, ax, models, groups = _per_model_axes(ours, ref)
    for e, p, d, x in groups:
        ax.errorbar(x, d["mean"], yerr=d["std"], fmt="o", capsize=4, label=f"ours: {e} ({p} protocol)")
    xr = [models.index(m) + 0.3 for m in ref["model"]]
    ax.errorbar(xr, ref["mean"], yerr=ref["std"], fmt="none", ecolor="black", capsize=3, lw=0.8)
    ax.scatter(xr, ref["mean"], marker="*", s=110, color="black", edgecolor="white", zorder=6,
               label=f"{LABEL} (Gupta et al.)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    fig_ = _finish_per_model(fig, ax, models, (0, 1.05), "P(heads), no evidence",
                             "Prior over paraphrases: mean ± std (ddof 0)", figs_dir, "papers_prior",
                             "Prior P(heads) over query paraphrases (mean ± population std) for the sweep's models, "
                             "with every published model's value (stars).")
    return df, [fig_]


# ---------------------------------------------------------------------------- C. coin ICL
def _theta_set(bt: pd.DataFrame, experiment: str, model: str) -> tuple[float, ...]:
    d = bt[(bt["experiment"] == experiment) & (bt["model"] == model) & (bt["process"] == "coin")]
    return tuple(sorted(round(float(t), 6) for t in d["theta"].unique()))


def _icl_coin_reference(pub: dict, thetas: tuple[float, ...]) -> list[dict]:
    """Published rows for a θ set: the stored mean over all 11 θ, else the mean of the per-θ values over
    ``thetas`` (an N only where every θ of the set has a value)."""
    full = tuple(round(b / 10, 6) for b in range(11))
    label = "all 11 θ" if thetas == full or not thetas else ", ".join(f"{t:g}" for t in thetas)
    if label == "all 11 θ":
        return [_ref(r, N=int(n), tvd=v, thetas=label) for r in pub["icl_coin_tvd"] for n, v in r["tvd"].items()]
    by: dict[str, dict] = {}
    for r in pub.get("icl_coin_tvd_theta", []):
        by.setdefault(r["published_name"], {"row": r, "theta": {}})["theta"][round(float(r["theta"]), 6)] = r["tvd"]
    out = []
    for e in by.values():
        if not all(t in e["theta"] for t in thetas):
            continue
        for n in NS:
            vals = [e["theta"][t].get(n) for t in thetas]
            if all(v is not None for v in vals):
                out.append(_ref(e["row"], N=n, tvd=float(np.mean(vals)), thetas=label))
    return out


def _icl_coin(res, pub, figs_dir) -> tuple[pd.DataFrame, list]:
    ng = _table(res, "icl", "icl_paper_ngrid")
    if ng.empty or not (ng["process"] == "coin").any():
        return pd.DataFrame(), []
    ng = ng[ng["process"] == "coin"]
    bt = _table(res, "icl", "icl_paper_by_theta")
    ours = ng[["experiment", "model", "protocol", "N", "tvd_paper", "tvd_of_mean"]].rename(columns={"tvd_paper": "tvd"})
    sets = {(e, m): _theta_set(bt, e, m) if not bt.empty else () for e, m in zip(ours["experiment"], ours["model"])}
    ours = _ours(ours.assign(thetas=[("all 11 θ" if len(sets[(e, m)]) in (0, 11) else
                                      ", ".join(f"{t:g}" for t in sets[(e, m)]))
                                     for e, m in zip(ours["experiment"], ours["model"])]))
    refs: dict[tuple, pd.DataFrame] = {}
    for s in dict.fromkeys(v if len(v) not in (0, 11) else () for v in sets.values()):
        refs[s] = _pub(_icl_coin_reference(pub, s))
    ref = pd.concat(list(refs.values()), ignore_index=True)
    wide = _wide(pd.concat([ours, ref], ignore_index=True),
                 ["source", "model", "published_name", "experiment", "protocol", "thetas", "published_source"],
                 "N", "tvd", lambda n: f"N={int(n)}")
    wide = wide[[c for c in wide.columns if c != "published_source"] + ["published_source"]]
    models = sorted(ours["model"].unique())
    fig, axes = F.grid(len(models), ncols=3)
    shades = _shades(list(dict.fromkeys(ref["model"])))
    for ax, m in zip(axes, models):
        d = ours[ours["model"] == m]
        for (e, p), g in d.groupby(["experiment", "protocol"], sort=True):
            g = g.sort_values("N")
            ax.plot(g["N"], g["tvd"], "o-", ms=4, label=f"ours: {e} ({p} protocol)", zorder=7)
        s = next(iter(sets[(e, m)] for e in d["experiment"]))
        r = refs.get(s if len(s) not in (0, 11) else (), ref)
        _draw_published(ax, r, "N", "tvd", shades, highlight=m)
        _n_axis(ax, "N = flips in context")
        ax.set_title(m + ("" if len(s) in (0, 11) else f" (θ = {', '.join(f'{t:g}' for t in s)})"), fontsize=9)
    axes[0].set_ylabel("TVD to θ (mean over θ)")
    F.suptitle(fig, "Coin ICL: TVD to θ on the paper's N grid (per θ the mean over prompts, then the mean over θ); "
                    "stars: every published model")
    rows = F.legend_below(fig, axes, ncol=3)
    fig_ = Figure(F.save(fig, figs_dir, "papers_icl_coin_tvd", rows),
                  "Coin ICL: the paper's TVD to θ after N flips for the sweep's models (circles) and every published "
                  "model (stars, one grey per model; the panel's own model in black). With a θ subset the published "
                  "values are the mean over the same θ.")
    return wide, [fig_]


# ---------------------------------------------------------------------------- C. die ICL
def _icl_die(res, pub, figs_dir) -> tuple[pd.DataFrame, list]:
    bt = _table(res, "icl", "icl_paper_by_theta")
    if bt.empty or not (bt["process"] == "die").any():
        return pd.DataFrame(), []
    bt = bt[bt["process"] == "die"]
    biases = sorted({round(float(r["bias"]), 6) for r in pub["icl_die_tvd"]})
    sel = bt[np.isclose(bt["theta"].to_numpy(float)[:, None], biases).any(axis=1)] if biases else bt.iloc[:0]
    if sel.empty:
        return pd.DataFrame(), []
    ours = _ours(sel[["experiment", "model", "protocol", "theta", "N", "tvd_paper"]].rename(columns={"tvd_paper": "tvd"}))
    ours_b = sorted({round(float(t), 6) for t in ours["theta"]})
    ref = _pub([_ref(r, theta=float(r["bias"]), N=int(n), tvd=v) for r in pub["icl_die_tvd"]
                if round(float(r["bias"]), 6) in ours_b for n, v in r["tvd"].items()])
    wide = _wide(pd.concat([ours, ref], ignore_index=True),
                 ["source", "model", "published_name", "experiment", "protocol", "theta", "published_source"],
                 "N", "tvd", lambda n: f"N={int(n)}")
    wide = wide[[c for c in wide.columns if c != "published_source"] + ["published_source"]]
    fig, axes = F.grid(len(ours_b), ncols=3)
    shades = _shades(list(dict.fromkeys(ref["model"])))
    for ax, b in zip(axes, ours_b):
        o = ours[np.isclose(ours["theta"].astype(float), b)]
        for (m, e, p), g in o.groupby(["model", "experiment", "protocol"], sort=True):
            g = g.sort_values("N")
            ax.plot(g["N"], g["tvd"], "o-", ms=4, label=f"ours: {m}, {e} ({p} protocol)", zorder=7)
        _draw_published(ax, ref[np.isclose(ref["theta"].astype(float), b)], "N", "tvd", shades)
        _n_axis(ax, "N = rolls in context")
        ax.set_title(f"bias {b:g} on one face (mean over faces)", fontsize=9)
    axes[0].set_ylabel("TVD to the stated die")
    rows = F.legend_below(fig, axes, ncol=3)
    fig_ = Figure(F.save(fig, figs_dir, "papers_icl_die_tvd", rows),
                  "Die ICL: TVD to the biased die after N rolls at the sweep's biases, ours (circles) and every "
                  "published model (stars, one grey per model).")
    return wide, [fig_]


# ---------------------------------------------------------------------------- D. gamma
def _gamma(res, pub, figs_dir) -> tuple[pd.DataFrame, list]:
    g = _table(res, "icl", "icl_paper_gamma")
    if g.empty:
        return pd.DataFrame(), []
    ours = _ours(g[["experiment", "model", "protocol", "gamma_paper", "gamma_bayesflip"]])
    ref = _pub([_ref(r, gamma_paper=r["gamma"]) for r in pub["gamma"]])
    df = pd.concat([ours, ref], ignore_index=True)[["source", "model", "published_name", "experiment", "protocol",
                                                     "gamma_paper", "gamma_bayesflip", "published_source"]]
    fig, ax, models, groups = _per_model_axes(ours, ref)
    for e, p, d, x in groups:
        ax.scatter(x, d["gamma_paper"], marker="o", s=40, label=f"ours, paper γ: {e} ({p} protocol)")
        ax.scatter(x, d["gamma_bayesflip"], marker="D", s=22, facecolors="none", edgecolors="tab:grey",
                   label="ours, bayesflip γ (fitted prior, soft likelihood)")
    ax.scatter([models.index(m) + 0.3 for m in ref["model"]], ref["gamma_paper"], marker="*", s=110, color="black",
               edgecolor="white", zorder=6, label=f"{LABEL} (Gupta et al.; Mistral-7B-Instruct's 0.0 is the fit's bound)")
    fig_ = _finish_per_model(fig, ax, models, (-0.05, 1.05), "γ (1 = no forgetting)",
                             "Distribution shift: fitted discount γ", figs_dir, "papers_gamma",
                             "The paper's γ (prior decays with the counts, L1 fit) for the sweep's models next to "
                             "bayesflip's γ and every published value (stars).")
    return df, [fig_]


# ---------------------------------------------------------------------------- E. Poisson
def _our_conditions(protocol: str, mode: str, temperature: float) -> str:
    t = "temperature not set (the model's generation config)" if pd.isna(temperature) else f"temperature {temperature:g}"
    if mode.startswith("icl_") and mode.endswith("w"):
        return f"{t}; story {mode[4:-1]} words"
    return f"{t}; {'explicit prompt, no story' if mode == 'explicit' else mode}" + (
        "" if protocol == "paper" else "; clean protocol (bayesflip's prompts and gap counter)")


def _poisson(res, pub, figs_dir) -> tuple[pd.DataFrame, list]:
    s = _table(res, "poisson", "poisson_samples")
    if s.empty or not pub["poisson"]:
        return pd.DataFrame(), []
    if "temperature" not in s:
        s = s.assign(temperature=np.nan)
    rows = []
    for (e, m, p, mode, lam), g in s.groupby(["experiment", "model", "protocol", "mode", "lam"], sort=True,
                                              dropna=False):
        per = g["lambda_hat"].to_numpy(float)
        per = per[~np.isnan(per)]
        temp = float(g["temperature"].iloc[0]) if g["temperature"].nunique(dropna=False) == 1 else np.nan
        rows.append({"experiment": e, "model": m, "protocol": p, "mode": mode, "lam": float(lam), "temperature": temp,
                     "lambda_hat_mean": float(per.mean()) if per.size else np.nan,
                     "lambda_hat_median": float(np.median(per)) if per.size else np.nan,
                     "lambda_hat": (float(g["n_markers"].sum() / g["n_gaps"].sum())
                                           if g["n_gaps"].sum() > 0 else np.nan),
                     "n_samples": int(per.size), "conditions": _our_conditions(str(p), str(mode), temp)})
    ours = _ours(pd.DataFrame(rows))
    lams = sorted({round(x, 6) for x in ours["lam"]})
    ref = _pub([_ref(r, mode=r["mode"], lam=float(r["lam"]), temperature=r.get("temperature"),
                     lambda_hat_mean=r["lambda_hat"], lambda_hat_median=r.get("lambda_hat_median"),
                     n_samples=r.get("n_samples"), conditions=r.get("conditions", ""))
                for r in pub["poisson"] if round(float(r["lam"]), 6) in lams])
    df = pd.concat([ours, ref], ignore_index=True)[
        ["source", "model", "published_name", "experiment", "protocol", "mode", "lam", "temperature",
         "lambda_hat_mean", "lambda_hat_median", "lambda_hat", "n_samples", "conditions", "published_source"]]
    return _sort(df, ["mode", "lam"]), []


# ---------------------------------------------------------------------------- H. chain of thought
_COT_VARIANT = {"hard_coded": "hard_coded", "few_shot": "in_context_prompt"}


def _cot(res, pub, figs_dir) -> tuple[pd.DataFrame, list]:
    bc = _table(res, "cot", "cot_by_condition")
    sm = _table(res, "cot", "cot_samples")
    if bc.empty or not pub.get("cot_coin_tvd"):
        return pd.DataFrame(), []
    bc = bc[(bc["process"] == "coin") & (bc["bias"] >= 0)]
    if bc.empty:
        return pd.DataFrame(), []
    how = ({e: r for e, r in zip(sm["experiment"], sm["reasoning"])} if "reasoning" in sm else {})
    prot = ({e: r for e, r in zip(sm["experiment"], sm["protocol"])} if "protocol" in sm else {})
    long = []
    for _, r in bc.iterrows():
        reasoning = how.get(r["experiment"], "sampled")
        base = dict(source="ours", model=r["model"], published_name="", experiment=r["experiment"],
                    protocol=prot.get(r["experiment"], ""), published_source="", theta=r["bias"] / 100)
        long.append({**base, "variant": f"{reasoning} (with CoT)", "tvd": r["tvd_cot"]})
        long.append({**base, "variant": "none (no CoT)", "tvd": r["tvd_base"]})
    biases = sorted({int(b) for b in bc["bias"]})
    want = {"none"} | {_COT_VARIANT[v] for v in how.values() if v in _COT_VARIANT}
    for r in pub["cot_coin_tvd"]:
        if r["variant"] not in want:
            continue
        for b in biases:
            v = {int(k): x for k, x in r["tvd"].items()}.get(b)
            if v is not None:
                long.append({"source": LABEL, "model": r["model"], "published_name": r["published_name"],
                             "experiment": "", "protocol": LABEL, "published_source": cite(r),
                             "variant": r["variant"], "theta": b / 100, "tvd": v})
    wide = _wide(pd.DataFrame(long), ["source", "model", "published_name", "experiment", "protocol", "variant",
                                      "published_source"], "theta", "tvd", lambda t: f"θ={t:g}")
    wide = wide[[c for c in wide.columns if c != "published_source"] + ["published_source"]]
    return wide, []


# ---------------------------------------------------------------------------- section
def _sources_blocks(pub: dict, used: list[str]) -> list:
    st = sources_table(pub)
    st = st[st["family"].isin(used)]
    blocks = [Heading("Sources of the published values"),
              Text(f"Every published row above names its source in `published_source`; this table gives, per "
                   f"family, the file in `{pub['source']['repository']}` (at commit `{str(pub['source']['commit'])[:7]}`), "
                   "the key read and what bayesflip computed from it. `bayesflip published --check <checkout>` "
                   "recomputes every value from a checkout of that repository."),
              Table(st, "Sources of the published values (published.yaml, `sources`).", max_rows=40)]
    absent = pub.get("absent", [])
    if absent:
        blocks.append(Text("Not available as published numbers:\n" + "\n".join(
            f"- {a['what']}: {' '.join(str(a['why']).split())}" for a in absent)))
    return blocks


def against_papers(res: dict[str, ReducedFamily], figures_dir: Path, pub: dict | None = None,
                   ) -> tuple[Section | None, dict[str, pd.DataFrame], dict, list[Path]]:
    """(section or None, tables, summary.json entry, figure paths) comparing ``res`` with the published values."""
    pub = pub or load_published()
    parts = [
        ("needle", ["needle_coin", "needle_die", "needle_number"], "A. Needle in a haystack: the heatmap cells",
         "The paper's heatmap value per (filler length L, depth d): the TVD between the filler-sample mean "
         "distribution and the stated one, averaged over the needles; `no needle` (filler only) and `query alone` "
         "against the uniform distribution. `protocol: paper` needle experiments only (the clean protocol's "
         "statements and filler are another condition).", _needle),
        ("explicit", ["explicit_coin_tvd", "explicit_die_tvd"], "A. The statement alone (no filler)",
         "Needle rows with L = 0: the bias statement and the query, TVD to the stated distribution per stated "
         "probability (die: mean over faces; the published die values are b = 60 %, 80 %); `protocol: paper` "
         "only.", _explicit),
        ("prior", ["prior"], "B. Prior over paraphrases", "P(heads) with no evidence, mean ± std (ddof 0) over the "
         "query paraphrases (instruct models: over the (instruct prompt, query) pairs).", _prior),
        ("icl_coin_tvd", ["icl_coin_tvd", "icl_coin_tvd_theta"], "C. Coin ICL: TVD to θ on the paper's N grid",
         "Per θ the TVD between each prompt's renormalised distribution and θ, averaged over the prompts (`tvd`, "
         "the paper's number), then over θ (`thetas` says which; a θ subset is compared with the published mean "
         "over the same θ); `tvd_of_mean` (ours only) is in the CSV.", _icl_coin),
        ("icl_die_tvd", ["icl_die_tvd"], "C. Die ICL per bias", "As the coin, with the die's stated distribution "
         "(b on one face), mean over faces; published N with fewer than six faces stored are left out.", _icl_die),
        ("gamma", ["gamma"], "D. Distribution shift: γ", "The paper's γ: pseudo-counts including the Beta(1, 1) "
         "prior decay by γ, counts clamped at 1, L1 fit by L-BFGS-B to the mean P(heads) over paraphrases; "
         "`gamma_bayesflip` is bayesflip's own γ (fitted prior, only the counts decay, soft-likelihood fit). "
         "Mistral-7B-Instruct's published 0.0 is the lower bound of the original fit.", _gamma),
        ("poisson", ["poisson"], "E. Poisson λ̂ at the sweep's λ", "The published λ̂ is the mean of the per-sample "
         "λ̂ = count(marker) / words (compare `lambda_hat_mean`); the median is beside it because a few samples "
         "dominate the mean. `lambda_hat` = Σ markers / Σ words, pooled over the samples (ours only). Every row names its "
         "conditions: the published results are stored at four temperatures (the rows are the 1.0 ones, "
         "bayesflip's `paper` default) with **no story length**, so the published icl rows' story length is "
         "ambiguous; bayesflip's length-keyed `icl_100w` / `icl_250w` / `icl_500w` rows follow the committed "
         "`poisson.py`, another version than the one that produced the stored results.", _poisson),
        ("cot", ["cot_coin_tvd"], "H. Chain of thought (coin)", "TVD to the stated θ with the reasoning (our "
         "`<reasoning> (with CoT)` rows) and without it (`none`). The published values were scored by the "
         "original's cot_sample.py (softmax over length-normalised log-probabilities of the whole prompt + "
         "choice), ours by the choice log-probabilities, and the hard-coded reasoning texts differ (bayesflip "
         "ships its own): read the comparison as qualitative. No figure.", _cot),
    ]
    blocks, tables, summary, figs, used = [], {}, {}, [], []
    for key, families, title, text, fn in parts:
        df, fs = fn(res, pub, figures_dir)
        if df is None or df.empty:
            continue
        used += families
        tables[f"papers_{key}"] = df
        summary[key] = df.replace({np.nan: None}).to_dict("records")
        figs += [f.path for f in fs]
        blocks += [Heading(title), Text(text), Table(df, f"Ours next to the {LABEL} values ({LABEL} rows: source = "
                                                         f"{LABEL}; `published_source`: where the number comes "
                                                         "from).", max_rows=80), *fs]
    if not blocks:
        return None, {}, {}, []
    src = pub["source"]
    intro = Text(f"The sweep's models measured as in the coin-flip paper, next to the numbers stored with it "
                 f"(rows and star markers labelled **{LABEL}**; source: {src['study']}, repository "
                 f"`{src['repository']}` at `{str(src.get('commit', ''))[:7]}`). Our rows name their experiment and "
                 "its protocol (`paper`: the paper's prompts and grids; `clean`: bayesflip's own); published rows "
                 "name their source file and what bayesflip computed from it (`published_source`; full list at the "
                 "end). Every figure draws every published model's series. Published model names are mapped to "
                 "registry names (configs/models). Differences between these metrics and the original analysis are "
                 "listed in docs/PROTOCOLS.md (section 4).")
    tables["papers_published"] = published_table(pub)
    tables["papers_sources"] = sources_table(pub)
    summary = {"source": src, **summary}
    return Section("Against the papers", [intro, *blocks, *_sources_blocks(pub, used)]), tables, summary, figs
