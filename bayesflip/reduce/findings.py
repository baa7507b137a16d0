"""The report's first section, "Findings on your models": the two studies' headline findings tested on the sweep.

For every claim in :data:`CLAIMS` (the coin-flip study's biased prior, ICL convergence, attention,
forgetting under a shift, Poisson rates; the iterated-learning study's bias amplification and its
mitigation by interaction) and every model of the sweep, one :class:`Finding`: our value(s), the
published value or range with its source, a verdict and the coverage behind it. Everything is
read from the family reducers' results of the run (``ReducedFamily.tables``; never the stores)
and the published values (:func:`bayesflip.reduce.published.load_published`).

Verdicts (:data:`VERDICTS`): ``agrees`` / ``differs`` (the claim's direction on our numbers, by the
rule written in :attr:`Claim.rule`), ``mixed`` (the measures of one claim point both ways),
``inconclusive`` (measured, but the rule cannot decide: e.g. no change at all), ``not measured``
(no experiment of the sweep measures it for that model). Flags: a value read from a cell whose
on-choice mass (the probability on the scored choices before renormalising) is below
:data:`LOW_MASS`; two estimators of one quantity more than :data:`ESTIMATOR_GAP` apart (the paper's
γ vs bayesflip's γ) get one sentence saying why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from ..models.registry import load_registry
from .base import Block, ReducedFamily, Section, Table, Text
from .published import load_published

LOW_MASS = 0.10          # on-choice mass below this: the renormalised distribution is flagged
ESTIMATOR_GAP = 0.2      # |γ_paper − γ_bayesflip| above this: the report says why
STEP = 0.02              # changes of a probability / proportion within ±STEP count as "no change"
ATTN_WEAK = 0.3          # |r| below this: attention and Bayesian error "hardly related"
RANK_STEP = 0.05         # acronyms: relative change of the mean frequency rank within ±5 % is "no change"
MISSING_PUB = "no published value"
POISSON_LAM = 0.5   # the λ whose published λ̂ the Poisson finding shows
VERDICTS = ("agrees", "differs", "mixed", "inconclusive", "not measured")

COIN_STUDY = "Gupta et al. (2025), Enough Coin Flips Can Make LLMs Act Bayesian"
COIN_REPO = "rcorona/llm-coin-flips"
IL_STUDY = "Ren et al. (2024), Bias Amplification in Language Model Evolution: An Iterated Learning Perspective"
IL_REPO = "Joshua-Ren/iICL"


@dataclass(frozen=True)
class Claim:
    """One headline finding of a study: ``text`` in our words, where it comes from, how we decide."""

    key: str
    title: str
    text: str
    study: str
    source: str      # repository + file(s) behind the claim
    rule: str        # how the verdict is decided on our numbers
    measured_by: str  # the experiments (families) of bayesflip that measure it


CLAIMS: dict[str, Claim] = {c.key: c for c in (
    Claim("prior", "Biased prior",
          "Asked for a coin flip with no evidence in context, models favour heads: P(heads) is above 0.5 for every "
          "published model.",
          COIN_STUDY, f"{COIN_REPO} exps/contextual/coin_flip_multiset/<model>/averaged_stats.txt",
          "agrees when our P(heads) with no evidence (mean over the query paraphrases) is above 0.5; differs when it "
          "is at or below 0.5.",
          "the prior over paraphrases (family `paraphrase`, e.g. `paper_prior_coin`)"),
    Claim("icl", "ICL approaches θ as N grows",
          "Shown N flips of a coin with bias θ, the model's P(heads) moves towards θ: the TVD to θ falls as N grows "
          "(from about 0.5 at N = 1 to below 0.13 at N = 100 for the published models).",
          COIN_STUDY, f"{COIN_REPO} analysis/explore_coin_flip.ipynb (configs coin_flip_icl_v2)",
          f"agrees when the paper's TVD (mean over θ) at the largest N is below the TVD at the smallest N ≥ 1 by more "
          f"than {STEP}; differs otherwise. Coin first; the die is shown beside it.",
          "ICL on the paper's N grid (family `icl`, e.g. `paper_icl_coin`, `paper_icl_die`)"),
    Claim("attention", "Attention magnitude hardly matters",
          "How much attention the read position pays to the in-context outcomes has a negligible effect on how "
          "Bayesian the model's prediction is.",
          COIN_STUDY, f"{COIN_REPO} attention_weights/get_attention_weight_icl.py",
          f"the correlation between the attention mass on all outcome tokens (the paper's max-over-heads metric "
          f"when stored, else the mean) and the Bayesian error, taken within (θ, n) when defined, else within n; "
          f"agrees when |r| < {ATTN_WEAK} in every layer set; differs when |r| ≥ {ATTN_WEAK} with p < 0.05 within "
          f"(θ, n); inconclusive when only the within-n r is defined (the generating θ can drive both sides) or "
          f"p ≥ 0.05.",
          "attention (family `attention`, e.g. `paper_attention_coin`)"),
    Claim("gamma", "Instruct models forget faster",
          "After the coin's bias changes, the instruct models discount old flips more than the base models: the "
          "paper's fitted γ is lower for instruct models.",
          COIN_STUDY, f"{COIN_REPO} analysis/posterior_chain_vis.ipynb",
          "the paper's γ of an instruct model agrees when it is below the median γ of the published base models; "
          "of a base model, when it is above the median γ of the published instruct models; differs otherwise. "
          "With base and instruct models in the sweep, their mean γs are also compared below the table.",
          "distribution shift (family `icl` with a shift, e.g. `paper_shift_coin`)"),
    Claim("poisson", "Poisson rates: context beats instruction",
          "In the published runs the rate of markers λ̂ a model writes is closer to λ when it continues a text that "
          "has markers at rate λ than when it is told λ.",
          COIN_STUDY, f"{COIN_REPO} exps/poisson/<model>/stats.pkl, stats_icl.pkl (temperature 1.0)",
          "agrees when |λ̂ − λ| in context is below |λ̂ − λ| when told λ (mean over the λ both modes measured); "
          "differs otherwise; needs both modes.",
          "Poisson (family `poisson`, e.g. `paper_poisson_icl` and `paper_poisson_explicit`)"),
    Claim("amplification", "Iterated learning amplifies bias",
          "When each generation learns from data the previous one wrote, a small bias of the prior grows "
          "generation by generation.",
          IL_STUDY, f"{IL_REPO} README.md, ARCE_experiments02_supbias.ipynb, acronym_all.ipynb",
          f"per measure, the change from generation 0 to the last generation in the direction of the bias: rules "
          f"(bias sentence about the screen): P(screen = off) of the belief; acronyms: the mean frequency rank of "
          f"the kept words (down for a common-word persona, up for a rare-word one; ±{RANK_STEP:.0%} is no change); "
          f"coin / die chains: `amplification_llm` of the chains reducer (distance of the late chains' mean from "
          f"uniform minus the prior's). Agrees when every measure moves with the bias by more than {STEP}, "
          f"differs when every one moves against it, mixed otherwise, inconclusive when none moves.",
          "iterated learning (families `rules`, `acronym`, `chains`)"),
    Claim("interaction", "Interaction mitigates the amplification",
          "An interaction phase that checks the learner's hypothesis against the data (self-refinement, a "
          "hypothesis filter) slows the amplification down.",
          IL_STUDY, f"{IL_REPO} README.md, ARCE_experiments03_adding_Heff.ipynb",
          f"rules chains with the same bias: agrees when the change of P(screen = off) from generation 0 to the "
          f"last is smaller with an interaction than without by more than {STEP}; differs when it is larger by "
          f"more than {STEP}; inconclusive in between.",
          "rule chains with and without interaction (family `rules`, e.g. `paper_rules`)"),
)}


@dataclass
class Finding:
    """One row of the findings table: claim × model."""

    claim: str
    model: str
    verdict: str
    ours: str = "—"
    published: str = "—"
    why: str = ""
    coverage: str = ""
    notes: list[str] = field(default_factory=list)
    values: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


@dataclass
class Context:
    """What the claim functions read: the reducers' results, the published values, models and coverage."""

    res: dict[str, ReducedFamily]
    pub: dict
    kinds: dict[str, str]            # sweep model -> kind (instruct / std), as recorded in the stores
    coverage: pd.DataFrame           # store summary: experiment, model, shards_*, cells_*
    pub_kinds: dict[str, str] = field(default_factory=dict)  # published (registry) model -> kind

    def table(self, family: str, name: str, cols: tuple[str, ...] = ()) -> pd.DataFrame:
        """A reducer table, empty when the family did not run; a missing column is an error (renamed upstream)."""
        r = self.res.get(family)
        t = r.tables.get(name) if r is not None else None
        if t is None or t.empty:
            return pd.DataFrame(columns=list(cols))
        missing = [c for c in cols if c not in t.columns]
        if missing:
            raise KeyError(f"findings: table {name} of family {family} has no column(s) {missing}")
        return t

    def cover(self, model: str, experiments) -> str:
        """``exp: trusted/total cells, done/total shards`` for each experiment (one line)."""
        parts = []
        for exp in dict.fromkeys(experiments):
            c = self.coverage[(self.coverage["experiment"] == exp) & (self.coverage["model"] == model)]
            if c.empty:
                continue
            parts.append(f"{exp}: {int(c['cells_trusted'].sum())}/{int(c['cells_total'].sum())} cells, "
                         f"{int(c['shards_done'].sum())}/{int(c['shards_total'].sum())} shards")
        return "; ".join(parts)


