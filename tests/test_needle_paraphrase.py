"""Families A (needle in a haystack) and B (paraphrase prior), and the filler module, on the real SmolLM2."""

import math

import numpy as np
import pytest

from bayesflip.config import load_experiment, validate_params
from bayesflip.engine import Scorer, choice_distribution
from bayesflip.errors import ChoiceError, ConfigError
from bayesflip.experiments import get_family
from bayesflip.experiments.base import RunContext
from bayesflip.experiments.needle import build_prompt, stated_distribution
from bayesflip.filler import build_filler, clean_sentences, load_sentences, split_sentences
from bayesflip.prompts import render
from conftest import plain_choice_logprob

pytestmark = pytest.mark.integration
TOL = 1e-4
NEEDLE = "When I flip coins they land on heads 30% of the time."


def needle_params(**kw):
    return validate_params(get_family("needle").Params, kw, "params")


def ctx(lm, seed=7):
    return RunContext(scorer=Scorer(lm), model_kind=lm.spec.kind, model_name=lm.spec.name, seed=seed)


# ---------------------------------------------------------------------------- filler
def test_pydoc_sentences_are_prose():
    sents = load_sentences("pydoc")
    assert len(sents) > 500 and load_sentences("pydoc") is sents  # cached per process
    for s in sents:
        assert s[0].isupper() and s[-1] in ".!?" and 6 <= len(s.split()) <= 60
        assert "::=" not in s and "_" not in s and ">>>" not in s
    assert split_sentences("It works, e.g. here. Then it stops! Does it?") == [
        "It works, e.g. here.", "Then it stops!", "Does it?"]
    raw = "Title\n*****\n\nThis is a real sentence of plain prose here. Another fine sentence follows it now.\n\n" \
          "   code_line = 1 + 2\n\n* a bullet point that is not kept at all\n"
    assert clean_sentences([raw]) == ["This is a real sentence of plain prose here.",
                                      "Another fine sentence follows it now."]


def test_needle_at_depth_0_and_1_and_token_length(smol):
    tok = smol.tokenizer
    for L in (10, 50, 200, 1000):
        for s in range(2):
            f0 = build_filler(tok, L, 0.0, NEEDLE, seed=3, sample=s)
            f1 = build_filler(tok, L, 1.0, NEEDLE, seed=3, sample=s)
            assert f0.text.startswith(NEEDLE + " ") and f0.insert_at == 0 and f0.token_depth == 0
            assert f0.text == NEEDLE + " " + f0.filler_text
            assert f1.text.endswith(" " + NEEDLE) and f1.insert_at == len(f1.sentences)
            assert f1.text == f1.filler_text + " " + NEEDLE and f1.token_depth == f1.token_length
            n = len(tok(f0.filler_text, add_special_tokens=False).input_ids)
            assert n == f0.token_length and abs(n - L) <= 3, (L, s, n)
    f = build_filler(tok, 400, 0.5, NEEDLE, seed=3, sample=0)
    assert 0 < f.insert_at < len(f.sentences)
    before = " ".join(f.sentences[: f.insert_at])
    assert len(tok(before, add_special_tokens=False).input_ids) == f.token_depth
    assert abs(f.token_depth - 200) <= 40  # within about one sentence of d·L
    assert build_filler(tok, 0, 0.7, NEEDLE, seed=3, sample=0).text == NEEDLE


def test_same_seed_same_prompts_other_sample_other_filler(smol):
    tok = smol.tokenizer
    a = build_filler(tok, 100, 0.3, NEEDLE, seed=11, sample=2)
    b = build_filler(tok, 100, 0.3, NEEDLE, seed=11, sample=2)
    c = build_filler(tok, 100, 0.3, NEEDLE, seed=11, sample=3)
    assert a == b and a.text != c.text
    fam = get_family("needle")
    p = needle_params(lengths=[60], depths=[0.5], biases=[30], samples=2, no_needle=False, no_context=False)
    texts1 = [render(build_prompt(p, cl, tok, "instruct", 5)[0], tok) for cl in fam.cells(p)]
    texts2 = [render(build_prompt(p, cl, tok, "instruct", 5)[0], tok) for cl in fam.cells(p)]
    assert texts1 == texts2 and len(set(texts1)) == 2
    # a shorter filler of the same sample is a prefix of the longer one (nested haystacks)
    short = build_filler(tok, 50, 1.0, "", seed=11, sample=2)
    assert a.filler_text.startswith(short.sentences[0])


