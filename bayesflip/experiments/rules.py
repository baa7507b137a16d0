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
import json
from functools import lru_cache
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, field_validator

from ..bayes import entropy as _entropy
from ..engine import ChoiceRequest
from ..generation import SamplingFields
from ..errors import ConfigError
from ..prompts import Prompt, check_boundary, encode_choices, encode_piece, render
from . import register
from . import rules_paper as RP
from .base import ArraySpec, Params, Protocol, RenderedCell, RunContext, cell_seed, use_chat
from .generational import GenerationalFamily, GenState

OBJECTS = ("A", "B", "C", "D", "E")
VALUES = ("on", "off", "und")
ON, OFF, UND = 0, 1, 2

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


# ---------------------------------------------------------------------------- the world
@lru_cache(maxsize=1)
def hypotheses() -> tuple[tuple[str, ...], ...]:
    """All 243 rules, ``itertools.product(VALUES, repeat=5)`` order (A slowest)."""
    return tuple(itertools.product(VALUES, repeat=len(OBJECTS)))


@lru_cache(maxsize=4)
def subsets(objects: tuple[str, ...] = OBJECTS) -> tuple[tuple[str, ...], ...]:
    """The 31 non-empty subsets of the objects, by size then in object order (A..E: lexicographic)."""
    return tuple(s for r in range(1, len(objects) + 1) for s in itertools.combinations(objects, r))


def rule_output(rule: dict | tuple, subset, objects: tuple[str, ...] = OBJECTS) -> str:
    """on if any object of the subset is on, else und if any is und, else off."""
    vals = [rule[o] if isinstance(rule, dict) else rule[objects.index(o)] for o in subset]
    if "on" in vals:
        return "on"
    if "und" in vals:
        return "und"
    return "off"


def rule_text(h: tuple[str, ...]) -> str:
    """Canonical JSON of a rule: ``{"A": "on", "B": "off", ...}`` (keys A..E, json.dumps defaults)."""
    return json.dumps(dict(zip(OBJECTS, h)))


@lru_cache(maxsize=1)
def output_table() -> np.ndarray:
    """(243, 31) value index (0 on, 1 off, 2 und) of every rule on every subset."""
    return np.array([[VALUES.index(rule_output(h, s)) for s in subsets()] for h in hypotheses()], dtype=np.int64)


def parse_subset(text: str, objects: tuple[str, ...] = OBJECTS) -> int:
    """``"A, C"`` → index into :func:`subsets`."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    objs = tuple(sorted(names, key=lambda o: objects.index(o) if o in objects else -1))
    if objs not in subsets(objects):
        raise ValueError(f"{text!r} is not a non-empty set of distinct objects from {', '.join(objects)}")
    return subsets(objects).index(objs)


def render_examples(inputs, outputs) -> str:
    return "\n".join(f"Input: {', '.join(subsets()[int(i)])}\nOutput: {VALUES[int(o)]}" for i, o in zip(inputs, outputs))


def accuracy(d_inputs, d_outputs) -> np.ndarray:
    """(243,) fraction of the examples (d_inputs, d_outputs) each rule reproduces."""
    tab = output_table()
    return (tab[:, np.asarray(d_inputs)] == np.asarray(d_outputs)[None, :]).mean(axis=1)


def next_examples(h: int, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``m`` inputs drawn without replacement uniformly from the 31 subsets, labelled by rule ``h``."""
    ins = rng.choice(len(subsets()), size=m, replace=False)
    return ins, output_table()[h, ins]


def _typical_inputs(m: int, objects: tuple[str, ...]) -> np.ndarray:
    """``m`` distinct subset indices spread evenly over the 31 subsets (ordered by size): data of the
    typical length for the cost estimate (``count_tokens``), where the run draws or the model writes them."""
    n = len(subsets(objects))
    return np.array(sorted({min(n - 1, int((k + 0.5) * n / m)) for k in range(m)}), dtype=np.int64)


def consistent_pair(h_star: int, screen: int) -> np.ndarray:
    """Subset indices on which h* and h̄ (h* with the screen off) give the same output."""
    h = hypotheses()[h_star]
    bar = hypotheses().index(tuple("off" if k == screen else v for k, v in enumerate(h)))
    tab = output_table()
    return np.flatnonzero(tab[h_star] == tab[bar])


