"""protocol: paper for the generating families (E poisson, F markov, H cot): rendering equals the
formulas of PAPER_PROTOCOLS.md character for character (base: tiny; instruct: SmolLM2's chat
template), and small real runs count / score what they render."""

import numpy as np
import pytest
import torch

from bayesflip.engine import Scorer
from bayesflip.errors import ConfigError
from bayesflip.experiments import get_family
from bayesflip.experiments.base import RunContext
from bayesflip.experiments.markov import NAMED

from conftest import plain_choice_logprob

CUE = "Let\u2019s think about what this means for my distribution of coin flips, "
CUE_YOU = "Let\u2019s think about what this means for your distribution of coin flips, "   # stored instruct runs


def _chat(lm, user: str) -> str:
    return lm.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                            add_generation_prompt=True)


def _ctx(lm, seed=3):
    return RunContext(scorer=Scorer(lm), model_kind=lm.spec.kind, model_name=lm.spec.name, seed=seed)


def _ws(x: str) -> str:
    return " ".join(x.split())


# ---------------------------------------------------------------------------- E: poisson
def test_poisson_paper_explicit_render(tiny, smol):
    fam = get_family("poisson")
    p = fam.Params(protocol="paper", mode="explicit")
    cells = fam.cells(p)
    assert len(cells) == 10 * 5 * 10 and p.markers[-1] == "<" and p.max_new_tokens == 100
    pick = [c for c in cells if c["sample"] == 0 and c["marker"] in ("*", "<") and c["lam"] in (0.1, 0.7)]
    gen = {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": None, "max_new_tokens": 100,
           "generation": "model_defaults"}
    for r in fam.render(p, pick, tiny.tokenizer, "std", 0):
        c, lam = r.cell["marker"], r.cell["lam"]
        assert r.text == (f'I am going to tell you a long story and insert the "{c}" character between words at a '
                          f'frequency following a Poisson distribution with lambda={lam}.\nOnce upon a time ')
        assert r.generation == gen and r.choices is None
    for r in fam.render(p, pick, smol.tokenizer, "instruct", 0):
        c, lam = r.cell["marker"], r.cell["lam"]
        assert r.text == _chat(smol, f'Generate a long, multi-paragraph story of your choice. You must insert the "{c}" '
                                     f'character between words at a frequency following a Poisson distribution with '
                                     f'lambda={lam}.')
    assert "lambda=0.1." in fam.render(p, pick[:1], tiny.tokenizer, "std", 0)[0].text


def test_poisson_paper_icl_story_from_file(tmp_path, tiny, smol):
    words = [f"w{i}" for i in range(40)]
    path = tmp_path / "story.txt"
    path.write_text(" ".join(words[:20]) + "\n\n" + " ".join(words[20:]) + "\n")
    fam = get_family("poisson")
    p = fam.Params(protocol="paper", mode="icl", story=f"file:{path}", story_words=[8, 30], markers=["*", "<"],
                   lambdas=[0.5, 10.0], samples=2)
    assert p.story.split() == words and fam.Params(protocol="paper").story is None
    cells = fam.cells(p)
    assert {c["prefix_words"] for c in cells} == {8, 30} and len(cells) == 2 * 2 * 2 * 2
    base = fam.render(p, cells, tiny.tokenizer, "std", 11)
    inst = fam.render(p, cells, smol.tokenizer, "instruct", 11)
    for rb, ri in zip(base, inst):
        c, n = rb.cell["marker"], rb.cell["prefix_words"]
        toks = rb.text.split(" ")
        assert [t for t in toks if t != c] == words[:n]                     # the story cut to n words
        assert toks[0] != c and all(not (a == b == c) for a, b in zip(toks, toks[1:]))  # ≤ 1 marker after a word
        if rb.cell["lam"] == 10.0:                   # P(Poisson(10) > 0) = 1 − e^−10 (this seed: every word)
            assert rb.text == " ".join(f"{w} {c}" for w in words[:n])
        assert ri.text == _chat(smol, f"Complete the following story: {rb.text}")
    same = [r.text for r in base if r.cell["marker"] == "*" and r.cell["lam"] == 0.5 and r.cell["prefix_words"] == 30]
    assert len(same) == 2 and same[0] == same[1]                            # one story per condition
    with pytest.raises(ConfigError, match="params.story_words"):
        fam.validate(fam.Params(protocol="paper", mode="icl", story=f"file:{path}", story_words=[41]),
                     tiny.tokenizer, "std")


def test_poisson_paper_run_counts_the_continuation(tiny):
    fam = get_family("poisson")
    p = fam.Params(protocol="paper", mode="explicit", markers=["*"], lambdas=[0.5], samples=2, max_new_tokens=12)
    ctx = _ctx(tiny)
    out = fam.run(p, fam.cells(p), ctx)
    for i, text in enumerate(out["text"]):
        n_words = len(str(text).replace("*", "").split())
        assert out["n_markers"][i] == str(text).count("*") and out["n_gaps"][i] == n_words
        if n_words:
            assert out["lambda_hat"][i] == pytest.approx(str(text).count("*") / n_words)
        assert 1 <= out["n_attempts"][i] <= p.max_attempts
    again = fam.run(p, fam.cells(p), ctx)
    assert list(again["text"]) == list(out["text"])
    import json
    assert json.loads(str(out["generation_config"][0])) == {   # tiny's generation config: HF defaults
        "do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": None, "max_new_tokens": 12}
    assert set(out) == set(fam.arrays(p))


