"""Reducer part for ``acronym`` stores of ``protocol: paper`` (the original acronym notebook).

Per cell and generation g (0 = d⁰): ``mean_rank`` = mean frequency rank of the acronym words of
the accepted data d^g (1-based in wordfreq's top ``rank_top`` list, outside = rank_top + 1;
lower = more common), ``share_top`` = share of them inside the list, ``mean_len`` = mean acronym
length, ``prod_mean_rank`` = the same over the reply's parsed pairs before the filter; the
reply's ``n_parsed``, ``n_invalid``, ``spelled_rate`` = n_spelled / n_parsed, ``redraws``,
``carried``. ``acronym_paper_by_generation``: mean and s.e. over d⁰ seeds and chains per
(experiment, model, bias_type, m_easy, temperature, generation).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import figures as F
from .base import Figure, FamilyInput, Section, Table, Text, mean_se_by
from .load import StoreData

KEYS = ["experiment", "model", "bias_type", "m_easy", "temperature"]
METRICS = ["mean_rank", "share_top", "mean_len", "prod_mean_rank", "n_parsed", "n_invalid", "spelled_rate",
           "redraws", "carried"]
FIG_METRICS = [("mean_rank", "mean frequency rank of the accepted acronym words"),
               ("share_top", "share of accepted acronym words in the top list"),
               ("prod_mean_rank", "mean rank of the produced acronym words"), ("n_parsed", "pairs parsed per reply")]


def cell_table(st: StoreData) -> pd.DataFrame:
    a = st.arrays
    C, G1 = a["mean_rank"].shape
    df = pd.DataFrame({"experiment": st.experiment, "model": st.model,
                       "cell": np.repeat(st.cells["cell"].to_numpy(), G1), "generation": np.tile(np.arange(G1), C)})
    for k in ("bias_type", "m_easy", "temperature", "d0_seed", "sample"):
        df[k] = np.repeat(st.cells[k].to_numpy(), G1)
    for k in ("mean_rank", "share_top", "mean_len", "prod_mean_rank"):
        df[k] = a[k].astype(np.float64).reshape(-1)
    for k in ("n_parsed", "n_invalid", "redraws"):
        v = a[k].astype(np.float64).reshape(-1)
        df[k] = np.where(v >= 0, v, np.nan)
    sp = a["n_spelled"].astype(np.float64).reshape(-1)
    df["spelled_rate"] = np.where((sp >= 0) & (df["n_parsed"] > 0), sp / df["n_parsed"].where(df["n_parsed"] > 0),
                                  np.nan)
    df.loc[df["generation"] == 0, ["n_parsed", "spelled_rate"]] = np.nan
    df["carried"] = a["carried"].astype(np.float64).reshape(-1)
    return df


def by_generation(cells: pd.DataFrame) -> pd.DataFrame:
    return mean_se_by(cells, KEYS + ["generation"], METRICS)


def _fig(inp: FamilyInput, exp: str, model: str, tab: pd.DataFrame) -> Figure | Text:
    """The per-generation figure, or a sentence why there is none (fewer than two generations)."""
    d = tab[(tab["experiment"] == exp) & (tab["model"] == model)]
    last = int(d["generation"].max())
    why = F.too_few_generations(last, f"{exp}, {model}")
    if why:
        return Text(why)
    conds = list(dict.fromkeys(zip(d["bias_type"], d["m_easy"], d["temperature"])))
    cmap = F.plt.get_cmap("tab10")(np.arange(max(len(conds), 1)) % 10)
    fig, axes = F.grid(len(FIG_METRICS), ncols=2, sharey=False)
    for ax, (m, lab) in zip(axes, FIG_METRICS):
        ax.set_title(lab, fontsize=9)
        F.generation_axis(ax, last)
        if not F.has_data(d[m]):
            F.no_data(ax, "no data: no reply parsed" if m in ("prod_mean_rank", "n_parsed") else "no data")
            continue
        for k, (b, me, t) in enumerate(conds):
            g = d[(d["bias_type"] == b) & (d["m_easy"] == me) & (d["temperature"] == t)].sort_values("generation")
            x, y, se = g["generation"].to_numpy(), g[m].to_numpy(), g[f"{m}_se"].to_numpy()
            ax.plot(x, y, color=cmap[k], lw=1.6, marker="o", ms=3, label=f"{b}, M_easy {me}, T={t:g}")
            if np.isfinite(se).any():
                ax.fill_between(x, y - se, y + se, color=cmap[k], alpha=0.15, lw=0)
        if m == "share_top":
            ax.set_ylim(-0.02, 1.02)
    F.suptitle(fig, f"{exp} — {model}: the original acronym chains (protocol paper), mean ± s.e. over d⁰ seeds")
    rows = F.legend_below(fig, axes, ncol=2)
    return Figure(F.save(fig, inp.figures_dir, f"acronym_paper_{exp}_{model}", rows),
                  f"{exp}, {model}: mean frequency rank (lower = more common) and share within the top list of the "
                  "accepted acronym words per generation (0 = d⁰), the produced words' mean rank and the pairs "
                  "parsed per reply; one line per bias type (persona + filter), M_easy and temperature.")


def section(inp: FamilyInput, stores: list[StoreData]) -> tuple[dict, list, dict, Section]:
    cells = pd.concat([cell_table(st) for st in stores], ignore_index=True)
    tab = by_generation(cells)
    figs = [_fig(inp, e, m, tab) for e, m in sorted({(st.experiment, st.model) for st in stores})]
    last = tab.loc[tab.groupby(KEYS)["generation"].idxmax()]
    first = tab[tab["generation"] == 0]
    summary: dict[str, dict] = {}
    for _, r in last.iterrows():
        key = f"{r['experiment']}: {r['bias_type']}, M_easy {int(r['m_easy'])}, T={r['temperature']:g}"
        summary.setdefault(r["model"], {})[key] = {"generation": int(r["generation"]),
                                                   "mean_rank": float(r["mean_rank"]),
                                                   "share_top": float(r["share_top"])}
    show = KEYS + ["generation", "n_chains", "mean_rank", "share_top", "prod_mean_rank", "n_parsed", "spelled_rate"]
    sec = Section("Iterated learning: the original acronym chains (protocol paper)", [
        Text("Acronym chains as in the original notebook: a persona, one reply of M pairs per generation from "
             "alternating agents (T, T/2), a pool across generations and a filter on the acronym word's frequency "
             "rank. `mean_rank` of the accepted acronym words (unknown words rank `rank_top + 1`). Mean over d⁰ "
             "seeds and chains."),
        Table(pd.concat([first, last]).sort_values(KEYS + ["generation"])[show],
              "First (d⁰) and last generation per condition (all generations in acronym_paper_by_generation)."),
        *figs,
    ])
    return ({"acronym_paper_by_generation": tab, "acronym_paper_cells": cells},
            [f.path for f in figs if isinstance(f, Figure)], summary, sec)
