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
Checkpointed after every generation like :mod:`.chains`.
"""

from __future__ import annotations

import itertools
import json
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from ..bayes import entropy as _entropy
from ..engine import ChoiceRequest
from ..errors import ConfigError
from ..prompts import Prompt, check_boundary, encode_choices, encode_piece, encode_prompt, render
from . import register
from .base import ArraySpec, Family, Params, RunContext, cell_seed, use_chat
from .checkpoint import start_or_resume, maybe_interrupt

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


@lru_cache(maxsize=1)
def subsets() -> tuple[tuple[str, ...], ...]:
    """The 31 non-empty subsets of A..E, by size then lexicographically."""
    return tuple(s for r in range(1, len(OBJECTS) + 1) for s in itertools.combinations(OBJECTS, r))


def rule_output(rule: dict | tuple, subset) -> str:
    """on if any object of the subset is on, else und if any is und, else off."""
    vals = [rule[o] if isinstance(rule, dict) else rule[OBJECTS.index(o)] for o in subset]
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


def parse_subset(text: str) -> int:
    """``"A, C"`` → index into :func:`subsets`."""
    objs = tuple(sorted(x.strip() for x in text.split(",") if x.strip()))
    if objs not in subsets():
        raise ValueError(f"{text!r} is not a non-empty set of distinct objects from {', '.join(OBJECTS)}")
    return subsets().index(objs)


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


def metrics(P: np.ndarray, acc0: np.ndarray, screen: int) -> dict[str, float]:
    """entropy, p_screen_off, acc_d0, both of a distribution over the 243 rules."""
    off = np.array([h[screen] == "off" for h in hypotheses()])
    cons = acc0 == 1.0
    return {"entropy": float(_entropy(P)), "p_screen_off": float(P[off].sum()), "acc_d0": float(P @ acc0),
            "both": float(P[cons & off].sum())}


# ---------------------------------------------------------------------------- params
class RulesParams(Params):
    biases: list[str] = Field(default_factory=lambda: ["strong", "medium", "weak", "none"], min_length=1)
    bias_sentences: dict[str, str] = Field(default_factory=lambda: dict(BIAS_SENTENCES))
    interactions: list[Literal["none", "self_check", "refine"]] = Field(default_factory=lambda: ["none"],
                                                                         min_length=1)
    screen: Literal["A", "B", "C", "D", "E"] = "A"
    true_rule: dict[str, Literal["on", "off", "und"]] = Field(
        default_factory=lambda: {"A": "off", "B": "on", "C": "off", "D": "und", "E": "off"})
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


@register
class RulesFamily(Family):
    name = "rules"
    Params = RulesParams

    def cells(self, p: RulesParams) -> list[dict]:
        return [{"bias": b, "interaction": it, "sample": s}
                for b, it, s in itertools.product(p.biases, p.interactions, range(p.chains))]

    def arrays(self, p: RulesParams) -> dict[str, ArraySpec]:
        g, H = p.generations + 1, len(hypotheses())
        m = max(p.examples, len(p.init_inputs))
        out = {"probs": ArraySpec(("generation", "hypothesis"), (g, H), "float64"),
               "check_yes": ArraySpec(("generation", "hypothesis"), (g, H), "float32"),
               "on_mass": ArraySpec(("generation",), (g,), "float64"),
               "rule": ArraySpec(("generation",), (g,), "int32"),
               "inputs": ArraySpec(("generation", "example"), (g, m), "int32"),
               "outputs": ArraySpec(("generation", "example"), (g, m), "int32")}
        for pre in ("", "eff_"):
            for k in ("entropy", "p_screen_off", "acc_d0", "both"):
                out[pre + k] = ArraySpec(("generation",), (g,), "float64")
        return out

    def coords(self, p: RulesParams) -> dict[str, list]:
        return {"hypothesis": [rule_text(h) for h in hypotheses()], "generation": list(range(p.generations + 1)),
                "example": list(range(max(p.examples, len(p.init_inputs))))}

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
        for s in p.init_inputs:
            try:
                parse_subset(s)
            except ValueError as e:
                raise ConfigError("params.init_inputs", str(e), allowed=["'A'", "'A, C'", "... (subsets of A-E)"]) \
                    from None
        ins, outs = _init_data(p)
        texts = [" " + rule_text(h) for h in hypotheses()]
        ctx_text = render(self.prompt(p, p.biases[0], ins, outs, model_kind), tokenizer)
        encode_choices(tokenizer, texts, context_text=ctx_text)  # boundary after the prefill, prefix-free
        if "self_check" in p.interactions:
            for t in texts[:1] + texts[-1:]:
                check_boundary(tokenizer, t, p.check_question)
                for a in p.check_answers:
                    check_boundary(tokenizer, t + p.check_question, a)
            a_ids = [encode_piece(tokenizer, a) for a in p.check_answers]
            if any(len(a) != 1 for a in a_ids) or a_ids[0] == a_ids[1]:
                raise ConfigError("params.check_answers", f"{p.check_answers} must be two distinct single tokens")

    # ------------------------------------------------------------------ run
    def read_beliefs(self, p: RulesParams, ctx: RunContext, context: list[int], self_check: bool
                     ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw summed log-prob l_h of every rule after ``context`` and (self_check) y(h)."""
        tok = ctx.tokenizer
        rules = [encode_piece(tok, " " + rule_text(h)) for h in hypotheses()]
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

    def run(self, p: RulesParams, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        G, C, H = p.generations, len(cells), len(hypotheses())
        screen = OBJECTS.index(p.screen)
        ins0, outs0 = _init_data(p)
        acc0 = accuracy(ins0, outs0)
        consistent0 = (acc0 == 1.0).astype(float)
        rngs = [np.random.default_rng(cell_seed(ctx.seed, "rules", sorted(c.items()))) for c in cells]
        arr, ck, start = start_or_resume(self, p, cells, ctx, rngs)
        if start is None:
            arr["inputs"][:, 0, : len(ins0)] = ins0
            arr["outputs"][:, 0, : len(outs0)] = outs0
            start = 0
        for g in range(start, G + 1):
            for i, c in enumerate(cells):
                m = p.examples if g > 0 else len(ins0)
                ins, outs = arr["inputs"][i, g, :m], arr["outputs"][i, g, :m]
                context = encode_prompt(ctx.tokenizer, self.prompt(p, c["bias"], ins, outs, ctx.model_kind))
                lp, yes = self.read_beliefs(p, ctx, context, c["interaction"] == "self_check")
                on_mass = float(np.exp(lp).sum())
                P = np.exp(lp - lp.max())
                P /= P.sum()
                if c["interaction"] == "self_check":
                    w = P * yes
                    arr["check_yes"][i, g] = yes
                elif c["interaction"] == "refine":
                    w = P * consistent0
                else:
                    w = P
                eff = w / w.sum()
                arr["probs"][i, g] = P
                arr["on_mass"][i, g] = on_mass
                for pre, dist in (("", P), ("eff_", eff)):
                    for k, v in metrics(dist, acc0, screen).items():
                        arr[pre + k][i, g] = v
                cdf = np.cumsum(eff)
                cdf[-1] = 1.0
                h = int(min(np.searchsorted(cdf, rngs[i].random(), side="right"), H - 1))
                arr["rule"][i, g] = h
                if g < G:
                    new_in, new_out = next_examples(h, p.examples, rngs[i])
                    arr["inputs"][i, g + 1, : p.examples] = new_in
                    arr["outputs"][i, g + 1, : p.examples] = new_out
            ck.save(arr, g + 1, rngs)
            maybe_interrupt(g)
        return arr
