"""The protocol seam (bayesflip/experiments/protocol.py): every family with a ``protocol`` key holds a
``clean`` and a ``paper`` strategy, the protocol's name decides nothing outside the dispatch, and the
process wording has one home (``domain.PROCESS_TEXTS``)."""

import ast
import re
from pathlib import Path

import pytest

from bayesflip.domain import CHOICES, PROCESS_TEXTS
from bayesflip.experiments import family_names, get_family
from bayesflip.experiments.protocol import ProtocolStrategy

PKG = Path(__file__).resolve().parents[1] / "bayesflip"
COMPARISON = re.compile(r"""protocol *(==|!=) *['"]paper|['"]paper['"] *(==|!=) *protocol|protocol in \(""")


def _protocol_families():
    out = [n for n in family_names() if "protocol" in get_family(n).Params.model_fields]
    assert len(out) >= 9, out      # needle, paraphrase, icl, attention, markov, poisson, cot, rules, acronym
    return out


@pytest.mark.parametrize("name", ["needle", "paraphrase", "icl", "attention", "markov", "poisson", "cot", "rules",
                                  "acronym"])
def test_every_protocol_family_holds_both_strategies(name):
    assert name in _protocol_families()
    P = get_family(name).Params
    assert set(P.PROTOCOLS) == {"clean", "paper"}
    for key, strat in P.PROTOCOLS.items():
        assert isinstance(strat, ProtocolStrategy) and strat.name == key
    assert type(P.PROTOCOLS["clean"]) is not type(P.PROTOCOLS["paper"])
    assert P().strategy is P.PROTOCOLS["clean"]


def test_few_protocol_name_comparisons_remain():
    hits = [f"{p.relative_to(PKG)}:{i}" for p in sorted(PKG.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if COMPARISON.search(line)]
    assert len(hits) <= 12, hits


def _imports(path: Path) -> set[str]:
    """Modules of bayesflip.experiments that ``path`` imports (any level, function bodies included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module} if node.module else {a.name for a in node.names}
    return out


@pytest.mark.parametrize("helpers,family,run", [("rules_world", "rules", "rules_run"),
                                                ("acronym_words", "acronym", "acronym_run")])
def test_game_helpers_break_the_family_run_cycle(helpers, family, run):
    exp = PKG / "experiments"
    assert family not in _imports(exp / f"{run}.py")
    assert not {family, run} & _imports(exp / f"{helpers}.py")
    assert helpers in _imports(exp / f"{run}.py")


def test_process_texts_are_the_families_wording():
    from bayesflip.experiments import cot, icl, needle

    for name, t in PROCESS_TEXTS.items():
        assert t.choices == CHOICES[name]
        s = needle.PROCESSES[name]
        assert (s["query"], s["needle"], s["instruction"], s["terminator"]) == (t.query, t.statement, t.instruction,
                                                                                  t.terminator)
    assert PROCESS_TEXTS["coin"].query == "I tossed a coin and it landed on"
    assert PROCESS_TEXTS["number"].terminator == "."
    for name, spec in (("coin", icl.COIN), ("die", icl.DIE)):
        assert spec["head"] == PROCESS_TEXTS[name].query and spec["user"] == PROCESS_TEXTS[name].sequence_instruction
        assert cot.SPECS[name]["task_base"] == PROCESS_TEXTS[name].question
        assert cot.SPECS[name]["query"] == PROCESS_TEXTS[name].query


def test_paper_strategy_defaults_fill_only_missing_keys():
    A = get_family("acronym").Params
    assert A(protocol="paper").rank_top == 60000
    assert A(protocol="paper", rank_top=500).rank_top == 500
    assert A().rank_top == 50000
    C = get_family("cot").Params
    p = C(protocol="paper")
    assert (p.max_new_tokens, p.temperature, p.stop, p.no_needle, p.samples) == (20, 0.0, [], True, 1)
    assert C(protocol="paper", reasoning="few_shot").no_needle is False
    assert C(protocol="paper", max_new_tokens=7).max_new_tokens == 7
    assert C().max_new_tokens == 96
