"""The report a person reads: "Findings on your models" first, its verdicts, and clean HTML.

* :func:`build_findings` on hand-made reducer tables: every verdict rule (agrees / differs /
  inconclusive / not measured), the low on-choice-mass flag and the γ-estimator sentence;
* the rendering helpers: missing values as "—" with a legend, inline Markdown in captions and cells;
* a reduced synthetic sweep (stores of the real families, a published model and an unpublished one
  with 4 % on-choice mass): the first section after the title and nav is the findings table, the
  visible HTML text has no raw backticks / nan / <NA> / None, every table scrolls sideways.
  :func:`html_report` splits a report into sections, tables and figures for further checks
  (e.g. the published markers of each comparison figure).
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from conftest import synthetic_store
from test_reduce_paper import coin_paper_store, die_store, shift_paper_store, write
from bayesflip import bayes
from bayesflip.reduce import figures as F
from bayesflip.reduce import reduce_sweep
from bayesflip.reduce.attention import corr_title
from bayesflip.reduce.base import ReducedFamily
from bayesflip.reduce.findings import CLAIMS, LOW_MASS, build_findings
from bayesflip.reduce.published import load_published
from bayesflip.reduce.report import MISSING_LEGEND, html_table, inline_html, md_table

PUB_MODEL = "llama-3.1-8b"          # a registry model with published values (base)
NEW_MODEL = "my-new-model"          # not in the papers


# ---------------------------------------------------------------------------- findings on hand-made tables
def cov(models, exps):
    return pd.DataFrame([{"experiment": e, "model": m, "family": "x", "shards_total": 2, "shards_done": 2,
                          "cells_total": 10, "cells_trusted": 10} for m in models for e in exps])


PUB = load_published()
KINDS = {"llama-3.1-8b": "std", "phi-2": "std", "mistral-7b-v0.3": "std", "gemma-2-2b": "std", "olmoe-1b-7b": "std",
         "llama-3.1-8b-instruct": "instruct", "gemma-2-2b-it": "instruct", "mistral-7b-instruct-v0.3": "instruct",
         "phi-3.5-mini-instruct": "instruct"}


def find(res, models=(PUB_MODEL, NEW_MODEL), kinds=None, exps=("e",)):
    fs = build_findings(res, list(models), kinds or {PUB_MODEL: "std", NEW_MODEL: "instruct"}, cov(models, exps),
                        PUB, KINDS)
    return {(f.claim, f.model): f for f in fs}


def test_every_claim_and_model_has_a_row_and_missing_families_are_not_measured():
    got = find({})
    assert set(got) == {(c, m) for c in CLAIMS for m in (PUB_MODEL, NEW_MODEL)}
    f = got[("prior", NEW_MODEL)]
    assert f.verdict == "not measured" and "paraphrase" in f.why and f.coverage == "none in this sweep"
    assert "0.69–0.97 over 10 published models" in f.published       # the published side is shown anyway
    assert got[("prior", PUB_MODEL)].published.startswith("0.76 ± 0.12")


def test_prior_verdict_published_std_and_low_mass_flag():
    t = pd.DataFrame([
        {"experiment": "p", "model": PUB_MODEL, "protocol": "paper", "process": "coin", "choice": "heads",
         "p_mean": 0.8, "p_std_paper": 0.1, "off_choice_mass": 0.2, "n_paraphrases": 50},
        {"experiment": "p", "model": NEW_MODEL, "protocol": "paper", "process": "coin", "choice": "heads",
         "p_mean": 0.3, "p_std_paper": 0.1, "off_choice_mass": 0.96, "n_paraphrases": 50}])
    got = find({"paraphrase": ReducedFamily(tables={"paraphrase_prior": t})}, exps=("p",))
    a, b = got[("prior", PUB_MODEL)], got[("prior", NEW_MODEL)]
    assert a.verdict == "agrees" and "within one published std" in a.why and a.notes == []
    assert a.coverage == "p: 10/10 cells, 2/2 shards"
    assert b.verdict == "differs" and "⚠" in b.ours and len(b.notes) == 1 and "4 %" in b.notes[0]
    assert 1 - 0.96 < LOW_MASS


def test_icl_tvd_falls_or_not():
    rows = []
    for m, tvd in ((PUB_MODEL, [0.5, 0.3, 0.1]), (NEW_MODEL, [0.4, 0.41, 0.39])):
        rows += [{"experiment": "c", "model": m, "protocol": "paper", "process": "coin", "N": n, "tvd_paper": v,
                  "n_theta": 11} for n, v in zip([0, 1, 100], [0.2] + tvd[1:])]
    got = find({"icl": ReducedFamily(tables={"icl_paper_ngrid": pd.DataFrame(rows)})})
    assert got[("icl", PUB_MODEL)].verdict == "agrees"              # 0.3 at N = 1 → 0.1 at N = 100
    assert got[("icl", NEW_MODEL)].verdict == "differs"             # 0.41 → 0.39: less than the step 0.02
    assert "coin: 0.53 (N = 1) → 0.04 (N = 100)" in got[("icl", PUB_MODEL)].published


def test_gamma_kind_rule_and_the_estimator_sentence():
    g = pd.DataFrame([{"experiment": "s", "model": NEW_MODEL, "protocol": "paper", "gamma_paper": 0.08,
                       "gamma_bayesflip": 0.90, "n_points": 100},
                      {"experiment": "s", "model": PUB_MODEL, "protocol": "paper", "gamma_paper": 0.2,
                       "gamma_bayesflip": 0.25, "n_points": 100}])
    fits = pd.DataFrame([{"experiment": "s", "model": NEW_MODEL, "prior_alpha": 40.0, "prior_beta": 58.0}])
    summ = pd.DataFrame([{"experiment": "s", "model": NEW_MODEL, "off_choice_mass": 0.5},
                         {"experiment": "s", "model": PUB_MODEL, "off_choice_mass": 0.5}])
    got = find({"icl": ReducedFamily(tables={"icl_paper_gamma": g, "icl_gamma_fits": fits, "icl_summary": summ})})
    inst, base = got[("gamma", NEW_MODEL)], got[("gamma", PUB_MODEL)]
    base_median = float(np.median([0.881, 0.878, 0.690, 0.491, 0.327]))
    assert inst.verdict == "agrees" and f"{base_median:.2f}" in inst.why      # instruct 0.08 < base median 0.69
    assert base.verdict == "differs"                                           # base 0.2 ≤ instruct median 0.31
    assert base.published.startswith("this model: 0.88")
    (note,) = inst.notes
    assert "differ by 0.82" in note and "α + β = 98" in note and note.count(".") >= 1
    assert base.notes == []                                                    # |0.2 − 0.25| ≤ 0.2


def test_poisson_needs_both_modes():
    c = pd.DataFrame([
        {"experiment": "pe", "model": PUB_MODEL, "mode": "explicit", "marker": "all", "lam": 0.5, "lambda_hat": 0.8,
         "n_samples": 4},
        {"experiment": "pi", "model": PUB_MODEL, "mode": "icl_100w", "marker": "all", "lam": 0.5, "lambda_hat": 0.45,
         "n_samples": 4},
        {"experiment": "pi", "model": NEW_MODEL, "mode": "icl_100w", "marker": "all", "lam": 0.5, "lambda_hat": 0.45,
         "n_samples": 4}])
    got = find({"poisson": ReducedFamily(tables={"poisson_by_condition": c})})
    assert got[("poisson", PUB_MODEL)].verdict == "agrees"          # |0.45 − 0.5| < |0.8 − 0.5|
    assert got[("poisson", NEW_MODEL)].verdict == "not measured" and "in-context" in got[("poisson", NEW_MODEL)].why
    # the published side: λ = 0.5 at temperature 1.0, mean and median, the in-context rows' conditions ambiguous
    own, other = got[("poisson", PUB_MODEL)].published, got[("poisson", NEW_MODEL)].published
    assert "told λ 0.716 (median 0.219)" in own and "in context 0.480 (median 0.513)" in own
    assert "conditions ambiguous" in own and "conditions ambiguous" in other and "11 published models" in other


def test_attention_within_theta_decides_within_n_alone_does_not():
    def row(m, ls, r_n, r_tn, p_tn=1e-5):
        return {"experiment": "a", "model": m, "layer_set": ls, "measure": "outcomes", "n_points": 40,
                "within_pearson_r": r_n, "within_pearson_p": 1e-6, "within_theta_pearson_r": r_tn,
                "within_theta_pearson_p": p_tn}
    t = pd.DataFrame([row(PUB_MODEL, "all", 0.9, 0.1), row(PUB_MODEL, "late", 0.2, -0.25),
                      row(NEW_MODEL, "all", 0.8, np.nan, np.nan)])
    got = find({"attention": ReducedFamily(tables={"attention_correlation": t})})
    assert got[("attention", PUB_MODEL)].verdict == "agrees"        # within (θ, n): |r| < 0.3 in both sets
    assert got[("attention", NEW_MODEL)].verdict == "inconclusive"  # within (θ, n) undefined, within n 0.8
    t.loc[1, "within_theta_pearson_r"] = 0.6
    assert find({"attention": ReducedFamily(tables={"attention_correlation": t})})[
        ("attention", PUB_MODEL)].verdict == "differs"


def test_rules_amplification_and_interaction():
    rows = []
    for it, last in (("none", 0.6), ("self", 0.35)):
        for g, v in ((0, 0.3), (1, 0.4), (2, last)):
            rows.append({"experiment": "r", "model": PUB_MODEL, "bias": "strong", "position": "start", "interaction": it,
                         "h_index": 0, "temperature": 1.0, "generation": g, "n_chains": 3, "p_screen_off": v,
                         "on_mass": 0.5})
    got = find({"rules": ReducedFamily(tables={"rules_paper_by_generation": pd.DataFrame(rows)})})
    amp, inter = got[("amplification", PUB_MODEL)], got[("interaction", PUB_MODEL)]
    assert amp.verdict == "agrees" and "0.30 → 0.60 over 2 generations, 3 chains" in amp.ours
    assert inter.verdict == "agrees" and inter.values["r/strong/self"] == {"delta_none": pytest.approx(0.3),
                                                                          "delta_interaction": pytest.approx(0.05)}
    assert got[("interaction", NEW_MODEL)].verdict == "not measured"


# ---------------------------------------------------------------------------- rendering helpers
def test_missing_values_render_as_dash_with_a_legend():
    df = pd.DataFrame({"a": [1.5, np.nan, 3.0], "b": ["x `code`", None, "nan"], "c": pd.array([1, pd.NA, 3])})
    md, html = md_table(df), html_table(df)
    for out in (md, html):
        assert "nan" not in out.lower() and "<NA>" not in out and "None" not in out
        assert MISSING_LEGEND in out or MISSING_LEGEND.replace("—", "&mdash;") in out
    assert html.startswith("<div class=tbl><table>") and "<code>code</code>" in html and "`" not in html
    assert md.count("—") >= 3 + 1
    assert "`" not in inline_html("a `b` **c**") and "<b>c</b>" in inline_html("a `b` **c**")
    assert html_table(pd.DataFrame({"a": [1.0]})).count(MISSING_LEGEND) == 0


def test_figure_helpers_name_what_is_missing():
    assert F.too_few_generations(1, "x") is not None and "one generation" in F.too_few_generations(1, "x")
    assert F.too_few_generations(2, "x") is None
    t = corr_title("all", {"pearson_r": 0.3, "spearman_rho": 0.25, "within_pearson_r": 0.7,
                           "within_theta_pearson_r": np.nan})
    assert "nan" not in t and "within θ, n: undefined" in t and "r = 0.30" in t


# ---------------------------------------------------------------------------- the HTML of a reduced sweep
class _Parser(HTMLParser):
    """Sections (h2 id, title), tables (with the tag of their parent), figures, and the visible text."""

    def __init__(self):
        super().__init__()
        self.stack, self.text, self.sections, self.tables, self.figures = [], [], [], [], []
        self._skip = 0
        self._h2 = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("style", "script"):
            self._skip += 1
        if tag == "h2":
            self._h2 = [a.get("id"), ""]
        if tag == "table":
            parent = self.stack[-1] if self.stack else ("", {})
            self.tables.append({"section": len(self.sections) - 1, "parent": parent[0],
                                "parent_class": parent[1].get("class", "")})
        if tag == "img":
            self.figures.append({"section": len(self.sections) - 1, "alt": a.get("alt", "")})
        if tag == "nav":
            self.sections_before_nav = len(self.sections)
        if tag not in ("img", "meta", "br"):
            self.stack.append((tag, a))

    def handle_endtag(self, tag):
        if tag in ("style", "script"):
            self._skip -= 1
        if tag == "h2" and self._h2 is not None:
            self.sections.append(tuple(self._h2))
            self._h2 = None
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self._skip:
            return
        self.text.append(data)
        if self._h2 is not None:
            self._h2[1] += data


def html_report(path) -> _Parser:
    p = _Parser()
    p.feed(path.read_text())
    return p


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    coin_paper_store(root)                       # icl, protocol paper, PUB_MODEL
    shift_paper_store(root)
    die_store(root)
    for model, p_heads, off in ((PUB_MODEL, [0.6, 0.7, 0.8, 0.9], 0.1), (NEW_MODEL, [0.2, 0.3, 0.4, 0.5], 0.96)):
        st, fam, p, cells = synthetic_store(root, "syn", "prior_coin", "paraphrase",
                                            {"process": "coin", "paraphrases": [f"Query {i}:" for i in range(4)]}, 2,
                                            7, model)
        write(st, {"logprobs": np.log((1 - off) * bayes.coin_dist(np.array(p_heads))).astype(np.float32)})
    report = reduce_sweep("syn", results_dir=root, strict=True)
    return report.parent


def test_findings_table_is_the_first_section(reduced):
    p = html_report(reduced / "report.html")
    assert p.sections[0][1] == "Findings on your models" and p.sections_before_nav == 0
    first_table = p.tables[0]
    assert first_table["section"] == 0
    html = (reduced / "report.html").read_text()
    body = html.split('<h2 id="s0">', 1)[1].split("<h2 ", 1)[0]
    head = re.findall(r"<th[^>]*>([^<]*)</th>", body.split("</thead>", 1)[0])
    assert head == ["finding", "model", "ours", "published (source)", "verdict", "coverage"]
    assert [t for _, t in p.sections][-1] == "Appendix: provenance"
    assert [t for _, t in p.sections].index("Against the papers") == 1
    md = (reduced / "report.md").read_text()
    assert md.split("\n## ", 2)[1].startswith("Findings on your models")
    assert "| Biased prior | my-new-model | P(heads) = 0.35 ± 0.11 ⚠ over 4 prompts (prior_coin)" in md
    assert "**differs**" in md and "**agrees**" in md


def test_visible_html_text_is_clean(reduced):
    p = html_report(reduced / "report.html")
    text = "\n".join(p.text)
    assert "`" not in text
    for bad in (r"\bnan\b", r"\bNaN\b", r"<NA>", r"\bNone\b"):
        assert not re.search(bad, text), (bad, re.search(bad, text))
    assert "—" in text and MISSING_LEGEND in text
    assert all(f["alt"] and "`" not in f["alt"] for f in p.figures)


def test_tables_scroll_sideways_and_wrap_in_print(reduced):
    p = html_report(reduced / "report.html")
    assert len(p.tables) > 5
    assert all(t["parent"] == "div" and t["parent_class"] == "tbl" for t in p.tables)
    html = (reduced / "report.html").read_text()
    css = html.split("<style>", 1)[1].split("</style>", 1)[0]
    assert re.search(r"\.tbl\{[^}]*overflow-x:auto", css)
    assert "@media print" in css and "white-space:normal" in css.split("@media print", 1)[1]


def test_summary_json_findings(reduced):
    s = json.loads((reduced / "summary.json").read_text())
    rows = {(f["claim"], f["model"]): f for f in s["findings"]}
    assert set(rows) == {(c, m) for c in CLAIMS for m in (PUB_MODEL, NEW_MODEL)}
    pr = rows[("prior", PUB_MODEL)]
    assert pr["verdict"] == "agrees" and pr["values"]["p_heads"] == pytest.approx(0.75, abs=1e-6)
    assert pr["source"].startswith("rcorona/llm-coin-flips") and pr["claim_text"] and pr["rule"]
    assert rows[("prior", NEW_MODEL)]["verdict"] == "differs" and rows[("prior", NEW_MODEL)]["notes"]
    assert rows[("icl", PUB_MODEL)]["verdict"] in ("agrees", "differs")
    assert rows[("amplification", PUB_MODEL)]["verdict"] == "not measured"
    assert (reduced / "tables" / "findings.csv").exists()
