"""Outcome sequences rendered into one prompt with a read position before every outcome.

``head + c[o_0] + sep + c[o_1] + sep + ... + c[o_{N-1}] + sep`` — position ``i`` (the last
token of ``head`` or of the i-th ``sep``) holds the model's prediction of outcome ``i``,
so one forward pass gives the whole learning curve (N+1 reads for N outcomes).
Pieces are joined at the token level; :func:`validate_sequence_pieces` checks that this
equals tokenizing the joined text, so the curve equals separate per-prefix prompts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..engine import CurveRequest
from ..prompts import Prompt, check_boundary, encode_choices, encode_piece, encode_prompt, render


def build_curve(tokenizer, head: Prompt, choices: Sequence[str], outcomes: Sequence[int] | np.ndarray, sep: str) -> CurveRequest:
    choice_ids = [encode_piece(tokenizer, c) for c in choices]
    sep_ids = encode_piece(tokenizer, sep)
    ids = encode_prompt(tokenizer, head)
    pos = [len(ids) - 1]
    for o in outcomes:
        ids = ids + choice_ids[o] + sep_ids
        pos.append(len(ids) - 1)
    return CurveRequest(ids=ids, positions=pos, choices=choice_ids)


def sequence_text(tokenizer, head: Prompt, choices: Sequence[str], outcomes: Sequence[int] | np.ndarray, sep: str) -> str:
    return render(head, tokenizer) + "".join(choices[o] + sep for o in outcomes)


def validate_sequence_pieces(tokenizer, head: Prompt, choices: Sequence[str], sep: str) -> None:
    """Choices must join cleanly after the head and after the separator, and the separator after a choice."""
    encode_choices(tokenizer, list(choices), context_text=render(head, tokenizer))
    for c in choices:
        check_boundary(tokenizer, "x" + sep, c)
        check_boundary(tokenizer, "x" + c, sep)
