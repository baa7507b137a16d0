"""Family A: an explicit bias statement ("needle") inside filler text ("haystack").

Prompt of one cell (L = filler length in model tokens, d = relative depth):

* filler of ≈ L tokens of real English prose (:mod:`bayesflip.filler`) with the needle inserted
  between sentences at token depth ≈ d·L (d = 0: before the first sentence; d = 1: after the
  last);  ``context = filler_with_needle``.
* base variant: ``context + " " + query`` — the query joins the filler after one space and the
  choice follows the query directly (``"... landed on" + " heads"``).
* instruct variant (``variant: auto`` and an instruct model, or ``variant: instruct``): user
  message ``context + " " + instruction``, assistant prefill = the query (no end-of-turn).

Processes (query → choices; needle; stated distribution ``p_stated``):

* coin: ``I tossed a coin and it landed on`` → `` heads``/`` tails``;
  ``When I flip coins they land on heads {b}% of the time.`` → p = (b, 1 − b)/100.
* die: ``I rolled a die and it landed on`` → `` 1``..`` 6``;
  ``When I roll dice they land on {face} {b}% of the time.`` → p_face = b/100, other faces
  (1 − b/100)/5 each.
* number: ``I picked a random number between 1 and 10 and it was`` → `` 1``..`` 10`` with the
  terminator ``"."`` (`` 1`` is a token-prefix of `` 10``, so complete answers `` 1.`` .. `` 10.``
  are compared; :func:`bayesflip.prompts.check_prefix_free`); needles "always even"/"always odd"
  → p uniform (1/5) on the even / odd numbers.

Conditions (coordinate ``condition``): ``needle`` (the L × d × needle × sample grid),
``no_needle`` (filler of L tokens only, per L × sample) and ``no_context`` (the query alone,
one cell). Not-applicable coordinates: ``depth`` NaN, ``bias`` −1, ``face`` 0, ``needle`` "none".
``p_stated`` is NaN for ``no_needle``/``no_context`` (nothing was stated; compare with uniform
explicitly if wanted).

Arrays per cell: ``logprobs`` (choice,) summed choice log-probs (float32; renormalised
distribution and off-choice mass follow, :func:`bayesflip.engine.choice_distribution`),
``p_stated`` (choice,), ``token_length`` (filler tokens actually used, needle excluded),
``token_depth`` (filler tokens before the needle; −1 without needle), ``prompt_tokens``
(the whole prompt's ids). Metrics (reduce): TVD/KL(p_model ‖ p_stated).

``protocol: paper`` (PAPER_PROTOCOLS.md A; :mod:`.paper`): the original's statements (base ``I``
form, instruct ``you`` form), queries ending in a space, instruct prompts, whitespace-normalised
rendering, whole-sentence filler of ≥ L tokens with the needle after the sentence at which the
running token count first reaches ⌊d·L_doc⌋ (:func:`bayesflip.filler.build_filler`,
``placement="paper"``). ``queries`` / ``instruct_prompts`` are stimulus lists (inline or
``file:``); cells get the coordinates ``instruct`` and ``query`` (indices; every (instruct
prompt, query) pair, the original's ``product``). A base model never sees the instruct prompt,
so its cells repeat per instruct prompt and identical prompts are scored once.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, ClassVar, Literal, Mapping, Optional

import numpy as np
from pydantic import AfterValidator, Field, field_validator

from ..domain import PROCESS_TEXTS, coin_probs, die_probs, parity_probs
from ..engine import ChoiceRequest
from ..errors import ConfigError
from ..filler import Filler, build_filler, check_source, load_sentences
from ..prompts import Prompt, encode_choices, encode_prompt, render
from ..stimuli import StimulusList, StimulusText
from . import paper, register
from .base import (ArraySpec, Family, Params, Protocol, RenderedCell, RunContext, evidence_kind, template_problem,
                   use_chat)
from .protocol import ProtocolStrategy



def in_range(lo, hi=None):
    """A validator whose error states the whole allowed range (a Field bound names only the violated end)."""
    def check(v):
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"must lie in [{lo}, {'inf)' if hi is None else str(hi) + ']'}")
        return v
    return AfterValidator(check)


Length = Annotated[int, in_range(0)]          # filler tokens; 0 = the needle alone
Depth = Annotated[float, in_range(0.0, 1.0)]  # relative depth of the needle
Bias = Annotated[int, in_range(0, 100)]       # stated percentage
Face = Annotated[int, in_range(1, 6)]

PROCESSES: dict[str, dict] = {
    name: {"choices": list(t.choices), "terminator": t.terminator, "query": t.query, "needle": t.statement,
           "instruction": t.instruction}
    for name, t in PROCESS_TEXTS.items()}
NEEDLE_KEYS = {"coin": {"b"}, "die": {"face", "b"}, "number": {"parity"}}


class NeedleProtocol(ProtocolStrategy):
    """What ``clean`` and ``paper`` needle cells differ in: statements, rendering, filler placement, grid."""

    placement: ClassVar[str]        # the filler's needle placement (:func:`bayesflip.filler.build_filler`)

    def cells(self, p: "NeedleParams", cells: list[dict]) -> list[dict]:
        return cells

    def needle_template(self, p: "NeedleParams", chat: bool) -> str:
        raise NotImplementedError

    def template_key(self, chat: bool) -> str:
        """The params key that holds the template used (for errors)."""
        return "params.needle"

    def prompt(self, p: "NeedleParams", cell: dict, context: str, chat: bool) -> Prompt:
        """The prompt of one cell around its (filler) ``context``."""
        raise NotImplementedError

    def probe_cells(self, cells: list[dict]) -> list[dict]:
        """The cells whose rendering ``validate`` tokenizes with the choices."""
        return [cells[-1]]

    def choice_error(self, e: ValueError, cell: dict) -> Exception:
        """What a choice that joins the probe's prompt badly raises."""
        return e


