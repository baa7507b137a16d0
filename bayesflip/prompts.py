"""Rendering prompts to token ids: base text, or a chat template with an assistant prefill.

Token accounting rules (tested against plain ``transformers`` forward passes):

* A base prompt is tokenized with the tokenizer's own special tokens (BOS if it adds one).
* An instruct prompt is ``apply_chat_template(messages, add_generation_prompt=True)``
  followed by the *prefill* (the start of the assistant's answer, e.g. the query
  ``I tossed a coin and it landed on``) with **no end-of-turn token** after it. If the
  rendered template already starts with the BOS token, no second BOS is added.
* Choices are tokenized on their own (``add_special_tokens=False``) and appended to the
  context's ids at the token level. The leading space belongs to the choice (``" heads"``).
  ``check_boundary`` verifies that this equals tokenizing the joined string; a choice for
  which it does not fails before any scoring (a "choice that tokenizes badly").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .errors import ChoiceError


@dataclass(frozen=True)
class Prompt:
    """A prompt: ``text`` is the whole prompt (base) or the assistant prefill (chat).

    ``messages`` (``(role, content)`` pairs) switches the chat template on.
    """

    text: str
    messages: tuple[tuple[str, str], ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def render(prompt: Prompt | str, tokenizer) -> str:
    """The exact string the model sees before the choices."""
    if isinstance(prompt, str):
        return prompt
    if not prompt.is_chat:
        return prompt.text
    if not getattr(tokenizer, "chat_template", None):
        raise ChoiceError("chat prompt for a tokenizer without a chat template (use a base prompt for std models)")
    msgs = [{"role": r, "content": c} for r, c in prompt.messages]  # type: ignore[union-attr]
    head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return head + prompt.text


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a full prompt, with exactly one BOS where the tokenizer uses one."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(text).input_ids
    bos_id = tokenizer.bos_token_id
    if bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
        raise ChoiceError(f"doubled BOS token in {text[:60]!r}")
    return list(ids)


def encode_prompt(tokenizer, prompt: Prompt | str) -> list[int]:
    return encode_text(tokenizer, render(prompt, tokenizer))


def encode_piece(tokenizer, piece: str) -> list[int]:
    """Ids of a piece that continues a text (a choice, a separator): no special tokens."""
    return list(tokenizer(piece, add_special_tokens=False).input_ids)


def check_boundary(tokenizer, context_text: str, piece: str, tail_chars: int = 64) -> None:
    """Raise ChoiceError if ``tok(context + piece) != tok(context) + tok(piece)`` at the boundary.

    Only the last ``tail_chars`` characters of the context matter for BPE merges across the
    boundary, so the check is cheap enough to run for every distinct (context tail, choice).
    """
    tail = context_text[-tail_chars:]
    a = encode_piece(tokenizer, tail) + encode_piece(tokenizer, piece)
    b = encode_piece(tokenizer, tail + piece)
    if a != b:
        toks = tokenizer.convert_ids_to_tokens(encode_piece(tokenizer, piece))
        raise ChoiceError(
            f"choice {piece!r} tokenizes differently after {tail[-20:]!r} than on its own "
            f"(alone: {toks}); put the leading space in the choice (e.g. ' heads') and none at the end of the prompt")


def validate_choices(choices: Sequence[str]) -> None:
    if not choices:
        raise ChoiceError("no choices given (need at least one)")
    for c in choices:
        if not isinstance(c, str) or c == "":
            raise ChoiceError(f"empty choice in {list(choices)!r}")
    seen = set()
    for c in choices:
        if c in seen:
            raise ChoiceError(f"duplicate choice {c!r} in {list(choices)!r}")
        seen.add(c)


def check_prefix_free(choice_ids: Sequence[Sequence[int]], labels: Sequence[str]) -> None:
    """Rule for choices that are prefixes of each other (``1`` vs ``10``).

    The summed log-prob of a choice whose tokens are a proper prefix of another choice's
    tokens includes the other choice's mass, so comparing them is meaningless. We refuse
    such a set and ask for a ``terminator`` (appended to every choice, e.g. ``"."``), which
    makes every choice a *complete* answer: p(" 1.") vs p(" 10.").
    """
    for i, a in enumerate(choice_ids):
        for j, b in enumerate(choice_ids):
            if i != j and len(a) < len(b) and list(b[: len(a)]) == list(a):
                raise ChoiceError(
                    f"choice {labels[i]!r} is a token-prefix of {labels[j]!r}; its summed log-prob would include "
                    f"{labels[j]!r}'s. Set a terminator (e.g. terminator: '.' / --terminator .) so complete answers are compared")


@dataclass
class EncodedChoices:
    labels: list[str]
    ids: list[list[int]] = field(default_factory=list)


def encode_choices(tokenizer, choices: Sequence[str], terminator: str = "",
                   context_text: str | None = None) -> EncodedChoices:
    """Validate and tokenize a choice set (with the optional terminator appended)."""
    validate_choices(choices)
    pieces = [c + terminator for c in choices]
    ids = [encode_piece(tokenizer, p) for p in pieces]
    for p, i in zip(pieces, ids):
        if not i:
            raise ChoiceError(f"choice {p!r} has no tokens")
    if context_text is not None:
        for p in pieces:
            check_boundary(tokenizer, context_text, p)
    check_prefix_free(ids, pieces)
    return EncodedChoices(labels=list(choices), ids=ids)


def normalize_ws(text: str) -> str:
    """The original studies' whitespace normalisation: ``' '.join(text.split())``."""
    return " ".join(text.split())


def paper_prompt(context: str, query: str, instruct_prompt: str | None, chat: bool) -> Prompt:
    """A prompt rendered as the coin-flip study did (``PAPER_PROTOCOLS.md``, "Rendering").

    * base:     ``' '.join(f'{context} {query}{choice}'.split())`` — the query ends with a space
      and the choice has none; bayesflip scores the choice as ``" " + choice`` after the
      normalised ``context query`` text, which is the same string.
    * instruct: user message ``' '.join(f'{context} {instruct_prompt}'.split())``, assistant
      prefill ``' '.join((query + choice).split())`` with no end-of-turn → prefill =
      ``normalize_ws(query)`` and the choice ``" " + choice``.
    """
    if chat:
        return Prompt(text=normalize_ws(query), messages=(("user", normalize_ws(f"{context} {instruct_prompt or ''}")),))
    return Prompt(text=normalize_ws(f"{context} {query}"))
