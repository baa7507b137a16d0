"""The engine's read path and decoding loop on tiny-random: one device-side pass per forward (≤ 3 host
syncs + copies, counted by wrapping the blocking tensor methods), float32 reads by default and the
``read_dtype: model`` opt-out, token-level stop candidates that never miss a stop string, finished rows
leaving the batch, KV-sized decoding groups."""

import numpy as np
import pytest
import torch

from bayesflip.bench_generate import SyncCounter
from bayesflip.engine import ChoiceRequest, CurveRequest, Scorer, _batches
from bayesflip.prompts import encode_piece, encode_prompt


def _plain_lsm(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_reads_one_pass_per_forward(tiny):
    tok = tiny.tokenizer
    rng = np.random.default_rng(0)
    rows = [encode_prompt(tok, "Here is a chain:") + rng.integers(300, 3000, n).tolist() for n in (90, 120, 60)]
    choices = [encode_piece(tok, c) for c in (" A", " B", " C", " 10.")]   # " 10." is multi-token: branches
    reqs = [CurveRequest(r, list(range(len(r))), choices) for r in rows]
    sc = Scorer(tiny, max_padding=1.0)
    counter = SyncCounter()
    with counter.patch():
        got = sc.score_curves(reqs)
    per = counter.per(sc.stats.forward_calls)
    assert per["syncs_and_copies"] <= 3 and counter.engine_transfers == sc.stats.forward_calls
    assert counter.by_method.get("cpu") == sc.stats.forward_calls          # one device->host copy per forward
    for r, g in zip(rows, got):                                             # = a plain forward, every position
        lsm = _plain_lsm(tiny.model, r)
        ref = np.array([[float(lsm[p, c[0]]) for c in choices[:3]] for p in range(len(r))])
        assert np.abs(g[:, :3] - ref).max() <= 1e-4
    ctx = [encode_prompt(tok, t) for t in ("I tossed a coin and it landed on", "Pick a number:")]
    counter = SyncCounter()
    sc.stats.reset()
    with counter.patch():
        res = sc.score_choices([ChoiceRequest(c, choices) for c in ctx])   # context + branch: two forwards
    assert sc.stats.forward_calls == 2 and counter.per(2)["syncs_and_copies"] <= 3
    for c, lp in zip(ctx, res):
        full = _plain_lsm(tiny.model, c + choices[3])
        want = sum(float(full[len(c) - 1 + j, t]) for j, t in enumerate(choices[3]))
        assert abs(lp[3] - want) <= 1e-4


def test_read_dtype_float32_by_default_and_model_opt_out(tiny):
    """bf16 model: float32 reads apply the output layer to the bf16 hidden states in float32; ``model``
    reads equal a plain bf16 forward's logits (log-softmax in float32 either way)."""
    from bayesflip.models.loader import load_model
    from bayesflip.models.registry import get_model_spec

    lm = load_model(get_model_spec("tiny-random").model_copy(update={"dtype": "bfloat16"}), device="cpu")
    ids = encode_prompt(lm.tokenizer, "I tossed a coin and it landed on heads, tails,")
    pos = list(range(len(ids)))
    ch = [[t] for t in encode_piece(lm.tokenizer, " heads") + encode_piece(lm.tokenizer, " tails")]
    f32 = Scorer(lm).score_curves([CurveRequest(ids, pos, ch)])[0]
    mdl = Scorer(lm, read_dtype="model").score_curves([CurveRequest(ids, pos, ch)])[0]
    assert Scorer(lm).read_dtype == "float32"
    with torch.inference_mode():
        out = lm.model(torch.tensor([ids]), output_hidden_states=True)
        plain = out.logits[0].float().log_softmax(-1)
        head = lm.model.get_output_embeddings().weight.float()
        exact = torch.nn.functional.linear(out.hidden_states[-1][0].float(), head).log_softmax(-1)
    cols = [c[0] for c in ch]
    assert np.abs(mdl - plain[:, cols].numpy()).max() <= 1e-5
    assert np.abs(f32 - exact[:, cols].numpy()).max() <= 1e-4
    assert np.abs(f32 - mdl).max() > 1e-4                          # bf16 logits are rounded, float32 are not
    with pytest.raises(ValueError, match="read_dtype"):
        Scorer(lm, read_dtype="float16")


def test_stop_candidates_never_miss_a_stop(tiny):
    """On random token streams, the old per-step text check first succeeds only at a candidate token."""
    sc = Scorer(tiny)
    tok = tiny.tokenizer
    rng = np.random.default_rng(1)
    vocab = len(tok)
    for stops in (["\n", "."], ["e", "on"], ["s ", "\n"], ["a"], ["ing", ","], [" "]):
        cand, known = sc.stop_candidates(stops)
        assert 0 < len(cand) < known
        window = max(map(len, stops)) + 1
        for _ in range(40):
            # mostly tokens that carry the stop strings' characters, so that stops do occur
            row = []
            pool = list(cand)
            for _ in range(30):
                row.append(int(rng.choice(pool)) if rng.random() < 0.3 else int(rng.integers(0, vocab)))
                if any(s in tok.decode(row[-window:]) for s in stops):
                    assert row[-1] in cand, (stops, row[-window:])
                    break
    assert sc.stop_candidates(["\ufffd"]) is None                    # no filter: check every token


def test_finished_rows_leave_the_batch(tiny):
    """Rows that stop early stop costing decode slots; the outputs are those of rows decoded alone."""
    tok = tiny.tokenizer
    prompts = [encode_prompt(tok, t) for t in ("Once upon a time", "The coin", "Hello there", "A list:")]
    sc = Scorer(tiny, max_padding=1.0)
    full = sc.generate(prompts, 16, seeds=[1, 2, 3, 4], stop_at_eos=False)
    stop = tok.decode(full[0][:2])[-1]                               # a character row 0 produces early
    sc.stats.reset()
    got = sc.generate(prompts, 16, seeds=[1, 2, 3, 4], stop_strings=[stop], stop_at_eos=False)
    for g, f, p, s in zip(got, full, prompts, [1, 2, 3, 4]):
        assert g == f[: len(g)]
        assert g == Scorer(tiny).generate([p], 16, seeds=[s], stop_strings=[stop], stop_at_eos=False)[0]
    # a row of n new tokens is fed back n − 1 times: a finished row is not decoded further
    assert len(got[0]) <= 2 and min(map(len, got)) < max(map(len, got))
    assert sc.stats.real_tokens == sum(map(len, prompts)) + sum(len(g) - 1 for g in got)


def test_decode_groups_follow_the_kv_budget(tiny):
    sc = Scorer(tiny, batch_tokens=64, kv_cache_gb=1.0)
    lens = [40, 38, 30, 30, 20, 10, 9, 5]
    batches = _batches(lens, 64, 64, 0.1)
    assert len(batches) > 1 and len(sc.decode_groups(batches, lens, 16)) == 1   # all rows fit 1 GB
    per_row = sc.kv_bytes_per_token() * (40 + 16)
    assert sc.kv_bytes_per_token() == 2 * 2 * 64 * 4                           # layers · (K, V) · n_embd · float32
    sc.kv_cache_gb = 2.5 * per_row / 2**30
    groups = sc.decode_groups(batches, lens, 16)
    assert [i for g in groups for b in g for i in b] == [i for b in batches for i in b]
    for g in groups:
        rows = sum(map(len, g))
        width = max(lens[i] for b in g for i in b)
        assert rows * (width + 16) * sc.kv_bytes_per_token() <= sc.kv_cache_gb * 2**30 or len(g) == 1
