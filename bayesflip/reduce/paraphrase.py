"""Reducer of the ``paraphrase`` family (B: the model's prior over prompt paraphrases).

Per store (experiment × model) and paraphrase i (no evidence in context):

* ``p_i = softmax(logprobs_i)`` over the K choices and off-choice mass ``1 − Σ_c exp(logprob_ic)``
  (:func:`bayesflip.engine.choice_distribution`);
* the prior per model, process and choice c: ``mean_i p_i(c)`` and the sample standard deviation
  ``std_i p_i(c) = sqrt(Σ_i (p_i(c) − mean)² / (n − 1))`` over the n paraphrases (coin: c = heads;
  die: every face), with min / median / max;
* ``std_paper`` = the population std (ddof = 0, the coin-flip paper's ``np.std``) over the same paraphrases;
* ``TVD(mean, uniform) = ½ Σ_c |mean_c − 1/K|``: how far the average prior is from fair;
* ``on_choice_mass`` = mean ``Σ_c exp(logprob_c)``; below ``LOW_MASS`` (10 %) the row is flagged
  (``low_on_choice_mass``): the renormalised probability rests on little mass.

Only cells whose evidence kind (:meth:`StoreData.cell_evidence`) is statement-free and
context-free (``statement: none``, ``context: none`` — every cell this family writes) enter a
prior; any other cell is left out and named in the report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import bayes
from ..engine import choice_distribution
from . import figures as F
from .base import LOW_MASS, Block, Figure, FamilyInput, Heading, ReducedFamily, Section, Table, Text, register_reducer
from .load import StoreData


def _labels(st: StoreData, k: int) -> list[str]:
    return [str(x).strip() for x in st.labels.get("choice", range(k))]


def prior_cells(st: StoreData) -> np.ndarray:
    """(C,) bool: the cells that are statement-free and context-free (the only ones a prior uses)."""
    ev = st.cell_evidence()
    return ((ev["statement"] == "none") & (ev["context"] == "none")).to_numpy()


def _cell_table(st: StoreData) -> pd.DataFrame:
    """Long: one row per (paraphrase, choice) of the statement-free, context-free cells."""
    keep = prior_cells(st)
    probs, off = choice_distribution(st.arrays["logprobs"][keep])
    labels = _labels(st, probs.shape[1])
    n, k = probs.shape
    cells = st.cells[keep]
    return pd.DataFrame({
        "experiment": st.experiment, "model": st.model, "protocol": str(st.params.get("protocol", "clean")),
        "process": str(st.params.get("process", "coin")),
        "paraphrase": np.repeat(cells["paraphrase"].to_numpy(dtype=int), k),
        "text": np.repeat(cells["text"].astype(str).to_numpy(), k),
        "choice": np.tile(labels, n), "p": probs.reshape(-1), "off_choice_mass": np.repeat(off, k),
    })


def _prior_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (experiment, model, process, choice): mean, sample std (ddof = 1), min, median, max over paraphrases."""
    by = ["experiment", "model", "protocol", "process", "choice"]
    g = cells.groupby(by, sort=False)["p"]
    off = cells.groupby(by, sort=False)["off_choice_mass"].mean()
    out = pd.DataFrame({"p_mean": g.mean(), "p_std": g.std(ddof=1), "p_std_paper": g.std(ddof=0), "p_min": g.min(),
                        "p_median": g.median(),
                        "p_max": g.max(), "off_choice_mass": off, "on_choice_mass": 1.0 - off,
                        "low_on_choice_mass": (1.0 - off) < LOW_MASS, "n_paraphrases": g.size()}).reset_index()
    return out