def tempered_pick(w: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """One draw from ``w^(1/T)`` renormalised (T = 0: the first argmax, no uniform used)."""
    w = np.asarray(w, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(w))
    with np.errstate(divide="ignore"):
        z = np.log(w) / temperature
    z = np.exp(z - z.max())
    cdf = np.cumsum(z / z.sum())
    cdf[-1] = 1.0
    return int(min(int(np.searchsorted(cdf, rng.random(), side="right")), len(w) - 1))


def metrics(P: np.ndarray, acc0: np.ndarray, screen: int) -> dict[str, float]:
    """entropy, p_screen_off, acc_d0, both of a distribution over the 243 rules."""
    off = np.array([h[screen] == "off" for h in hypotheses()])
    cons = acc0 == 1.0
    return {"entropy": float(_entropy(P)), "p_screen_off": float(P[off].sum()), "acc_d0": float(P @ acc0),
            "both": float(P[cons & off].sum())}


# ---------------------------------------------------------------------------- params
Interaction = Literal["none", "self_check", "refine", "self", "hypothesis"]
PAPER_INTERACTIONS = ("self", "hypothesis")            # model turns of the original (paper protocol only)


class RulesParams(Params, SamplingFields):
    protocol: Protocol = "clean"
    biases: list[str] = Field(default_factory=lambda: ["strong", "medium", "weak", "none"], min_length=1)
    bias_sentences: dict[str, str] = Field(default_factory=lambda: dict(BIAS_SENTENCES))
    interactions: list[Interaction] = Field(default_factory=lambda: ["none"], min_length=1)  # type: ignore[arg-type]  # mypy types a lambda in Field's union context as list[str]
    screen: Literal["A", "B", "C", "D", "E"] = "A"
    true_rule: dict[str, Literal["on", "off", "und"]] = Field(
        default_factory=lambda: {"A": "off", "B": "on", "C": "off", "D": "und", "E": "off"})  # type: ignore[arg-type]  # mypy types a lambda in Field's union context as list[str]
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
    positions: list[Literal["start", "end", "both"]] = Field(default_factory=lambda: ["start"], min_length=1)  # type: ignore[arg-type]  # mypy types a lambda in Field's union context as list[str]
    h_indices: list[Annotated[int, Field(ge=0, le=161)]] = Field(default_factory=lambda: [0, 33], min_length=1)
    d0_size: int = Field(4, ge=1, le=30)
    d0_seeds: list[int] = Field(default_factory=lambda: [10086, 14843, 42, 1314, 916, 1024], min_length=1)
    temperatures: list[Annotated[float, Field(ge=0.0)]] = Field(default_factory=lambda: [1.0, 0.5, 0.1],
                                                                   min_length=1)
    look_back: int = Field(2, ge=0)
    max_new_tokens: int = Field(160, ge=8)
    max_redraws: int = Field(3, ge=0)

    @field_validator("true_rule")
    @classmethod
    def _all_objects(cls, v: dict) -> dict:
        if sorted(v) != list(OBJECTS):
            raise ValueError(f"true_rule must give a value for exactly the objects {list(OBJECTS)}, got {sorted(v)}")
        return v


def _init_data(p: RulesParams) -> tuple[np.ndarray, np.ndarray]:
    ins = np.array([parse_subset(s) for s in p.init_inputs], dtype=np.int64)
    outs = np.array([VALUES.index(rule_output(p.true_rule, subsets()[i])) for i in ins], dtype=np.int64)
    return ins, outs


def feasible_rules() -> list[int]:
    """The original's ``hcomp_df``: indices (into the 243) of the rules whose last object (screen) is not off."""
    return [k for k, h in enumerate(hypotheses()) if h[-1] != "off"]


def paper_d0(p: RulesParams, cell: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """d⁰ of a paper cell: ``d0_size`` inputs where h* and h̄ agree, by (experiment seed, h_index, d0 seed)."""
    h = feasible_rules()[cell["h_index"]]
    rng = np.random.default_rng(cell_seed(seed, "rules-d0", cell["h_index"], cell["d0_seed"]))
    ins = RP.sample_d0(consistent_pair(h, len(OBJECTS) - 1), p.d0_size, rng)
    return ins.astype(np.int64), output_table()[h, ins]


# ---------------------------------------------------------------------------- family
@register
class RulesFamily(GenerationalFamily):
    name = "rules"
    Params = RulesParams

    def cells(self, p: RulesParams) -> list[dict]:
        if p.protocol == "clean":
            return [{"bias": b, "interaction": it, "sample": s}
                    for b, it, s in itertools.product(p.biases, p.interactions, range(p.chains))]
        conds = [(b, pos) for b in p.biases for pos in (["none"] if b == "none" else p.positions)]
        return [{"bias": b, "position": pos, "interaction": it, "h_index": h, "temperature": float(t),
                 "d0_seed": d, "sample": s}
                for (b, pos), it, h, t, d, s in itertools.product(conds, p.interactions, p.h_indices, p.temperatures,
                                                                   p.d0_seeds, range(p.chains))]

    def _m(self, p: RulesParams) -> int:
        return max(p.examples, p.d0_size if p.protocol == "paper" else len(p.init_inputs))

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
        if p.protocol == "paper":
            out.update({"probs_refined": ArraySpec(("generation", "hypothesis"), (g, H), "float64"),
                        "rule_passed": ArraySpec(("generation",), (g,), "int32"),
                        "refined": ArraySpec(("generation",), (g,), "bool"),
                        "n_examples": ArraySpec(("generation",), (g,), "int32"),
                        "n_invalid": ArraySpec(("generation",), (g,), "int32"),
                        "redraws": ArraySpec(("generation",), (g,), "int32"),
                        "n_consistent": ArraySpec(("generation",), (g,), "int32"),
                        "carried": ArraySpec(("generation",), (g,), "bool"),
                        "reply": ArraySpec(("generation",), (g,), "str")})
        return out

    def objects(self, p: RulesParams) -> tuple[str, ...]:
        return RP.OBJECTS if p.protocol == "paper" else OBJECTS

    def rule_texts(self, p: RulesParams) -> list[str]:
        """The 243 teacher-forced continuations of the prefill ``Rule:``."""
        if p.protocol == "paper":
            return [" " + RP.rule_json(h) for h in hypotheses()]
        return [" " + rule_text(h) for h in hypotheses()]

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
        if p.protocol == "clean":
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
        else:
            for h in p.h_indices:
                n = len(consistent_pair(feasible_rules()[h], len(OBJECTS) - 1))
                if n < p.d0_size:
                    raise ConfigError("params.d0_size", f"h_index {h} has only {n} inputs on which h* and h-bar "
                                      f"agree", allowed=[f"[1, {n}]"])
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
        from .rules_run import paper_rule_prompt

        out = []
        for c in cells:
            if p.protocol == "paper":
                ins, outs = paper_d0(p, c, seed)
                pr = paper_rule_prompt(p, c, [], ins, outs, model_kind)
            else:
                ins, outs = _init_data(p)
                pr = self.prompt(p, c["bias"], ins, outs, model_kind)
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
        from ..cost import TokenCount, branch_tokens
        from ..prompts import encode_prompt

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
            if p.protocol == "paper":
                key = tuple((k, c[k]) for k in ("bias", "position", "interaction", "h_index", "d0_seed"))
                if key not in cache:
                    cache[key] = self._paper_count(p, c, tokenizer, model_kind, seed, read)
                out = out + cache[key]
                continue
            key = (c["bias"], c["interaction"])
            if key not in cache:
                ins0, outs0 = _init_data(p)
                n0 = len(encode_prompt(tokenizer, self.prompt(p, c["bias"], ins0, outs0, model_kind)))
                t = TokenCount(prompt=read(n0, c["interaction"] == "self_check"))
                if p.generations:
                    ins = _typical_inputs(p.examples, OBJECTS)
                    outs = output_table()[hypotheses().index(tuple(p.true_rule[o] for o in OBJECTS)), ins]
                    n = len(encode_prompt(tokenizer, self.prompt(p, c["bias"], ins, outs, model_kind)))
                    t = t + TokenCount(prompt=read(n, c["interaction"] == "self_check")).scaled(p.generations)
                cache[key] = t
            out = out + cache[key]
        return out

    def _paper_count(self, p: RulesParams, c: dict, tokenizer, model_kind: str, seed: int, read):
        """One paper cell's tokens (see :meth:`count_tokens`): the run's own prompt builders
        (:func:`.rules_run.rounds`, :func:`.rules_run.paper_rule_prompt`) over arrays filled with the
        stated assumptions."""
        from ..cost import TokenCount
        from ..prompts import encode_prompt
        from .rules_run import _fmt, conversation, paper_rule_prompt, rounds

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
        p = s.p
        for i, c in enumerate(s.cells):
            ins, outs = paper_d0(p, c, s.ctx.seed) if p.protocol == "paper" else _init_data(p)
            s.arr["inputs"][i, 0, : len(ins)] = ins
            s.arr["outputs"][i, 0, : len(outs)] = outs
            if p.protocol == "paper":
                s.arr["n_examples"][i, 0] = len(ins)

    def step(self, s: GenState, g: int) -> None:
        from .rules_run import clean_step, paper_step

        (paper_step if s.p.protocol == "paper" else clean_step)(self, s, g)
