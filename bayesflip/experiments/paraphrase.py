"""Family B: prompt paraphrase sets → the model's prior (no evidence in context).

Each paraphrase q_i of the query (``I just flipped a coin, and it came up``, …) is scored
with no evidence:

* base variant: prompt = q_i, choices follow directly (``q_i + " heads"``);
* instruct variant (``variant: auto`` and an instruct model, or ``instruct``): user message =
  the process's instruction (``Please toss a coin and tell me whether it landed on heads or
  tails.``), assistant prefill = q_i.

Paraphrases come from ``configs/prompts/<paraphrase_set>.txt`` (one per line, ``#`` comments;
default ``paraphrase_<process>``) unless given inline as ``paraphrases`` (``limit`` keeps the
first n, for demos); the texts are
resolved into the params at validation, so the stored config (and its hash) holds them.

``protocol: paper`` (PAPER_PROTOCOLS.md B): ``queries`` in the original's format (ending in a
space; default bayesflip's own 50, ``set:paper_<process>_queries``) and ``instruct_prompts``
(default its own 5, ``set:paper_<process>_instruct``), both stimulus lists (inline, ``file:`` or
``set:``). Instruct models are scored on every (instruct prompt, query) pair (5 × 50 = 250);
rendering as :func:`bayesflip.prompts.paper_prompt` with an empty context. Cells carry
``instruct`` (index) next to ``paraphrase`` (the query index); a base model never sees the
instruct prompt, so its cells repeat per instruct prompt (identical prompts are scored once; mean
and std over pairs then equal those over queries).

Arrays per cell: ``logprobs`` (choice,). Coordinates: ``paraphrase`` (index), ``text``.
Reduce: p_i = softmax(logprobs_i); the prior is reported as mean ± std over i of p_i(heads)
(die: of each face) and its distribution.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Mapping, Optional

import numpy as np
from pydantic import Field, field_validator

from ..engine import ChoiceRequest
from ..errors import ConfigError
from ..paths import configs_dir
from ..prompts import Prompt, encode_choices, encode_prompt, render
from ..stimuli import StimulusList
from . import paper, register
from .base import ArraySpec, Family, Params, Protocol, RenderedCell, RunContext, evidence_kind
from .needle import PROCESSES, is_chat
from .protocol import ProtocolStrategy


def prompt_dir() -> Path:
    return configs_dir() / "prompts"


def available_sets() -> list[str]:
    return sorted(p.stem for p in prompt_dir().glob("*.txt"))


def read_set(name: str) -> list[str]:
    """Lines of ``configs/prompts/<name>.txt`` without blank lines, comments and trailing spaces."""
    path = prompt_dir() / f"{name}.txt"
    lines = [ln.rstrip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def check_paraphrases(v: list[str]) -> list[str]:
    """Distinct, non-empty, no trailing whitespace (the choice carries the leading space)."""
    dup = sorted({x for x in v if v.count(x) > 1})
    if dup:
        raise ValueError(f"duplicate paraphrases {dup}")
    if any(not x.strip() or x != x.rstrip() for x in v):
        raise ValueError("paraphrases must be non-empty and end without whitespace (the choice has the space)")
    return v


class ParaphraseProtocol(ProtocolStrategy):
    """What ``clean`` and ``paper`` paraphrase cells differ in: the query list, the grid, the prompt."""

    texts_key: ClassVar[str]        # the params key holding the scored query texts

    def texts(self, p: "ParaphraseParams") -> list[str]:
        return list(getattr(p, self.texts_key) or [])

    def cells(self, p: "ParaphraseParams") -> list[dict]:
        raise NotImplementedError

    def prompt(self, p: "ParaphraseParams", text: str, chat: bool, instruct: int) -> Prompt:
        raise NotImplementedError


class CleanParaphrase(ParaphraseProtocol):
    """bayesflip's paraphrase sets (``configs/prompts``), the process's instruction for instruct models."""

    name = "clean"
    texts_key = "paraphrases"

    def check(self, p: "ParaphraseParams") -> None:
        paper.refuse_paper_keys(p)
        if p.paraphrases is None:
            name = p.paraphrase_set or f"paraphrase_{p.process}"
            texts = read_set(name)
            if not texts:
                raise ValueError(f"paraphrase set {name!r} is empty")
            p.paraphrases = check_paraphrases(texts)
        if p.limit is not None:
            p.paraphrases = p.paraphrases[: p.limit]

    def cells(self, p: "ParaphraseParams") -> list[dict]:
        return [{"process": p.process, "paraphrase": i, "text": t, "sample": 0} for i, t in enumerate(p.paraphrases or [])]

    def prompt(self, p: "ParaphraseParams", text: str, chat: bool, instruct: int) -> Prompt:
        if chat:
            return Prompt(text=text, messages=(("user", p.instruction or PROCESSES[p.process]["instruction"]),))
        return Prompt(text=text)


class PaperParaphrase(ParaphraseProtocol):
    """The coin-flip study's query format and instruct prompts, every (instruct prompt, query) pair."""

    name = "paper"
    texts_key = "queries"

    def check(self, p: "ParaphraseParams") -> None:
        paper.resolve_stimuli(p, ("paraphrase_set", "paraphrases", "instruction"), paper.QUERY_SET[p.process],
                              paper.INSTRUCT_SET[p.process])
        if p.limit is not None:
            assert p.queries is not None                                     # filled by resolve_stimuli
            p.queries = p.queries[: p.limit]

    def cells(self, p: "ParaphraseParams") -> list[dict]:
        return [{"process": p.process, "paraphrase": q, "instruct": i, "text": paper.stimuli(p)[0][q], "sample": 0}
                for i, q in paper.pairs(*paper.stimuli(p))]

    def prompt(self, p: "ParaphraseParams", text: str, chat: bool, instruct: int) -> Prompt:
        return paper.render_prompt("", text, paper.stimuli(p)[1][instruct], chat)