def cite(row: dict, pub: dict) -> str:
    """The short citation of a published row (its ``source.cite``; else the study's first words)."""
    fallback = pub.get("source", {}).get("cite") or str(pub.get("source", {}).get("study", "published")).split(",")[0]
    return row.get("source", {}).get("cite", fallback) if isinstance(row.get("source"), dict) else fallback


def _f(x: float, nd: int = 2) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %" if x >= 0.01 else f"{100 * x:.1g} %"


def _prefer(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the paper protocol first, then the others (stable)."""
    if "protocol" not in df:
        return df
    return df.assign(_o=(df["protocol"] != "paper").astype(int)).sort_values(["_o"], kind="stable").drop(columns="_o")


def _low_mass(what: str, off: float) -> list[str]:
    """A ⚠ note when the on-choice mass 1 − ``off`` is below :data:`LOW_MASS`, else nothing."""
    on = 1.0 - float(off)
    if np.isfinite(on) and on < LOW_MASS:
        return [f"⚠ {what} is renormalised from only {_pct(on)} on-choice mass (below {LOW_MASS:.0%}): the model "
                "mostly continues with something other than the choices, so this value says little."]
    return []


def _range(values: list[float | None], nd: int = 2) -> str:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return "—"
    lo, hi = min(vals), max(vals)
    return _f(lo, nd) if np.isclose(lo, hi) else f"{_f(lo, nd)}–{_f(hi, nd)}"


# ---------------------------------------------------------------------------- published side
def _published(ctx: Context, claim: str, model: str) -> str:
    """The published value of ``claim`` for ``model`` (its own row when the paper has one, else the range over
    the published models, or the qualitative claim) with its source."""
    pub = ctx.pub
    if claim == "prior":
        rows = pub.get("prior", [])
        own = [r for r in rows if r["model"] == model]
        if own:
            return f"{_f(own[0]['mean'])} ± {_f(own[0]['std'])}; {cite(own[0], pub)}"
        return (f"{_range([r['mean'] for r in rows])} over {len(rows)} published models; {cite(rows[0], pub)}"
                if rows else MISSING_PUB)
    if claim == "icl":
        rows = pub.get("icl_coin_tvd", [])
        tv = [({int(k): v for k, v in r["tvd"].items()}, r) for r in rows]
        own = [(t, r) for t, r in tv if r["model"] == model]
        if own:
            t, r = own[0]
            return f"coin: {_f(t[min(t)])} (N = {min(t)}) → {_f(t[max(t)])} (N = {max(t)}); {cite(r, pub)}"
        if not rows:
            return MISSING_PUB
        return (f"coin, {len(rows)} published models: N = 1: {_range([t.get(1) for t, _ in tv])}, "
                f"N = 100: {_range([t.get(100) for t, _ in tv])}; {cite(rows[0], pub)}")
    if claim == "gamma":
        rows = pub.get("gamma", [])
        base = [r["gamma"] for r in rows if ctx.pub_kinds.get(r["model"]) == "std"]
        inst = [r["gamma"] for r in rows if ctx.pub_kinds.get(r["model"]) == "instruct"]
        if not (base and inst):
            return MISSING_PUB
        own = [r for r in rows if r["model"] == model]
        return ((f"this model: {_f(own[0]['gamma'])}; " if own else "")
                + f"base {_range(base)} (median {_f(float(np.median(base)))}), instruct {_range(inst)} "
                  f"(median {_f(float(np.median(inst)))}); {cite(rows[0], pub)}")
    if claim == "poisson":   # λ = 0.5, the study's example; the in-context rows' story length is not stored
        rows = [r for r in pub.get("poisson", []) if np.isclose(float(r["lam"]), POISSON_LAM)]
        if not rows:
            return MISSING_PUB
        own = [r for r in rows if r["model"] == model]
        how = {"explicit": "told λ", "icl": "in context"}
        amb = " (in context: conditions ambiguous, story length not stored)" if any(
            "ambiguous" in str(r.get("conditions", "")) for r in rows) else ""
        if own:
            return (f"λ = {POISSON_LAM:g}: " + ", ".join(
                f"{how.get(r['mode'], r['mode'])} {_f(r['lambda_hat'], 3)} (median {_f(r.get('lambda_hat_median'), 3)})"
                for r in own) + f"{amb}; {cite(own[0], pub)}")
        by = {m: [r["lambda_hat"] for r in rows if r["mode"] == m] for m in how}
        return (f"λ = {POISSON_LAM:g}, {len({r['model'] for r in rows})} published models, mean λ̂: "
                + ", ".join(f"{how[m]} {_range(v, 3)}" for m, v in by.items() if v) + f"{amb}; {cite(rows[0], pub)}")
    who = IL_STUDY.split(",")[0] if claim in ("amplification", "interaction") else COIN_STUDY.split(",")[0]
    return {"attention": f"qualitative: negligible effect (no number published); {who}",
            "amplification": f"qualitative: amplified over generations (curves of API models, no numbers); {who}",
            "interaction": f"qualitative: mitigated by interaction (curves of API models, no numbers); {who}"}[claim]


# ---------------------------------------------------------------------------- claims
def _prior(ctx: Context, model: str) -> Finding | None:
    t = ctx.table("paraphrase", "paraphrase_prior", ("experiment", "model", "process", "choice", "p_mean",
                                                      "off_choice_mass", "n_paraphrases"))
    t = t[(t["model"] == model) & (t["process"] == "coin") & (t["choice"].astype(str).str.strip() == "heads")]
    if t.empty:
        return None
    t = _prefer(t)
    std_col = "p_std_paper" if "p_std_paper" in t else "p_std" if "p_std" in t else None
    parts, notes = [], []
    for r in t.to_dict("records"):
        sd = f" ± {_f(r[std_col])}" if std_col else ""
        flag = " ⚠" if 1 - r["off_choice_mass"] < LOW_MASS else ""
        parts.append(f"P(heads) = {_f(r['p_mean'])}{sd}{flag} over {int(r['n_paraphrases'])} prompts "
                     f"({r['experiment']})")
        notes += _low_mass(f"P(heads) of {r['experiment']}", r["off_choice_mass"])
    main = t.iloc[0]
    p = float(main["p_mean"])
    verdict = "agrees" if p > 0.5 else "differs"
    why = f"P(heads) {_f(p)} {'>' if p > 0.5 else '≤'} 0.5 ({main['experiment']})"
    own = [r for r in ctx.pub.get("prior", []) if r["model"] == model]
    if own:
        inside = abs(p - own[0]["mean"]) <= own[0]["std"]
        why += f"; {'within' if inside else 'outside'} one published std of this model's {_f(own[0]['mean'])}"
    return Finding("prior", model, verdict, "; ".join(parts), _published(ctx, "prior", model), why,
                   ctx.cover(model, t["experiment"]), notes, {"p_heads": p, "experiment": main["experiment"]})


def _icl(ctx: Context, model: str) -> Finding | None:
    t = ctx.table("icl", "icl_paper_ngrid", ("experiment", "model", "process", "N", "tvd_paper", "n_theta"))
    t = t[(t["model"] == model) & (t["N"] >= 1)]
    if t.empty:
        return None
    summ = ctx.table("icl", "icl_summary", ("experiment", "model", "off_choice_mass"))
    parts, notes, verdicts, exps = [], [], [], []
    vals = {}
    main = None
    order = _prefer(t.drop_duplicates(["experiment", "process"]))[["experiment", "process"]]
    order = order.assign(_c=(order["process"] != "coin").astype(int)).sort_values("_c", kind="stable")
    for exp, proc in zip(order["experiment"], order["process"]):
        d = t[(t["experiment"] == exp) & (t["process"] == proc)].sort_values("N")
        if len(d) < 2:
            continue
        lo, hi = d.iloc[0], d.iloc[-1]
        falls = hi["tvd_paper"] < lo["tvd_paper"] - STEP
        flag = ""
        s = summ[(summ["experiment"] == exp) & (summ["model"] == model)]
        if len(s):
            off = float(s["off_choice_mass"].mean())
            if 1 - off < LOW_MASS:
                flag = " ⚠"
            notes += _low_mass(f"the ICL reads of {exp} (mean)", off)
        parts.append(f"{proc}: TVD {_f(lo['tvd_paper'])} (N = {int(lo['N'])}) → {_f(hi['tvd_paper'])} "
                     f"(N = {int(hi['N'])}){flag} ({exp}, {int(d['n_theta'].max())} θ)")
        exps.append(exp)
        vals[f"{exp}/{proc}"] = {"N_min": int(lo["N"]), "tvd_min_N": float(lo["tvd_paper"]), "N_max": int(hi["N"]),
                                 "tvd_max_N": float(hi["tvd_paper"])}
        if main is None:
            main = (exp, proc, lo, hi, falls)
        verdicts.append(falls)
    if main is None:
        return Finding("icl", model, "inconclusive", "; ".join(parts) or "one N only", _published(ctx, "icl", model),
                       "a single N: no trend to test", ctx.cover(model, t["experiment"]), notes)
    exp, proc, lo, hi, falls = main
    verdict = "agrees" if falls else "differs"
    why = (f"{proc} TVD {'falls' if falls else 'does not fall'} from {_f(lo['tvd_paper'])} at N = {int(lo['N'])} "
           f"to {_f(hi['tvd_paper'])} at N = {int(hi['N'])} ({exp})")
    return Finding("icl", model, verdict, "; ".join(parts), _published(ctx, "icl", model), why,
                   ctx.cover(model, exps), notes, vals)


def _attention(ctx: Context, model: str) -> Finding | None:
    t = ctx.table("attention", "attention_correlation", ("experiment", "model", "layer_set", "measure", "n_points",
                                                          "within_pearson_r", "within_pearson_p",
                                                          "within_theta_pearson_r", "within_theta_pearson_p"))
    t = t[t["model"] == model]
    if t.empty:
        return None
    meas = "max_outcomes" if (t["measure"] == "max_outcomes").any() else "outcomes"
    d = t[t["measure"] == meas]
    if d.empty:
        return None
    parts, states, vals = [], [], {}
    pts = ctx.table("attention", "attention_points", ("experiment", "model", "off_choice_mass", "position"))
    notes = []
    for r in d.to_dict("records"):
        theta_ok = np.isfinite(r["within_theta_pearson_r"])
        rr, pp = ((r["within_theta_pearson_r"], r["within_theta_pearson_p"]) if theta_ok
                  else (r["within_pearson_r"], r["within_pearson_p"]))
        where = "within (θ, n)" if theta_ok else "within n"
        if not np.isfinite(rr):
            states.append("undefined")
            parts.append(f"{r['layer_set']}: r undefined ({r['experiment']})")
            continue
        if abs(rr) < ATTN_WEAK:
            states.append("weak")
        elif theta_ok and pp < 0.05:
            states.append("strong")
        else:
            states.append("unclear")
        parts.append(f"{r['layer_set']}: r = {_f(rr)} {where} (p = {pp:.2g}, {int(r['n_points'])} points)")
        vals[f"{r['experiment']}/{r['layer_set']}"] = {"r": float(rr), "p": float(pp), "within": where,
                                                       "measure": meas}
    p = pts[(pts["model"] == model) & (pts["position"] >= 1)]
    if len(p):
        notes += _low_mass("the model's prediction at the attention read positions (mean)",
                           float(p.drop_duplicates(["experiment", "cell", "position"])["off_choice_mass"].mean())
                           if "cell" in p else float(p["off_choice_mass"].mean()))
    if states and all(s == "weak" for s in states):
        verdict, why = "agrees", f"|r| < {ATTN_WEAK} in every layer set"
    elif "strong" in states:
        verdict, why = "differs", f"|r| ≥ {ATTN_WEAK} with p < 0.05 within (θ, n) in at least one layer set"
    elif states and all(s == "undefined" for s in states):
        verdict, why = "inconclusive", "the correlation is undefined (constant measure or too few points)"
    else:
        verdict = "inconclusive"
        why = (f"|r| ≥ {ATTN_WEAK} but only within n (one cell per θ: the generating θ can drive both the "
               "attention and the error) or not significant")
    label = "max over heads (the paper's metric)" if meas.startswith("max_") else "mean over heads"
    return Finding("attention", model, verdict, f"mass on outcomes, {label}: " + "; ".join(parts),
                   _published(ctx, "attention", model), why,
                   ctx.cover(model, d["experiment"]), notes, vals)


def _gamma_note(r: dict, alpha_sum: float | None) -> str:
    gp, gb = float(r["gamma_paper"]), float(r["gamma_bayesflip"])
    prior = f" (here α + β = {alpha_sum:.3g})" if alpha_sum is not None and np.isfinite(alpha_sum) else ""
    if gp < gb:
        tail = ("a model that follows the flips less than that fixed prior implies is read by the paper's fit as "
                "fast forgetting (a low γ keeps its prediction near ½) and by bayesflip's as a strong prior with "
                "little forgetting")
    else:
        tail = ("a model that follows recent flips more than its own fitted prior allows needs a low γ in "
                "bayesflip's fit, while the paper's weak Beta(1, 1) prior already lets recent flips dominate")
    return (f"The paper's γ ({_f(gp)}) and bayesflip's γ ({_f(gb)}) of {r['experiment']} differ by "
            f"{_f(abs(gp - gb))} because they model different learners: the paper's decays a fixed Beta(1, 1) prior "
            f"together with the counts (clamped at 1) and is fitted by L1 to the mean P(heads), bayesflip's decays "
            f"only the counts on top of the prior fitted to this model{prior} and is fitted by likelihood to every "
            f"read — {tail}.")


def _gamma(ctx: Context, model: str) -> Finding | None:
    t = ctx.table("icl", "icl_paper_gamma", ("experiment", "model", "gamma_paper", "gamma_bayesflip", "n_points"))
    t = _prefer(t[t["model"] == model])
    if t.empty:
        return None
    fits = ctx.table("icl", "icl_gamma_fits", ("experiment", "model", "prior_alpha", "prior_beta"))
    summ = ctx.table("icl", "icl_summary", ("experiment", "model", "off_choice_mass"))
    parts, notes, vals = [], [], {}
    for r in t.to_dict("records"):
        f = fits[(fits["experiment"] == r["experiment"]) & (fits["model"] == model)]
        a_sum = float(f["prior_alpha"].iloc[0] + f["prior_beta"].iloc[0]) if len(f) else None
        s = summ[(summ["experiment"] == r["experiment"]) & (summ["model"] == model)]
        off = float(s["off_choice_mass"].mean()) if len(s) else np.nan
        flag = " ⚠" if np.isfinite(off) and 1 - off < LOW_MASS else ""
        parts.append(f"paper γ = {_f(r['gamma_paper'])}{flag} (bayesflip γ = {_f(r['gamma_bayesflip'])}; "
                     f"{r['experiment']})")
        vals[r["experiment"]] = {"gamma_paper": r["gamma_paper"], "gamma_bayesflip": r["gamma_bayesflip"]}
        if np.isfinite(off):
            notes += _low_mass(f"P(heads) along {r['experiment']} (mean)", off)
        if np.isfinite(r["gamma_bayesflip"]) and abs(r["gamma_paper"] - r["gamma_bayesflip"]) > ESTIMATOR_GAP:
            notes.append(_gamma_note(r, a_sum))
    g = float(t["gamma_paper"].iloc[0])
    rows = ctx.pub.get("gamma", [])
    base = [r["gamma"] for r in rows if ctx.pub_kinds.get(r["model"]) == "std"]
    inst = [r["gamma"] for r in rows if ctx.pub_kinds.get(r["model"]) == "instruct"]
    kind = ctx.kinds.get(model, "")
    published = _published(ctx, "gamma", model)
    if not (base and inst) or kind not in ("instruct", "std"):
        why = ("no published γ of both kinds to compare with" if not (base and inst)
               else f"the model's kind is unknown ({kind or 'not recorded'})")
        return Finding("gamma", model, "inconclusive", "; ".join(parts), published, why,
                       ctx.cover(model, t["experiment"]), notes, vals)
    if kind == "instruct":
        ref = float(np.median(base))
        ok = g < ref
        why = f"instruct model: paper γ {_f(g)} {'<' if ok else '≥'} the published base median {_f(ref)}"
    else:
        ref = float(np.median(inst))
        ok = g > ref
        why = f"base model: paper γ {_f(g)} {'>' if ok else '≤'} the published instruct median {_f(ref)}"
    return Finding("gamma", model, "agrees" if ok else "differs", "; ".join(parts), published, why,
                   ctx.cover(model, t["experiment"]), notes, {**vals, "kind": kind})


def _poisson(ctx: Context, model: str) -> Finding | None:
    t = ctx.table("poisson", "poisson_by_condition", ("experiment", "model", "mode", "marker", "lam", "lambda_hat",
                                                       "n_samples"))
    t = t[(t["model"] == model) & (t["marker"] == "all")]
    if t.empty:
        return None
    t = t.assign(kind=np.where(t["mode"].astype(str).str.startswith("icl"), "icl", "explicit"),
                 err=(t["lambda_hat"] - t["lam"]).abs())
    parts = [f"λ = {r['lam']:g}, {'in context' if r['kind'] == 'icl' else 'told λ'} ({r['mode']}): "
             f"λ̂ = {_f(r['lambda_hat'], 3)} ({int(r['n_samples'])} samples)" for r in t.to_dict("records")]
    published = _published(ctx, "poisson", model)
    common = sorted(set(t.loc[t["kind"] == "icl", "lam"]) & set(t.loc[t["kind"] == "explicit", "lam"]))
    notes: list[str] = []
    vals = {f"{r['mode']}/{r['lam']:g}": float(r["lambda_hat"]) for r in t.to_dict("records")}
    if not common:
        have = "in-context" if (t["kind"] == "icl").any() else "explicit"
        return Finding("poisson", model, "not measured", "; ".join(parts), published,
                       f"only the {have} mode measured: the claim compares both", ctx.cover(model, t["experiment"]),
                       notes, vals)
    c = t[t["lam"].isin(common)]
    e_icl = float(c.loc[c["kind"] == "icl", "err"].mean())
    e_exp = float(c.loc[c["kind"] == "explicit", "err"].mean())
    ok = e_icl < e_exp
    if (c["lambda_hat"] < 0.5 * c["lam"]).all():
        notes.append("Neither mode tracks λ: every λ̂ is below half of λ (the model rarely writes the marker), so "
                     "the comparison of the two errors says little.")
    why = f"|λ̂ − λ| in context {_f(e_icl, 3)} {'<' if ok else '≥'} told {_f(e_exp, 3)}"
    return Finding("poisson", model, "agrees" if ok else "differs", "; ".join(parts), published, why,
                   ctx.cover(model, t["experiment"]), notes, vals)


def _direction(deltas: list[float], step: float) -> str:
    """agrees / differs / mixed / inconclusive from signed changes (positive = with the claim)."""
    ups = [d > step for d in deltas]
    downs = [d < -step for d in deltas]
    if not deltas or not any(ups) and not any(downs):
        return "inconclusive"
    if all(ups):
        return "agrees"
    if all(downs):
        return "differs"
    return "mixed"


_ACR_DIR = {"easy": ("mean_rank", -1, "common"), "hard": ("mean_rank", 1, "rare"),
            "easylong": ("mean_len", 1, "long"), "easyshort": ("mean_len", -1, "short")}


def _rules_changes(ctx: Context, model: str) -> list[dict]:
    """Per rules condition (paper and clean protocol): P(screen = off) at generation 0 and the last generation."""
    out = []
    for name in ("rules_paper_by_generation", "rules_by_generation"):
        t = ctx.table("rules", name, ("experiment", "model", "bias", "interaction", "generation", "p_screen_off"))
        t = t[(t["model"] == model) & (t["bias"].astype(str) != "none")]
        if t.empty:
            continue
        keys = [k for k in ("experiment", "bias", "position", "interaction", "h_index", "temperature") if k in t]
        for key, g in t.groupby(keys, sort=True):
            g = g.sort_values("generation")
            if len(g) < 2:
                continue
            k = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
            out.append({**k, "g0": float(g["p_screen_off"].iloc[0]), "glast": float(g["p_screen_off"].iloc[-1]),
                        "generations": int(g["generation"].iloc[-1]),
                        "n_chains": int(g["n_chains"].min()) if "n_chains" in g else 0,
                        "on_mass": float(g["on_mass"].mean()) if "on_mass" in g else np.nan})
    return out


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def _amplification(ctx: Context, model: str) -> Finding | None:
    deltas, parts, exps, vals, notes = [], [], [], {}, []
    rules = [r for r in _rules_changes(ctx, model) if r["interaction"] == "none"]
    for r in rules:
        d = r["glast"] - r["g0"]
        deltas.append(d)
        low = np.isfinite(r["on_mass"]) and r["on_mass"] < LOW_MASS
        parts.append(f"rules, bias {r['bias']}: P(screen off) {_f(r['g0'])} → {_f(r['glast'])}{' ⚠' if low else ''} "
                     f"over {_n(r['generations'], 'generation')}, {_n(r['n_chains'], 'chain')} ({r['experiment']})")
        if low:
            notes.append(f"⚠ P(h) of {r['experiment']} (bias {r['bias']}) is renormalised from {r['on_mass']:.2g} "
                         f"on-choice mass (mean over generations; below {LOW_MASS:.0%}): the 243 rule strings are "
                         "long, so a small mass is expected, but P(h) is then the model's relative preference among "
                         "the rules rather than what it would write.")
        exps.append(r["experiment"])
        vals[f"rules/{r['experiment']}/{r['bias']}"] = d
    acr = ctx.table("acronym", "acronym_paper_by_generation", ("experiment", "model", "bias_type", "generation"))
    acr = acr[acr["model"] == model]
    for _key, g in acr.groupby([k for k in ("experiment", "bias_type", "m_easy", "temperature") if k in acr],
                              sort=True):
        g = g.sort_values("generation")
        b = str(g["bias_type"].iloc[0])
        if b not in _ACR_DIR or len(g) < 2:
            continue
        col, sign, word = _ACR_DIR[b]
        v0, v1 = float(g[col].iloc[0]), float(g[col].iloc[-1])
        rel = (v1 - v0) / abs(v0) if v0 else np.nan
        if not np.isfinite(rel):
            continue
        # scaled so that RANK_STEP maps onto STEP: a ±5 % move of the rank counts like ±STEP of a probability
        deltas.append(sign * rel * STEP / RANK_STEP)
        parts.append(f"acronyms, {word}-word persona: {col.replace('_', ' ')} {v0:.0f} → {v1:.0f} over "
                     f"{_n(int(g['generation'].iloc[-1]), 'generation')} ({g['experiment'].iloc[0]})")
        exps.append(g["experiment"].iloc[0])
        vals[f"acronym/{g['experiment'].iloc[0]}/{b}"] = sign * rel
    ch = ctx.table("chains", "chains_diagnostic", ("experiment", "model", "condition", "primary", "prior",
                                                   "amplification_llm", "n_chains", "generations"))
    ch = ch[(ch["model"] == model) & ch["primary"].astype(bool)]
    gen = ctx.table("chains", "chains_by_generation", ("experiment", "model", "condition", "off_choice_mass"))
    for r in ch.to_dict("records"):
        if not np.isfinite(r["amplification_llm"]):
            continue
        deltas.append(float(r["amplification_llm"]))
        off = gen.loc[(gen["experiment"] == r["experiment"]) & (gen["model"] == model)
                      & (gen["condition"] == r["condition"]), "off_choice_mass"]
        off = float(off.mean()) if len(off) else np.nan
        flag = " ⚠" if np.isfinite(off) and 1 - off < LOW_MASS else ""
        parts.append(f"chains {r['condition']}: amplification {r['amplification_llm']:+.3f}{flag} under the "
                     f"{r['prior']} prior, {_n(int(r['n_chains']), 'chain')} × "
                     f"{_n(int(r['generations']), 'generation')} ({r['experiment']})")
        if np.isfinite(off):
            notes += _low_mass(f"the chain reads of {r['experiment']}, {r['condition']} (mean)", off)
        exps.append(r["experiment"])
        vals[f"chains/{r['experiment']}/{r['condition']}"] = float(r["amplification_llm"])
    if not parts:
        return None
    verdict = _direction(deltas, STEP)
    why = {"agrees": "every measure moves with the bias", "differs": "every measure moves against the bias",
           "mixed": "the measures move in different directions",
           "inconclusive": f"no measure moves by more than {STEP} (or its equivalent)"}[verdict]
    if any(r["generations"] < 2 for r in rules) or (len(acr) and acr["generation"].max() < 2):
        notes.append("One generation only: a single step says little about amplification over generations.")
    pub = _published(ctx, "amplification", model)
    return Finding("amplification", model, verdict, "; ".join(parts), pub, why, ctx.cover(model, exps), notes, vals)


def _interaction(ctx: Context, model: str) -> Finding | None:
    ch = _rules_changes(ctx, model)
    if not ch:
        return None
    base_keys = ("experiment", "bias", "position", "h_index", "temperature")

    def key(r):
        return tuple(r.get(k) for k in base_keys)

    none = {key(r): r["glast"] - r["g0"] for r in ch if r["interaction"] == "none"}
    with_it = [r for r in ch if r["interaction"] != "none"]
    deltas, parts, exps, vals = [], [], [], {}
    for r in with_it:
        if key(r) not in none:
            continue
        d_it, d_none = r["glast"] - r["g0"], none[key(r)]
        deltas.append(d_none - d_it)
        parts.append(f"bias {r['bias']}: Δ P(screen off) {d_none:+.2f} without, {d_it:+.2f} with {r['interaction']} "
                     f"({r['experiment']})")
        exps.append(r["experiment"])
        vals[f"{r['experiment']}/{r['bias']}/{r['interaction']}"] = {"delta_none": d_none, "delta_interaction": d_it}
    pub = _published(ctx, "interaction", model)
    if not parts:
        its = sorted({r["interaction"] for r in ch})
        return Finding("interaction", model, "not measured",
                       f"rules chains with interaction {', '.join(its)} only", pub,
                       "needs the same rules condition with and without an interaction",
                       ctx.cover(model, [r["experiment"] for r in ch]), [], {})
    verdict = _direction(deltas, STEP)
    why = {"agrees": "the change is smaller with interaction in every condition",
           "differs": "the change is larger with interaction in every condition",
           "mixed": "smaller in some conditions, larger in others",
           "inconclusive": f"the changes differ by at most {STEP}"}[verdict]
    return Finding("interaction", model, verdict, "; ".join(parts), pub, why, ctx.cover(model, exps), [], vals)


_FUNCS = {"prior": _prior, "icl": _icl, "attention": _attention, "gamma": _gamma, "poisson": _poisson,
          "amplification": _amplification, "interaction": _interaction}


# ---------------------------------------------------------------------------- assembly
def build_findings(res: dict[str, ReducedFamily], models: list[str], kinds: dict[str, str],
                   coverage: pd.DataFrame, pub: dict | None = None, pub_kinds: dict[str, str] | None = None
                   ) -> list[Finding]:
    """One :class:`Finding` per (claim in :data:`CLAIMS`, model); ``not measured`` where no reducer table has it."""
    pub = load_published() if pub is None else pub
    ctx = Context(res, pub, kinds, coverage, pub_kinds if pub_kinds is not None else published_kinds(pub))
    out = []
    for key, claim in CLAIMS.items():
        for m in models:
            f = _FUNCS[key](ctx, m)
            if f is None:
                f = Finding(key, m, "not measured", "no experiment", _published(ctx, key, m),
                            f"no experiment of the sweep measures it for this model (needs {claim.measured_by})",
                            "none in this sweep")
            out.append(f)
    return out


def published_kinds(pub: dict) -> dict[str, str]:
    """Published model (registry name) → kind (``std`` / ``instruct``) from the model registry."""
    reg = load_registry()
    names = {r["model"] for key in ("prior", "icl_coin_tvd", "icl_die_tvd", "gamma", "poisson")
             for r in pub.get(key, [])}
    return {n: reg[n].kind for n in names if n in reg}


def findings_table(findings: list[Finding]) -> pd.DataFrame:
    """The table shown in the report (also written as ``tables/findings.csv``)."""
    return pd.DataFrame([{"finding": CLAIMS[f.claim].title, "model": f.model, "ours": f.ours,
                          "published (source)": f.published, "verdict": f"**{f.verdict}**" + (f": {f.why}" if f.why
                                                                                                  else ""),
                          "coverage": f.coverage or "—"} for f in findings])


def findings_summary(findings: list[Finding]) -> list[dict]:
    """JSON-able: every finding with its claim's text and source (``summary.json`` ``findings``)."""
    out = []
    for f in findings:
        c = CLAIMS[f.claim]
        out.append({**asdict(f), "title": c.title, "claim_text": c.text, "study": c.study, "source": c.source,
                    "rule": c.rule})
    return out


def _kind_comparison(findings: list[Finding]) -> str:
    g: dict[str, list] = {"instruct": [], "std": []}
    for f in findings:
        if f.claim == "gamma" and f.values.get("kind") in g:
            first = next((v for v in f.values.values() if isinstance(v, dict) and "gamma_paper" in v), None)
            if first is not None and np.isfinite(first["gamma_paper"]):
                g[f.values["kind"]].append(float(first["gamma_paper"]))
    if not g["instruct"] or not g["std"]:
        return ""
    mi, mb = float(np.mean(g["instruct"])), float(np.mean(g["std"]))
    return (f"Across this sweep the instruct models' mean paper γ is {_f(mi)} and the base models' {_f(mb)}: "
            f"{'agrees with' if mi < mb else 'differs from'} the claim that instruct models forget faster.")


def findings_section(findings: list[Finding]) -> Section:
    """The report's first section: the table, the notes (flags, estimator gaps), and the claims with their rules."""
    counts = {v: sum(f.verdict == v for f in findings) for v in VERDICTS}
    tally = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    blocks: list[Block] = [
        Text("Each headline finding of the two studies, tested on this sweep's models: our value, the published "
             f"value or range with its source, and a verdict ({tally}). **agrees** / **differs**: the claim's "
             "direction holds / fails on our numbers by the rule listed under the table; **mixed**: its measures "
             "point both ways; **inconclusive**: measured, but the rule cannot decide; **not measured**: no "
             "experiment of the sweep measures it for that model. Coverage names the experiments behind each row "
             "and how many of their cells and shards are complete. ⚠ marks a value renormalised from less than "
             f"{LOW_MASS:.0%} on-choice mass. The detailed comparisons are in **Against the papers**, the data "
             "behind them in the family sections; provenance is in the appendix."),
        Table(findings_table(findings), "One row per claim and model (the verdict rules are listed below).",
              max_rows=200),
    ]
    notes = [(f, n) for f in findings for n in f.notes]
    extra = _kind_comparison(findings)
    if notes or extra:
        lines = [f"- **{CLAIMS[f.claim].title}, {f.model}**: {n}" for f, n in notes]
        if extra:
            lines.append(f"- **{CLAIMS['gamma'].title}, sweep**: {extra}")
        blocks.append(Text("Notes:\n\n" + "\n".join(lines)))
    blocks.append(Text("The claims (in our words), their sources and the rule behind each verdict:\n\n" + "\n".join(
        f"- **{c.title}** — {c.text} Source: {c.study}; `{c.source}`. Verdict: {c.rule}" for c in CLAIMS.values())))
    return Section("Findings on your models", blocks)
