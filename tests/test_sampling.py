"""On-device sampling of Scorer.generate: seeded, top-k/top-p cuts, inverse CDF matches softmax."""

import numpy as np
import pytest
import torch

from bayesflip.engine import Scorer, filter_logits, sample_next
from bayesflip.generation import GenerationFields, GenerationSettings, resolve
from bayesflip.prompts import encode_prompt


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_distribution_matches_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, -3.0]])
    n = 20000
    gens = _gens([123])
    draws = torch.cat([sample_next(logits, 1.0, gens) for _ in range(n)]).numpy()
    freq = np.bincount(draws, minlength=6) / n
    want = torch.softmax(logits[0], -1).numpy()
    assert np.abs(freq - want).max() < 4 * np.sqrt(want.max() * (1 - want.max()) / n)
    # temperature 2 flattens the same row
    draws = torch.cat([sample_next(logits, 2.0, gens) for _ in range(n)]).numpy()
    freq = np.bincount(draws, minlength=6) / n
    want = torch.softmax(logits[0] / 2, -1).numpy()
    assert np.abs(freq - want).max() < 0.02


def test_top_k_and_top_p_cuts():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    z = filter_logits(logits, 1.0, top_k=2)
    assert torch.isfinite(z[0]).tolist() == [False, True, False, True]
    p = torch.softmax(logits[0], -1)          # sorted: 1 (0.64), 3 (0.24), 2 (0.09), 0 (0.03)
    z = filter_logits(logits, 1.0, top_p=0.7)
    assert torch.isfinite(z[0]).tolist() == [False, True, False, True]
    z = filter_logits(logits, 1.0, top_p=float(p[1]) - 1e-3)
    assert torch.isfinite(z[0]).tolist() == [False, True, False, False]
    gens = _gens([1, 2, 3])
    rows = torch.randn(3, 50)
    for _ in range(20):
        assert torch.equal(sample_next(rows, 1.0, gens, top_k=1), rows.argmax(-1))
        assert torch.equal(sample_next(rows, 1.0, gens, top_p=1e-6), rows.argmax(-1))
        picked = sample_next(rows, 1.0, gens, top_k=5)
        top5 = torch.topk(rows, 5).indices
        assert all(int(t) in top5[i].tolist() for i, t in enumerate(picked))


def test_rows_are_independent_and_seeded():
    rows = torch.randn(4, 30)
    a = [sample_next(rows, 1.0, g).tolist() for g in [_gens([5, 6, 7, 8])] * 1 for _ in range(10)]
    b = [sample_next(rows, 1.0, g).tolist() for g in [_gens([5, 6, 7, 8])] * 1 for _ in range(10)]
    assert a == b
    c = [sample_next(rows[2:3], 1.0, g).tolist() for g in [_gens([7])] for _ in range(10)]
    assert [x[2] for x in a] == [x[0] for x in c]