def test_file_and_hf_sources(tmp_path, smol):
    path = tmp_path / "story.txt"
    path.write_text("The old lighthouse keeper climbed the stairs every night.\nHe counted the steps twice "
                    "before he lit the lamp.\n\nShips passed far out at sea without ever knowing his name.\n")
    sents = load_sentences(f"file:{path}")
    assert sents == ("The old lighthouse keeper climbed the stairs every night.",
                     "He counted the steps twice before he lit the lamp.",
                     "Ships passed far out at sea without ever knowing his name.")
    f = build_filler(smol.tokenizer, 30, 1.0, NEEDLE, seed=0, sample=0, source=f"file:{path}")
    assert f.text.endswith(NEEDLE) and all(s.rstrip(".") in " ".join(sents) for s in f.sentences)
    with pytest.raises(ConfigError, match="params.filler"):
        load_sentences(f"file:{tmp_path / 'missing.txt'}")
    try:
        import datasets  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ConfigError, match="datasets"):
            load_sentences("hf:wikitext:train:text")
    with pytest.raises(ConfigError, match=r"params\.filler"):
        needle_params(filler="wikipedia")


# ---------------------------------------------------------------------------- config validation
@pytest.mark.parametrize("params,key,allowed", [
    ({"lengths": [10, -5]}, "params.lengths.1", "[0, inf)"),
    ({"depths": [0.5, 1.5]}, "params.depths.1", "[0.0, 1.0]"),
    ({"biases": [120]}, "params.biases.0", "[0, 100]"),
    ({"faces": [0]}, "params.faces.0", "[1, 6]"),
    ({"samples": 0}, "params.samples", "[1, inf)"),
    ({"process": "roulette"}, "params.process", "coin"),
    ({"sampels": 3}, "params.sampels", "samples"),
])
def test_bad_needle_config_names_key(params, key, allowed):
    with pytest.raises(ConfigError) as e:
        needle_params(**params)
    assert e.value.key == key and allowed in str(e.value)
    with pytest.raises(ConfigError) as e2:  # the same through the experiment loader
        load_experiment("needle_coin", {"params": params})
    assert key in str(e2.value)


def test_needle_grid_and_stated_distributions(smol):
    fam = get_family("needle")
    p = needle_params(lengths=[10, 20], depths=[0.0, 0.5, 1.0], biases=[0, 50, 100], samples=2)
    cells = fam.cells(p)
    assert len(cells) == 1 + 2 * 2 + 2 * 3 * 3 * 2
    assert {c["condition"] for c in cells} == {"no_context", "no_needle", "needle"}
    assert all(set(c) == set(cells[0]) for c in cells)  # uniform coordinate fields
    assert math.isnan(cells[0]["depth"]) and cells[0]["bias"] == -1
    die = {"condition": "needle", "bias": 40, "face": 3}
    np.testing.assert_allclose(stated_distribution("die", die), [0.12, 0.12, 0.4, 0.12, 0.12, 0.12])
    np.testing.assert_allclose(stated_distribution("number", {"condition": "needle", "needle": "even"}),
                               [0, .2, 0, .2, 0, .2, 0, .2, 0, .2])
    assert np.isnan(stated_distribution("coin", cells[0])).all()
    # number choices " 1" .. " 10" need the terminator (" 1" is a token-prefix of " 10")
    pn = needle_params(process="number", lengths=[10], depths=[0.5], samples=1)
    fam.validate(pn, smol.tokenizer, "instruct")
    with pytest.raises(ChoiceError, match="token-prefix"):
        fam.validate(needle_params(process="number", lengths=[10], terminator=""), smol.tokenizer, "std")
    with pytest.raises(ConfigError, match=r"params\.needle"):
        fam.validate(needle_params(needle="Coins are biased."), smol.tokenizer, "std")


