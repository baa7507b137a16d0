"""Reducer of the ``needle`` family (A: an explicit bias statement inside filler text).

Per store (experiment × model) and cell:

* model distribution ``p = softmax(logprobs)`` over the K choices and off-choice mass
  ``1 − Σ_c exp(logprob_c)`` (:func:`bayesflip.engine.choice_distribution`);
* the stated distribution ``q`` (the store's ``p_stated``: coin ``(b, 1 − b)``; die ``b`` on the
  named face, ``(1 − b)/5`` on the others; number uniform on the even / odd numbers);
* ``TVD(p, q) = ½ Σ_i |p_i − q_i|`` and ``KL(q ‖ p) = Σ_i q_i log(q_i / p_i)`` (nats; the stated
  distribution first, as in the ICL reducer, so a degenerate b ∈ {0, 100} gives a finite value);
* ``p_target`` = the model's probability of the needle's target: heads (coin), the named face
  (die), the stated parity's numbers (number); ``p_target_stated`` the same under ``q``.

Baselines: ``no_needle`` (filler only) and ``no_context`` (query only) cells state nothing; they
are compared with **every** stated distribution of the experiment's needle grid
(``TVD(p_baseline, q_needle)``): the TVD a model that ignores the needle would get. A needle cell
whose TVD is not below the no-needle baseline at the same length shows no effect of the needle.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import bayes
from ..engine import choice_distribution
from ..experiments import get_family
from ..experiments.needle import NeedleParams, stated_distribution
from . import figures as F
from .base import Figure, FamilyInput, Heading, ReducedFamily, Section, Table, Text, register_reducer
from .load import StoreData

COND_ORDER = {"needle": 0, "no_needle": 1, "no_context": 2}
KEY_COLS = ["experiment", "model", "process"]


def target_mask(process: str, face: int, stated: np.ndarray) -> np.ndarray:
    """(K,) bool: the needle's target choices — heads (coin), the named face (die), the stated parity (number)."""
    k = len(stated)
    m = np.zeros(k, dtype=bool)
    if process == "coin":
        m[0] = True
    elif process == "die":
        m[int(face) - 1] = True
    else:
        m[np.asarray(stated) > 0] = True
    return m


def needle_grid(st: StoreData) -> pd.DataFrame:
    """One row per distinct needle of the experiment's grid (from the family's own cells): needle, bias,
    face, stated distribution ``q`` and target mask."""
    fam = get_family("needle")
    p = fam.Params(**st.params)
    assert isinstance(p, NeedleParams)   # the needle family's Params
    rows, seen = [], set()
    for c in fam.cells(p):
        if c["condition"] != "needle" or c["needle"] in seen:
            continue
        seen.add(c["needle"])
        q = stated_distribution(p.process, c)
        rows.append({"needle": c["needle"], "bias": int(c["bias"]), "face": int(c["face"]), "q": q,
                     "target": target_mask(p.process, c["face"], q)})
    return pd.DataFrame(rows, columns=["needle", "bias", "face", "q", "target"])


def _cell_table(st: StoreData) -> pd.DataFrame:
    probs, off = choice_distribution(st.arrays["logprobs"])
    q = st.arrays["p_stated"].astype(np.float64)
    cells = st.cells
    process = str(st.params.get("process", "coin"))
    labels = [str(x).strip() for x in st.labels.get("choice", range(probs.shape[1]))]
    is_needle = (cells["condition"] == "needle").to_numpy()
    tvd = np.where(is_needle, np.asarray(bayes.tvd(probs, np.nan_to_num(q)), dtype=float), np.nan)
    kl = np.where(is_needle, np.asarray(bayes.kl(np.nan_to_num(q), probs), dtype=float), np.nan)
    p_t, q_t = np.full(len(cells), np.nan), np.full(len(cells), np.nan)
    for i in np.flatnonzero(is_needle):
        m = target_mask(process, int(cells["face"].iloc[i]), q[i])
        p_t[i], q_t[i] = probs[i, m].sum(), q[i, m].sum()
    df = pd.DataFrame({
        "experiment": st.experiment, "model": st.model, "process": process,
        "condition": cells["condition"].astype(str).to_numpy(), "length": cells["length"].to_numpy(dtype=int),
        "depth": cells["depth"].to_numpy(dtype=float), "needle": cells["needle"].astype(str).to_numpy(),
        "bias": cells["bias"].to_numpy(dtype=int), "face": cells["face"].to_numpy(dtype=int),
        "sample": cells["sample"].to_numpy(dtype=int), "cell": cells["cell"].to_numpy(dtype=int),
        "token_length": st.arrays["token_length"].astype(int), "token_depth": st.arrays["token_depth"].astype(int),
        "prompt_tokens": st.arrays["prompt_tokens"].astype(int),
        "off_choice_mass": off, "p_target": p_t, "p_target_stated": q_t, "tvd": tvd, "kl": kl,
    })
    for k, lab in enumerate(labels):
        df[f"p_model_{lab}"] = probs[:, k]
    return df


