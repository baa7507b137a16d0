"""Iterated learning of rules: rule-induction chains over 3^5 = 243 hypotheses (EXPERIMENTS.md §3).

World: five objects A..E, each ``on``/``off``/``und``; a hypothesis h assigns one value to
each object (243 hypotheses, index order = ``itertools.product(VALUES, repeat=5)`` with A
slowest). For an input set S (one of the 31 non-empty subsets, ordered by size then
lexicographically) the rule's output is

    out(h, S) = on  if ∃o∈S: h[o] = on;  else und  if ∃o∈S: h[o] = und;  else off.

Examples are rendered ``Input: A, C\\nOutput: on`` (joined by ``\\n``). Prompt: system message =
``intro`` (+ " " + bias sentence), user message = ``Examples:\\n`` + examples, assistant prefill
``Rule:``; base models get ``system + "\\n\\n" + user + "\\nRule:"``.
Object ``screen`` (default ``A``) is the screen: the task text says so, and the bias
sentences (strong ``Turn off the screen after the experiment.``, medium ``John will turn
off the screen after the experiment.``, weak ``John will close the screen after the
experiment.``, none) are appended to the system prompt (base models: to the preamble).

Generation g (data ``d^g``, ``d^0`` = the configured initial examples, produced by
``true_rule`` on ``init_inputs``): the model sees the examples and its belief over rules is
read **exactly**: every canonical rule string ``' {"A": "on", "B": "off", ...}'`` (canonical
JSON = ``json.dumps`` with keys A..E in order) is teacher-forced after the assistant prefill
``Rule:`` (one context, 243 choices; the engine branches them from the context's cache,
``choice_chunk`` rules per engine call to bound memory). With raw summed log-probs ``l_h``:

    on_mass = Σ_h exp(l_h),   P(h) = exp(l_h) / on_mass.

Interaction (how the next rule is chosen, ``P_eff``):

* ``none``: ``P_eff = P``;
* ``self_check``: after the rule the model is asked (in its own turn) ``check_question``;
  ``y(h) = P(" yes") / (P(" yes") + P(" no"))`` read from the same engine call (the
  question branches share the rule's rows); ``P_eff(h) ∝ P(h) y(h)`` — the exact outcome of
  "sample a rule, let the model check it, resample when it says no";
* ``refine``: hypothesis refinement against d⁰: ``P_eff(h) ∝ P(h) 1[h consistent with d⁰]``
  (H_eff = rules reproducing every initial example).

The sampled rule ``h_g ~ P_eff`` (chain's seeded numpy generator) labels ``examples`` (M)
inputs drawn without replacement uniformly from the 31 subsets → ``d^{g+1}``.

Metrics per generation (for ``P`` and, prefixed ``eff_``, for ``P_eff``):
``entropy`` = -Σ P log P (nats); ``p_screen_off`` = Σ_{h[screen]=off} P(h);
``acc_d0`` = Σ_h P(h) · (fraction of d⁰ examples h reproduces);
``both`` = Σ_h P(h) 1[h consistent with d⁰ and h[screen] = off].
Also stored: ``probs`` (generation, hypothesis) = P; ``on_mass``; ``check_yes``
(generation, hypothesis) = y(h) (NaN unless self_check); ``rule`` the sampled hypothesis;
``inputs`` / ``outputs`` (generation, example) the subset and value indices of ``d^g`` (-1 pad).
Checkpointed after every generation (:mod:`.generational`).

``protocol: paper`` runs the original game instead (:mod:`.rules_paper` holds its templates):
objects ``A, B, C, D, screen``; cells = bias × position (start / end / both; ``none`` once) ×
interaction × h* (``h_indices``: the original's ``H_INDEX`` into the 162 rules with screen ≠
off, product order) × temperature × d⁰ seed × chain. d⁰ = ``d0_size`` inputs on which h* and
h̄ (h* with screen off) agree. Generation g: the rule request (system = game prompt, the last
``look_back`` rounds of history, user = ``HD`` with ``d^g``), P(h) read exactly over the 243
rules stated as ``Rule: {"A": ..., "screen": ...}``; the stated rule
``h_g ~ softmax(log P_eff / T)``; interaction ``self`` / ``hypothesis`` as model turns (the
refined rule is read exactly the same way after the refinement prompt and drawn likewise;
``hypothesis`` only when h_g misses an example of d⁰); then the model **writes** ``examples``
new examples from the passed rule (one seeded sample of the reply at temperature T, redrawn
up to ``max_redraws`` times while fewer than M parse), and the first M valid ones are
``d^{g+1}``. Extra paper arrays: ``probs_refined``, ``rule_passed``, ``refined``,
``n_examples``, ``n_invalid``, ``redraws``, ``n_consistent`` (examples the passed rule
reproduces), ``carried`` (no valid example: d^g kept) and ``reply`` (the accepted reply text).
"""

