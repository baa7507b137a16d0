"""protocol: paper for needle (A), paraphrase (B), icl incl. shift (C, D): the rendering equals the
coin-flip study's formula (PAPER_PROTOCOLS.md "Rendering") character for character.

Reference formulas, written here independently of bayesflip's rendering code:
* base:     ' '.join(f'{context} {query}{choice}'.split())
* instruct: chat_template(user = ' '.join(f'{context} {instruct_prompt}'.split()), generation prompt)
            + ' '.join((query + choice).split())          (assistant prefill, no end-of-turn)
"""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bayesflip import cli
from bayesflip.config import validate_params
from bayesflip.engine import Scorer
from bayesflip.errors import ConfigError
from bayesflip.experiments import get_family
from bayesflip.experiments.base import RunContext
from bayesflip.experiments.seq import build_curve
from bayesflip.filler import build_filler, paper_insertion_index
from bayesflip.models.loader import load_tokenizer
from bayesflip.models.registry import get_model_spec

ROOT = Path(__file__).resolve().parents[1]


def ws(t: str) -> str:
    return " ".join(t.split())


def base_formula(context: str, query: str, choice: str) -> str:
    return ws(f"{context} {query}{choice}")


def chat_formula(tok, context: str, instruct: str, query: str, choice: str) -> str:
    head = tok.apply_chat_template([{"role": "user", "content": ws(f"{context} {instruct}")}],
                                   tokenize=False, add_generation_prompt=True)
    return head + ws(query + choice)


def formula(tok, kind, context, instruct, query, choice):
    return chat_formula(tok, context, instruct, query, choice) if kind == "instruct" else base_formula(context, query, choice)


@pytest.fixture(scope="module")
def toks():
    # tiny-random (kind std) renders base prompts; smollm2-135m-instruct (kind instruct) its chat template
    return {"std": load_tokenizer(get_model_spec("tiny-random")),
            "instruct": load_tokenizer(get_model_spec("smollm2-135m-instruct"))}


def params(family, **kw):
    return validate_params(get_family(family).Params, kw, "params")


@pytest.fixture
def original_files(tmp_path):
    """Stimuli in the original's format (queries end with a space; choices have none) in .txt files."""
    q = tmp_path / "queries.txt"
    q.write_text("The coin landed on \nAfter my toss, the coin showed \n", encoding="utf-8")
    i = tmp_path / "instruct.txt"
    i.write_text("Please complete this sentence: My coin landed on \nFinish this: The coin showed \n", encoding="utf-8")
    return f"file:{q}", f"file:{i}"


def check_rendered(tok, kind, rendered, context_of, choices=("heads", "tails")):
    for r in rendered:
        context, instruct, query = context_of(r.cell)
        assert len(r.choices) == len(choices)
        for scored, orig in zip(r.choices, choices):
            assert r.text + scored == formula(tok, kind, context, instruct, query, orig)


# ---------------------------------------------------------------------------- A: needle
@pytest.mark.parametrize("kind", ["std", "instruct"])
def test_needle_paper_matches_formula(toks, kind, original_files):
    tok = toks[kind]
    fam = get_family("needle")
    qfile, ifile = original_files
    for extra in ({}, {"queries": qfile, "instruct_prompts": ifile}):
        p = params("needle", protocol="paper", lengths=[0, 30], depths=[0.0, 0.5, 1.0], biases=[30], samples=1, **extra)
        fam.validate(p, tok, kind)
        cells = fam.cells(p)
        assert {c["condition"] for c in cells} == {"no_context", "no_needle", "needle"}
        stmt = ("When you flip coins, they land on heads 30% of the time." if kind == "instruct"
                else "When I flip coins they land on heads 30% of the time.")

        def context_of(c):
            if c["condition"] == "no_context":
                ctx = ""
            else:
                needle = stmt if c["condition"] == "needle" else ""
                ctx = build_filler(tok, c["length"], 0.0 if c["condition"] != "needle" else c["depth"], needle, 42,
                                   c["sample"], "pydoc", placement="paper").text
            return ctx, p.instruct_prompts[c["instruct"]], p.queries[c["query"]]

        rendered = fam.render(p, cells, tok, kind, 42)
        check_rendered(tok, kind, rendered, context_of)
        if not extra:
            assert p.queries == ["I tossed a coin and it landed on "]
            assert p.instruct_prompts == ["Please toss a coin and tell me whether it landed on head or tails."]
            tail = (f"{stmt} Please toss a coin and tell me whether it landed on head or tails." if kind == "instruct"
                    else f"{stmt} I tossed a coin and it landed on")
            assert any(tail in r.text for r in rendered if r.cell["length"] == 0 and r.cell["condition"] == "needle")