def _baseline_table(st: StoreData) -> pd.DataFrame:
    """Every baseline cell (no_needle / no_context) × every needle of the grid: TVD, KL, p_target."""
    cells = st.cells
    base = np.flatnonzero((cells["condition"] != "needle").to_numpy())
    grid = needle_grid(st)
    if not len(base) or grid.empty:
        return pd.DataFrame()
    probs, off = choice_distribution(st.arrays["logprobs"][base])
    rows = []
    process = str(st.params.get("process", "coin"))
    for g in grid.itertuples(index=False):
        tvd = np.asarray(bayes.tvd(probs, g.q), dtype=float).reshape(-1)
        kl = np.asarray(bayes.kl(g.q, probs), dtype=float).reshape(-1)
        for j, i in enumerate(base):
            rows.append({"experiment": st.experiment, "model": st.model, "process": process,
                         "condition": str(cells["condition"].iloc[i]), "length": int(cells["length"].iloc[i]),
                         "depth": np.nan, "needle": g.needle, "bias": g.bias, "face": g.face,
                         "sample": int(cells["sample"].iloc[i]), "cell": int(cells["cell"].iloc[i]),
                         "off_choice_mass": float(off[j]), "p_target": float(probs[j, g.target].sum()),
                         "p_target_stated": float(np.asarray(g.q)[g.target].sum()), "tvd": float(tvd[j]),
                         "kl": float(kl[j])})
    return pd.DataFrame(rows)


