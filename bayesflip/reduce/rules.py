"""Reducer of the ``rules`` family: rule-induction chains over the 243 hypotheses (EXPERIMENTS.md §3).

Every metric is recomputed here from the stored belief ``P(h)`` (``probs``, generation ×
hypothesis) and the store's params, per cell and generation g:

* ``entropy`` = ``−Σ_h P(h) log P(h)`` (nats; at most log 243 ≈ 5.49);
* ``p_screen_off`` = ``Σ_{h: h[screen] = off} P(h)``;
* ``acc_d0`` = ``Σ_h P(h) a(h)``, ``a(h)`` = fraction of the initial examples d⁰ (``true_rule`` on
  ``init_inputs``) that h reproduces;
* ``both`` = ``Σ_h P(h) 1[a(h) = 1 and h[screen] = off]``;
* ``p_true_rule`` = ``P(true_rule)``; ``p_max`` = ``max_h P(h)``;
* ``on_mass`` = the stored on-choice mass ``Σ_h exp(l_h)`` (raw log-probs of the 243 rule strings);
* the same four for ``P_eff`` (prefix ``eff_``): ``P`` (interaction none), ``∝ P(h) y(h)``
  (self_check, ``y`` = stored ``check_yes``), ``∝ P(h) 1[a(h) = 1]`` (refine);
* ``sampled_screen_off`` / ``sampled_consistent``: whether the rule sampled at g (the one that
  produced ``d^{g+1}``) has the screen off / reproduces d⁰.

``rules_by_generation``: mean and s.e. (std / √N) over the N chains of each (experiment, model,
bias, interaction) per generation; ``rules_cells``: the per-cell values.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from matplotlib.ticker import MaxNLocator

from .. import bayes
from ..experiments.rules_world import OBJECTS, VALUES, accuracy, hypotheses, parse_subset, rule_output, subsets
from . import figures as F
from .base import Figure, FamilyInput, ReducedFamily, Section, Table, Text, reduce_by_protocol, register_reducer
from .load import StoreData

METRICS = ["entropy", "p_screen_off", "acc_d0", "both", "p_true_rule", "p_max", "on_mass",
           "eff_entropy", "eff_p_screen_off", "eff_acc_d0", "eff_both", "sampled_screen_off", "sampled_consistent"]
FIG_METRICS = [("entropy", "entropy of P(h) (nats)"), ("p_screen_off", "P(screen = off)"),
               ("acc_d0", "accuracy on d⁰"), ("both", "P(consistent with d⁰ and screen off)"),
               ("on_mass", "on-choice mass Σ_h exp(l_h)")]
BIAS_ORDER = ["strong", "medium", "weak", "none"]
LINESTYLE = {"none": "-", "self_check": "--", "refine": ":"}


def world(params: dict) -> dict[str, np.ndarray]:
    """Per-hypothesis masks of a store's world: ``acc0`` a(h), ``consistent``, ``screen_off``, ``true`` index."""
    screen = OBJECTS.index(params.get("screen", "A"))
    true_rule = params["true_rule"]
    ins = np.array([parse_subset(s) for s in params["init_inputs"]], dtype=np.int64)
    outs = np.array([VALUES.index(rule_output(true_rule, subsets()[i])) for i in ins], dtype=np.int64)
    acc0 = accuracy(ins, outs)
    hs = hypotheses()
    true_idx = hs.index(tuple(true_rule[o] for o in OBJECTS))
    return {"acc0": acc0, "consistent": acc0 == 1.0, "screen_off": np.array([h[screen] == "off" for h in hs]),
            "true": np.array(true_idx)}


