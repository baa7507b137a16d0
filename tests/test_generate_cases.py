"""Seeded generation is bit-identical to the engine before issue 20 (token-level stop strings, finished
rows leaving the batch, KV-sized decoding groups): outputs saved from that engine (commit cf1ab2e) in
tests/data/generate_cases.json, for tiny-random (two batch sizes: one batch / several prefill batches
decoded as one group) and SmolLM2 (integration)."""

import json
from pathlib import Path

import pytest

from bayesflip.engine import Scorer

CASES = json.loads((Path(__file__).parent / "data" / "generate_cases.json").read_text())["cases"]


def _run(lm, case, **scorer_kw):
    sc = Scorer(lm, batch_tokens=case["batch_tokens"], **scorer_kw)
    return sc.generate(case["prompts"], case["max_new_tokens"], case["seeds"], **case["settings"]), sc


def _ids(model):
    return [i for i, c in enumerate(CASES) if c["model"] == model]


@pytest.mark.parametrize("i", _ids("tiny-random"))
def test_tiny_random_outputs_unchanged(tiny, i):
    case = CASES[i]
    got, sc = _run(tiny, case)
    assert got == case["outputs"]
    if case["batch_tokens"] == 64:  # several prefill batches; one decoding group unless the KV budget is tiny
        assert len(sc.decode_groups(*_groups_args(sc, case))) == 1
        one_row_budget = sc.kv_bytes_per_token() * (max(map(len, case["prompts"])) + case["max_new_tokens"]) / 2**30
        got2, sc2 = _run(tiny, case, kv_cache_gb=one_row_budget * 2.5)
        assert got2 == case["outputs"] and len(sc2.decode_groups(*_groups_args(sc2, case))) > 1


def _groups_args(sc, case):
    from bayesflip.engine import _batches

    lens = [len(p) for p in case["prompts"]]
    return _batches(lens, sc.batch_tokens, sc.max_batch, sc.max_padding), lens, case["max_new_tokens"]


@pytest.mark.integration
def test_smollm2_outputs_unchanged(smol):
    for i in _ids("smollm2-135m-instruct"):
        case = CASES[i]
        got, _ = _run(smol, case)
        assert got == case["outputs"], case["settings"]