def test_needle_paper_die_and_number_statements(toks):
    tok = toks["std"]
    fam = get_family("needle")
    p = params("needle", protocol="paper", process="die", lengths=[0], depths=[0.0], biases=[60, 80], faces=[2],
               samples=1, no_needle=False, no_context=False)
    texts = [r.text for r in fam.render(p, fam.cells(p), tok, "std", 0)]
    assert texts == ["When I roll dice they land on 2 60% of the time. I rolled a die and it landed on",
                     "When I roll dice they land on 2 80% of the time. I rolled a die and it landed on"]
    r = fam.render(p, fam.cells(p)[:1], toks["instruct"], "instruct", 0)[0]
    assert "Whenever you roll dice they land on 2 60% of the time. Please roll a six-sided die and tell me what number it landed on." in r.text
    p = params("needle", protocol="paper", process="number", lengths=[0], depths=[0.0], samples=1,
               no_needle=False, no_context=False)
    rs = fam.render(p, fam.cells(p), tok, "std", 0)
    assert rs[0].text == "When I pick random numbers, they are always even. I picked a random number between 1 and 10 and it was"
    assert rs[0].choices[-1] == " 10."   # complete answers: " 1." vs " 10."
    ri = fam.render(p, fam.cells(p)[1:], toks["instruct"], "instruct", 0)[0]
    assert "When you pick random numbers, they are always odd. Please pick a random number between 1 and 10." in ri.text


def test_paper_filler_placement(toks):
    """Whole sentences up to >= L tokens; the needle after the sentence where the count first reaches floor(d·L_doc)."""
    tok = toks["std"]
    needle = "When I flip coins they land on heads 30% of the time."
    for L in (10, 100, 400):
        for d in (0.0, 0.3, 0.5, 1.0):
            f = build_filler(tok, L, d, needle, 5, 1, placement="paper")
            counts = [len(tok(" ".join(f.sentences[:k]), add_special_tokens=False).input_ids) if k else 0
                      for k in range(len(f.sentences) + 1)]
            assert counts[-1] >= L and counts[-2] < L                 # >= L tokens, no sentence beyond
            assert f.token_length == counts[-1]
            target = int(counts[-1] * d)
            k = next(k for k in range(1, len(counts)) if counts[k] >= target)
            assert f.insert_at == k == paper_insertion_index(counts, d)
            assert f.text == " ".join([*f.sentences[:k], needle, *f.sentences[k:]])
            if d == 0.0:
                assert f.insert_at == 1
            if d == 1.0:
                assert f.insert_at == len(f.sentences)


# ---------------------------------------------------------------------------- B: paraphrase prior
@pytest.mark.parametrize("kind", ["std", "instruct"])
def test_paraphrase_paper_matches_formula(toks, kind, original_files):
    tok = toks[kind]
    fam = get_family("paraphrase")
    p = params("paraphrase", protocol="paper")
    assert len(p.queries) == 50 and len(p.instruct_prompts) == 5 and all(q.endswith(" ") for q in p.queries)
    cells = fam.cells(p)
    assert len(cells) == 250 and {(c["instruct"], c["paraphrase"]) for c in cells} == {(i, q) for i in range(5) for q in range(50)}
    fam.validate(p, tok, kind)
    check_rendered(tok, kind, fam.render(p, cells[::7], tok, kind, 0),
                   lambda c: ("", p.instruct_prompts[c["instruct"]], p.queries[c["paraphrase"]]))
    qfile, ifile = original_files
    p = params("paraphrase", protocol="paper", queries=qfile, instruct_prompts=ifile)
    assert p.queries == ["The coin landed on ", "After my toss, the coin showed "]
    cells = fam.cells(p)
    assert len(cells) == 4
    check_rendered(tok, kind, fam.render(p, cells, tok, kind, 0),
                   lambda c: ("", p.instruct_prompts[c["instruct"]], p.queries[c["paraphrase"]]))


# ---------------------------------------------------------------------------- C/D: ICL
def icl_context(p, c, kind):
    if p.statement == "none":
        return ""
    th = c["theta"] if p.statement == "theta" else c["theta2"]
    if p.process == "coin":
        return (f"When you flip coins, they land on heads {round(th * 100)}% of the time." if kind == "instruct"
                else f"When I flip coins they land on heads {round(th * 100)}% of the time.")
    verb = "When you roll dice," if kind == "instruct" else "When I roll dice,"
    return f"{verb} they land on {c['face']} {round(th * 100)}% of the time."


