"""Families E (Poisson processes by generation) and H (chain of thought)."""

import math

import numpy as np
import pytest

from bayesflip.config import load_experiment
from bayesflip.errors import ConfigError
from bayesflip.experiments import get_family
from bayesflip.experiments.base import RunContext
from bayesflip.experiments.poisson import MARKERS, count_markers, make_prefix

from conftest import plain_choice_logprob


# ---------------------------------------------------------------------------- pure
@pytest.mark.parametrize("lam", [0.1, 0.5, 0.9])
def test_icl_prefix_rate_matches_generator(lam):
    rng = np.random.default_rng(7)
    pre = make_prefix(2001, "#", lam, rng)
    mc = count_markers(pre.text, "#")
    assert mc.n_gaps == 2000 == len(pre.counts)
    assert mc.n_markers == int(pre.counts.sum()) and mc.n_attached == 0
    se = math.sqrt(lam / 2000)  # Poisson: Var(k) = λ per gap
    assert abs(mc.lambda_hat - lam) < 3 * se
    words = [w for w in pre.text.split() if w != "#"]
    assert len(words) == 2001 and not any(m in w for w in words for m in MARKERS)


def test_icl_prefix_is_seeded():
    a = make_prefix(50, "%", 0.7, np.random.default_rng(3))
    b = make_prefix(50, "%", 0.7, np.random.default_rng(3))
    c = make_prefix(50, "%", 0.7, np.random.default_rng(4))
    assert a.text == b.text and a.text != c.text


@pytest.mark.parametrize("text,marker,want", [
    ("a # b ## c", "#", (3, 0, 2)),
    ("The cat sat", "#", (0, 0, 2)),
    ("# a b #", "#", (0, 0, 1)),          # leading/trailing markers lie in no complete gap
    ("a#b c# d #e", "#", (3, 3, 4)),      # attached markers count, and split words
    ("a, # - b", "#", (1, 0, 1)),         # "-" is no word and splits nothing
    ("Hi! there ! ! you", "!", (3, 1, 2)),
    ("a\n\n*\tb * * * c", "*", (4, 0, 2)),
    ("a $ b", "#", (0, 0, 1)),            # other markers are not counted
    ("word", "#", (0, 0, 0)),
])
def test_count_markers_hand_made(text, marker, want):
    mc = count_markers(text, marker)
    assert (mc.n_markers, mc.n_attached, mc.n_gaps) == want
    if want[2]:
        assert mc.lambda_hat == want[0] / want[2]
    else:
        assert math.isnan(mc.lambda_hat)


def test_bad_configs_name_key_and_allowed():
    with pytest.raises(ConfigError) as e:
        load_experiment("poisson_icl", {"params": {"lambdas": [0.5, -0.1]}})
    assert "params.lambdas.1" in str(e.value) and "[0.0, 10.0]" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_experiment("poisson_explicit", {"params": {"markers": ["#", "?"]}})
    msg = str(e.value)
    assert "params.markers.1" in msg and all(f"'{m}'" in msg for m in MARKERS)
    with pytest.raises(ConfigError, match=r"params\.mode.*'explicit' or 'icl'"):
        load_experiment("poisson_icl", {"params": {"mode": "implicit"}})
    with pytest.raises(ConfigError, match=r"params\.biases\.0.*\[0, 100\]"):
        load_experiment("cot_coin", {"params": {"biases": [150]}})
    with pytest.raises(ConfigError, match=r"params\.max_new_tokens"):
        load_experiment("cot_coin", {"params": {"max_new_tokens": 0}})


def test_cells_and_arrays():
    e = load_experiment("poisson_icl")
    fam = get_family("poisson")
    cells = fam.cells(e.params)
    assert len(cells) == 9 * 5 * 10 and cells[0] == {"marker": "*", "lam": 0.1, "sample": 0}
    assert "prefix_lambda_hat" in fam.arrays(e.params)
    assert "prefix_lambda_hat" not in fam.arrays(load_experiment("poisson_explicit").params)
    c = load_experiment("cot_coin")
    assert len(get_family("cot").cells(c.params)) == 12 * 10


# ---------------------------------------------------------------------------- real model
def _run(smol, name, overrides, seed=None, kind="instruct"):
    from bayesflip.engine import Scorer

    e = load_experiment(name, {"params": overrides})
    fam = get_family(e.family)
    cells = fam.cells(e.params)
    fam.validate(e.params, smol.tokenizer, kind)
    ctx = RunContext(Scorer(smol), kind, smol.name, e.seed if seed is None else seed)
    return fam, e.params, cells, ctx, fam.run(e.params, cells, ctx)


@pytest.mark.integration
def test_poisson_generation_seeded(smol):
    over = {"markers": ["#"], "lambdas": [0.5], "samples": 2, "max_new_tokens": 16}
    fam, p, cells, ctx, a = _run(smol, "poisson_explicit", over)
    _, _, _, _, b = _run(smol, "poisson_explicit", over)
    _, _, _, _, c = _run(smol, "poisson_explicit", over, seed=123)
    assert list(a["text"]) == list(b["text"])                       # same seed -> identical samples
    assert a["text"][0] != a["text"][1]                             # same prompt, other cell seed
    assert list(c["text"]) != list(a["text"])                       # other experiment seed
    assert all(0 < n <= 16 for n in a["n_tokens"])
    for i, _cell in enumerate(cells):                                # stored counts = the counter on the text
        mc = count_markers(a["text"][i], "#")                       # instruct prefill is empty: no tail
        assert (a["n_markers"][i], a["n_gaps"][i]) == (mc.n_markers, mc.n_gaps)