# ---------------------------------------------------------------------------- F: markov
def test_markov_paper_sequence_and_curve(tiny):
    fam = get_family("markov")
    p = fam.Params(protocol="paper", named=["simple_mdp"], non_uniformity=[0.0, 0.7], samples=1, n_steps=7)
    cells = fam.cells(p)
    assert [c["matrix_name"] for c in cells] == ["simple_mdp", "non_uniform_0.0", "non_uniform_0.7"]
    assert p.kinds == [] and p.init == "start" and p.states == ["1", "2", "3", "4"]
    assert np.array_equal(fam.matrix(p, cells[0], 0), np.asarray(NAMED["simple_mdp"]))
    assert np.allclose(fam.matrix(p, cells[1], 0), 0.25)
    m = fam.matrix(p, cells[2], 0)
    assert np.allclose(m.sum(1), 1) and (m >= 0).all() and not np.allclose(m, 0.25)
    tok = tiny.tokenizer
    sid = [tok.convert_tokens_to_ids(tok.tokenize(s))[-1] for s in p.states]
    ctx = _ctx(tiny)
    out = fam.run(p, cells, ctx)
    for ci, (c, r) in enumerate(zip(cells, fam.render(p, cells, tok, "std", ctx.seed))):
        x = fam.trajectory(p, c, ctx.seed)[2]
        assert x[0] == 0                                                    # start state 1
        ids = [tok.bos_token_id] + [sid[s] for s in x]
        assert r.text == tok.decode(ids) and r.choices == p.states
        with torch.no_grad():
            lsm = tiny.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)[:, sid]
        assert np.abs(out["logprobs"][ci] - lsm.numpy()).max() < 1e-4
        assert np.allclose(out["true_row"][ci][0], np.eye(4)[0])


def test_markov_paper_bad_custom_matrix(tiny):
    fam = get_family("markov")
    p = fam.Params(kinds=[], custom={"bad": [[0.5, 0.5], [1.0, 0.0]]})
    with pytest.raises(ConfigError, match="params.custom.bad"):
        fam.validate(p, tiny.tokenizer, "std")


# ---------------------------------------------------------------------------- H: cot
def test_cot_paper_render_base_and_instruct(tiny, smol):
    fam = get_family("cot")
    q = "I tossed a coin and it landed on"
    for reasoning in ("sampled", "hard_coded", "few_shot"):
        p = fam.Params(protocol="paper", reasoning=reasoning)
        cells = [c for c in fam.cells(p) if c["bias"] == 30]
        assert len(cells) == 1 and p.max_new_tokens == 20 and p.generation_settings().engine_kwargs()["temperature"] == 0
        n = "When I flip coins they land on heads 30% of the time."
        nu = "When you flip coins, they land on heads 30% of the time."
        task = "Please toss a coin and tell me whether it landed on head or tails."
        rb = {r.cell["stage"]: r for r in fam.render(p, cells, tiny.tokenizer, "std", 0)}
        ri = {r.cell["stage"]: r for r in fam.render(p, cells, smol.tokenizer, "instruct", 0)}
        assert rb["baseline"].text == f"{n} {q}" and rb["baseline"].choices == [" heads", " tails"]
        # instruct: the second-person statement and cue of the study's stored instruct runs, every variant
        assert ri["baseline"].text == _chat(smol, f"{nu} {task}") + q
        for r in ri.values():
            assert " my " not in r.text and "When I flip" not in r.text
        if reasoning == "sampled":
            assert rb["generate"].text == f"{n} {CUE}"
            assert rb["generate"].generation["max_new_tokens"] == 20 and rb["generate"].generation["stop"] == []
            assert rb["cot"].text == f"{n} {CUE}{{reasoning}} {q}"
            assert ri["generate"].text == _chat(smol, f"{nu} {task}") + CUE_YOU
            assert ri["cot"].text == _chat(smol, f"{nu} {task}") + CUE_YOU + "{reasoning} " + q
        elif reasoning == "hard_coded":
            reason = "heads should appear about three times in ten flips, so tails remains the more likely outcome."
            assert "generate" not in rb and rb["cot"].text == f"{n} {CUE}{reason} {q}"
            # the form of the stored instruct keys: "When you flip coins, they land on heads 30% of the time.
            # Let’s think about what this means for your distribution of coin flips, <reasoning>"
            you = f"When you flip coins, they land on heads 30% of the time. {CUE_YOU}{reason}"
            assert ri["cot"].text == _chat(smol, f"{you} {task}") + q
        else:
            shots = ("Premise: I have a weighted coin that lands on head 30% of the time and lands on tail 70% of the "
                     "time.\nReasoning: When I toss this coin, I should expect to see tail more often and head less "
                     "often.\n\nPremise: I have a weighted coin that lands on head 80% of the time and lands on tail "
                     "20% of the time.\nReasoning: When I toss this coin, I should expect to see head more often and "
                     "tail less often.\n\n")
            assert rb["cot"].text == f"{shots}Premise: {n}\n{q}"
            assert ri["cot"].text == _chat(smol, f"{shots}Premise: {nu}\n{task}") + q


def test_cot_paper_run_scores_the_rendered_prompt(tiny):
    fam = get_family("cot")
    p = fam.Params(protocol="paper", biases=[70], no_needle=False)
    cells = fam.cells(p)
    out = fam.run(p, cells, _ctx(tiny))
    r = str(out["cot"][0])
    assert 0 <= out["cot_tokens"][0] <= 20
    text = _ws(f"When I flip coins they land on heads 70% of the time. {CUE}{r} I tossed a coin and it landed on")
    for k, ch in enumerate([" heads", " tails"]):
        assert out["logprobs"][0, k] == pytest.approx(plain_choice_logprob(tiny, text, ch), abs=1e-4)
    with pytest.raises(ConfigError, match="params.no_needle"):
        fam.validate(fam.Params(protocol="paper", reasoning="few_shot", no_needle=True), tiny.tokenizer, "std")