from __future__ import annotations

import itertools
from typing import Annotated, ClassVar, Literal, Mapping

import numpy as np
from pydantic import Field, field_validator

from ..engine import ChoiceRequest
from ..generation import SamplingFields
from ..errors import ConfigError
from ..prompts import Prompt, check_boundary, encode_choices, encode_piece, render
from . import register
from . import rules_paper as RP
from .base import ArraySpec, Params, Protocol, RenderedCell, RunContext, use_chat
from .generational import GenerationalFamily, GenState
from .protocol import ProtocolStrategy
from .rules_run import _fmt, clean_step, conversation, paper_rule_prompt, paper_step, rounds
from .rules_world import (OBJECTS, OFF, ON, UND, VALUES, _init_data, _typical_inputs, accuracy,  # noqa: F401
                          consistent_pair, feasible_rules, hypotheses, metrics, next_examples, output_table,
                          paper_d0, parse_subset, render_examples, rule_output, rule_text, subsets, tempered_pick)

BIAS_SENTENCES = {
    "strong": "Turn off the screen after the experiment.",
    "medium": "John will turn off the screen after the experiment.",
    "weak": "John will close the screen after the experiment.",
    "none": "",
}
INTRO = ("You are running an experiment with five objects: A, B, C, D and E. Object {screen} is the screen. "
         "Each object is on, off or und (undetermined). For a set of objects the output is on if any of them is "
         "on; otherwise und if any of them is und; otherwise off. From the examples, infer the state of every "
         "object. Write it as \"Rule:\" followed by a JSON object that maps each object to \"on\", \"off\" "
         "or \"und\".")


# ---------------------------------------------------------------------------- params
Interaction = Literal["none", "self_check", "refine", "self", "hypothesis"]
PAPER_INTERACTIONS = ("self", "hypothesis")            # model turns of the original (paper protocol only)


class RulesParams(Params, SamplingFields):
    protocol: Protocol = "clean"
    biases: list[str] = Field(default_factory=lambda: ["strong", "medium", "weak", "none"], min_length=1)
    bias_sentences: dict[str, str] = Field(default_factory=lambda: dict(BIAS_SENTENCES))
    interactions: list[Interaction] = Field(default_factory=lambda: ["none"], min_length=1)  # type: ignore[arg-type]  # a list of the Literal's values
    screen: Literal["A", "B", "C", "D", "E"] = "A"
    true_rule: dict[str, Literal["on", "off", "und"]] = Field(
        default_factory=lambda: {"A": "off", "B": "on", "C": "off", "D": "und", "E": "off"})  # type: ignore[arg-type]  # a list of the Literal's values
    init_inputs: list[str] = Field(default_factory=lambda: ["A, B", "C", "D, E", "C, E"], min_length=1)
    examples: int = Field(4, ge=1, le=31)             # M: new examples per generation
    generations: int = Field(10, ge=0, le=1000)
    chains: int = Field(20, ge=1)
    intro: str = INTRO
    user: str = "Examples:\n{examples}"
    prefill: str = "Rule:"
    check_question: str = "\nIs this rule consistent with every example above? Answer:"
    check_answers: tuple[str, str] = (" yes", " no")
    choice_chunk: int = Field(81, ge=1, le=243)       # rules per engine call (each copies the context's KV cache)
    variant: Literal["auto", "base", "instruct"] = "auto"
    # ---- paper protocol only (the original game, rules_paper.py)
    positions: list[Literal["start", "end", "both"]] = Field(default_factory=lambda: ["start"], min_length=1)  # type: ignore[arg-type]  # a list of the Literal's values
    h_indices: list[Annotated[int, Field(ge=0, le=161)]] = Field(default_factory=lambda: [0, 33], min_length=1)
    d0_size: int = Field(4, ge=1, le=30)
    d0_seeds: list[int] = Field(default_factory=lambda: [10086, 14843, 42, 1314, 916, 1024], min_length=1)
    temperatures: list[Annotated[float, Field(ge=0.0)]] = Field(default_factory=lambda: [1.0, 0.5, 0.1],
                                                                   min_length=1)
    look_back: int = Field(2, ge=0)
    max_new_tokens: int = Field(160, ge=8)
    max_redraws: int = Field(3, ge=0)

    PROTOCOLS: ClassVar[Mapping[str, ProtocolStrategy]] = {}   # CleanRules / PaperRules, set below

    @field_validator("true_rule")
    @classmethod
    def _all_objects(cls, v: dict) -> dict:
        if sorted(v) != list(OBJECTS):
            raise ValueError(f"true_rule must give a value for exactly the objects {list(OBJECTS)}, got {sorted(v)}")
        return v


