"""The coin-flip study's ``paper`` protocol: its templates, default stimuli and rendering.

Templates (statements, queries, instruct prompts) are the original code's strings, character
for character (``create_configs.py``, ``create_icl_*_config.py``; PAPER_PROTOCOLS.md A–D).
Long stimulus lists (50 query paraphrases, 5 instruct prompts) are bayesflip's own sets
(``configs/prompts/paper_*.txt``); a user points ``file:`` at the originals.

Rendering (:func:`bayesflip.prompts.paper_prompt`): base ``' '.join(f'{context} {query}{choice}'.split())``;
instruct: user ``' '.join(f'{context} {instruct_prompt}'.split())``, assistant prefill
``' '.join((query + choice).split())`` without end-of-turn. bayesflip scores the choice as
``" " + choice`` after the normalised text, which is the same string.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

from ..prompts import Prompt, paper_prompt

# ---------------------------------------------------------------- A: needle statements and queries
NEEDLE = {
    "coin": {"statement": "When I flip coins they land on heads {b}% of the time.",
             "instruct_statement": "When you flip coins, they land on heads {b}% of the time.",
             "query": "I tossed a coin and it landed on ",
             "instruct_prompt": "Please toss a coin and tell me whether it landed on head or tails."},
    "die": {"statement": "When I roll dice they land on {face} {b}% of the time.",
            "instruct_statement": "Whenever you roll dice they land on {face} {b}% of the time.",
            "query": "I rolled a die and it landed on ",
            "instruct_prompt": "Please roll a six-sided die and tell me what number it landed on."},
    "number": {"statement": "When I pick random numbers, they are always {parity}.",
               "instruct_statement": "When you pick random numbers, they are always {parity}.",
               "query": "I picked a random number between 1 and 10 and it was ",
               "instruct_prompt": "Please pick a random number between 1 and 10."},
}

# ---------------------------------------------------------------- C/D: ICL statements (note the die comma)
ICL_STATEMENT = {
    "coin": {k: NEEDLE["coin"][k] for k in ("statement", "instruct_statement")},
    "die": {"statement": "When I roll dice, they land on {face} {b}% of the time.",
            "instruct_statement": "When you roll dice, they land on {face} {b}% of the time."},
}
READ_NS = (0, 1, 3, 5, 10, 20, 100)

# ---------------------------------------------------------------- B/C: bayesflip's own shipped sets
QUERY_SET = {"coin": "set:paper_coin_queries", "die": "set:paper_die_queries"}
INSTRUCT_SET = {"coin": "set:paper_coin_instruct", "die": "set:paper_die_instruct"}


def percent(theta: float) -> int:
    """θ ∈ [0, 1] → the integer percentage the statements print (0.3 → 30)."""
    return int(round(theta * 100))


def pairs(queries: Sequence[str], instruct_prompts: Sequence[str]) -> list[tuple[int, int]]:
    """(instruct index, query index) in the original's order: ``product(instruct_prompts, queries)``."""
    return list(itertools.product(range(len(instruct_prompts)), range(len(queries))))


def stimuli(p) -> tuple[list[str], list[str]]:
    """(queries, instruct prompts) of a paper-protocol params object, filled by :func:`resolve_stimuli`."""
    assert p.queries is not None and p.instruct_prompts is not None, "resolve_stimuli fills them"
    return p.queries, p.instruct_prompts


def render_prompt(context: str, query: str, instruct_prompt: Optional[str], chat: bool) -> Prompt:
    """One paper-protocol prompt (the text before the choice)."""
    return paper_prompt(context, query, instruct_prompt, chat)


def check_query(q: str) -> str:
    """A paper query ends with whitespace (the original's format: ``"... landed on "``)."""
    if not q.strip():
        raise ValueError("empty query")
    if q == q.rstrip():
        raise ValueError(f"paper queries end with a space, as in the original (got {q!r})")
    return q


def resolve_stimuli(p, clean_keys: tuple[str, ...], query: str, instruct: str) -> None:
    """The paper protocol's stimuli: clean-only keys are refused, ``queries`` / ``instruct_prompts``
    get their defaults (a string is one item, a ``set:``/``file:`` spec a list) and every query must
    end with a space (the original's format)."""
    from ..stimuli import load_list

    bad = [k for k in clean_keys if getattr(p, k) is not None]
    if bad:
        raise ValueError(f"key {bad[0]!r} belongs to protocol clean; with protocol paper use "
                         f"'queries' / 'instruct_prompts' (allowed for paper: queries, instruct_prompts)")
    if p.queries is None:
        p.queries = [query] if not query.startswith(("set:", "file:")) else load_list(query)
    if p.instruct_prompts is None:
        p.instruct_prompts = [instruct] if not instruct.startswith(("set:", "file:")) else load_list(instruct)
    for i, q in enumerate(p.queries):
        try:
            check_query(q)
        except ValueError as e:
            raise ValueError(f"queries.{i}: {e}") from None


def refuse_paper_keys(p, extra_paper_keys: tuple[str, ...] = ()) -> None:
    """Under ``protocol: clean``: the paper's stimulus keys (and ``extra_paper_keys``) are refused."""
    bad = [k for k in ("queries", "instruct_prompts", *extra_paper_keys) if getattr(p, k) is not None]
    if bad:
        raise ValueError(f"key {bad[0]!r} needs protocol: paper (allowed protocols: clean, paper)")


# ---------------------------------------------------------------- scoring identical prompts once
def _unique(keys: list) -> tuple[list[int], list[int]]:
    """(indices of first occurrences, map from every item to its unique slot)."""
    first: dict = {}
    uniq: list[int] = []
    where: list[int] = []
    for i, k in enumerate(keys):
        if k not in first:
            first[k] = len(uniq)
            uniq.append(i)
        where.append(first[k])
    return uniq, where


def score_choices_once(scorer, reqs: list) -> list:
    """``scorer.score_choices`` with identical requests scored once (a base model's cells differ
    only by an instruct prompt it never sees, so they repeat the same prompt)."""
    uniq, where = _unique([(tuple(r.context), tuple(map(tuple, r.choices))) for r in reqs])
    out = scorer.score_choices([reqs[i] for i in uniq])
    return [out[w] for w in where]


def score_curves_once(scorer, reqs: list) -> list:
    """``scorer.score_curves`` with identical requests scored once."""
    uniq, where = _unique([(tuple(r.ids), tuple(r.positions), tuple(map(tuple, r.choices))) for r in reqs])
    out = scorer.score_curves([reqs[i] for i in uniq])
    return [out[w] for w in where]
