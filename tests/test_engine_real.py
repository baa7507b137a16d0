"""The engine's numbers equal plain transformers forward passes (≤ 1e-4).

Each contract runs on ``tiny-random`` (fast tier: the engine's plumbing against transformers) and on the
real SmolLM2 (integration); checks of SmolLM2's own values (its P(" heads"), context, chat template,
the DeepSpeed twin) run on SmolLM2 only."""

import numpy as np
import pytest

from bayesflip.engine import ChoiceRequest, CurveRequest, Scorer, score_prompts
from bayesflip.errors import ChoiceError, ContextLengthError
from bayesflip.prompts import Prompt, encode_piece, encode_prompt
from conftest import plain_choice_logprob

TOL = 1e-4


@pytest.fixture(params=["tiny", pytest.param("smol", marks=pytest.mark.integration)])
def lm(request):
    """The engine-equals-transformers contracts on both models."""
    return request.getfixturevalue(request.param)


def test_single_token_choices_match_plain_forward(lm):
    res = score_prompts(Scorer(lm), ["I tossed a coin and it landed on"], [" heads", " tails"])[0]
    ref = [plain_choice_logprob(lm, "I tossed a coin and it landed on", c) for c in (" heads", " tails")]
    assert np.abs(res.logprobs - ref).max() <= TOL
    assert abs(res.off_choice_mass - (1 - np.exp(res.logprobs).sum())) < 1e-9
    assert abs(res.probs.sum() - 1) < 1e-12


@pytest.mark.integration
def test_smollm2_sanity_figure(smol):
    """The sanity figure of MODELS.md: P(" heads") ≈ 0.53, P(" tails") ≈ 0.03."""
    res = score_prompts(Scorer(smol), ["I tossed a coin and it landed on"], [" heads", " tails"])[0]
    assert abs(np.exp(res.logprobs[0]) - 0.53) < 0.01 and abs(np.exp(res.logprobs[1]) - 0.03) < 0.01


def test_multi_token_and_prefix_choices(lm):
    tok = lm.tokenizer
    assert len(encode_piece(tok, " 10")) == 3  # "Ġ","1","0": multi-token and " 1" is its token-prefix
    prompt = "I picked a random number between 1 and 10 and it was"
    with pytest.raises(ChoiceError, match="token-prefix"):
        score_prompts(Scorer(lm), [prompt], [" 1", " 10"])
    choices = [" 1", " 10", " 7", " seven"]
    res = score_prompts(Scorer(lm), [prompt], choices, terminator=".")[0]
    ref = [plain_choice_logprob(lm, prompt, c + ".") for c in choices]
    assert np.abs(res.logprobs - ref).max() <= TOL


@pytest.mark.integration
def test_chat_template_prefill(smol):
    msgs = (("user", "Please toss a coin and tell me whether it landed on heads or tails."),)
    prompt = Prompt(text="I tossed a coin and it landed on", messages=msgs)
    ids = encode_prompt(smol.tokenizer, prompt)
    text = smol.tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\nI tossed a coin and it landed on")  # prefill, no end-of-turn
    assert text.count("<|im_start|>") == 3 and ids.count(smol.tokenizer.bos_token_id) == 3  # system, user, assistant
    res = score_prompts(Scorer(smol), [prompt], [" heads", " tails"])[0]
    ref = [plain_choice_logprob(smol, prompt.text, c, chat_messages=msgs) for c in (" heads", " tails")]
    assert np.abs(res.logprobs - ref).max() <= TOL


def test_batch_of_different_lengths_padding(lm):
    prompts = ["Heads or tails? It was", "I tossed a coin and it landed on",
               "After a long day at the office I went home, found a coin in my pocket, tossed it, and it landed on",
               "Coin:"]
    sc = Scorer(lm, batch_tokens=4096, max_padding=1.0)  # force one padded batch
    res = score_prompts(sc, prompts, [" heads", " tails"])
    assert sc.stats.forward_calls == 1 and sc.stats.padded_slots > 0  # one padded batch
    for p, r in zip(prompts, res):
        ref = [plain_choice_logprob(lm, p, c) for c in (" heads", " tails")]
        assert np.abs(r.logprobs - ref).max() <= TOL


def _coin_sequence(tok, outcomes, head="Here are my coin flips:"):
    ids = encode_prompt(tok, head)
    pos = [len(ids) - 1]
    text = head
    for o in outcomes:
        ids += encode_piece(tok, o) + encode_piece(tok, ",")
        text += o + ","
        pos.append(len(ids) - 1)
    return ids, pos