def _agg(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean of tvd / kl / p_target / off-choice mass per group, with the std and s.e. of the TVD."""
    g = df.groupby(by, sort=True, dropna=False)
    out = g[["tvd", "kl", "p_target", "p_target_stated", "off_choice_mass"]].mean()
    out.insert(1, "tvd_std", g["tvd"].std(ddof=1))
    out["n"] = g.size()
    out.insert(2, "tvd_se", out["tvd_std"] / np.sqrt(out["n"]))
    return out.reset_index()


def target_slope(stated: np.ndarray, p_target: np.ndarray) -> float:
    """Least-squares slope of the model's ``p_target`` on the stated target probability (1: follows the
    needle, 0: ignores it); NaN when the stated probability does not vary (number process)."""
    x, y = np.asarray(stated, dtype=float), np.asarray(p_target, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        return np.nan
    return float(np.polyfit(x, y, 1)[0])


def _slopes(df: pd.DataFrame, by: list[str]) -> list[float]:
    """target_slope per group, in the order of ``df.groupby(by, sort=True, dropna=False)`` (that of :func:`_agg`)."""
    return [target_slope(g["p_target_stated"], g["p_target"]) for _, g in df.groupby(by, sort=True, dropna=False)]


def _by_length_depth(cells: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """Needle cells per (length, depth) (pooled over needles and samples) + baselines per length."""
    by = KEY_COLS + ["condition", "length", "depth"]
    nd = cells[cells["condition"] == "needle"]
    agg = _agg(nd, by)
    agg["target_slope"] = _slopes(nd, by)
    parts = [agg]
    if len(base):
        parts.append(_agg(base, KEY_COLS + ["condition", "length", "depth"]))
    df = pd.concat(parts, ignore_index=True)
    df = df.sort_values(KEY_COLS + ["condition", "length", "depth"],
                        key=lambda s: s.map(COND_ORDER) if s.name == "condition" else s).reset_index(drop=True)
    return df.rename(columns={"n": "n_values"})


def _by_bias(cells: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """Per needle (bias, face / parity): needle cells pooled over lengths, depths and samples, and each
    baseline condition against the same stated distribution."""
    cols = KEY_COLS + ["condition", "needle", "bias", "face"]
    parts = [_agg(cells[cells["condition"] == "needle"], cols)]
    if len(base):
        parts.append(_agg(base, cols))
    df = pd.concat(parts, ignore_index=True)
    df = df.sort_values(KEY_COLS + ["condition", "face", "bias", "needle"],
                        key=lambda s: s.map(COND_ORDER) if s.name == "condition" else s).reset_index(drop=True)
    return df.rename(columns={"n": "n_values"})


# ---------------------------------------------------------------------------- paper metric
def paper_table(st: StoreData) -> pd.DataFrame:
    """The coin-flip paper's needle metric, one row per (condition, length, depth, needle).

    For each prompt (``paraphrase`` when the store has one) the renormalised distributions of the
    filler samples are averaged, ``p̄ = mean_s p_s``, and compared with the stated distribution
    ``q`` (needle cells) or with the uniform one ``1/K`` (no-needle and no-context cells, the
    original's ``default_expected_dist``):

    * ``tvd_paper = TVD(p̄, q)`` (the original's ``tvd(choice_probs, expected_dist)``);
    * ``kl_paper = mean_s KL(q ‖ p_s)`` (the original's ``kl_div``: per sample, then averaged);
    * ``kl_of_mean = KL(q ‖ p̄)``.

    With a paraphrase axis the three are then averaged over the paraphrases.
    """
    probs, _ = choice_distribution(st.arrays["logprobs"])
    stated = np.nan_to_num(st.arrays["p_stated"].astype(np.float64))
    cells = st.cells.reset_index(drop=True)
    k = probs.shape[1]
    keys = ["condition", "length", "depth", "needle", "bias", "face"]
    prompt = ["paraphrase"] if "paraphrase" in cells else []
    rows = []
    for gkey, g in cells.groupby(keys + prompt, sort=True, dropna=False):
        idx = g.index.to_numpy()
        p = probs[idx]
        q = stated[idx[0]] if g["condition"].iloc[0] == "needle" else np.full(k, 1.0 / k)
        pbar = p.mean(axis=0)
        rows.append({**dict(zip(keys + prompt, gkey)), "tvd_paper": float(bayes.tvd(pbar, q)),
                     "kl_paper": float(np.mean(bayes.kl(q, p))), "kl_of_mean": float(bayes.kl(q, pbar)),
                     "p_mean_target": float(pbar[target_mask(str(st.params.get("process", "coin")),
                                                             int(g["face"].iloc[0]), q)].sum())
                     if g["condition"].iloc[0] == "needle" else np.nan,
                     "n_samples": int(len(idx))})
    d = pd.DataFrame(rows)
    if d.empty:
        return d
    out = d.groupby(keys, sort=True, dropna=False).agg(
        tvd_paper=("tvd_paper", "mean"), tvd_paper_std=("tvd_paper", lambda v: float(np.std(v))),
        kl_paper=("kl_paper", "mean"), kl_of_mean=("kl_of_mean", "mean"), p_mean_target=("p_mean_target", "mean"),
        n_samples=("n_samples", "mean"), n_prompts=("tvd_paper", "size")).reset_index()
    for col, v in (("process", str(st.params.get("process", "coin"))),
                   ("protocol", str(st.params.get("protocol", "clean"))),
                   ("model", st.model), ("experiment", st.experiment)):
        out.insert(0, col, v)
    return out


def paper_by_length_depth(paper: pd.DataFrame) -> pd.DataFrame:
    """The paper's heatmap values: mean over needles of ``tvd_paper`` per (condition, length, depth)."""
    if paper.empty:
        return paper
    by = ["experiment", "model", "protocol", "process", "condition", "length", "depth"]
    out = paper.groupby(by, sort=True, dropna=False).agg(
        tvd_paper=("tvd_paper", "mean"), kl_paper=("kl_paper", "mean"), kl_of_mean=("kl_of_mean", "mean"),
        n_needles=("needle", "nunique")).reset_index()
    return out.sort_values(by, key=lambda s: s.map(COND_ORDER) if s.name == "condition" else s).reset_index(drop=True)


# ---------------------------------------------------------------------------- figures
def _baseline_means(ld: pd.DataFrame) -> dict[str, float]:
    """Mean baseline TVD (over lengths, needles, samples) per condition."""
    out = {}
    for cond in ("no_needle", "no_context"):
        d = ld[ld["condition"] == cond]
        if len(d):
            out[cond] = float(np.average(d["tvd"], weights=d["n_values"]))
    return out


def _fig_heatmap(inp: FamilyInput, exp: str, ld: pd.DataFrame, process: str) -> Figure:
    d = ld[(ld["experiment"] == exp)]
    models = sorted(d["model"].unique())
    fig, axes = F.grid(len(models), ncols=2, panel=(5.2, 3.6), sharey=False)
    im = None
    for ax, m in zip(axes, models):
        dm = d[d["model"] == m]
        nd = dm[dm["condition"] == "needle"]
        wide = nd.pivot(index="depth", columns="length", values="tvd").sort_index()
        im = ax.imshow(wide.to_numpy(), origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(wide.shape[1]), [str(c) for c in wide.columns], fontsize=7,
                      rotation=45 if wide.shape[1] > 8 else 0)
        ax.set_yticks(range(wide.shape[0]), [f"{v:g}" for v in wide.index], fontsize=7)
        if wide.size <= 80:
            for (r, c), v in np.ndenumerate(wide.to_numpy()):
                if np.isfinite(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.55 else "black")
        b = _baseline_means(dm)
        extra = ", ".join(f"{k.replace('_', '-')} {v:.2f}" for k, v in b.items())
        ax.set_title(f"{m}" + (f"\nbaselines: {extra}" if extra else ""), fontsize=8)
        ax.set_xlabel("context length L (filler tokens)")
        ax.set_ylabel("needle depth d")
    h = fig.get_figheight()
    top, bottom = 1 - 1.0 / h, 0.7 / h
    fig.subplots_adjust(top=top, bottom=bottom, left=0.08, right=0.84, hspace=0.75, wspace=0.3)
    if im is not None:
        cax = fig.add_axes((0.87, bottom, 0.02, top - bottom))
        fig.colorbar(im, cax=cax, label="mean TVD(model, stated)")
    F.suptitle(fig, f"{exp}: mean TVD between the model's distribution and the stated one, "
                    "context length × needle depth")
    return Figure(_save_colorbar(fig, inp, f"needle_heatmap_{exp}"),
                  f"{exp}: TVD(model, stated) per context length and needle depth, mean over needles (biases"
                  f"{', faces' if process == 'die' else ''}) and filler samples (colour 0 = the model follows the "
                  "needle exactly). Panel titles: the same TVD for the no-needle (filler only) and no-context "
                  "(query only) baselines against the same stated distributions.")


def _save_colorbar(fig, inp: FamilyInput, name: str):
    """Save a figure that has a colorbar attached to several axes (tight_layout cannot place it)."""
    out = inp.figures_dir
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{F.slug(name)}.png"
    fig.savefig(png, dpi=110)
    fig.savefig(png.with_suffix(".pdf"))
    F.plt.close(fig)
    return png


def _fig_response(inp: FamilyInput, exp: str, cells: pd.DataFrame, bias: pd.DataFrame, process: str) -> Figure:
    d = cells[(cells["experiment"] == exp) & (cells["condition"] == "needle")]
    models = sorted(d["model"].unique())
    lengths = sorted(d["length"].unique())
    colors = F.plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(lengths), 1)))
    fig, axes = F.grid(len(models), ncols=3)
    what = "P(heads)" if process == "coin" else "P(named face)"
    for ax, m in zip(axes, models):
        dm = d[d["model"] == m]
        for col, L in zip(colors, lengths):
            g = dm[dm["length"] == L].groupby("bias")["p_target"].mean()
            ax.plot(g.index / 100.0, g.to_numpy(), "o-", color=col, lw=1.4, ms=3, label=f"needle, L = {L}")
        bm = bias[(bias["experiment"] == exp) & (bias["model"] == m)]
        for cond, ls in (("no_needle", "--"), ("no_context", ":")):
            g = bm[bm["condition"] == cond].groupby("bias")["p_target"].mean()
            if len(g):
                ax.plot(g.index / 100.0, g.to_numpy(), color="tab:red" if cond == "no_needle" else "tab:grey",
                        ls=ls, lw=1.4, label=f"{cond.replace('_', '-')} baseline")
        ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls=":", label="stated b")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(0, 1)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("stated probability b")
    axes[0].set_ylabel(f"model {what} (mean)")
    F.suptitle(fig, f"{exp}: model {what} vs the stated probability, per context length (mean over depths"
                    f"{', faces' if process == 'die' else ''} and samples)")
    rows = F.legend_below(fig, axes)
    return Figure(F.save(fig, inp.figures_dir, f"needle_response_{exp}", rows),
                  f"{exp}: the model's probability of the needle's target ({what}) against the stated probability; "
                  "a model that follows the needle lies on the diagonal. Baselines: the same probability without "
                  "needle (filler only) and without context.")


