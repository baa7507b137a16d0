"""Iterated-learning families: coin chains (+ mid-shard resume), rule induction, acronyms."""

import json
import math

import numpy as np
import pytest

from bayesflip.config import validate_params
from bayesflip.engine import Scorer
from bayesflip.errors import ConfigError
from bayesflip.experiments import get_family
from bayesflip.experiments import acronym as AC
from bayesflip.experiments import rules as R
from bayesflip.experiments.base import RunContext
from bayesflip.experiments.chains import ChainParams, initial_outcomes
from bayesflip.experiments.checkpoint import INTERRUPT_ENV, STATE_FILE, ChainInterrupted
from conftest import plain_choice_logprob


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These tests make many small forward calls; on the shared 2-core machine, 2 OpenMP threads per
    process oversubscribe the cores and run ~5x slower than 1. Restored after the module."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def scorer(smol):
    return Scorer(smol)


def _ctx(scorer, smol, seed, workdir=None):
    return RunContext(scorer=scorer, model_kind=smol.spec.kind, model_name=smol.spec.name, seed=seed, workdir=workdir)


# 8 chains x 3 generations of data (0, 1, 2), n = 10; base rendering keeps the prompts short on CPU
SHARD = dict(learners=["pm", "sampler", "greedy", "tempered"], taus=[0.5], chains=2, n=[10], inits=[5],
             min_counts=[0], generations=2, variant="base")


# ---------------------------------------------------------------------------- coin chains
@pytest.mark.integration
def test_coin_chain_shard_values_and_resume(smol, scorer, tmp_path, monkeypatch):
    fam = get_family("chains")
    p = ChainParams(**SHARD)
    fam.validate(p, smol.tokenizer, smol.spec.kind)
    cells = fam.cells(p)
    assert len(cells) == 8
    scorer.stats.reset()
    a = fam.run(p, cells, _ctx(scorer, smol, 11))
    full_calls = scorer.stats.forward_calls
    assert set(a) == set(fam.arrays(p))
    counts, probs, lp = a["counts"], a["probs"].astype(float), a["logprobs"].astype(float)
    assert counts.shape == (8, 3, 2) and (counts.sum(-1) == 10).all()
    assert (counts[:, 0] == [5, 5]).all()
    for i in range(8):
        for g in range(3):
            assert (np.bincount(a["outcomes"][i, g], minlength=2) == counts[i, g]).all()
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert np.allclose(probs, np.exp(lp) / np.exp(lp).sum(-1, keepdims=True), atol=1e-6)
    assert np.allclose(a["off_mass"], 1 - np.exp(lp).sum(-1), atol=1e-6)
    assert np.allclose(a["entropy"], -(probs * np.log(probs)).sum(-1), atol=1e-5)
    # greedy: every produced outcome is the argmax of the previous read
    for i, c in enumerate(cells):
        if c["learner"] == "greedy":
            for g in range(2):
                assert (a["outcomes"][i, g + 1] == probs[i, g].argmax()).all()
    # p_t is the model's read after the rendered previous generation (independent plain forward)
    i = 0
    text = "I tossed a coin and it landed on" + "".join([" heads", " tails"][o] + ", then" for o in a["outcomes"][i, 2])
    ref = plain_choice_logprob(smol, text, " heads")
    assert abs(ref - lp[i, 2, 0]) < 1e-4

    # interrupted after generation 0, resumed from the sidecar: equals the uninterrupted run
    work = tmp_path / "shard-000000"
    monkeypatch.setenv(INTERRUPT_ENV, "0")
    with pytest.raises(ChainInterrupted):
        fam.run(p, cells, _ctx(scorer, smol, 11, work))
    with np.load(work / STATE_FILE) as z:
        assert int(z["next_gen"]) == 1 and (z["counts"][:, 1].sum(-1) == 10).all() and (z["counts"][:, 2] == -1).all()
    monkeypatch.delenv(INTERRUPT_ENV)
    scorer.stats.reset()
    b = fam.run(p, cells, _ctx(scorer, smol, 11, work))
    assert 0 < scorer.stats.forward_calls < full_calls  # only reads 1..2 were computed
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # another seed gives other chains (generation-0 order is a per-chain seeded shuffle)
    c = fam.run(ChainParams(**{**SHARD, "generations": 0}), cells, _ctx(scorer, smol, 12))
    assert not np.array_equal(a["outcomes"][:, 0], c["outcomes"][:, 0])
    assert len({tuple(o) for o in a["outcomes"][:, 0]}) > 1