def _uniform_tvd(prior: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (exp, m, proc), g in prior.groupby(["experiment", "model", "process"], sort=True):
        p = g["p_mean"].to_numpy(float)
        rows.append({"experiment": exp, "model": m, "process": proc,
                     "tvd_mean_to_uniform": float(bayes.tvd(p, np.full(len(p), 1.0 / len(p))))})
    return pd.DataFrame(rows)


def _extremes(cells: pd.DataFrame, n: int = 3) -> pd.DataFrame:
    """The n paraphrases with the highest and the lowest P(heads) per coin store."""
    c = cells[(cells["process"] == "coin") & (cells["choice"] == "heads")]
    parts = []
    for _, g in c.groupby(["experiment", "model"], sort=True):
        g = g.sort_values("p", ascending=False)
        hi, lo = g.head(n).assign(rank="highest"), g.tail(n).assign(rank="lowest")
        parts.append(pd.concat([hi, lo.iloc[::-1]]))
    if not parts:
        return pd.DataFrame()
    out = pd.concat(parts)
    out["on_choice_mass"] = 1.0 - out["off_choice_mass"]
    out["low_on_choice_mass"] = out["on_choice_mass"] < LOW_MASS
    cols = ["experiment", "model", "rank", "paraphrase", "text", "p", "on_choice_mass", "low_on_choice_mass"]
    return out[cols].rename(columns={"p": "P(heads)"}).reset_index(drop=True)


# ---------------------------------------------------------------------------- figures
def _fig_coin(inp: FamilyInput, cells: pd.DataFrame) -> Figure:
    d = cells[(cells["process"] == "coin") & (cells["choice"] == "heads")]
    keys = sorted({(e, m) for e, m in zip(d["experiment"], d["model"])}, key=lambda t: (t[1], t[0]))
    multi = len({e for e, _ in keys}) > 1
    fig, ax = F.plt.subplots(figsize=(max(6.0, 1.5 * len(keys) + 3), 4.0))
    rng = np.random.default_rng(0)
    for i, (e, m) in enumerate(keys):
        v = d[(d["experiment"] == e) & (d["model"] == m)]["p"].to_numpy(float)
        ax.violinplot([v], positions=[i], widths=0.7, showextrema=False)
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(v)), v, s=14, alpha=0.7, color="tab:blue",
                   label="one paraphrase")
        ax.errorbar(i, v.mean(), yerr=v.std(ddof=1) if len(v) > 1 else 0, fmt="o", color="black", capsize=5,
                    label="mean ± std over paraphrases", zorder=5)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="fair coin 0.5")
    ax.set_xticks(range(len(keys)), [f"{m}\n({e})" if multi else m for e, m in keys], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("P(heads), no evidence")
    ax.set_title("Coin prior over prompt paraphrases: P(heads) per paraphrase and model", fontsize=10)
    rows = F.legend_below(fig, [ax])
    return Figure(F.save(fig, inp.figures_dir, "paraphrase_prior_coin", rows),
                  "Coin prior: the model's P(heads) for every paraphrase of the query (dots, violin = their "
                  "distribution) with the mean ± standard deviation over paraphrases.")


def _fig_die(inp: FamilyInput, cells: pd.DataFrame) -> Figure:
    d = cells[cells["process"] == "die"]
    models = sorted(d["model"].unique())
    labels = list(dict.fromkeys(d["choice"]))
    fig, axes = F.grid(len(models), ncols=2, panel=(5.0, 3.4))
    rng = np.random.default_rng(0)
    for ax, m in zip(axes, models):
        dm = d[d["model"] == m]
        for k, lab in enumerate(labels):
            v = dm[dm["choice"] == lab]["p"].to_numpy(float)
            ax.scatter(k + rng.uniform(-0.15, 0.15, len(v)), v, s=10, alpha=0.6, color="tab:blue",
                       label="one paraphrase")
            ax.errorbar(k, v.mean(), yerr=v.std(ddof=1) if len(v) > 1 else 0, fmt="o", color="black", capsize=4,
                        label="mean ± std over paraphrases", zorder=5)
        ax.axhline(1 / len(labels), color="grey", lw=0.8, ls=":", label="fair die 1/K")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("face")
        ax.set_ylim(0, 1)
        ax.set_title(m, fontsize=9)
    axes[0].set_ylabel("P(face), no evidence")
    F.suptitle(fig, "Die prior over prompt paraphrases: P(face) per paraphrase, mean ± std per face")
    rows = F.legend_below(fig, axes)
    return Figure(F.save(fig, inp.figures_dir, "paraphrase_prior_die", rows),
                  "Die prior: the model's probability of every face for each paraphrase (dots) with the mean ± "
                  "standard deviation over paraphrases.")


# ---------------------------------------------------------------------------- reducer
def _models_summary(prior: pd.DataFrame) -> dict:
    models: dict[str, dict] = {}
    for (exp, m, proc), g in prior.groupby(["experiment", "model", "process"], sort=True):
        ent = {"process": proc, "n_paraphrases": int(g["n_paraphrases"].iloc[0]),
               "off_choice_mass": float(g["off_choice_mass"].mean())}
        if proc == "coin":
            h = g[g["choice"] == "heads"].iloc[0]
            ent.update(p_heads_mean=float(h["p_mean"]), p_heads_std=float(h["p_std"]),
                       p_heads_std_paper=float(h["p_std_paper"]), protocol=str(h["protocol"]))
        else:
            ent.update(choices=list(g["choice"]), p_mean=[float(x) for x in g["p_mean"]],
                       p_std=[float(x) for x in g["p_std"]])
        models.setdefault(m, {})[exp] = ent
    return models


@register_reducer("paraphrase")
def reduce_paraphrase(inp: FamilyInput) -> ReducedFamily:
    left_out = {f"{st.experiment} ({st.model}): {int((~prior_cells(st)).sum())} cells"
                for st in inp.stores if not prior_cells(st).all()}
    cells = pd.concat([_cell_table(st) for st in inp.stores], ignore_index=True)
    prior = _prior_table(cells)
    unif = _uniform_tvd(prior)
    figs = []
    if (cells["process"] == "coin").any():
        figs.append(_fig_coin(inp, cells))
    if (cells["process"] == "die").any():
        figs.append(_fig_die(inp, cells))
    coin = prior[(prior["process"] == "coin") & (prior["choice"] == "heads")]
    die = prior[prior["process"] == "die"]
    ext = _extremes(cells)
    blocks: list[Block] = [
        Heading("Prior over prompt paraphrases (family B)"),
        Text("Every paraphrase i of the query is scored with no statement and nothing else in context; "
             "`p_i = softmax(logprobs_i)`. The prior is reported as the mean over paraphrases ± the sample standard "
             "deviation `sqrt(Σ_i (p_i − mean)² / (n − 1))`; the prompts differ, so this spread is the model's "
             "sensitivity to the wording of the question, not numerical noise. `on_choice_mass` = the probability the "
             f"choices get before renormalising; below {LOW_MASS:.0%} (`low_on_choice_mass`) the renormalised "
             "probability rests on little mass."
             + (f" Left out (not statement-free and context-free): {'; '.join(sorted(left_out))}."
                if left_out else "")),
    ]
    if len(coin):
        blocks.append(Table(coin.drop(columns=["process", "choice"]).rename(
            columns={c: c.replace("p_", "P(heads) ") for c in ("p_mean", "p_std", "p_std_paper", "p_min", "p_median",
                                                                "p_max")}),
            "Coin: P(heads) over paraphrases (`std_paper`: the population std, ddof = 0, as the paper's np.std; "
            "instruct models: over every (instruct prompt, query) pair of the store)."))
    if len(die):
        wide = die.pivot_table(index=["experiment", "model"], columns="choice", values=["p_mean", "p_std"],
                               sort=False)
        wide.columns = [f"{'mean' if a == 'p_mean' else 'std'} {c}" for a, c in wide.columns]
        blocks.append(Table(wide.reset_index(), "Die: P(face) mean and std over paraphrases."))
    low = prior[prior["low_on_choice_mass"]].drop_duplicates(["experiment", "model"])
    if len(low):
        blocks.append(Text("Flagged: the mean prior of " + ", ".join(
            f"`{e}` ({m}, on-choice mass {v:.3g})" for e, m, v in zip(low["experiment"], low["model"],
                                                                      low["on_choice_mass"]))
            + f" comes from an on-choice mass below {LOW_MASS:.0%}."))
    blocks.append(Table(unif, "TVD between the mean prior over paraphrases and the uniform distribution."))
    if len(ext):
        blocks.append(Table(ext, "The paraphrases with the highest and lowest P(heads)."))
        low_ext = ext[ext["low_on_choice_mass"]]
        if len(low_ext):
            blocks.append(Text("Flagged: " + ", ".join(
                f"`{e}` paraphrase {q} ({m}: P(heads) {ph:.3g}, on-choice mass {v:.3g})"
                for e, m, q, ph, v in zip(low_ext["experiment"], low_ext["model"], low_ext["paraphrase"],
                                          low_ext["P(heads)"], low_ext["on_choice_mass"]))
                + f" — a P(heads) renormalised from an on-choice mass below {LOW_MASS:.0%}."))
    blocks += figs
    return ReducedFamily(
        tables={"paraphrase_cells": cells, "paraphrase_prior": prior, "paraphrase_uniform_tvd": unif},
        figures=[f.path for f in figs],
        summary={"models": _models_summary(prior)},
        sections=[Section("Priors", blocks)],
    )