def test_generate_seeded_topk1_equals_greedy(tiny):
    sc = Scorer(tiny)
    p1 = encode_prompt(tiny.tokenizer, "Once upon a time there was")
    p2 = encode_prompt(tiny.tokenizer, "Hello")
    a = sc.generate([p1, p2], 8, seeds=[3, 4], stop_at_eos=False)
    b = sc.generate([p1], 8, seeds=[3], stop_at_eos=False)
    assert a[0] == b[0] and len(a[0]) == 8
    greedy = sc.generate([p1, p2], 8, seeds=[0, 0], temperature=0, stop_at_eos=False)
    assert sc.generate([p1, p2], 8, seeds=[9, 10], top_k=1, stop_at_eos=False) == greedy
    assert sc.generate([p1, p2], 8, seeds=[9, 10], top_p=1e-9, stop_at_eos=False) == greedy
    with torch.no_grad():
        ref = tiny.model.generate(torch.tensor([p1]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                  pad_token_id=sc.pad_id)[0, len(p1):].tolist()
    assert greedy[0] == ref


def test_stop_string_cuts_generation(tiny):
    sc = Scorer(tiny)
    p = encode_prompt(tiny.tokenizer, "Once upon a time")
    full = sc.generate([p], 12, seeds=[1], stop_at_eos=False)[0]
    txt = [tiny.tokenizer.decode(full[: i + 1]) for i in range(len(full))]
    stop = txt[5][-2:] if len(txt[5]) >= 2 else txt[5]
    first = next(i for i, t in enumerate(txt) if stop in t)
    assert sc.generate([p], 12, seeds=[1], stop_strings=[stop], stop_at_eos=False)[0] == full[: first + 1]


def test_generation_settings_resolve():
    class P(GenerationFields):
        pass

    assert resolve(P()).engine_kwargs() == {"temperature": 1.0, "top_k": None, "top_p": None}
    assert resolve(P(temperature=0)).engine_kwargs()["temperature"] == 0.0

    class M:
        class generation_config:
            do_sample = True
            temperature = 0.6
            top_p = 0.9
            top_k = None

    s = resolve(P(generation="model_defaults"), M())
    assert (s.do_sample, s.temperature, s.top_k, s.top_p) == (True, 0.6, 50, 0.9)
    s = resolve(P(generation="model_defaults", temperature=1.0), M())
    assert (s.do_sample, s.temperature, s.top_k, s.top_p) == (True, 1.0, 50, 0.9)

    class G:
        class generation_config:
            do_sample = False

    assert resolve(P(generation="model_defaults"), G()).engine_kwargs()["temperature"] == 0.0
    assert resolve(P(generation="model_defaults", temperature=0.7), G()).engine_kwargs()["temperature"] == 0.0
    assert resolve(P(generation="model_defaults", temperature=1.0, do_sample=True), G()).describe() == {
        "do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": None, "max_new_tokens": 128}
    assert isinstance(s, GenerationSettings)
    with pytest.raises(ValueError):   # pydantic ValidationError
        P(top_p=0)


def test_grid_temperature_families_sampling_kwargs():
    """rules/acronym: the cell's temperature, top_k/top_p explicit or from the model's generation config."""
    from types import SimpleNamespace

    from bayesflip.experiments import get_family

    p = get_family("rules").Params(protocol="paper", top_p=0.9)
    assert p.sampling_kwargs(0.5) == {"temperature": 0.5, "top_k": None, "top_p": 0.9}
    assert p.sampling_kwargs(0.0) == {"temperature": 0.0, "top_k": None, "top_p": None}   # greedy
    model = SimpleNamespace(generation_config=SimpleNamespace(do_sample=True, temperature=0.6, top_k=None, top_p=0.95))
    a = get_family("acronym").Params(protocol="paper", generation="model_defaults")
    assert a.sampling_kwargs(1.0, model) == {"temperature": 1.0, "top_k": 50, "top_p": 0.95}
    assert get_family("acronym").Params(protocol="paper", generation="model_defaults", top_k=5).sampling_kwargs(
        0.5, model) == {"temperature": 0.5, "top_k": 5, "top_p": 0.95}


def test_generate_host_syncs(tiny):
    """The sampler never syncs; without EOS or stop strings the ids reach the host once per batch."""
    from bayesflip.bench_generate import SyncCounter

    sc = Scorer(tiny, max_padding=1.0)       # one batch
    ps = [encode_prompt(tiny.tokenizer, t) for t in ("Once upon a time there was", "Hello", "The coin")]
    ref = sc.generate(ps, 6, seeds=[1, 2, 3], stop_at_eos=False)
    for temp in (0.0, 1.0):
        counter = SyncCounter()
        with counter.patch():
            got = sc.generate(ps, 6, seeds=[1, 2, 3], temperature=temp, stop_at_eos=False)
        assert counter.in_sampler == 0 and counter.by_method.get("tolist") == 1
        if temp:
            assert got == ref