# ---------------------------------------------------------------------------- reducer
def _summary(cells: pd.DataFrame, ld: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    rows, models = [], {}   # type: list[dict], dict[str, dict]
    for (exp, m, proc), g in cells.groupby(KEY_COLS, sort=True):
        nd = g[g["condition"] == "needle"]
        b = _baseline_means(ld[(ld["experiment"] == exp) & (ld["model"] == m)])
        row = {"experiment": exp, "model": m, "process": proc, "n_needle_cells": int(len(nd)),
               "mean_tvd": float(nd["tvd"].mean()) if len(nd) else np.nan,
               "mean_kl": float(nd["kl"].mean()) if len(nd) else np.nan,
               "target_slope": target_slope(nd["p_target_stated"], nd["p_target"]),
               "tvd_no_needle": b.get("no_needle", np.nan), "tvd_no_context": b.get("no_context", np.nan),
               "off_choice_mass": float(g["off_choice_mass"].mean())}
        rows.append(row)
        models.setdefault(m, {})[exp] = {k: row[k] for k in ("mean_tvd", "mean_kl", "target_slope", "tvd_no_needle",
                                                             "tvd_no_context", "off_choice_mass", "n_needle_cells")}
    return pd.DataFrame(rows), models


@register_reducer("needle")
def reduce_needle(inp: FamilyInput) -> ReducedFamily:
    cells = pd.concat([_cell_table(st) for st in inp.stores], ignore_index=True)
    bases = [b for b in (_baseline_table(st) for st in inp.stores) if len(b)]
    base = pd.concat(bases, ignore_index=True) if bases else pd.DataFrame(columns=cells.columns)
    ld = _by_length_depth(cells, base)
    bias = _by_bias(cells, base)
    summ, models = _summary(cells, ld)
    papers = [t for t in (paper_table(st) for st in inp.stores) if len(t)]
    paper = pd.concat(papers, ignore_index=True) if papers else pd.DataFrame()
    paper_ld = paper_by_length_depth(paper)
    if len(paper):
        for (exp, m), g in paper.groupby(["experiment", "model"], sort=True):
            nd, nn = g[g["condition"] == "needle"], g[g["condition"] == "no_needle"]
            models.setdefault(m, {}).setdefault(exp, {}).update(
                protocol=str(g["protocol"].iloc[0]),
                tvd_paper=float(nd["tvd_paper"].mean()) if len(nd) else None,
                kl_paper=float(nd["kl_paper"].mean()) if len(nd) else None,
                tvd_paper_no_needle_vs_uniform=float(nn["tvd_paper"].mean()) if len(nn) else None)
        summ = summ.merge(paper[paper["condition"] == "needle"].groupby(["experiment", "model"])["tvd_paper"].mean()
                          .rename("tvd_paper").reset_index(), on=["experiment", "model"], how="left")
        summ = summ.merge(paper[paper["condition"] == "no_needle"].groupby(["experiment", "model"])["tvd_paper"]
                          .mean().rename("tvd_paper_no_needle_vs_uniform").reset_index(),
                          on=["experiment", "model"], how="left")
    figs: list[Figure] = []
    for exp in sorted(cells["experiment"].unique()):
        process = str(cells.loc[cells["experiment"] == exp, "process"].iloc[0])
        if (ld[(ld["experiment"] == exp)]["condition"] == "needle").any():
            figs.append(_fig_heatmap(inp, exp, ld, process))
            if process in ("coin", "die"):
                figs.append(_fig_response(inp, exp, cells, bias, process))
    show_bias = bias.drop(columns=["p_target_stated"]) if len(bias) else bias
    section = Section("Explicit bias in context (needle)", [
        Text("Each cell states a distribution q in a needle sentence inside L tokens of filler at relative depth d. "
             "The model's distribution p is the softmax of the choice log-probs; `TVD = ½ Σ|p − q|` and "
             "`KL(q ‖ p) = Σ q log(q / p)` (nats). `p_target` is the model's probability of the needle's target "
             "(heads; the named face; the numbers of the stated parity). The no-needle (filler only) and "
             "no-context (query only) baselines state nothing; they are scored against every stated q of the "
             "grid, i.e. the TVD of a model that ignores the needle (averaged over a symmetric bias grid this "
             "is nearly constant for any p between the extreme biases, so compare per bias, or use the slope). "
             "`target_slope` is the least-squares slope of the model's p_target on the stated one (1: follows "
             "the needle, 0: ignores it). Depth is the nominal d; `token_depth` in the cell table is where the "
             "needle actually went (between sentences, so short fillers have few distinct depths)."),
        Table(summ, "Per experiment and model: mean over needle cells, the slope of p_target on the stated "
                    "probability, and the baselines' mean TVD."),
        Table(ld, "Mean TVD per context length and depth (needle cells, pooled over needles and samples) and "
                  "per length for the baselines (depth empty). n_values = cells (needle) or cells × needles "
                  "(baselines).", max_rows=80),
        Table(show_bias, "Per needle (bias / face / parity): needle cells pooled over lengths, depths and "
                         "samples, and the baselines against the same stated distribution.", max_rows=80),
        *(figs if figs else [Text("No needle cells in the trusted shards.")]),
    ])
    if len(paper_ld):
        section.blocks += [
            Heading("Paper metric: TVD of the filler-sample mean"),
            Text("As in the coin-flip paper: per (length, depth, needle) the renormalised distributions of the "
                 "filler samples are averaged first, `p̄ = mean_s p_s`, and `TVD(p̄, q)` is taken against the stated "
                 "q; no-needle and no-context cells are compared with the uniform (fair) distribution, not with the "
                 "stated ones. `kl_paper = mean_s KL(q ‖ p_s)` as in the original; `kl_of_mean = KL(q ‖ p̄)`. The "
                 "table is the paper's heatmap: the mean over needles per length and depth."),
            Table(paper_ld, "Paper metric per condition, length and depth (mean over needles).", max_rows=80),
        ]
    return ReducedFamily(
        tables={"needle_cells": cells, "needle_baselines": base, "needle_by_length_depth": ld,
                "needle_by_bias": bias, "needle_summary": summ, "needle_paper": paper,
                "needle_paper_by_length_depth": paper_ld},
        figures=[f.path for f in figs],
        summary={"models": models},
        sections=[section],
    )
