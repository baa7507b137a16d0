"""Reducer part for ``rules`` stores of ``protocol: paper`` (the original rule game).

Per cell and generation g, from the stored P(h) (``probs``), the stated rule h_g (``rule``), the
rule passed on after the interaction (``rule_passed``) and d⁰ (generation 0's examples):

* ``p_screen_off`` = ``Σ_{h[screen]=off} P(h)``; ``on_mass``; ``entropy``; ``acc_d0``; ``both``
  (as the clean reducer, with this cell's d⁰); ``p_h_star`` = P(h*), ``p_h_bar`` = P(h̄);
* the notebooks' per-rule counts, as rates: ``stated_screen_off`` / ``passed_screen_off``
  (the rule's screen is off), ``stated_acc_d0`` / ``passed_acc_d0`` (share of d⁰ it
  reproduces: ``d0_corr_list / M_d0``), ``passed_target`` (screen off **and** all of d⁰: the
  notebooks' ``ht_tgt``);
* the written examples: ``n_examples``, ``n_invalid``, ``redraws``, ``consistent_rate`` =
  ``n_consistent / n_examples``, ``carried``.

``rules_paper_by_generation``: mean and s.e. over d⁰ seeds and chains per (experiment, model,
bias, position, interaction, h_index, temperature, generation).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import bayes
from ..experiments.rules_world import accuracy, feasible_rules, hypotheses
from . import figures as F
from .base import Figure, FamilyInput, Section, Table, Text, mean_se_by
from .load import StoreData

SCREEN = 4
KEYS = ["experiment", "model", "bias", "position", "interaction", "h_index", "temperature"]
METRICS = ["entropy", "p_screen_off", "acc_d0", "both", "p_h_star", "p_h_bar", "on_mass", "eff_p_screen_off",
           "stated_screen_off", "stated_acc_d0", "passed_screen_off", "passed_acc_d0", "passed_target",
           "n_examples", "n_invalid", "redraws", "consistent_rate", "carried"]
FIG_METRICS = [("p_screen_off", "P(screen = off) of the stated belief"), ("passed_screen_off", "passed rule: screen off"),
               ("passed_acc_d0", "passed rule: accuracy on d⁰"), ("on_mass", "on-choice mass Σ_h exp(l_h)"),
               ("entropy", "entropy of P(h) (nats)"), ("consistent_rate", "written examples consistent with the rule")]


def cell_table(st: StoreData) -> pd.DataFrame:
    a = st.arrays
    P = a["probs"].astype(np.float64)
    C, G1, _ = P.shape
    hs = hypotheses()
    off = np.array([h[SCREEN] == "off" for h in hs])
    cols = {k: np.full((C, G1), np.nan) for k in METRICS}
    for i, h_index in enumerate(st.cells["h_index"].to_numpy()):
        h_star = feasible_rules()[int(h_index)]
        h_bar = hs.index(tuple("off" if k == SCREEN else v for k, v in enumerate(hs[h_star])))
        n0 = int(a["n_examples"][i, 0])
        acc0 = accuracy(a["inputs"][i, 0, :n0].astype(np.int64), a["outputs"][i, 0, :n0].astype(np.int64))
        cons = acc0 == 1.0
        cols["entropy"][i] = bayes.entropy(P[i])
        cols["p_screen_off"][i] = P[i] @ off
        cols["acc_d0"][i] = P[i] @ acc0
        cols["both"][i] = P[i] @ (cons & off)
        cols["p_h_star"][i], cols["p_h_bar"][i] = P[i, :, h_star], P[i, :, h_bar]
        for pre, key in (("stated", "rule"), ("passed", "rule_passed")):
            r = a[key][i].astype(np.int64)
            ok = r >= 0
            rr = np.clip(r, 0, None)
            cols[f"{pre}_screen_off"][i] = np.where(ok, off[rr], np.nan)
            cols[f"{pre}_acc_d0"][i] = np.where(ok, acc0[rr], np.nan)
        rp = np.clip(a["rule_passed"][i].astype(np.int64), 0, None)
        cols["passed_target"][i] = np.where(a["rule_passed"][i] >= 0, off[rp] & cons[rp], np.nan)
    cols["on_mass"] = a["on_mass"].astype(np.float64)
    cols["eff_p_screen_off"] = a["eff_p_screen_off"].astype(np.float64)
    for k in ("n_examples", "n_invalid", "redraws"):
        v = a[k].astype(np.float64)
        cols[k] = np.where(v >= 0, v, np.nan)
    n_cons = a["n_consistent"].astype(np.float64)
    # n_consistent[g] counts the examples written at g, i.e. d^{g+1}
    nxt = np.concatenate([cols["n_examples"][:, 1:], np.full((C, 1), np.nan)], axis=1)
    cols["consistent_rate"] = np.where((n_cons >= 0) & (nxt > 0), n_cons / np.where(nxt > 0, nxt, 1), np.nan)
    cols["carried"] = a["carried"].astype(np.float64)
    df = pd.DataFrame({"experiment": st.experiment, "model": st.model,
                       "cell": np.repeat(st.cells["cell"].to_numpy(), G1), "generation": np.tile(np.arange(G1), C)})
    for k in ("bias", "position", "interaction", "h_index", "temperature", "d0_seed", "sample"):
        df[k] = np.repeat(st.cells[k].to_numpy(), G1)
    for k in METRICS:
        df[k] = cols[k].reshape(-1)
    return df


def by_generation(cells: pd.DataFrame) -> pd.DataFrame:
    return mean_se_by(cells, KEYS + ["generation"], METRICS)


PROB_METRICS = {"p_screen_off", "passed_screen_off", "passed_acc_d0", "consistent_rate"}


def _fig(inp: FamilyInput, exp: str, model: str, tab: pd.DataFrame) -> Figure | Text:
    """The per-generation figure, or a sentence why there is none (fewer than two generations)."""
    d = tab[(tab["experiment"] == exp) & (tab["model"] == model)]
    last = int(d["generation"].max())
    why = F.too_few_generations(last, f"{exp}, {model}")
    if why:
        return Text(why)
    # average over h* per condition for the figure (the table keeps h*)
    d = d.groupby(["bias", "position", "interaction", "temperature", "generation"], sort=True)[
        [m for m, _ in FIG_METRICS]].mean().reset_index()
    conds = list(dict.fromkeys(zip(d["bias"], d["position"], d["interaction"], d["temperature"])))
    cmap = F.plt.get_cmap("viridis")(np.linspace(0, 0.85, max(len(conds), 1)))
    fig, axes = F.grid(len(FIG_METRICS), ncols=3, sharey=False)
    for ax, (m, lab) in zip(axes, FIG_METRICS):
        ax.set_title(lab, fontsize=9)
        F.generation_axis(ax, last)
        if not F.has_data(d[m]):
            F.no_data(ax, "no data: not recorded in these chains")
            continue
        for k, (b, pos, it, t) in enumerate(conds):
            g = d[(d["bias"] == b) & (d["position"] == pos) & (d["interaction"] == it) & (d["temperature"] == t)]
            ax.plot(g["generation"], g[m], color=cmap[k], lw=1.4, marker="o", ms=3, label=f"{b}@{pos}, {it}, T={t:g}")
        if m == "on_mass":
            ax.set_yscale("log")
        elif m in PROB_METRICS:
            ax.set_ylim(-0.02, 1.02)
    F.suptitle(fig, f"{exp} — {model}: the original rule game (protocol paper), mean over h*, d⁰ seeds and chains")
    rows = F.legend_below(fig, axes, ncol=3)
    return Figure(F.save(fig, inp.figures_dir, f"rules_paper_{exp}_{model}", rows),
                  f"{exp}, {model}: per generation, P(screen = off) of the belief, whether the passed rule has the "
                  "screen off, its accuracy on d⁰, the on-choice mass, the entropy of P(h) and the share of the "
                  "written examples that the rule reproduces; one line per bias@position, interaction, temperature.")


def section(inp: FamilyInput, stores: list[StoreData]) -> tuple[dict, list, dict, Section]:
    cells = pd.concat([cell_table(st) for st in stores], ignore_index=True)
    tab = by_generation(cells)
    figs = [_fig(inp, e, m, tab) for e, m in sorted({(st.experiment, st.model) for st in stores})]
    last = tab.loc[tab.groupby(KEYS)["generation"].idxmax()]
    summary: dict[str, dict] = {}
    for _, r in last.iterrows():
        key = f"{r['experiment']}: {r['bias']}@{r['position']}, {r['interaction']}, h{int(r['h_index']):03d}, " \
              f"T={r['temperature']:g}"
        summary.setdefault(r["model"], {})[key] = {k: float(r[k]) for k in ("p_screen_off", "passed_screen_off",
                                                                            "passed_acc_d0", "on_mass")}
    show = ["experiment", "model", "bias", "position", "interaction", "h_index", "temperature", "generation",
            "n_chains", "p_screen_off", "passed_screen_off", "passed_acc_d0", "passed_target", "on_mass",
            "consistent_rate"]
    sec = Section("Iterated learning: the original rule game (protocol paper)", [
        Text("Rule chains as in the original study: the model states a rule (P(h) read exactly over the 243 rules), "
             "optionally refines it, and writes the next examples itself. `p_screen_off` of the belief; for the "
             "passed rule: screen off, accuracy on d⁰, `passed_target` = screen off and all of d⁰ (the notebooks' "
             "h̄ hit); `consistent_rate` = written examples the rule reproduces. Mean over d⁰ seeds and chains."),
        Table(last[show], "Last generation per condition (all generations in rules_paper_by_generation)."),
        *figs,
    ])
    return ({"rules_paper_by_generation": tab, "rules_paper_cells": cells},
            [f.path for f in figs if isinstance(f, Figure)], summary, sec)