@pytest.mark.integration
def test_coin_chain_filter_redraws(smol, scorer):
    fam = get_family("chains")
    p = ChainParams(learners=["pm"], chains=4, n=[10], inits=[5], min_counts=[4], generations=2, max_redraws=5000)
    out = fam.run(p, fam.cells(p), _ctx(scorer, smol, 5))
    heads = out["counts"][:, 1:, 0]
    assert out["accepted"].all() and (heads >= 4).all()
    assert out["redraws"][:, 0].tolist() == [0, 0, 0, 0] and out["redraws"][:, 1:].sum() > 0  # smol favours tails


def test_chain_config_errors(smol):
    fam = get_family("chains")
    with pytest.raises(ConfigError, match=r"params\.inits.*exceed"):
        fam.validate(ChainParams(n=[4], inits=[5]), smol.tokenizer, "instruct")
    with pytest.raises(ConfigError, match=r"params\.filter_choice"):
        fam.validate(ChainParams(process="coin", filter_choice=2), smol.tokenizer, "instruct")
    with pytest.raises(ConfigError, match=r"params\.learners"):
        validate_params(ChainParams, {"learners": ["bayes"]}, "params")
    seq = initial_outcomes(6, 12, 2, 0, np.random.default_rng(0))
    assert np.bincount(seq, minlength=6).tolist() == [2, 2, 2, 2, 2, 2]


# ---------------------------------------------------------------------------- rules
def test_rule_semantics_hand_cases():
    h = {"A": "off", "B": "on", "C": "und", "D": "off", "E": "und"}
    assert R.rule_output(h, ("A",)) == "off"
    assert R.rule_output(h, ("A", "D")) == "off"
    assert R.rule_output(h, ("A", "C")) == "und"
    assert R.rule_output(h, ("B", "C", "E")) == "on"       # on wins over und
    assert R.rule_output(h, ("C", "E")) == "und"
    assert R.rule_output(tuple(h.values()), ("D", "B")) == "on"
    assert len(R.subsets()) == 31 and len(set(R.subsets())) == 31
    assert R.render_examples([R.parse_subset("C, A")], [0]) == "Input: A, C\nOutput: on"
    with pytest.raises(ValueError):
        R.parse_subset("A, F")
    # d0 of the default config: C off, E off, D und, (A, B) has at least one on -> 5 consistent rules
    ins, outs = R._init_data(R.RulesParams())
    acc = R.accuracy(ins, outs)
    cons = [R.hypotheses()[i] for i in np.flatnonzero(acc == 1.0)]
    assert len(cons) == 5 and all(c[2] == "off" and c[3] == "und" and c[4] == "off" for c in cons)
    assert ("off", "on", "off", "und", "off") in cons
    new_in, new_out = R.next_examples(242, 4, np.random.default_rng(0))   # 242 = all und
    assert len(set(new_in.tolist())) == 4 and (new_out == R.UND).all()
    new_in, new_out = R.next_examples(R.hypotheses().index(("on", "off", "off", "off", "off")), 31,
                                      np.random.default_rng(0))
    assert sorted(new_in.tolist()) == list(range(31))
    assert all((o == R.ON) == ("A" in R.subsets()[i]) for i, o in zip(new_in, new_out))
    m = R.metrics(np.full(243, 1 / 243), acc, screen=0)
    assert abs(m["p_screen_off"] - 1 / 3) < 1e-12 and abs(m["both"] - 1 / 243) < 1e-12
    assert abs(m["entropy"] - math.log(243)) < 1e-12


def test_rule_hypotheses_are_canonical_and_distinct(smol):
    texts = [R.rule_text(h) for h in R.hypotheses()]
    assert len(texts) == 243 == len(set(texts))
    assert texts[0] == '{"A": "on", "B": "on", "C": "on", "D": "on", "E": "on"}'
    assert all(list(json.loads(t)) == list(R.OBJECTS) for t in texts)
    ids = {tuple(smol.tokenizer(" " + t, add_special_tokens=False).input_ids) for t in texts}
    assert len(ids) == 243