def belief_metrics(P: np.ndarray, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """entropy, p_screen_off, acc_d0, both of distributions ``P`` (..., 243)."""
    off, cons = w["screen_off"].astype(float), w["consistent"]
    return {"entropy": np.asarray(bayes.entropy(P), dtype=float), "p_screen_off": P @ off,
            "acc_d0": P @ w["acc0"], "both": P @ (cons & w["screen_off"]).astype(float)}


def effective(P: np.ndarray, interaction: str, check_yes: np.ndarray, consistent: np.ndarray) -> np.ndarray:
    """P_eff: P (none), ∝ P y (self_check), ∝ P 1[consistent with d⁰] (refine)."""
    if interaction == "self_check":
        w = P * check_yes
    elif interaction == "refine":
        w = P * consistent[None, :].astype(float)
    else:
        return P
    return w / w.sum(axis=-1, keepdims=True)


def cell_table(st: StoreData) -> pd.DataFrame:
    w = world(st.params)
    P = st.arrays["probs"].astype(np.float64)                              # (C, G+1, 243)
    yes = st.arrays["check_yes"].astype(np.float64)
    C, G1, _ = P.shape
    cols: dict[str, np.ndarray] = {k: np.empty((C, G1)) for k in METRICS}
    for i, inter in enumerate(st.cells["interaction"]):
        m = belief_metrics(P[i], w)
        e = belief_metrics(effective(P[i], str(inter), yes[i], w["consistent"]), w)
        for k in m:
            cols[k][i], cols["eff_" + k][i] = m[k], e[k]
    cols["p_true_rule"] = P[..., int(w["true"])]
    cols["p_max"] = P.max(axis=-1)
    cols["on_mass"] = st.arrays["on_mass"].astype(np.float64)
    rule = st.arrays["rule"].astype(np.int64)
    ok = rule >= 0
    r = np.clip(rule, 0, None)
    cols["sampled_screen_off"] = np.where(ok, w["screen_off"][r], np.nan)
    cols["sampled_consistent"] = np.where(ok, w["consistent"][r], np.nan)
    df = pd.DataFrame({"experiment": st.experiment, "model": st.model,
                       "cell": np.repeat(st.cells["cell"].to_numpy(), G1),
                       "bias": np.repeat(st.cells["bias"].to_numpy(), G1),
                       "interaction": np.repeat(st.cells["interaction"].to_numpy(), G1),
                       "sample": np.repeat(st.cells["sample"].to_numpy(), G1),
                       "generation": np.tile(np.arange(G1), C)})
    for k in METRICS:
        df[k] = cols[k].reshape(-1)
    return df


def by_generation(cells: pd.DataFrame) -> pd.DataFrame:
    keys = ["experiment", "model", "bias", "interaction", "generation"]
    g = cells.groupby(keys, sort=True)
    out = g[METRICS].mean()
    n = g.size()
    se = g[METRICS].std(ddof=1).div(np.sqrt(n), axis=0)
    out = out.join(se.add_suffix("_se"))
    out.insert(0, "n_chains", n)
    out = out.reset_index()
    out["bias"] = pd.Categorical(out["bias"], [b for b in BIAS_ORDER if b in set(out["bias"])] +
                                 sorted(set(out["bias"]) - set(BIAS_ORDER)))
    return out.sort_values(keys).reset_index(drop=True).astype({"bias": str})


def _fig(inp: FamilyInput, exp: str, model: str, tab: pd.DataFrame) -> Figure | Text:
    """The per-generation figure, or a sentence why there is none (fewer than two generations)."""
    d = tab[(tab["experiment"] == exp) & (tab["model"] == model)]
    why = F.too_few_generations(int(d["generation"].max()), f"{exp}, {model}")
    if why:
        return Text(why)
    biases = list(dict.fromkeys(d["bias"]))
    cmap = F.plt.get_cmap("viridis")(np.linspace(0, 0.85, max(len(biases), 1)))
    fig, axes = F.grid(len(FIG_METRICS), ncols=3, sharey=False)
    for ax, (m, lab) in zip(axes, FIG_METRICS):
        for (b, it), g in d.groupby(["bias", "interaction"], sort=False):
            g = g.sort_values("generation")
            col = cmap[biases.index(b)]
            x, y, se = g["generation"].to_numpy(), g[m].to_numpy(), g[f"{m}_se"].to_numpy()
            ax.plot(x, y, color=col, ls=LINESTYLE.get(it, "-."), lw=1.6, label=f"bias {b}, interaction {it}")
            if np.isfinite(se).any():
                ax.fill_between(x, y - se, y + se, color=col, alpha=0.15, lw=0)
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("generation")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if m == "entropy":
            ax.set_ylim(0, math.log(len(hypotheses())) * 1.02)
        elif m == "on_mass":
            ax.set_yscale("log")   # the mass on 243 long rule strings can be orders of magnitude below 1
        else:
            ax.set_ylim(-0.02, 1.02)
    F.suptitle(fig, f"{exp} — {model}: rule-induction chains, belief P(h) over the 243 rules per generation "
                    "(mean ± s.e. over chains)")
    rows = F.legend_below(fig, axes, ncol=3)
    return Figure(F.save(fig, inp.figures_dir, f"rules_{exp}_{model}", rows),
                  f"{exp}, {model}: entropy of P(h), P(screen = off), accuracy on d⁰, P(consistent and screen off) and "
                  "the on-choice mass per generation; colour = bias sentence, line style = interaction "
                  "(solid none, dashed self-check, dotted refinement).")


@register_reducer("rules")
def reduce_rules(inp: FamilyInput) -> ReducedFamily:
    """Clean stores here; ``protocol: paper`` stores in :mod:`.rules_paper` (own tables, figures, section)."""
    from . import rules_paper

    return reduce_by_protocol(inp, _reduce_clean, rules_paper.section)


def _reduce_clean(inp: FamilyInput, stores: list[StoreData]) -> ReducedFamily:
    cells = pd.concat([cell_table(st) for st in stores], ignore_index=True)
    tab = by_generation(cells)
    figs = [_fig(inp, e, m, tab) for e, m in sorted({(st.experiment, st.model) for st in stores})]
    last = tab.loc[tab.groupby(["experiment", "model", "bias", "interaction"])["generation"].idxmax()]
    first = tab[tab["generation"] == 0]
    show_cols = ["experiment", "model", "bias", "interaction", "generation", "n_chains", "entropy", "p_screen_off",
                 "acc_d0", "both", "eff_p_screen_off", "eff_both", "on_mass"]
    summary: dict[str, dict] = {}
    for _, r in last.iterrows():
        summary.setdefault(r["model"], {})[f"{r['experiment']}: bias {r['bias']}, {r['interaction']}"] = {
            k: float(r[k]) for k in ("entropy", "p_screen_off", "acc_d0", "both", "on_mass")} | {
            "generation": int(r["generation"])}
    sec = Section("Iterated learning: rule induction", [
        Text("Belief P(h) over the 243 rules read exactly per generation (family `rules`), recomputed from the "
             "stored P(h): entropy `−Σ P log P` (nats, max log 243 ≈ 5.49), `P(screen = off)`, accuracy on d⁰ "
             "`Σ P(h) a(h)`, `both` = P(consistent with d⁰ and screen off), on-choice mass `Σ_h exp(l_h)`; the "
             "`eff_` columns are the same for P_eff (self-check / refinement). Mean over chains."),
        Table(pd.concat([first, last])[show_cols].sort_values(["experiment", "model", "bias", "interaction",
                                                               "generation"]),
              "First and last generation per condition (all generations in rules_by_generation)."),
        *figs,
    ])
    return ReducedFamily(tables={"rules_by_generation": tab, "rules_cells": cells},
                         figures=[f.path for f in figs if isinstance(f, Figure)],
                         summary={"models": summary}, sections=[sec])