# ---------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("variant", ["auto", "base"])
def test_needle_cell_equals_plain_forward(smol, variant):
    fam = get_family("needle")
    p = needle_params(lengths=[40], depths=[0.5], biases=[30], samples=1, no_needle=False, no_context=True,
                      variant=variant)
    fam.validate(p, smol.tokenizer, smol.spec.kind)
    cells = fam.cells(p)
    out = fam.run(p, cells, ctx(smol))
    assert out["logprobs"].shape == (2, 2) and out["token_depth"].tolist()[0] == -1
    np.testing.assert_allclose(out["p_stated"][1], [0.3, 0.7], atol=1e-6)
    assert abs(out["token_length"][1] - 40) <= 3 and 0 < out["token_depth"][1] < out["token_length"][1]
    prompt, fill = build_prompt(p, cells[1], smol.tokenizer, smol.spec.kind, 7)
    assert NEEDLE in (prompt.messages[0][1] if prompt.is_chat else prompt.text)
    assert prompt.is_chat == (variant == "auto")  # SmolLM2-Instruct is an instruct model
    ref = [plain_choice_logprob(smol, prompt.text, c, chat_messages=prompt.messages) for c in (" heads", " tails")]
    assert np.abs(out["logprobs"][1] - ref).max() <= TOL


def test_needle_100_vs_0_moves_p_heads(smol):
    """Measured on SmolLM2-135M-Instruct (chat variant, L=0): P(heads) 0.309 at 100% vs 0.235 at 0%."""
    fam = get_family("needle")
    p = needle_params(lengths=[0], depths=[0.0], biases=[0, 100], samples=1, no_needle=False, no_context=False)
    out = fam.run(p, fam.cells(p), ctx(smol))
    probs, _ = choice_distribution(out["logprobs"])
    assert probs[1, 0] > probs[0, 0] + 0.03, probs


def test_paraphrase_sets():
    fam = get_family("paraphrase")
    for proc in ("coin", "die"):
        p = validate_params(fam.Params, {"process": proc}, "params")
        assert len(set(p.paraphrases)) == len(p.paraphrases) >= 45
        assert all(t == t.strip() and not t.startswith("#") for t in p.paraphrases)
        cells = fam.cells(p)
        assert [c["paraphrase"] for c in cells] == list(range(len(cells)))
    assert "I just flipped a coin, and it came up" in validate_params(fam.Params, {}, "params").paraphrases
    with pytest.raises(ConfigError) as e:
        validate_params(fam.Params, {"paraphrase_set": "nope"}, "params")
    assert e.value.key == "params.paraphrase_set" and "paraphrase_coin" in str(e.value)
    with pytest.raises(ConfigError, match=r"params\.paraphrases"):
        validate_params(fam.Params, {"paraphrases": ["a b", "a b"]}, "params")


def test_paraphrase_scoring_and_validation(smol):
    fam = get_family("paraphrase")
    for proc in ("coin", "die"):
        fam.validate(validate_params(fam.Params, {"process": proc}, "params"), smol.tokenizer, "instruct")
    texts = ["I just flipped a coin, and it came up", "The result of my coin flip was"]
    p = validate_params(fam.Params, {"paraphrases": texts, "variant": "base"}, "params")
    out = fam.run(p, fam.cells(p), ctx(smol))
    for i, t in enumerate(texts):
        ref = [plain_choice_logprob(smol, t, c) for c in (" heads", " tails")]
        assert np.abs(out["logprobs"][i] - ref).max() <= TOL
    with pytest.raises(ConfigError, match=r"params\.paraphrases"):  # the choice carries the space
        validate_params(fam.Params, {"paraphrases": ["It landed on "]}, "params")
