"""Reducer of the ``acronym`` family: word-preference chains with pool-and-filter (EXPERIMENTS.md §3).

The family stores, per chain and generation, over the input words of the kept pairs (and,
prefixed ``prod_``, of all valid produced pairs): ``share_common`` (fraction with Zipf frequency
≥ ``common_zipf``), ``mean_rank`` (mean 1-based rank in wordfreq's top list, outside = top + 1)
and ``mean_zipf``; plus ``n_valid`` and ``carried`` (no valid reply: previous pairs kept).

``acronym_by_generation``: per (experiment, model, filter) and generation, the mean and s.e.
(std / √N, NaNs ignored) over the N chains of each of those, the share of chains that carried,
and ``valid_rate = n_valid / pool`` (generation 0: the initial pairs).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from . import figures as F
from .base import Figure, FamilyInput, ReducedFamily, Section, Table, Text, reduce_by_protocol, register_reducer
from .load import StoreData

METRICS = ["share_common", "mean_rank", "mean_zipf", "prod_share_common", "prod_mean_rank", "prod_mean_zipf",
           "n_valid", "valid_rate", "carried"]
FIG_METRICS = [("share_common", "share of common words"), ("mean_rank", "mean frequency rank"),
               ("mean_zipf", "mean Zipf frequency"), ("valid_rate", "valid replies / pool; chains carried")]
FILTER_COLOR = {"most": "tab:blue", "none": "tab:grey", "least": "tab:red"}


def cell_table(st: StoreData) -> pd.DataFrame:
    a = st.arrays
    C, G1 = a["n_valid"].shape
    pool = float(st.params.get("pool", 20))
    df = pd.DataFrame({"experiment": st.experiment, "model": st.model,
                       "cell": np.repeat(st.cells["cell"].to_numpy(), G1),
                       "filter": np.repeat(st.cells["filter"].to_numpy(), G1),
                       "sample": np.repeat(st.cells["sample"].to_numpy(), G1),
                       "generation": np.tile(np.arange(G1), C)})
    for k in ("share_common", "mean_rank", "mean_zipf", "prod_share_common", "prod_mean_rank", "prod_mean_zipf"):
        df[k] = a[k].astype(np.float64).reshape(-1)
    df["n_valid"] = a["n_valid"].astype(np.float64).reshape(-1)
    df["valid_rate"] = np.where(df["generation"] > 0, df["n_valid"] / pool, np.nan)
    df["carried"] = a["carried"].astype(np.float64).reshape(-1)
    return df


def by_generation(cells: pd.DataFrame) -> pd.DataFrame:
    keys = ["experiment", "model", "filter", "generation"]
    g = cells.groupby(keys, sort=True)
    out = g[METRICS].mean()
    n_ok = g[METRICS].count()
    se = g[METRICS].std(ddof=1) / np.sqrt(n_ok.where(n_ok > 0))
    out = out.join(se.add_suffix("_se"))
    out.insert(0, "n_chains", g.size())
    return out.reset_index()


def _fig(inp: FamilyInput, exp: str, tab: pd.DataFrame) -> Figure | Text:
    """The per-generation figure, or a sentence why there is none (fewer than two generations)."""
    d = tab[tab["experiment"] == exp]
    why = F.too_few_generations(int(d["generation"].max()), exp)
    if why:
        return Text(why)
    models = sorted(d["model"].unique())
    fig, axes = F.grid(len(models) * len(FIG_METRICS), ncols=len(FIG_METRICS), sharey=False, squeeze_cols=False)
    for i, m in enumerate(models):
        for j, (k, lab) in enumerate(FIG_METRICS):
            ax = axes[i * len(FIG_METRICS) + j]
            for f, g in d[d["model"] == m].groupby("filter", sort=True):
                g = g.sort_values("generation")
                col = FILTER_COLOR.get(f, "tab:green")
                x = g["generation"].to_numpy()
                y, se = g[k].to_numpy(), g[f"{k}_se"].to_numpy()
                if k == "valid_rate":
                    ax.plot(x, y, color=col, lw=1.8, marker="o", ms=3, label=f"valid rate, filter {f}")
                    ax.plot(x, g["carried"].to_numpy(), color=col, lw=1.0, ls=":", marker="x", ms=4,
                            label=f"share of chains carried (no valid reply), filter {f}")
                    continue
                ax.plot(x, y, color=col, lw=1.8, label=f"kept, filter {f}")
                ax.fill_between(x, y - se, y + se, color=col, alpha=0.15, lw=0)
                ax.plot(x, g[f"prod_{k}"].to_numpy(), color=col, lw=1.0, ls="--", label=f"produced, filter {f}")
            ax.set_title(f"{m}: {lab}", fontsize=9)
            ax.set_xlabel("generation")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if k in ("share_common", "valid_rate"):
                ax.set_ylim(-0.02, 1.02)
            elif k == "mean_rank":
                ax.set_yscale("log")
    F.suptitle(fig, f"{exp}: word-preference chains — word frequency of the acronym pairs per generation")
    rows = F.legend_below(fig, axes)
    return Figure(F.save(fig, inp.figures_dir, f"acronym_{exp}", rows),
                  f"{exp}: share of common words (Zipf ≥ threshold), mean frequency rank (lower = more frequent) and "
                  "mean Zipf frequency of the input words per generation, per filter; solid: kept pairs (mean ± s.e. "
                  "over chains), dashed: all valid produced pairs. Last panel: share of the pool's replies that were "
                  "valid pairs, and share of chains that kept their previous pairs because none was.")


@register_reducer("acronym")
def reduce_acronym(inp: FamilyInput) -> ReducedFamily:
    """Clean stores here; ``protocol: paper`` stores in :mod:`.acronym_paper` (own tables, figures, section)."""
    from . import acronym_paper

    return reduce_by_protocol(inp, _reduce_clean, acronym_paper.section)


def _reduce_clean(inp: FamilyInput, stores: list[StoreData]) -> ReducedFamily:
    cells = pd.concat([cell_table(st) for st in stores], ignore_index=True)
    tab = by_generation(cells)
    figs = [_fig(inp, e, tab) for e in sorted(tab["experiment"].unique())]
    last = tab.loc[tab.groupby(["experiment", "model", "filter"])["generation"].idxmax()]
    first = tab[tab["generation"] == 0]
    show = pd.concat([first, last]).sort_values(["experiment", "model", "filter", "generation"])[
        ["experiment", "model", "filter", "generation", "n_chains", "share_common", "mean_rank", "mean_zipf",
         "prod_share_common", "prod_mean_rank", "valid_rate", "carried"]]
    summary: dict[str, dict] = {}
    for _, r in last.iterrows():
        summary.setdefault(r["model"], {})[f"{r['experiment']}: filter {r['filter']}"] = {
            "generation": int(r["generation"]), "share_common": r["share_common"], "mean_rank": r["mean_rank"],
            "share_common_gen0": float(first[(first["experiment"] == r["experiment"]) & (first["model"] == r["model"])
                                             & (first["filter"] == r["filter"])]["share_common"].iloc[0])}
    sec = Section("Iterated learning: word preference (acronyms)", [
        Text("Acronym chains (family `acronym`): each generation writes a pool of (word, input words) pairs; the "
             "filter keeps the most / least frequent or a random subset. Word frequencies from `wordfreq` "
             "(Zipf = log10 occurrences per billion words). `share_common` = share of input words with Zipf ≥ "
             "the threshold, `mean_rank` = mean rank in the top list (lower = more common); `prod_` = over all "
             "valid produced pairs before filtering. Mean over chains."),
        Table(show, "First and last generation per filter (all generations in acronym_by_generation)."),
        *figs,
    ])
    return ReducedFamily(tables={"acronym_by_generation": tab},
                         figures=[f.path for f in figs if isinstance(f, Figure)], summary={"models": summary},
                         sections=[sec])