def test_prefix_curve_equals_separate_prompts(lm):
    tok = lm.tokenizer
    rng = np.random.default_rng(0)
    outcomes = [" heads" if x else " tails" for x in rng.random(12) < 0.7]
    ids, pos = _coin_sequence(tok, outcomes)
    choices = [encode_piece(tok, " heads"), encode_piece(tok, " tails")]
    sc = Scorer(lm)
    curve = sc.score_curves([CurveRequest(ids, pos, choices)])[0]
    assert curve.shape == (13, 2) and sc.stats.forward_calls == 1
    text = "Here are my coin flips:"
    for i in range(13):
        ref = [plain_choice_logprob(lm, text, c) for c in (" heads", " tails")]
        assert np.abs(curve[i] - ref).max() <= TOL
        if i < 12:
            text += outcomes[i] + ","


def test_die_curve_multi_token_faces(lm):
    """Faces ' 1'..' 6' are two tokens (Ġ + digit): read from the same pass, last one branched."""
    tok = lm.tokenizer
    faces = [f" {i}" for i in range(1, 7)]
    seq = [" 3", " 5", " 3", " 6"]
    ids, pos = _coin_sequence(tok, seq, head="I rolled a die several times:")
    sc = Scorer(lm)
    curve = sc.score_curves([CurveRequest(ids, pos, [encode_piece(tok, f) for f in faces])])[0]
    assert sc.stats.fallback_contexts == 0
    text = "I rolled a die several times:"
    for i in range(len(seq) + 1):
        ref = [plain_choice_logprob(lm, text, f) for f in faces]
        assert np.abs(curve[i] - ref).max() <= TOL
        if i < len(seq):
            text += seq[i] + ","


def test_prefix_sharing_counts_tokens_once(lm):
    """Six 2-token faces after one context: the context runs once, the shared 'Ġ' row once."""
    tok = lm.tokenizer
    ctx = encode_prompt(tok, "I rolled a die and it landed on")
    sc = Scorer(lm)
    sc.score_choices([ChoiceRequest(ctx, [encode_piece(tok, f" {i}") for i in range(1, 7)])])
    assert sc.stats.real_tokens == len(ctx) + 1


@pytest.mark.integration
def test_errors_are_clear(smol):
    sc = Scorer(smol)
    with pytest.raises(ChoiceError, match="empty choice"):
        score_prompts(sc, ["x"], [" heads", ""])
    with pytest.raises(ChoiceError, match="duplicate choice"):
        score_prompts(sc, ["x"], [" heads", " heads"])
    with pytest.raises(ChoiceError, match="no choices"):
        score_prompts(sc, ["x"], [])
    with pytest.raises(ContextLengthError, match="longer than smollm2-135m-instruct's context of 8192"):
        score_prompts(sc, ["heads " * 9000], [" heads", " tails"])
    with pytest.raises(ChoiceError, match="tokenizes differently"):
        score_prompts(sc, ["I tossed a coin and it landed on h"], ["eads", "ails"])  # BPE merges across the join


def test_seeded_generation_is_reproducible(lm):
    sc = Scorer(lm)
    p = encode_prompt(lm.tokenizer, "Once upon a time")
    a = sc.generate([p, p], 12, seeds=[7, 8])
    b = sc.generate([p], 12, seeds=[7])
    assert a[0] == b[0] and len(a[0]) == 12
    assert a[0] != a[1]  # different seeds, different samples (with overwhelming probability)
    greedy = sc.generate([p], 5, seeds=[0], temperature=0)[0]
    import torch
    with torch.no_grad():
        ref = lm.model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False)[0, len(p):].tolist()
    assert greedy == ref


@pytest.mark.integration
def test_deepspeed_backend_identical_on_cpu(smol):
    from bayesflip.models.loader import load_model

    ds = load_model("smollm2-135m-instruct-ds", device="cpu")
    assert type(ds.model).__name__ == "InferenceEngine"
    prompts = ["I tossed a coin and it landed on", "I rolled a die and it landed on"]
    a = score_prompts(Scorer(smol), prompts, [" heads", " tails", " 6"])
    b = score_prompts(Scorer(ds), prompts, [" heads", " tails", " 6"])
    for x, y in zip(a, b):
        assert np.abs(x.logprobs - y.logprobs).max() <= 1e-6


def test_batches_bound_padding():
    from bayesflip.engine import _batches

    rng = np.random.default_rng(0)
    lengths = list(rng.integers(5, 300, 500))
    batches = _batches(lengths, batch_tokens=8192, max_batch=64, max_padding=0.1)
    assert sorted(i for b in batches for i in b) == list(range(500))
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert 1 - sum(lengths) / slots <= 0.1
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 8192 or len(b) == 1