class CleanNeedle(NeedleProtocol):
    """bayesflip's wording (:data:`PROCESSES`, overridable per key), filler cut to ≈ L tokens."""

    name = "clean"
    placement = "clean"

    def check(self, p: "NeedleParams") -> None:
        paper.refuse_paper_keys(p, ("instruct_needle",))

    def needle_template(self, p: "NeedleParams", chat: bool) -> str:
        return spec(p)["needle"]

    def prompt(self, p: "NeedleParams", cell: dict, context: str, chat: bool) -> Prompt:
        s = spec(p)
        if chat:
            user = (context + " " if context else "") + s["instruction"]
            return Prompt(text=s["query"], messages=(("user", user),))
        return Prompt(text=(context + " " if context else "") + s["query"])


class PaperNeedle(NeedleProtocol):
    """The coin-flip study's statements, queries and instruct prompts (:mod:`.paper`), whole-sentence filler."""

    name = "paper"
    placement = "paper"

    def check(self, p: "NeedleParams") -> None:
        paper.resolve_stimuli(p, ("query", "instruction"), paper.NEEDLE[p.process]["query"],
                              paper.NEEDLE[p.process]["instruct_prompt"])

    def cells(self, p: "NeedleParams", cells: list[dict]) -> list[dict]:
        # every (instruct prompt, query) pair, innermost
        return [{**c, "instruct": i, "query": q} for c in cells for i, q in paper.pairs(*paper.stimuli(p))]

    def needle_template(self, p: "NeedleParams", chat: bool) -> str:
        if chat:
            return p.instruct_needle or paper.NEEDLE[p.process]["instruct_statement"]
        return p.needle or paper.NEEDLE[p.process]["statement"]

    def template_key(self, chat: bool) -> str:
        return "params.instruct_needle" if chat else "params.needle"

    def prompt(self, p: "NeedleParams", cell: dict, context: str, chat: bool) -> Prompt:
        return paper.render_prompt(context, paper.stimuli(p)[0][cell["query"]], paper.stimuli(p)[1][cell["instruct"]], chat)

    def probe_cells(self, cells: list[dict]) -> list[dict]:
        last = cells[-1]  # every query ending (the choice follows each one)
        return [c for c in cells if c["condition"] == last["condition"] and c["length"] == last["length"]
                and c["depth"] == last["depth"] and c["needle"] == last["needle"]
                and c["sample"] == last["sample"] and c["instruct"] == 0]

    def choice_error(self, e: ValueError, cell: dict) -> Exception:
        key = "params.terminator" if "token-prefix" in str(e) else f"params.queries.{cell['query']}"
        return ConfigError(key, str(e))


PROTOCOLS: dict[str, NeedleProtocol] = {"clean": CleanNeedle(), "paper": PaperNeedle()}