@pytest.mark.integration
def test_rules_one_generation_exact_beliefs(smol, scorer):
    fam = get_family("rules")
    p = R.RulesParams(biases=["strong"], interactions=["refine"], generations=0, chains=1, choice_chunk=81,
                      init_inputs=["A, B", "C, E"], intro="Objects A-E are on, off or und; {screen} is the screen.")
    fam.validate(p, smol.tokenizer, smol.spec.kind)
    out = fam.run(p, fam.cells(p), _ctx(scorer, smol, 3))   # one read: one context, 243 teacher-forced rules (3 calls)
    P, mass = out["probs"][0, 0], out["on_mass"][0, 0]
    assert abs(P.sum() - 1) < 1e-9 and (P > 0).all() and 0 < mass < 1
    # P(h) * on_mass = exp(summed log-prob of the canonical rule string), by independent plain forwards
    ins, outs = R._init_data(p)
    prompt = fam.prompt(p, "strong", ins, outs, smol.spec.kind)
    for h in [int(P.argmax()), 242]:
        ref = plain_choice_logprob(smol, prompt.text, " " + R.rule_text(R.hypotheses()[h]),
                                   chat_messages=prompt.messages)
        assert abs(math.exp(ref) - P[h] * mass) <= 1e-6 * max(mass, 1e-300) + 1e-3 * math.exp(ref)
    # metrics of P and of P_eff (refinement against d0: 15 consistent rules, C = E = off)
    acc0 = R.accuracy(ins, outs)
    assert (acc0 == 1).sum() == 15
    assert out["acc_d0"][0, 0] == pytest.approx(float(P @ acc0), abs=1e-12)
    eff = P * (acc0 == 1)
    eff /= eff.sum()
    assert out["eff_p_screen_off"][0, 0] == pytest.approx(sum(eff[h] for h in range(243) if R.hypotheses()[h][0] == "off"))
    assert out["eff_acc_d0"][0, 0] == pytest.approx(1.0) and acc0[out["rule"][0, 0]] == 1.0
    assert np.isnan(out["check_yes"]).all()


# ---------------------------------------------------------------------------- acronyms
def test_acronym_parse_and_word_stats():
    assert AC.parse_pair("FREEDOM: friends run east every day on mountains\nmore", 7) == (
        "FREEDOM", ["friends", "run", "east", "every", "day", "on", "mountains"])
    assert AC.parse_pair("freedom = Friends run east every day on mountains", 7) is not None
    assert AC.parse_pair("FREEDOM: friends run east every day on", 7) is None         # 6 words
    assert AC.parse_pair("FREEDOM: friends ran away every day on mountains", 7) is None  # initials
    assert AC.rank("the", 1000) == 1 and AC.rank("zzzqqq", 1000) == 1001
    share, mean_rank, _ = AC.word_stats([("AB", ["the", "zzzqqq"])], 4.0, 1000)
    assert share == 0.5 and mean_rank == (1 + 1001) / 2
    pairs = [("X", ["the", "the"]), ("Y", ["zzzqqq", "zzzqqq"]), ("Z", ["house", "house"])]
    most = AC.AcronymFamily._filter("most", pairs, 1, np.random.default_rng(0))
    least = AC.AcronymFamily._filter("least", pairs, 1, np.random.default_rng(0))
    assert most[0][0] == "X" and least[0][0] == "Y"


@pytest.mark.integration
def test_acronym_one_generation(smol, scorer):
    fam = get_family("acronym")
    p = AC.AcronymParams(filters=["most"], chains=1, generations=1, pool=2, keep=4, shots=2, max_new_tokens=16)
    fam.validate(p, smol.tokenizer, smol.spec.kind)
    out = fam.run(p, fam.cells(p), _ctx(scorer, smol, 1))
    nv = int(out["n_valid"][0, 1])
    assert 0 <= nv <= 2 and out["n_valid"][0, 0] == len(AC.INIT_PAIRS)
    kept1 = [s for s in out["kept"][0, 1] if s]
    if nv == 0:
        assert out["carried"][0, 1] and kept1 == [s for s in out["kept"][0, 0] if s]
    else:
        assert len(kept1) == nv and all(AC.parse_pair(s, 7) for s in kept1)
    assert 0 <= out["share_common"][0, 0] <= 1
