"""Reducer of the ``cot`` family (H: does a sampled chain of thought move the answer towards the stated bias?).

Per store (experiment × model) and cell (bias b, face, sample):

* with CoT ``p = softmax(logprobs)`` and without (baseline, the same prompt minus cue and
  reasoning) ``p⁰ = softmax(logprobs_baseline)``; off-choice masses ``1 − Σ_c exp(logprob_c)``
  (:func:`bayesflip.engine.choice_distribution`);
* the stated distribution ``q = p_stated`` (coin ``(b, 1 − b)``; die ``b`` on the named face,
  ``(1 − b)/5`` elsewhere; NaN for the no-needle cells, bias −1);
* ``TVD(p, q) = ½ Σ_i |p_i − q_i|`` and ``TVD(p⁰, q)`` (:func:`bayesflip.bayes.tvd`);
* ``p_target`` = P(heads) (coin) / P(named face) (die), with and without CoT.

Per condition (experiment, model, bias, face) over the samples: mean ± std of ``p_target``; mean
per-sample ``TVD(p_s, q)``; the TVD of the reasoning-marginal distribution ``TVD(mean_s p_s, q)``
(the answer distribution of "sample a reasoning, then answer"); the baseline (the same for every
sample); mean off-choice masses; the share of reasoning samples ended by a stop (not the token cap)
and their mean length in tokens. Per store: the least-squares line ``p_target = a · b/100 + c``
(``numpy.polyfit``) over the needle cells' samples, with and without CoT (a = 1, c = 0 follows the
statement exactly; a = 0 ignores it).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import bayes
from ..engine import choice_distribution
from . import figures as F
from .base import Figure, FamilyInput, ReducedFamily, Section, Table, Text, protocol_of, register_reducer
from .load import StoreData
from .poisson import fit_line

NO_NEEDLE = -1


def sample_table(st: StoreData) -> pd.DataFrame:
    """One row per trusted cell: target probability, TVD to the stated distribution and off-choice mass,
    with and without CoT, plus every choice's renormalised probability."""
    a, c = st.arrays, st.cells
    process = str(st.params.get("process", "coin"))
    p, off = choice_distribution(a["logprobs"])
    p0, off0 = choice_distribution(a["logprobs_baseline"])
    q = a["p_stated"].astype(np.float64)
    n = len(c)
    face = c["face"].to_numpy(dtype=np.int64) if "face" in c else np.full(n, 1, dtype=np.int64)
    target = face - 1 if process == "die" else np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    bias = c["bias"].to_numpy(dtype=np.int64)
    df = pd.DataFrame({
        "experiment": st.experiment, "model": st.model, "process": process,
        "protocol": protocol_of(st), "reasoning": str(st.params.get("reasoning", "sampled")),
        "cell": c["cell"].to_numpy(),
        "bias": bias, "face": pd.array(face if "face" in c else [pd.NA] * n, dtype="Int64"),
        "sample": c["sample"].to_numpy(),
        "stated": np.where(bias == NO_NEEDLE, np.nan, bias / 100.0),
        "p_target_cot": p[rows, target], "p_target_base": p0[rows, target], "p_target_stated": q[rows, target],
        "tvd_cot": np.asarray(bayes.tvd(p, q), dtype=float).reshape(n),
        "tvd_base": np.asarray(bayes.tvd(p0, q), dtype=float).reshape(n),
        "off_cot": off, "off_base": off0,
        "cot_tokens": a["cot_tokens"].astype(np.int64), "stopped": a["stopped"].astype(bool),
    })
    for k, lab in enumerate(choice_labels(st)):
        df[f"p_cot_{lab}"] = p[:, k]
        df[f"p_base_{lab}"] = p0[:, k]
        df[f"q_{lab}"] = q[:, k]
    df["cot"] = [str(x) for x in a["cot"]]
    return df


def choice_labels(st: StoreData) -> list[str]:
    k = st.arrays["logprobs"].shape[1]
    return [str(x).strip() for x in st.labels.get("choice", range(k))]