@pytest.mark.parametrize("kind", ["std", "instruct"])
@pytest.mark.parametrize("case", ["coin", "die", "shift", "double", "file"])
def test_icl_paper_matches_formula(toks, kind, case, original_files):
    tok = toks[kind]
    fam = get_family("icl")
    kw = {"protocol": "paper", "samples": 1, "n_flips": 12, "thetas": [0.3, 0.7]}
    if case == "die":
        kw.update(process="die", thetas=[0.2, 0.6], faces=[3])
    if case == "shift":
        kw.update(shift="switch", thetas=[0.25], theta2s=[0.75], cutoff=5)
    if case == "double":
        kw.update(shift="switch", thetas=[0.2], theta2s=[0.9], cutoff=5, statement="theta2")
    if case == "file":
        kw.update(queries=original_files[0], instruct_prompts=original_files[1])
    p = params("icl", **kw)
    assert p.statement == ("none" if case == "shift" else "theta2" if case == "double" else "theta")
    fam.validate(p, tok, kind)
    cells = fam.cells(p)
    cells = cells if case == "file" else cells[::37]
    rendered = fam.render(p, cells, tok, kind, 42)
    assert [r.cell["n"] for r in rendered[:6]] == [0, 1, 3, 5, 10, 12]  # paper N capped at n_flips
    labels = [c.strip() for c in fam.coords(p)["choice"]]
    for r in rendered:
        c = {k: v for k, v in r.cell.items() if k != "n"}
        o = fam.sample_outcomes(p, c, 42)
        flips = [labels[i] for i in o[: r.cell["n"]]]
        query = p.queries[c["query"]] + ", then ".join(flips) + (", then " if flips else "")
        for scored, orig in zip(r.choices, labels):
            assert r.text + scored == formula(tok, kind, icl_context(p, c, kind), p.instruct_prompts[c["instruct"]],
                                              query, orig)


def test_icl_paper_shares_one_sequence_per_theta_and_numpy_legacy():
    fam = get_family("icl")
    p = params("icl", protocol="paper", samples=1, n_flips=100, flips="numpy_legacy",
               thetas=[round(0.1 * i, 1) for i in range(11)])
    cells = fam.cells(p)
    assert len(cells) == 11 * 250
    by_theta = {}
    for c in cells[::13]:
        by_theta.setdefault(c["theta"], set()).add(tuple(fam.sample_outcomes(p, c, 42)))
    assert all(len(s) == 1 for s in by_theta.values())
    # the original script: np.random.seed(42); per theta in order np.random.choice(choices, N, p=[h, round(1-h, 1)])
    np.random.seed(42)
    for t in range(0, 101, 10):
        flips = np.random.choice(["heads", "tails"], 100, p=[t / 100, round(1 - t / 100, 1)])
        ours = fam.sample_outcomes(p, {"theta": round(t / 100, 1), "sample": 0, "instruct": 0, "query": 0}, 42)
        assert [["heads", "tails"][i] for i in ours] == list(flips)


def test_paper_params_errors(original_files, tmp_path):
    for fam, kw, key in [("icl", {"protocol": "papr"}, "protocol"),
                         ("icl", {"protocol": "paper", "head": "x"}, "head"),
                         ("icl", {"statement": "theta"}, "statement"),
                         ("icl", {"protocol": "paper", "statement": "theta2"}, "theta2"),
                         ("needle", {"queries": ["a "]}, "queries"),
                         ("paraphrase", {"protocol": "paper", "queries": ["no trailing space"]}, "space"),
                         ("paraphrase", {"protocol": "paper", "queries": f"file:{tmp_path}/missing.txt"}, "not found")]:
        with pytest.raises(ConfigError) as e:
            params(fam, **kw)
        assert key in str(e.value)


# ---------------------------------------------------------------------------- exchangeability
def test_icl_permutations(tiny):
    fam = get_family("icl")
    p = params("icl", thetas=[0.3], samples=2, n_flips=6, permutations=3)
    arr = fam.arrays(p)
    assert arr["perm_logprobs"].dims == ("perm", "position", "choice") and arr["perm_logprobs"].shape == (3, 7, 2)
    assert arr["perm_outcomes"].dims == ("perm", "flip")
    ctx = RunContext(scorer=Scorer(tiny), model_kind="std", model_name="tiny-random", seed=9)
    cells = fam.cells(p)
    out = fam.run(p, cells, ctx)
    assert out["perm_logprobs"].shape == (2, 3, 7, 2) and out["perm_outcomes"].shape == (2, 3, 6)
    for ci in range(2):
        for k in range(3):
            assert sorted(out["perm_outcomes"][ci, k]) == sorted(out["outcomes"][ci])
            req = build_curve(tiny.tokenizer, fam.head(p, "std"), [" heads", " tails"], out["perm_outcomes"][ci, k], ", then")
            ref = Scorer(tiny).score_curves([req])[0]
            np.testing.assert_allclose(out["perm_logprobs"][ci, k], ref, atol=1e-5)
        np.testing.assert_allclose(out["perm_logprobs"][ci, :, 0], np.repeat(out["logprobs"][ci, :1], 3, 0), atol=1e-5)
    again = fam.run(p, cells, ctx)
    assert np.array_equal(again["perm_outcomes"], out["perm_outcomes"])  # seeded
    with pytest.raises(ConfigError, match="permutations"):
        get_family("attention").validate(params("attention", permutations=2), tiny.tokenizer, "std")


