"""The "Against the papers" report section: the user's models next to the coin-flip study's published values.

``published.yaml`` (beside this module) holds the published numbers, their source and the map from
the paper's model names to bayesflip registry names. :func:`against_papers` takes the results of
the family reducers of a run (``icl``, ``paraphrase``, ``poisson``) and, for every main figure of
the paper whose quantity the sweep measured, builds the same table and plot for the sweep's models
with the published values as reference rows / markers labelled ``published``:

* B. prior P(heads) mean ± std over paraphrases (``paraphrase`` family, ``p_std_paper`` = ddof 0);
* C. coin ICL TVD to θ on the paper's N grid, mean over θ (``icl_paper_ngrid``, ``tvd_paper``);
* C. die ICL TVD at the published bias (``icl_paper_by_theta``);
* D. the paper's γ (``icl_paper_gamma``; bayesflip's own γ beside it);
* E. Poisson λ̂ at the published λ (``poisson_by_condition``, pooled over markers).

Our rows carry the experiment and its protocol (``paper`` / ``clean``); comparisons with no data in
the sweep are left out, and the section is absent when none has data.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from . import figures as F
from .base import Figure, Heading, ReducedFamily, Section, Table, Text

PUBLISHED_PATH = Path(__file__).with_name("published.yaml")
LABEL = "published"
_PUB_STYLE = {"marker": "*", "s": 110, "color": "black", "edgecolor": "white", "zorder": 6}


@lru_cache(maxsize=4)
def _load(path: str) -> dict:
    return yaml.safe_load(Path(path).read_text())


def load_published(path: Path | str | None = None) -> dict:
    """The published values (``published.yaml``) with model names mapped to registry names (``model``)
    and the paper's name kept as ``published_name``."""
    raw = _load(str(path or PUBLISHED_PATH))
    names = raw["models"]
    out = {"source": raw["source"], "models": dict(names)}
    for key in ("prior", "icl_coin_tvd", "icl_die_tvd", "gamma", "poisson"):
        out[key] = [{**r, "published_name": r["model"], "model": names.get(r["model"], r["model"])}
                    for r in raw.get(key, [])]
    return out


def published_table(pub: dict) -> pd.DataFrame:
    """Every published number as one tidy row: metric, model, published_name, N, theta/lam, mode, value, std."""
    rows = []
    for r in pub["prior"]:
        rows.append({"metric": "prior_p_heads", "model": r["model"], "published_name": r["published_name"],
                     "value": r["mean"], "std": r["std"]})
    for r in pub["icl_coin_tvd"]:
        rows += [{"metric": "icl_coin_tvd", "model": r["model"], "published_name": r["published_name"], "N": int(n),
                  "value": v} for n, v in r["tvd"].items()]
    for r in pub["icl_die_tvd"]:
        rows += [{"metric": "icl_die_tvd", "model": r["model"], "published_name": r["published_name"], "N": int(n),
                  "theta": r["bias"], "value": v} for n, v in r["tvd"].items()]
    for r in pub["gamma"]:
        rows.append({"metric": "gamma_paper", "model": r["model"], "published_name": r["published_name"],
                     "value": r["gamma"]})
    for r in pub["poisson"]:
        rows.append({"metric": "poisson_lambda_hat", "model": r["model"], "published_name": r["published_name"],
                     "lam": r["lam"], "mode": r["mode"], "value": r["lambda_hat"]})
    cols = ["metric", "model", "published_name", "N", "theta", "lam", "mode", "value", "std"]
    return pd.DataFrame(rows).reindex(columns=cols)


def _table(res: dict[str, ReducedFamily], family: str, name: str) -> pd.DataFrame:
    r = res.get(family)
    t = r.tables.get(name) if r is not None else None
    return t if t is not None else pd.DataFrame()


