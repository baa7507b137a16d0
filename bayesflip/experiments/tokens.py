"""Token counting of rendered prompts: what the engine forwards and samples, without a model.

Used by :meth:`bayesflip.experiments.base.Family.count_tokens` (default :func:`count_rendered`)
and by the generation-by-generation families' own ``count_tokens``; the cost estimate
(:mod:`bayesflip.hpc.cost`) sums these counts per shard. Pure functions over token ids and
rendered texts (a tokenizer is passed in); nothing here imports a model or the cluster layer.

What is counted: per cell the maximal rendered texts (a learning curve's read points are prefixes
of one sequence, forwarded once), identical texts within a shard once (the engine scores identical
prompts once), plus the continuation tokens of multi-token choices (the first choice token is read
from the context's last logits); a generation row forwards its prompt and samples
``max_new_tokens`` (an upper bound: rows stopping at EOS sample fewer).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenCount:
    """Tokens of some cells: ``prompt`` forwarded for scoring/prefill, ``generated`` sampled,
    ``rows`` generation rows (sequences sampled), ``reads`` scored read points (positions whose
    log-probs are read: one per needle prompt, one per token of a Markov curve)."""

    prompt: int = 0
    generated: int = 0
    rows: int = 0
    reads: int = 0

    def __add__(self, other: "TokenCount") -> "TokenCount":
        return TokenCount(self.prompt + other.prompt, self.generated + other.generated, self.rows + other.rows,
                          self.reads + other.reads)

    def scaled(self, k: int) -> "TokenCount":
        return TokenCount(self.prompt * k, self.generated * k, self.rows * k, self.reads * k)


def branch_tokens(choices: list) -> int:
    """Continuation tokens the engine forwards for one ``score_choices`` request's choices (token
    ids) after its context: the maximal unique ``c[:-1]`` prefixes (``engine._branch_plan``; the
    first token of every choice is read from the context's last logits)."""
    uniq = sorted({tuple(c[:-1]) for c in choices if len(c) > 1}, key=len, reverse=True)
    keep: list[tuple] = []
    for s in uniq:
        if not any(k[: len(s)] == s for k in keep):
            keep.append(s)
    return sum(map(len, keep))


def chunked_read_tokens(context_len: int, choices: list, chunk: int) -> int:
    """Tokens forwarded to read ``choices`` after one context in engine calls of ``chunk`` choices
    each (the context is forwarded once per call, the branches of each call's choices after it)."""
    return sum(context_len + branch_tokens(choices[lo: lo + chunk]) for lo in range(0, len(choices), chunk))


def _maximal_texts(texts: list[str]) -> list[str]:
    """Unique texts that are not a proper prefix of another one (what one forward pass covers)."""
    keep: list[str] = []
    for t in sorted(set(texts), key=len, reverse=True):
        if not any(k.startswith(t) for k in keep):
            keep.append(t)
    return keep


def count_rendered(rendered: list, cells: list[dict], tokenizer) -> TokenCount:
    """Tokens the engine forwards / samples for these rendered cells (see the module docstring).

    ``rendered``: :class:`~bayesflip.experiments.base.RenderedCell` items of ``cells`` (one or more
    per cell; an item's ``cell`` holds the cell's coordinates plus its read point). Per cell: every
    generation item = its prompt + ``max_new_tokens`` sampled; scored items = the maximal texts (read
    points that are prefixes of a longer text of the same cell are free), each text once per call
    (identical prompts are scored once), each + Σ_choices (len(choice tokens) − 1); every scored item
    is one read."""
    from ..prompts import encode_piece, encode_text

    keys = list(cells[0]) if cells else []

    def cell_key(c: dict) -> tuple:
        return tuple(repr(c.get(k)) for k in keys)

    groups: dict[tuple, list] = {}
    for r in rendered:
        groups.setdefault(cell_key(r.cell), []).append(r)
    choice_extra: dict[tuple, int] = {}
    seen: set[str] = set()
    out = TokenCount()
    for items in groups.values():
        scored: dict[str, tuple] = {}
        for r in items:
            if r.generation is not None:
                out.prompt += len(encode_text(tokenizer, r.text))
                out.generated += int(r.generation.get("max_new_tokens") or 0)
                out.rows += 1
            else:
                scored[r.text] = tuple(r.choices or ())
                out.reads += 1
        for text in _maximal_texts(list(scored)):
            if text in seen:
                continue
            seen.add(text)
            ch = scored[text]
            if ch not in choice_extra:
                choice_extra[ch] = sum(max(len(encode_piece(tokenizer, c)) - 1, 0) for c in ch)
            out.prompt += len(encode_text(tokenizer, text)) + choice_extra[ch]
    return out