@pytest.mark.integration
def test_poisson_icl_prefix_and_tail(smol):
    over = {"mode": "icl", "markers": ["*"], "lambdas": [0.9], "samples": 1, "max_new_tokens": 12,
            "prefix_words": 40}
    fam, p, cells, ctx, out = _run(smol, "poisson_icl", over, kind="std")
    pre = fam.prefix(p, cells[0], ctx.seed)
    assert out["prefix_n_gaps"][0] == 39 and out["prefix_n_markers"][0] == pre.counts.sum()
    tail = pre.text.split()[-1]
    mc = count_markers(tail + out["text"][0], "*")
    assert out["n_gaps"][0] == mc.n_gaps and out["n_markers"][0] == mc.n_markers
    assert fam.prompt(p, cells[0], "std", ctx.seed).text == pre.text


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["instruct", "std"])
def test_cot_logprobs_match_plain_forward(smol, kind):
    over = {"biases": [30], "no_needle": False, "samples": 1, "max_new_tokens": 20}
    fam, p, cells, ctx, out = _run(smol, "cot_coin", over, kind=kind)
    r = str(out["cot"][0])
    assert out["cot_tokens"][0] == len(smol.tokenizer(r, add_special_tokens=False).input_ids) > 0
    assert "\n\n" not in r
    needle = "When I flip coins they land on heads 30% of the time."
    q = "I tossed a coin and it landed on"
    if kind == "instruct":
        task = "Please toss a coin and tell me whether it landed on heads or tails."
        cot = dict(text=r + "\n" + q, chat_messages=[("user", f"{needle} {task} Let's think step by step.")])
        base = dict(text=q, chat_messages=[("user", f"{needle} {task}")])
    else:
        task = "Question: I am going to toss a coin. Will it land on heads or tails?\nAnswer:"
        cot = dict(text=f"{needle} {task} Let's think step by step." + r + "\n" + q)
        base = dict(text=f"{needle} {task}\n{q}")
    for k, ch in enumerate([" heads", " tails"]):
        assert abs(out["logprobs"][0, k] - plain_choice_logprob(smol, choice=ch, **cot)) < 1e-4
        assert abs(out["logprobs_baseline"][0, k] - plain_choice_logprob(smol, choice=ch, **base)) < 1e-4
    np.testing.assert_allclose(out["p_stated"][0], [0.3, 0.7])


def test_cot_die_cells_and_layout():
    e = load_experiment("cot_coin", {"params": {"process": "die", "biases": [40], "faces": [6], "samples": 2}})
    fam = get_family("cot")
    cells = fam.cells(e.params)
    assert cells == [{"bias": -1, "sample": 0, "face": 6}, {"bias": -1, "sample": 1, "face": 6},
                     {"bias": 40, "sample": 0, "face": 6}, {"bias": 40, "sample": 1, "face": 6}]
    np.testing.assert_allclose(fam.p_stated(e.params, cells[2]), [0.12] * 5 + [0.4])
    assert np.isnan(fam.p_stated(e.params, cells[0])).all()
    base = fam.cot_prompt(e.params, cells[0], "std", " R.")
    assert base.text == ("Question: I am going to roll a die. Which number will it land on?\nAnswer: "
                         "Let's think step by step. R.\nI rolled a die and it landed on") and not base.is_chat
    chat = fam.cot_prompt(e.params, cells[2], "instruct", "R.")
    assert chat.messages == (("user", "When I roll dice they land on 6 40% of the time. Please roll a die and "
                              "tell me which number it landed on. Let's think step by step."),)
    assert chat.text == "R.\nI rolled a die and it landed on"


def test_clean_render_lists_what_run_feeds(tiny):
    from bayesflip.prompts import render

    fam = get_family("poisson")
    for mode in ("explicit", "icl"):
        p = fam.Params(mode=mode, markers=["#"], lambdas=[0.5], samples=2, prefix_words=12)
        cells = fam.cells(p)
        rs = fam.render(p, cells, tiny.tokenizer, "std", 9)
        assert [r.cell for r in rs] == cells
        assert [r.text for r in rs] == [render(fam.prompt(p, c, "std", 9), tiny.tokenizer) for c in cells]
        assert rs[0].generation["temperature"] == 1.0 and rs[0].generation["max_new_tokens"] == 128
    cot = get_family("cot")
    p = cot.Params(biases=[50], no_needle=False, samples=1)
    rs = cot.render(p, cot.cells(p), tiny.tokenizer, "std", 0)
    assert [r.cell["stage"] for r in rs] == ["generate", "cot", "baseline"]
    assert rs[0].text == ("When I flip coins they land on heads 50% of the time. Question: I am going to toss a coin. "
                          "Will it land on heads or tails?\nAnswer: Let's think step by step.")
    assert rs[1].text == rs[0].text + "{reasoning}\nI tossed a coin and it landed on"
    assert rs[2].choices == [" heads", " tails"] and rs[0].generation["stop"] == ["\n\n"]