def default_lengths() -> list[int]:
    return list(range(10, 101, 10)) + [200, 400, 800, 1000]


class NeedleParams(Params):
    process: Literal["coin", "die", "number"] = "coin"
    lengths: list[Length] = Field(default_factory=default_lengths, min_length=1)
    depths: list[Depth] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)], min_length=1)
    biases: list[Bias] = Field(default_factory=lambda: list(range(0, 101, 10)), min_length=1)
    faces: list[Face] = Field(default_factory=lambda: [1, 2, 3, 4, 5, 6], min_length=1)
    parities: list[Literal["even", "odd"]] = Field(default_factory=lambda: ["even", "odd"], min_length=1)  # type: ignore[arg-type]  # a list of the Literal's values
    samples: int = Field(5, ge=1)
    no_needle: bool = True
    no_context: bool = True
    filler: str = "pydoc"
    variant: Literal["auto", "base", "instruct"] = "auto"
    query: Optional[str] = None
    needle: Optional[StimulusText] = None             # statement template (paper: the base "I" form); inline or file:
    instruction: Optional[str] = None
    terminator: Optional[str] = None
    protocol: Protocol = "clean"
    queries: Optional[StimulusList] = None            # paper: query paraphrases ending in a space
    instruct_prompts: Optional[StimulusList] = None   # paper: user messages of instruct models
    instruct_needle: Optional[StimulusText] = None    # paper: the instruct ("you") statement template; inline or file:

    @field_validator("filler")
    @classmethod
    def _filler_source(cls, v: str) -> str:
        return check_source(v)

    PROTOCOLS: ClassVar[Mapping[str, ProtocolStrategy]] = PROTOCOLS


def spec(p: NeedleParams) -> dict:
    """The process's strings with the params' overrides applied."""
    s = dict(PROCESSES[p.process])
    for k in ("query", "needle", "instruction", "terminator"):
        if getattr(p, k) is not None:
            s[k] = getattr(p, k)
    return s


def is_chat(p, model_kind: str) -> bool:
    return use_chat(p.variant, model_kind)


def stated_distribution(process: str, cell: dict) -> np.ndarray:
    """The distribution the needle states (NaN without a needle)."""
    k = len(PROCESSES[process]["choices"])
    if cell["condition"] != "needle":
        return np.full(k, np.nan)
    if process == "coin":
        return coin_probs(cell["bias"] / 100.0)
    if process == "die":
        return die_probs(cell["face"], cell["bias"] / 100.0)
    return parity_probs(cell["needle"])


def needle_template(p: NeedleParams, chat: bool = False) -> str:
    """The statement template: clean ``needle``; paper the base (``I``) or instruct (``you``) form."""
    return p.strategy.needle_template(p, chat)


def needle_sentence(p: NeedleParams, cell: dict, chat: bool = False) -> str:
    tpl = needle_template(p, chat)
    if p.process == "number":
        return tpl.format(parity=cell["needle"])
    return tpl.format(b=cell["bias"], face=cell["face"])


def _needle_cells(p: NeedleParams) -> list[dict]:
    if p.process == "coin":
        return [{"needle": f"heads {b}%", "bias": b, "face": 0} for b in p.biases]
    if p.process == "die":
        return [{"needle": f"face {f} {b}%", "bias": b, "face": f} for f, b in itertools.product(p.faces, p.biases)]
    return [{"needle": par, "bias": -1, "face": 0} for par in p.parities]


def build_prompt(p: NeedleParams, cell: dict, tokenizer, model_kind: str, seed: int) -> tuple[Prompt, Optional[Filler]]:
    """The prompt of one cell (and its filler, None for no_context)."""
    chat = is_chat(p, model_kind)
    fill = None
    context = ""
    if cell["condition"] != "no_context":
        needle = needle_sentence(p, cell, chat) if cell["condition"] == "needle" else ""
        depth = cell["depth"] if cell["condition"] == "needle" else 0.0
        fill = build_filler(tokenizer, cell["length"], depth, needle, seed, cell["sample"], p.filler,
                            placement=p.strategy.placement)
        context = fill.text
    return p.strategy.prompt(p, cell, context, chat), fill