def by_condition(samples: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Per (experiment, model, process, bias, face) of one store's sample table: the statistics of the
    module docstring (``labels``: the store's choice labels, naming its ``p_cot_*`` / ``q_*`` columns)."""
    rows = []
    keys = ["experiment", "model", "process", "bias", "face"]
    for key, g in samples.groupby(keys, sort=True, dropna=False):
        marginal = g[[f"p_cot_{lab}" for lab in labels]].to_numpy(float).mean(axis=0)
        q = g[[f"q_{lab}" for lab in labels]].to_numpy(float)[0]
        rows.append({**dict(zip(keys, key)), "n_samples": int(len(g)), "stated": float(g["stated"].iloc[0]),
                     "p_target_cot_mean": float(g["p_target_cot"].mean()),
                     "p_target_cot_std": float(g["p_target_cot"].std(ddof=1)) if len(g) > 1 else np.nan,
                     "p_target_base": float(g["p_target_base"].mean()),
                     "tvd_cot": float(g["tvd_cot"].mean()), "tvd_cot_marginal": float(bayes.tvd(marginal, q)),
                     "tvd_base": float(g["tvd_base"].mean()),
                     "off_cot": float(g["off_cot"].mean()), "off_base": float(g["off_base"].mean()),
                     "stopped_frac": float(g["stopped"].mean()), "cot_tokens_mean": float(g["cot_tokens"].mean())})
    out = pd.DataFrame(rows)
    out["face"] = out["face"].astype("Int64")
    return out


def store_table(samples: pd.DataFrame, cond: pd.DataFrame) -> pd.DataFrame:
    """Per (experiment, model, process): means over the needle conditions, the lines of ``p_target`` on the
    stated bias (per-sample points), and the no-needle ``p_target`` where those cells exist."""
    rows = []
    for (exp, model, process), g in samples.groupby(["experiment", "model", "process"], sort=True):
        nd = g[g["bias"] != NO_NEEDLE]
        cn = cond[(cond["experiment"] == exp) & (cond["model"] == model) & (cond["bias"] != NO_NEEDLE)]
        free = g[g["bias"] == NO_NEEDLE]
        sc, ic, rc, n = fit_line(nd["stated"], nd["p_target_cot"])
        sb, ib, rb, _ = fit_line(nd["stated"], nd["p_target_base"])
        rows.append({"experiment": exp, "model": model, "process": process, "n_needle_samples": n,
                     "tvd_cot": float(nd["tvd_cot"].mean()) if len(nd) else np.nan,
                     "tvd_cot_marginal": float(cn["tvd_cot_marginal"].mean()) if len(cn) else np.nan,
                     "tvd_base": float(nd["tvd_base"].mean()) if len(nd) else np.nan,
                     "slope_cot": sc, "intercept_cot": ic, "r_cot": rc,
                     "slope_base": sb, "intercept_base": ib, "r_base": rb,
                     "off_cot": float(g["off_cot"].mean()), "off_base": float(g["off_base"].mean()),
                     "p_target_cot_no_needle": float(free["p_target_cot"].mean()) if len(free) else np.nan,
                     "p_target_base_no_needle": float(free["p_target_base"].mean()) if len(free) else np.nan,
                     "stopped_frac": float(g["stopped"].mean()), "cot_tokens_mean": float(g["cot_tokens"].mean())})
    return pd.DataFrame(rows)


def _fig(inp: FamilyInput, exp: str, process: str, samples: pd.DataFrame, cond: pd.DataFrame) -> Figure:
    d, s = cond[cond["experiment"] == exp], samples[samples["experiment"] == exp]
    models = sorted(d["model"].unique())
    colors = {m: F.plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    what = "P(heads)" if process == "coin" else "P(named face)"
    fig, (a1, a2) = F.grid(2, ncols=2, panel=(5.0, 3.9), sharey=False)
    for k, m in enumerate(models):
        col = colors[m]
        dm = d[(d["model"] == m) & (d["bias"] != NO_NEEDLE)].groupby("stated", sort=True).mean(numeric_only=True)
        sm = s[(s["model"] == m) & (s["bias"] != NO_NEEDLE)]
        x = dm.index.to_numpy(float)
        jit = np.random.default_rng(k).uniform(-0.012, 0.012, len(sm))
        a1.scatter(sm["stated"] + jit, sm["p_target_cot"], s=10, alpha=0.35, color=col, label="with CoT, per sample")
        a1.errorbar(x, dm["p_target_cot_mean"], yerr=dm["p_target_cot_std"].fillna(0), fmt="o-", color=col, lw=1.8,
                    ms=5, capsize=3, label=f"{m}: with CoT (mean ± std)")
        a1.plot(x, dm["p_target_base"], "s--", color=col, lw=1.2, ms=4, mfc="none", label=f"{m}: without CoT")
        a2.plot(x, dm["tvd_cot"], "o-", color=col, lw=1.8, ms=5, label=f"{m}: with CoT (mean per sample)")
        a2.plot(x, dm["tvd_cot_marginal"], "^-.", color=col, lw=1.0, ms=4, label=f"{m}: with CoT, marginal over samples")
        a2.plot(x, dm["tvd_base"], "s--", color=col, lw=1.2, ms=4, mfc="none", label=f"{m}: without CoT")
        free = s[(s["model"] == m) & (s["bias"] == NO_NEEDLE)]
        if len(free):
            a1.axhline(free["p_target_cot"].mean(), color=col, lw=0.9, alpha=0.7, label=f"{m}: no needle, with CoT")
            a1.axhline(free["p_target_base"].mean(), color=col, lw=0.9, ls="--", alpha=0.7,
                       label=f"{m}: no needle, without CoT")
    a1.plot([0, 1], [0, 1], color="black", ls=":", lw=1.2, label="identity (stated bias)")
    for ax in (a1, a2):
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("stated bias b/100")
    a1.set_ylabel(what)
    a1.set_title(f"{what} vs stated bias", fontsize=9)
    a2.set_ylabel("TVD(model, stated)")
    a2.set_title("TVD to the stated distribution", fontsize=9)
    F.suptitle(fig, f"{exp}: answer after a sampled chain of thought vs the same prompt without it")
    rows = F.legend_below(fig, [a1, a2], ncol=3)
    return Figure(F.save(fig, inp.figures_dir, f"cot_{exp}", rows),
                  f"{exp}: {what} after a sampled chain of thought (per sample and mean ± std) and without it "
                  "(baseline), vs the stated bias; the dotted identity is the stated distribution. Right: TVD to the "
                  "stated distribution (mean over samples, and of the sample-averaged answer distribution).")


@register_reducer("cot")
def reduce_cot(inp: FamilyInput) -> ReducedFamily:
    per_store = [(sample_table(st), choice_labels(st)) for st in inp.stores]
    samples = pd.concat([t for t, _ in per_store], ignore_index=True)
    cond = pd.concat([by_condition(t, labs) for t, labs in per_store], ignore_index=True)
    summ = store_table(samples, cond)
    exps = sorted(samples[["experiment", "process"]].drop_duplicates().itertuples(index=False))
    figs = [_fig(inp, exp, process, samples, cond) for exp, process in exps]
    show = cond[["experiment", "model", "process", "bias", "face", "n_samples", "stated", "p_target_cot_mean",
                 "p_target_cot_std", "p_target_base", "tvd_cot", "tvd_cot_marginal", "tvd_base", "off_cot",
                 "off_base", "stopped_frac", "cot_tokens_mean"]]
    models: dict[str, dict] = {}
    for r in summ.to_dict("records"):
        models.setdefault(r["model"], {})[r["experiment"]] = {k: v for k, v in r.items()
                                                             if k not in ("experiment", "model")}
    sec = Section("Chain of thought", [
        Text("Each cell samples a reasoning text after the cue (`Let's think step by step.`), then reads the answer "
             "distribution p after it; the baseline p⁰ is the same prompt without cue and reasoning. The stated "
             "distribution q is the needle's (coin `(b, 1 − b)`). `TVD = ½ Σ|p − q|`; `tvd_cot_marginal` is the TVD "
             "of the answer distribution averaged over the reasoning samples; off-choice mass `1 − Σ_c exp(lp_c)`. "
             "The slope is the least-squares line of P(target) on b/100 over the needle samples (1 = follows the "
             "statement, 0 = ignores it). Bias −1 = no needle."),
        Table(summ, "Per experiment and model: means over the needle cells and the fitted lines."),
        Table(show, "Per stated bias (per-sample rows with the reasoning texts in the cot_samples table)."),
        *figs,
    ])
    return ReducedFamily(tables={"cot_samples": samples, "cot_by_condition": cond, "cot_summary": summ},
                         figures=[f.path for f in figs], summary={"models": models}, sections=[sec])