PROTOCOLS: dict[str, ParaphraseProtocol] = {"clean": CleanParaphrase(), "paper": PaperParaphrase()}


class ParaphraseParams(Params):
    process: Literal["coin", "die"] = "coin"
    paraphrase_set: Optional[str] = None
    paraphrases: Optional[list[str]] = Field(None, min_length=1)
    variant: Literal["auto", "base", "instruct"] = "auto"
    instruction: Optional[str] = None
    limit: Optional[int] = Field(None, ge=1)  # score only the first `limit` paraphrases / queries (demos)
    protocol: Protocol = "clean"
    queries: Optional[StimulusList] = None            # paper: query paraphrases ending in a space
    instruct_prompts: Optional[StimulusList] = None   # paper: user messages of instruct models

    @field_validator("paraphrase_set")
    @classmethod
    def _set_exists(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not (prompt_dir() / f"{v}.txt").is_file():
            raise ValueError(f"no paraphrase set {v!r} in {prompt_dir()} (allowed: {', '.join(available_sets())})")
        return v

    @field_validator("paraphrases")
    @classmethod
    def _distinct(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        return None if v is None else check_paraphrases(v)

    PROTOCOLS: ClassVar[Mapping[str, ProtocolStrategy]] = PROTOCOLS


def build_prompt(p: ParaphraseParams, text: str, model_kind: str, instruct: int = 0) -> Prompt:
    return p.strategy.prompt(p, text, is_chat(p, model_kind), instruct)


@register
class ParaphraseFamily(Family):
    name = "paraphrase"
    Params = ParaphraseParams

    def cells(self, p: ParaphraseParams) -> list[dict]:
        return p.strategy.cells(p)

    def evidence(self, p: ParaphraseParams) -> dict:
        """Every cell: the query paraphrase alone (no statement, no context)."""
        return evidence_kind("none", "none")

    def arrays(self, p: ParaphraseParams) -> dict[str, ArraySpec]:
        return {"logprobs": ArraySpec(("choice",), (len(PROCESSES[p.process]["choices"]),), finite="all")}

    def coords(self, p: ParaphraseParams) -> dict[str, list]:
        return {"choice": PROCESSES[p.process]["choices"]}

    def validate(self, p: ParaphraseParams, tokenizer, model_kind: str) -> None:
        s = PROCESSES[p.process]
        key = p.strategy.texts_key
        for i, t in enumerate(p.strategy.texts(p)):
            try:
                text = render(build_prompt(p, t, model_kind), tokenizer)
                encode_choices(tokenizer, s["choices"], s["terminator"], context_text=text)
            except ValueError as e:
                raise ConfigError(f"params.{key}.{i}", f"{t!r}: {e}") from None

    def render(self, p: ParaphraseParams, cells: list[dict], tokenizer, model_kind: str, seed: int) -> list[RenderedCell]:
        s = PROCESSES[p.process]
        return [RenderedCell(cell=dict(c), text=render(build_prompt(p, c["text"], model_kind, c.get("instruct", 0)), tokenizer),
                             choices=[x + s["terminator"] for x in s["choices"]]) for c in cells]

    def run(self, p: ParaphraseParams, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        tok = ctx.tokenizer
        s = PROCESSES[p.process]
        prompts = [build_prompt(p, c["text"], ctx.model_kind, c.get("instruct", 0)) for c in cells]
        reqs = []
        for pr in prompts:
            enc = encode_choices(tok, s["choices"], s["terminator"], render(pr, tok))
            reqs.append(ChoiceRequest(encode_prompt(tok, pr), enc.ids))
        return {"logprobs": np.stack(paper.score_choices_once(ctx.scorer, reqs)).astype(np.float32)}