@register
class NeedleFamily(Family):
    name = "needle"
    Params = NeedleParams

    def cells(self, p: NeedleParams) -> list[dict]:
        base = {"process": p.process}
        out = []
        if p.no_context:
            out.append({**base, "condition": "no_context", "length": 0, "depth": math.nan, "needle": "none",
                        "bias": -1, "face": 0, "sample": 0})
        if p.no_needle:
            for L, s in itertools.product(p.lengths, range(p.samples)):
                out.append({**base, "condition": "no_needle", "length": L, "depth": math.nan, "needle": "none",
                            "bias": -1, "face": 0, "sample": s})
        for L, d, nd, s in itertools.product(p.lengths, p.depths, _needle_cells(p), range(p.samples)):
            out.append({**base, "condition": "needle", "length": L, "depth": d, **nd, "sample": s})
        return p.strategy.cells(p, out)

    def evidence(self, p: NeedleParams) -> dict:
        """By ``condition``: the needle states the cell's bias inside filler; no_needle is filler alone;
        no_context the query alone."""
        return {"by": "condition", "values": {"needle": evidence_kind("theta", "filler"),
                                              "no_needle": evidence_kind("none", "filler"),
                                              "no_context": evidence_kind("none", "none")}}

    def arrays(self, p: NeedleParams) -> dict[str, ArraySpec]:
        k = len(PROCESSES[p.process]["choices"])
        return {"logprobs": ArraySpec(("choice",), (k,), finite="all"),
                "p_stated": ArraySpec(("choice",), (k,)),
                "token_length": ArraySpec((), (), "int32"),
                "token_depth": ArraySpec((), (), "int32"),
                "prompt_tokens": ArraySpec((), (), "int32")}

    def coords(self, p: NeedleParams) -> dict[str, list]:
        return {"choice": PROCESSES[p.process]["choices"]}

    def validate(self, p: NeedleParams, tokenizer, model_kind: str) -> None:
        s = spec(p)
        keys = NEEDLE_KEYS[p.process]
        chat = is_chat(p, model_kind)
        key = p.strategy.template_key(chat)
        tpl = needle_template(p, chat)
        if problem := template_problem(tpl, {"b": 50, "face": 1, "parity": "even"}, tuple(sorted(keys))):
            raise ConfigError(key, f"needle {problem}", allowed=[f"a sentence using {{{k}}}" for k in sorted(keys)])
        load_sentences(p.filler)  # source readable and non-empty (ConfigError naming params.filler)
        cells = self.cells(p)
        if not cells:
            raise ConfigError("params", "empty grid: no needle cells and no_needle/no_context off")
        # the choices must join cleanly after the query, in the rendering this model gets
        for c in p.strategy.probe_cells(cells):
            prompt, _ = build_prompt(p, c, tokenizer, model_kind, 0)
            try:
                encode_choices(tokenizer, s["choices"], terminator=s["terminator"], context_text=render(prompt, tokenizer))
            except ValueError as e:
                err = p.strategy.choice_error(e, c)
                if err is e:
                    raise
                raise err from None

    def render(self, p: NeedleParams, cells: list[dict], tokenizer, model_kind: str, seed: int) -> list[RenderedCell]:
        s = spec(p)
        out = []
        for c in cells:
            prompt, _ = build_prompt(p, c, tokenizer, model_kind, seed)
            out.append(RenderedCell(cell=dict(c), text=render(prompt, tokenizer),
                                    choices=[x + s["terminator"] for x in s["choices"]]))
        return out

    def run(self, p: NeedleParams, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        tok = ctx.tokenizer
        s = spec(p)
        built = [build_prompt(p, c, tok, ctx.model_kind, ctx.seed) for c in cells]
        enc = encode_choices(tok, s["choices"], terminator=s["terminator"], context_text=render(built[0][0], tok))
        reqs = [ChoiceRequest(encode_prompt(tok, pr), enc.ids) for pr, _ in built]
        lps = paper.score_choices_once(ctx.scorer, reqs)
        return {
            "logprobs": np.stack(lps).astype(np.float32),
            "p_stated": np.stack([stated_distribution(p.process, c) for c in cells]).astype(np.float32),
            "token_length": np.array([f.token_length if f else 0 for _, f in built], dtype=np.int32),
            "token_depth": np.array([f.token_depth if (f and c["condition"] == "needle") else -1
                                     for c, (_, f) in zip(cells, built)], dtype=np.int32),
            "prompt_tokens": np.array([len(r.context) for r in reqs], dtype=np.int32),
        }