# ---------------------------------------------------------------------------- CLI
def run_prompts(*args):
    """``bayesflip prompts ARGS`` through the CLI entry point, in-process; its JSON lines, parsed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["prompts", *args])
    assert rc == 0, err.getvalue()
    return [json.loads(ln) for ln in out.getvalue().splitlines() if ln.strip()]


def stream_prompts(*args, keep=lambda r: True):
    """The command's JSON lines, parsed one by one (the full sweep listing is ~100 MB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bayesflip.cli", "prompts", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, experiments = [], set()
    for ln in proc.stdout:
        r = json.loads(ln)
        experiments.add(r["experiment"])
        if keep(r):
            out.append(r)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    return out, experiments


@pytest.mark.integration              # streams the whole paper_coinflips listing (~100 MB, minutes)
def test_cli_prompts_paper_coinflips():
    # the exact command, whole sweep: every experiment listed, then the ICL prompts at theta = 30 %, N = 3
    icl, experiments = stream_prompts(
        "--exp", "paper_coinflips", "--model", "tiny-random", "--json",
        keep=lambda r: r["experiment"] == "paper_icl_coin" and r["cell"]["theta"] == 0.3 and r["cell"]["n"] == 3)
    assert experiments == {"paper_needle_coin", "paper_needle_die", "paper_needle_number", "paper_prior_coin",
                           "paper_prior_die", "paper_icl_coin", "paper_icl_die", "paper_shift_coin",
                           "paper_poisson_explicit", "paper_poisson_icl", "paper_markov", "paper_attention_coin",
                           "paper_cot_coin", "paper_cot_coin_hard_coded", "paper_cot_coin_few_shot"}
    recs = run_prompts("--exp", "paper_coinflips", "--model", "tiny-random", "--json", "--where", "theta=0.3",
                       "--where", "n=3")
    assert [r for r in recs if r["experiment"] == "paper_icl_coin"] == icl   # --where selects the same records
    assert len(icl) == 250 and all(r["model"] == "tiny-random" and r["cell"]["n"] == 3 for r in icl)
    by_query = {}
    for r in icl:
        assert r["choices"] == [" heads", " tails"]
        text = ws(r["text"])
        stmt = "When I flip coins they land on heads 30% of the time. "
        assert text.startswith(stmt) and text.endswith(", then")
        body = text[len(stmt):]
        seq = body.split(", then")[-4:-1]
        assert len(seq) == 3
        o = [s.strip().split()[-1] for s in seq]
        assert all(x in ("heads", "tails") for x in o)
        assert by_query.setdefault(r["cell"]["query"], o) == o   # the instruct prompts share their query's flips
    assert len(by_query) == 50 and len({tuple(o) for o in by_query.values()}) > 1   # a sequence per query (v2)
    flips = by_query[0]
    q0 = next(r for r in icl if r["cell"]["query"] == 0)
    assert ws(q0["text"]) == ("When I flip coins they land on heads 30% of the time. I tossed a coin and it landed on "
                              f"{flips[0]}, then {flips[1]}, then {flips[2]}, then")
    assert {r["experiment"] for r in recs} >= {"paper_needle_coin", "paper_prior_coin", "paper_icl_coin"}

    recs = run_prompts("--exp", "paper_coinflips", "--model", "smollm2-135m-instruct", "--json", "--where", "theta=0.3",
                       "--where", "n=3", "--where", "query=0", "--where", "instruct=0", "--limit", "3")
    r = next(r for r in recs if r["experiment"] == "paper_icl_coin")
    user = r["text"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    assert user == "When you flip coins, they land on heads 30% of the time. Please complete this sentence: I tossed a coin and it came up"
    assert r["text"].endswith("<|im_start|>assistant\nI tossed a coin and it landed on "
                              f"{flips[0]}, then {flips[1]}, then {flips[2]}, then")


def test_cli_prompts_family_without_renderer(capsys, monkeypatch):
    from bayesflip.cli import main
    from bayesflip.experiments.base import Family
    from bayesflip.experiments.markov import MarkovFamily

    monkeypatch.setattr(MarkovFamily, "render", Family.render)  # every shipped family renders; fake one that does not
    assert main(["prompts", "--exp", "markov", "--model", "tiny-random", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "markov" in out and "cannot list its prompts" in out