def _ours(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(source="ours")


def _pub(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows).assign(source=LABEL, experiment="", protocol=LABEL)


def _order(models_ours: list[str], models_pub: list[str]) -> list[str]:
    return list(dict.fromkeys(sorted(models_ours) + [m for m in models_pub if m not in models_ours]))


# ---------------------------------------------------------------------------- comparisons
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


def _prior(res, pub, figs_dir) -> tuple[pd.DataFrame, list]:
    pr = _table(res, "paraphrase", "paraphrase_prior")
    if pr.empty:
        return pd.DataFrame(), []
    pr = pr[(pr["process"] == "coin") & (pr["choice"].astype(str).str.strip() == "heads")]
    if pr.empty:
        return pd.DataFrame(), []
    ours = _ours(pr[["experiment", "model", "protocol", "p_mean", "p_std_paper", "n_paraphrases"]]
                 .rename(columns={"p_mean": "mean", "p_std_paper": "std"}))
    ref = _pub([{"model": r["model"], "published_name": r["published_name"], "mean": r["mean"], "std": r["std"]}
                for r in pub["prior"]])
    df = pd.concat([ours, ref], ignore_index=True)[["source", "model", "published_name", "experiment", "protocol",
                                                     "mean", "std", "n_paraphrases"]]
    fig, ax, models, groups = _per_model_axes(ours, ref)
    for e, p, d, x in groups:
        ax.errorbar(x, d["mean"], yerr=d["std"], fmt="o", capsize=4, label=f"ours: {e} ({p} protocol)")
    xr = [models.index(m) + 0.3 for m in ref["model"]]
    ax.errorbar(xr, ref["mean"], yerr=ref["std"], fmt="none", ecolor="black", capsize=3, lw=0.8)
    ax.scatter(xr, ref["mean"], label=f"{LABEL} (Gupta et al.)", **_PUB_STYLE)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    fig_ = _finish_per_model(fig, ax, models, (0, 1.05), "P(heads), no evidence",
                             "Prior over paraphrases: mean ± std (ddof 0)", figs_dir, "papers_prior",
                             "Prior P(heads) over query paraphrases (mean ± population std) for the sweep's models, "
                             "with the published values (stars) of the coin-flip paper.")
    return df, [fig_]


def _icl_coin(res, pub, figs_dir) -> tuple[pd.DataFrame, list]:
    ng = _table(res, "icl", "icl_paper_ngrid")
    if ng.empty or not (ng["process"] == "coin").any():
        return pd.DataFrame(), []
    ng = ng[ng["process"] == "coin"]
    ours = _ours(ng[["experiment", "model", "protocol", "N", "tvd_paper", "tvd_of_mean"]]
                 .rename(columns={"tvd_paper": "tvd"}))
    ref = _pub([{"model": r["model"], "published_name": r["published_name"], "N": int(n), "tvd": v}
                for r in pub["icl_coin_tvd"] for n, v in r["tvd"].items()])
    long = pd.concat([ours, ref], ignore_index=True)
    long["published_name"] = long.get("published_name", pd.Series(dtype=object)).fillna("")
    wide = long.pivot_table(index=["source", "model", "published_name", "experiment", "protocol"], columns="N",
                            values="tvd", sort=True)
    wide.columns = [f"N={n}" for n in wide.columns]
    wide = wide.reset_index().sort_values(["model", "source"], key=lambda s: s.map({"ours": 0, LABEL: 1})
                                          if s.name == "source" else s)
    models = sorted(ours["model"].unique())
    fig, axes = F.grid(len(models), ncols=3)
    for ax, m in zip(axes, models):
        d = ours[ours["model"] == m]
        for (e, p), g in d.groupby(["experiment", "protocol"], sort=True):
            g = g.sort_values("N")
            ax.plot(g["N"], g["tvd"], "o-", ms=4, label=f"ours: {e} ({p} protocol)")
        r = ref[ref["model"] == m].sort_values("N")
        if len(r):
            ax.plot(r["N"], r["tvd"], ls="--", color="black", lw=0.8)
            ax.scatter(r["N"], r["tvd"], label=f"{LABEL} (Gupta et al.)", **_PUB_STYLE)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks([0, 1, 3, 5, 10, 20, 100], ["0", "1", "3", "5", "10", "20", "100"])
        ax.set_ylim(0, 1)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("N = flips in context")
    axes[0].set_ylabel("TVD to θ (mean over θ)")
    F.suptitle(fig, "Coin ICL: TVD to θ on the paper's N grid (per θ the mean over prompts, then the mean over θ)")
    rows = F.legend_below(fig, axes, ncol=2)
    fig_ = Figure(F.save(fig, figs_dir, "papers_icl_coin_tvd", rows),
                  "Coin ICL: the paper's TVD to θ after N flips for the sweep's models, published values as stars.")
    return wide, [fig_]


def _icl_die(res, pub, figs_dir) -> tuple[pd.DataFrame, list]:
    bt = _table(res, "icl", "icl_paper_by_theta")
    if bt.empty or not (bt["process"] == "die").any():
        return pd.DataFrame(), []
    bt = bt[bt["process"] == "die"]
    biases = sorted({float(r["bias"]) for r in pub["icl_die_tvd"]})
    sel = bt[np.isclose(bt["theta"].to_numpy(float)[:, None], biases).any(axis=1)] if biases else bt.iloc[:0]
    if sel.empty:
        return pd.DataFrame(), []
    ours = _ours(sel[["experiment", "model", "protocol", "theta", "N", "tvd_paper"]]
                 .rename(columns={"tvd_paper": "tvd"}))
    ref = _pub([{"model": r["model"], "published_name": r["published_name"], "theta": float(r["bias"]), "N": int(n),
                 "tvd": v} for r in pub["icl_die_tvd"] for n, v in r["tvd"].items()])
    long = pd.concat([ours, ref], ignore_index=True)
    long["published_name"] = long.get("published_name", pd.Series(dtype=object)).fillna("")
    wide = long.pivot_table(index=["source", "model", "published_name", "experiment", "protocol", "theta"],
                            columns="N", values="tvd", sort=True)
    wide.columns = [f"N={n}" for n in wide.columns]
    wide = wide.reset_index().sort_values(["model", "source"], key=lambda s: s.map({"ours": 0, LABEL: 1})
                                          if s.name == "source" else s)
    fig, ax = F.plt.subplots(figsize=(7.0, 4.0))
    for (m, e, p), g in ours.groupby(["model", "experiment", "protocol"], sort=True):
        g = g.sort_values("N")
        ax.plot(g["N"], g["tvd"], "o-", ms=4, label=f"ours: {m}, {e} ({p} protocol)")
    for m, r in ref.groupby("model"):
        ax.scatter(r["N"], r["tvd"], label=f"{LABEL}: {m}", **_PUB_STYLE)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks([0, 1, 3, 5, 10, 20, 100], ["0", "1", "3", "5", "10", "20", "100"])
    ax.set_ylim(0, 1)
    ax.set_xlabel("N = rolls in context")
    ax.set_ylabel("TVD to the stated die")
    ax.set_title(f"Die ICL at bias {', '.join(f'{b:g}' for b in biases)} (mean over faces)", fontsize=10)
    rows = F.legend_below(fig, [ax], ncol=2)
    fig_ = Figure(F.save(fig, figs_dir, "papers_icl_die_tvd", rows),
                  "Die ICL: TVD to the biased die after N rolls at the published bias, published values as stars.")
    return wide, [fig_]


def _gamma(res, pub, figs_dir) -> tuple[pd.DataFrame, list]:
    g = _table(res, "icl", "icl_paper_gamma")
    if g.empty:
        return pd.DataFrame(), []
    ours = _ours(g[["experiment", "model", "protocol", "gamma_paper", "gamma_bayesflip"]])
    ref = _pub([{"model": r["model"], "published_name": r["published_name"], "gamma_paper": r["gamma"]}
                for r in pub["gamma"]])
    df = pd.concat([ours, ref], ignore_index=True)[["source", "model", "published_name", "experiment", "protocol",
                                                     "gamma_paper", "gamma_bayesflip"]]
    fig, ax, models, groups = _per_model_axes(ours, ref)
    for e, p, d, x in groups:
        ax.scatter(x, d["gamma_paper"], marker="o", s=40, label=f"ours, paper γ: {e} ({p} protocol)")
        ax.scatter(x, d["gamma_bayesflip"], marker="D", s=22, facecolors="none", edgecolors="tab:grey",
                   label="ours, bayesflip γ (fitted prior, soft likelihood)")
    ax.scatter([models.index(m) + 0.3 for m in ref["model"]], ref["gamma_paper"], label=f"{LABEL} (Gupta et al.)",
               **_PUB_STYLE)
    fig_ = _finish_per_model(fig, ax, models, (-0.05, 1.05), "γ (1 = no forgetting)",
                             "Distribution shift: fitted discount γ", figs_dir, "papers_gamma",
                             "The paper's γ (prior decays with the counts, L1 fit) for the sweep's models next to "
                             "bayesflip's γ and the published values (stars).")
    return df, [fig_]


def _poisson(res, pub, figs_dir) -> tuple[pd.DataFrame, list]:
    c = _table(res, "poisson", "poisson_by_condition")
    if c.empty or not pub["poisson"]:
        return pd.DataFrame(), []
    lams = sorted({float(r["lam"]) for r in pub["poisson"]})
    c = c[(c["marker"] == "all") & np.isclose(c["lam"].to_numpy(float)[:, None], lams).any(axis=1)]
    if c.empty:
        return pd.DataFrame(), []
    ours = _ours(c[["experiment", "model", "mode", "lam", "lambda_hat", "lambda_hat_mean", "n_samples"]])
    ours = ours.assign(protocol=[_protocol_of(res, e) for e in ours["experiment"]])
    ref = _pub([{"model": r["model"], "published_name": r["published_name"], "mode": r["mode"],
                 "lam": float(r["lam"]), "lambda_hat": r["lambda_hat"]} for r in pub["poisson"]])
    df = pd.concat([ours, ref], ignore_index=True)[["source", "model", "published_name", "experiment", "protocol",
                                                     "mode", "lam", "lambda_hat", "lambda_hat_mean", "n_samples"]]
    df = df.sort_values(["model", "mode", "source"]).reset_index(drop=True)
    return df, []


def _protocol_of(res: dict[str, ReducedFamily], experiment: str) -> str:
    """An experiment's protocol as recorded by any reducer table that has a ``protocol`` column, else ``clean``."""
    for r in res.values():
        for t in r.tables.values():
            if "protocol" in t and "experiment" in t:
                hit = t.loc[t["experiment"] == experiment, "protocol"]
                if len(hit):
                    return str(hit.iloc[0])
    return "clean"


# ---------------------------------------------------------------------------- section
def against_papers(res: dict[str, ReducedFamily], figures_dir: Path, pub: dict | None = None,
                   ) -> tuple[Section | None, dict[str, pd.DataFrame], dict, list[Path]]:
    """(section or None, tables, summary.json entry, figure paths) comparing ``res`` with the published values."""
    pub = pub or load_published()
    parts = [
        ("prior", "B. Prior over paraphrases", "P(heads) with no evidence, mean ± std (ddof 0) over the query "
         "paraphrases (instruct models: over the (instruct prompt, query) pairs).", _prior),
        ("icl_coin_tvd", "C. Coin ICL: TVD to θ on the paper's N grid", "Per θ the TVD between each prompt's "
         "renormalised distribution and θ, averaged over the prompts (`tvd`, the paper's number), then over θ; "
         "`tvd_of_mean` is the TVD of the prompt-mean distribution (ours only; in the CSV).", _icl_coin),
        ("icl_die_tvd", "C. Die ICL at the published bias", "As the coin, with the die's stated distribution "
         "(b on one face), mean over faces.", _icl_die),
        ("gamma", "D. Distribution shift: γ", "The paper's γ: pseudo-counts including the Beta(1, 1) prior decay "
         "by γ, counts clamped at 1, L1 fit by L-BFGS-B to the mean P(heads) over paraphrases; `gamma_bayesflip` "
         "is bayesflip's own γ (fitted prior, only the counts decay, soft-likelihood fit).", _gamma),
        ("poisson", "E. Poisson λ̂ at the published λ", "λ̂ = markers / word gaps pooled over samples "
         "(`lambda_hat`) and the mean of the per-sample ratios (`lambda_hat_mean`).", _poisson),
    ]
    blocks, tables, summary, figs = [], {}, {}, []
    for key, title, text, fn in parts:
        df, fs = fn(res, pub, figures_dir)
        if df is None or df.empty:
            continue
        tables[f"papers_{key}"] = df
        summary[key] = df.replace({np.nan: None}).to_dict("records")
        figs += [f.path for f in fs]
        blocks += [Heading(title), Text(text), Table(df, f"Ours next to the {LABEL} values ({LABEL} rows: source = "
                                                         f"{LABEL}).", max_rows=80), *fs]
    if not blocks:
        return None, {}, {}, []
    src = pub["source"]
    intro = Text(f"The sweep's models measured as in the coin-flip paper, next to the numbers it published "
                 f"(rows and star markers labelled **{LABEL}**; source: {src['study']}, repository "
                 f"`{src['repository']}`). Our rows name their experiment and its protocol (`paper`: the paper's "
                 "prompts and grids; `clean`: bayesflip's own). Published model names are mapped to registry names "
                 "(configs/models/paper.yaml). Differences between these metrics and the original analysis are "
                 "listed in docs/PROTOCOLS.md (section 4).")
    pub_tab = published_table(pub)
    tables["papers_published"] = pub_tab
    summary = {"source": src, **summary}
    return Section("Against the papers", [intro, *blocks]), tables, summary, figs