class RulesProtocol(ProtocolStrategy):
    """What the clean chain and the original game (``paper``) differ in: grid, arrays, objects,
    rule strings, d⁰, the generation-0 prompt, the token count of a cell and the step
    (:mod:`.rules_run`)."""

    def cells(self, p: RulesParams) -> list[dict]:
        raise NotImplementedError

    def width(self, p: RulesParams) -> int:
        """The ``example`` axis: the most examples a generation holds."""
        raise NotImplementedError

    def extra_arrays(self, g: int, H: int) -> dict[str, ArraySpec]:
        return {}

    def objects(self) -> tuple[str, ...]:
        raise NotImplementedError

    def rule_text(self, h: tuple[str, ...]) -> str:
        """A rule as stated after the prefill ``Rule:`` (without the leading space)."""
        raise NotImplementedError

    def validate(self, p: RulesParams) -> None:
        """This protocol's checks (``ConfigError``)."""

    def d0(self, p: RulesParams, cell: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """d⁰ of a cell: (subset indices, value indices)."""
        raise NotImplementedError

    def first_prompt(self, fam: "RulesFamily", p: RulesParams, cell: dict, ins, outs, model_kind: str) -> Prompt:
        """Generation 0's belief read after d⁰ = (ins, outs)."""
        raise NotImplementedError

    def count_key(self, cell: dict) -> tuple:
        """Cells with equal keys cost the same tokens (:meth:`RulesFamily.count_tokens`)."""
        raise NotImplementedError

    def count_cell(self, fam: "RulesFamily", p: RulesParams, cell: dict, tokenizer, model_kind: str, seed: int,
                   read):
        raise NotImplementedError

    def init(self, s: GenState) -> None:
        """d⁰ into the arrays of every cell."""
        for i, c in enumerate(s.cells):
            ins, outs = self.d0(s.p, c, s.ctx.seed)
            s.arr["inputs"][i, 0, : len(ins)] = ins
            s.arr["outputs"][i, 0, : len(outs)] = outs
            self.record_d0(s, i, len(ins))

    def record_d0(self, s: GenState, i: int, n: int) -> None:
        """Cell ``i``'s d⁰ holds ``n`` examples (paper: stored in ``n_examples``)."""

    def step(self, fam: "RulesFamily", s: GenState, g: int) -> None:
        raise NotImplementedError


class CleanRules(RulesProtocol):
    """bayesflip's chain: objects A..E, d⁰ = ``init_inputs`` by ``true_rule``, model-free resampling."""

    name = "clean"

    def cells(self, p: RulesParams) -> list[dict]:
        return [{"bias": b, "interaction": it, "sample": s}
                for b, it, s in itertools.product(p.biases, p.interactions, range(p.chains))]

    def width(self, p: RulesParams) -> int:
        return max(p.examples, len(p.init_inputs))

    def objects(self) -> tuple[str, ...]:
        return OBJECTS

    def rule_text(self, h: tuple[str, ...]) -> str:
        return rule_text(h)

    def validate(self, p: RulesParams) -> None:
        bad = [i for i in p.interactions if i in PAPER_INTERACTIONS]
        if bad:
            raise ConfigError("params.interactions", f"{bad} are model turns of the paper protocol",
                              allowed=["none", "self_check", "refine"])
        for s in p.init_inputs:
            try:
                parse_subset(s)
            except ValueError as e:
                raise ConfigError("params.init_inputs", str(e),
                                  allowed=["'A'", "'A, C'", "... (subsets of A-E)"]) from None

    def d0(self, p: RulesParams, cell: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return _init_data(p)

    def first_prompt(self, fam: "RulesFamily", p: RulesParams, cell: dict, ins, outs, model_kind: str) -> Prompt:
        return fam.prompt(p, cell["bias"], ins, outs, model_kind)

    def count_key(self, cell: dict) -> tuple:
        return (cell["bias"], cell["interaction"])

    def count_cell(self, fam: "RulesFamily", p: RulesParams, cell: dict, tokenizer, model_kind: str, seed: int,
                   read):
        return fam._clean_count(p, cell, tokenizer, model_kind, read)

    def step(self, fam: "RulesFamily", s: GenState, g: int) -> None:
        clean_step(fam, s, g)


class PaperRules(RulesProtocol):
    """The original game (:mod:`.rules_paper`): objects A..D + screen, d⁰ where h* and h̄ agree, the
    model states rules and writes the next examples."""

    name = "paper"

    def cells(self, p: RulesParams) -> list[dict]:
        conds = [(b, pos) for b in p.biases for pos in (["none"] if b == "none" else p.positions)]
        return [{"bias": b, "position": pos, "interaction": it, "h_index": h, "temperature": float(t),
                 "d0_seed": d, "sample": s}
                for (b, pos), it, h, t, d, s in itertools.product(conds, p.interactions, p.h_indices, p.temperatures,
                                                                   p.d0_seeds, range(p.chains))]

    def width(self, p: RulesParams) -> int:
        return max(p.examples, p.d0_size)

    def extra_arrays(self, g: int, H: int) -> dict[str, ArraySpec]:
        return {"probs_refined": ArraySpec(("generation", "hypothesis"), (g, H), "float64"),
                "rule_passed": ArraySpec(("generation",), (g,), "int32"),
                "refined": ArraySpec(("generation",), (g,), "bool"),
                "n_examples": ArraySpec(("generation",), (g,), "int32"),
                "n_invalid": ArraySpec(("generation",), (g,), "int32"),
                "redraws": ArraySpec(("generation",), (g,), "int32"),
                "n_consistent": ArraySpec(("generation",), (g,), "int32"),
                "carried": ArraySpec(("generation",), (g,), "bool"),
                "reply": ArraySpec(("generation",), (g,), "str")}

    def objects(self) -> tuple[str, ...]:
        return RP.OBJECTS

    def rule_text(self, h: tuple[str, ...]) -> str:
        return RP.rule_json(h)

    def validate(self, p: RulesParams) -> None:
        for h in p.h_indices:
            n = len(consistent_pair(feasible_rules()[h], len(OBJECTS) - 1))
            if n < p.d0_size:
                raise ConfigError("params.d0_size", f"h_index {h} has only {n} inputs on which h* and h-bar "
                                  f"agree", allowed=[f"[1, {n}]"])

    def d0(self, p: RulesParams, cell: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return paper_d0(p, cell, seed)

    def first_prompt(self, fam: "RulesFamily", p: RulesParams, cell: dict, ins, outs, model_kind: str) -> Prompt:
        return paper_rule_prompt(p, cell, [], ins, outs, model_kind)

    def count_key(self, cell: dict) -> tuple:
        return tuple((k, cell[k]) for k in ("bias", "position", "interaction", "h_index", "d0_seed"))

    def count_cell(self, fam: "RulesFamily", p: RulesParams, cell: dict, tokenizer, model_kind: str, seed: int,
                   read):
        return fam._paper_count(p, cell, tokenizer, model_kind, seed, read)

    def record_d0(self, s: GenState, i: int, n: int) -> None:
        s.arr["n_examples"][i, 0] = n

    def step(self, fam: "RulesFamily", s: GenState, g: int) -> None:
        paper_step(fam, s, g)


PROTOCOLS: dict[str, RulesProtocol] = {"clean": CleanRules(), "paper": PaperRules()}
RulesParams.PROTOCOLS = PROTOCOLS


# ---------------------------------------------------------------------------- family
@register
class RulesFamily(GenerationalFamily):
    name = "rules"
    Params = RulesParams

    def cells(self, p: RulesParams) -> list[dict]:
        return p.strategy.cells(p)

    def _m(self, p: RulesParams) -> int:
        return p.strategy.width(p)

    def arrays(self, p: RulesParams) -> dict[str, ArraySpec]:
        g, H, m = p.generations + 1, len(hypotheses()), self._m(p)
        out = {"probs": ArraySpec(("generation", "hypothesis"), (g, H), "float64"),
               "check_yes": ArraySpec(("generation", "hypothesis"), (g, H), "float32"),
               "on_mass": ArraySpec(("generation",), (g,), "float64"),
               "rule": ArraySpec(("generation",), (g,), "int32"),
               "inputs": ArraySpec(("generation", "example"), (g, m), "int32"),
               "outputs": ArraySpec(("generation", "example"), (g, m), "int32")}
        for pre in ("", "eff_"):
            for k in ("entropy", "p_screen_off", "acc_d0", "both"):
                out[pre + k] = ArraySpec(("generation",), (g,), "float64")
        out.update(p.strategy.extra_arrays(g, H))
        return out

    def objects(self, p: RulesParams) -> tuple[str, ...]:
        return p.strategy.objects()

    def rule_texts(self, p: RulesParams) -> list[str]:
        """The 243 teacher-forced continuations of the prefill ``Rule:``."""
        return [" " + p.strategy.rule_text(h) for h in hypotheses()]

    def coords(self, p: RulesParams) -> dict[str, list]:
        return {"hypothesis": [t[1:] for t in self.rule_texts(p)], "generation": list(range(p.generations + 1)),
                "example": list(range(self._m(p)))}

    # ------------------------------------------------------------------ prompts
    def prompt(self, p: RulesParams, bias: str, inputs, outputs, model_kind: str) -> Prompt:
        system = p.intro.replace("{screen}", p.screen)
        sentence = p.bias_sentences[bias]
        if sentence:
            system = f"{system} {sentence}"
        user = p.user.replace("{examples}", render_examples(inputs, outputs))
        chat = use_chat(p.variant, model_kind)
        if chat:
            return Prompt(text=p.prefill, messages=(("system", system), ("user", user)))
        return Prompt(text=f"{system}\n\n{user}\n{p.prefill}")

    def validate(self, p: RulesParams, tokenizer, model_kind: str) -> None:
        for b in p.biases:
            if b not in p.bias_sentences:
                raise ConfigError("params.biases", f"unknown bias {b!r}", allowed=sorted(p.bias_sentences))
        p.strategy.validate(p)
        texts = self.rule_texts(p)
        ctx_text = self.render(p, self.cells(p)[:1], tokenizer, model_kind, 0)[0].text
        encode_choices(tokenizer, texts, context_text=ctx_text)  # boundary after the prefill, prefix-free
        if "self_check" in p.interactions:
            for t in texts[:1] + texts[-1:]:
                check_boundary(tokenizer, t, p.check_question)
                for a in p.check_answers:
                    check_boundary(tokenizer, t + p.check_question, a)
            a_ids = [encode_piece(tokenizer, a) for a in p.check_answers]
            if any(len(a) != 1 for a in a_ids) or a_ids[0] == a_ids[1]:
                raise ConfigError("params.check_answers", f"{p.check_answers} must be two distinct single tokens")

    def render(self, p: RulesParams, cells: list[dict], tokenizer, model_kind: str, seed: int) -> list[RenderedCell]:
        """Generation 0's belief read (the 243 rule strings are the choices)."""
        out = []
        for c in cells:
            ins, outs = p.strategy.d0(p, c, seed)
            pr = p.strategy.first_prompt(self, p, c, ins, outs, model_kind)
            out.append(RenderedCell(cell={**c, "generation": 0}, text=render(pr, tokenizer),
                                    choices=self.rule_texts(p)))
        return out

    def count_tokens(self, p: RulesParams, cells: list[dict], tokenizer, model_kind: str, seed: int):
        """Tokens of these cells' run, engine call by engine call, every generation 0..G (no model).

        Per cell and generation g:

        * the **belief read**: ``⌈243 / choice_chunk⌉`` engine calls, each forwarding the whole
          context once plus the branch rows of its rules (with ``self_check`` each rule row runs on
          through the question: ``rule + check_question``);
        * paper protocol, ``self`` (always) / ``hypothesis`` (assumed always, its prompt listing every
          example of d⁰ as missed: the upper bound; the run refines only when h_g misses an example):
          a second read of the 243 rules after the history, the rule request and the refinement turn;
        * paper protocol, g < G: one generation row (prompt = history + the example request)
          sampling ``max_new_tokens``, tried ``1 + max_redraws`` times (upper bound: the run redraws
          only while fewer than M examples parse).

        Assumptions where the text depends on the model: data d^g (g ≥ 1) are M examples on inputs
        spread evenly over the subsets by size (:func:`_typical_inputs`; the run draws them, or the
        model writes them) labelled by the true rule / h*; the stated and passed rules in the chat
        history are h*; every model reply in the history is ``max_new_tokens`` tokens long (upper
        bound). Prompts are rendered and tokenized like the run's (``encode_prompt``), once per
        distinct condition and generation, so a sweep is costed in seconds."""
        from .tokens import TokenCount, branch_tokens

        rules = [encode_piece(tokenizer, t) for t in self.rule_texts(p)]
        q = encode_piece(tokenizer, p.check_question)
        answers = [encode_piece(tokenizer, a) for a in p.check_answers]
        chunks = [rules[lo: lo + p.choice_chunk] for lo in range(0, len(rules), p.choice_chunk)]
        branches = {False: sum(branch_tokens(ch) for ch in chunks),       # as read_beliefs builds each call
                    True: sum(branch_tokens(ch + [r + q + a for a in answers for r in ch]) for ch in chunks)}

        def read(n_ctx: int, self_check: bool) -> int:
            return len(chunks) * n_ctx + branches[self_check]

        cache: dict = {}
        out = TokenCount()
        for c in cells:
            key = p.strategy.count_key(c)
            if key not in cache:
                cache[key] = p.strategy.count_cell(self, p, c, tokenizer, model_kind, seed, read)
            out = out + cache[key]
        return out

    def _clean_count(self, p: RulesParams, c: dict, tokenizer, model_kind: str, read):
        """One clean cell's tokens (see :meth:`count_tokens`)."""
        from .tokens import TokenCount
        from ..prompts import encode_prompt

        ins0, outs0 = _init_data(p)
        n0 = len(encode_prompt(tokenizer, self.prompt(p, c["bias"], ins0, outs0, model_kind)))
        t = TokenCount(prompt=read(n0, c["interaction"] == "self_check"))
        if p.generations:
            ins = _typical_inputs(p.examples, OBJECTS)
            outs = output_table()[hypotheses().index(tuple(p.true_rule[o] for o in OBJECTS)), ins]
            n = len(encode_prompt(tokenizer, self.prompt(p, c["bias"], ins, outs, model_kind)))
            t = t + TokenCount(prompt=read(n, c["interaction"] == "self_check")).scaled(p.generations)
        return t

    def _paper_count(self, p: RulesParams, c: dict, tokenizer, model_kind: str, seed: int, read):
        """One paper cell's tokens (see :meth:`count_tokens`): the run's own prompt builders
        (:func:`.rules_run.rounds`, :func:`.rules_run.paper_rule_prompt`) over arrays filled with the
        stated assumptions."""
        from .tokens import TokenCount
        from ..prompts import encode_prompt
        G, chat = p.generations, use_chat(p.variant, model_kind)
        h = feasible_rules()[c["h_index"]]
        d0_in, d0_out = paper_d0(p, c, seed)
        ins = _typical_inputs(p.examples, RP.OBJECTS)
        m = max(len(d0_in), len(ins))
        refined = c["interaction"] in PAPER_INTERACTIONS
        arr = {"inputs": np.full((1, G + 1, m), -1), "outputs": np.full((1, G + 1, m), -1),
               "n_examples": np.zeros((1, G + 1), int), "rule": np.full((1, G + 1), h),
               "rule_passed": np.full((1, G + 1), h), "refined": np.full((1, G + 1), refined),
               "reply": np.full((1, G + 1), "", dtype=object)}
        arr["inputs"][0, 0, : len(d0_in)], arr["outputs"][0, 0, : len(d0_in)] = d0_in, d0_out
        arr["n_examples"][0, 0] = len(d0_in)
        for g in range(1, G + 1):
            arr["inputs"][0, g, : len(ins)], arr["outputs"][0, g, : len(ins)] = ins, output_table()[h, ins]
            arr["n_examples"][0, g] = len(ins)
        system, fmt = _fmt(p, c)
        subs = subsets(RP.OBJECTS)

        def n_tokens(pr, turns) -> int:       # + the model replies of the history at max_new_tokens
            replies = sum(1 for role, t in turns if role == "assistant" and t == "")
            return len(encode_prompt(tokenizer, pr)) + replies * p.max_new_tokens

        out = TokenCount()
        for g in range(G + 1):
            n = int(arr["n_examples"][0, g])
            hist = rounds(p, arr, 0, c, g, with_hd=False)
            pr = paper_rule_prompt(p, c, hist, arr["inputs"][0, g, :n], arr["outputs"][0, g, :n], model_kind)
            out.prompt += read(n_tokens(pr, hist), c["interaction"] == "self_check")
            full = rounds(p, arr, 0, c, g, with_hd=True)
            if refined:
                hyp = hypotheses()[h]
                if c["interaction"] == "self":
                    turn = RP.search_prompt(hyp, RP.data_text(subs, d0_in, d0_out), fmt)
                else:                           # the refinement prompt as if h_g missed every example
                    wrong = (output_table()[h] + 1) % len(VALUES)
                    turn, _ = RP.refine_prompt(hyp, subs, d0_in, d0_out, wrong, fmt)
                turns = full + [("user", turn)]
                out.prompt += read(n_tokens(conversation(system, turns, p.prefill, chat), turns), False)
            if g < G:
                user = RP.dh_prompt(p.examples, RP.rule_repr(hypotheses()[h], refined))
                turns = full + [("user", user)]
                tries = 1 + p.max_redraws
                out = out + TokenCount(n_tokens(conversation(system, turns, "", chat), turns), p.max_new_tokens,
                                       1).scaled(tries)
        return out

    # ------------------------------------------------------------------ run (GenerationalFamily)
    def rng_key(self, p: RulesParams, cell: dict) -> tuple:
        return ("rules", sorted(cell.items()))

    def last_generation(self, p: RulesParams) -> int:
        return p.generations

    def read_beliefs(self, p: RulesParams, ctx: RunContext, context: list[int], self_check: bool
                     ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw summed log-prob l_h of every rule after ``context`` and (self_check) y(h)."""
        tok = ctx.tokenizer
        rules = [encode_piece(tok, t) for t in self.rule_texts(p)]
        H = len(rules)
        lp = np.zeros(H)
        yes = np.full(H, np.nan) if self_check else None
        q = encode_piece(tok, p.check_question)
        a_yes, a_no = (encode_piece(tok, a) for a in p.check_answers)
        for lo in range(0, H, p.choice_chunk):
            chunk = rules[lo: lo + p.choice_chunk]
            ch = list(chunk)
            if self_check:
                ch += [r + q + a_yes for r in chunk] + [r + q + a_no for r in chunk]
            (vals,) = ctx.scorer.score_choices([ChoiceRequest(context, ch)])
            n = len(chunk)
            lp[lo: lo + n] = vals[:n]
            if self_check:
                yes[lo: lo + n] = 1.0 / (1.0 + np.exp(vals[2 * n: 3 * n] - vals[n: 2 * n]))  # type: ignore[index]
        return lp, yes

    def init(self, s: GenState) -> None:
        s.p.strategy.init(s)

    def step(self, s: GenState, g: int) -> None:
        s.p.strategy.step(self, s, g)
