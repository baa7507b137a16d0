"""Family H: chain of thought — a sampled reasoning text before the query, then the choice distribution.

Cells = bias b × (face, die only) × sample. The *needle* is family A's explicit bias statement
without filler: coin ``When I flip coins they land on heads {b}% of the time.``, die ``When I roll
dice they land on {face} {b}% of the time.``; ``no_needle: true`` adds cells with ``bias = -1``
meaning **no bias statement** (``N`` below is then empty and its following space dropped; for
the die these cells repeat per face, the face coordinate then being unused).

Prompt layout (``N`` = needle, ``T`` = task, ``C`` = cue, ``R`` = reasoning, ``Q`` = query)::

    base      generate from   "N T C"                  (T = "Question: I am going to toss a coin.
              score after     "N T C" + R + "\\n" + Q        Will it land on heads or tails?\\nAnswer:")
              baseline        "N T" + "\\n" + Q
    instruct  generate from   user "N T C", prefill "" (T = "Please toss a coin and tell me whether
              score after     user "N T C", prefill R + "\\n" + Q      it landed on heads or tails.")
              baseline        user "N T",   prefill Q              (= family A's instruct prompt)

with C = ``Let's think step by step.`` and Q = ``I tossed a coin and it landed on`` (die: ``I
rolled a die and it landed on``, choices `` 1``..`` 6``). The baseline is the same prompt with
the cue and the reasoning removed, scored for every cell.

Reasoning R: ``scorer.generate`` with seed ``cell_seed(seed, "cot", process, bias, face,
sample)``, ``temperature``, at most ``max_new_tokens``; the text is cut before the first blank
line (``stop``, default ``"\\n\\n"``), EOS or end of turn, then trailing whitespace is removed
(instruct: leading whitespace too, the template already ends the header line). ``cot_tokens`` =
``len(tok(R))`` without special tokens; ``stopped`` = a stop (not the cap) ended the sample.

Arrays per cell: ``logprobs`` (choice,) summed choice log-probs after the CoT prompt,
``logprobs_baseline`` (choice,) after the baseline prompt, ``p_stated`` (choice,) the stated
distribution (coin [b, 1−b]; die b on ``face``, (1−b)/5 elsewhere; NaN without needle),
``cot`` (the text R), ``cot_tokens``, ``stopped``.

**protocol: paper** (coin; the coin-flip study's ``cot_sample.py``, ``token_prob_experiments.py``
and ``configs/exps/contextual/coin_flip_cot_*.yaml``, ``coin_flip_in_context.yaml``). Needle N =
``When I flip coins they land on heads {b}% of the time.``, cue C = ``Let’s think about what this
means for my distribution of coin flips, `` (typographic apostrophe U+2019, trailing space); with the
chat template (instruct models) both take the study's second-person form of its stored instruct runs
(``exps/contextual/coin_flip/cot/*-Instruct``, ``cot_in_context_prompt/``): N = ``When you flip coins,
they land on heads {b}% of the time.``, C = ``Let’s think about what this means for your distribution
of coin flips, `` — in every variant. Q = ``I tossed a coin and it landed on `` and choices
`` heads``/`` tails``; ``W(x)`` = ``' '.join(x.split())``. ``reasoning``:

* ``sampled``: generate R from ``N + " " + C`` (base; instruct: user ``W(N + " " + I)``, prefill C,
  I = ``Please toss a coin and tell me whether it landed on head or tails.``), ``max_new_tokens``
  20, greedy (``temperature: 0``), no stop but EOS / end of turn; score after ``W(N + " " + C + R +
  " " + Q)`` (instruct: prefill ``W(C + R + " " + Q)``);
* ``hard_coded``: R is the fixed reasoning of bias b (``hard_coded``, one entry per bias, default
  bayesflip's own texts ``set:cot_hard_coded``; ``file:<path>`` runs the study's), scored after
  ``W(N + " " + C + R + " " + Q)`` (instruct: user ``W(N + " " + C + R + " " + I)``, prefill ``W(Q)`` —
  the layout of ``token_prob_experiments.py``'s contextless prompt, which wrote the stored runs with
  N + " " + C + R as the "bias needle"; their instruct prompt I is in no committed config); nothing
  is generated;
* ``few_shot``: scored after ``FEW_SHOT + "Premise: " + N + "\n" + Q`` with the two worked
  ``Premise: … Reasoning: …`` examples of ``coin_flip_in_context.yaml`` (instruct: user
  ``FEW_SHOT + "Premise: " + N + "\n" + I``, prefill ``W(Q)``); nothing is generated.

The baseline is ``W(N + " " + Q)`` (instruct: user ``W(N + " " + I)``, prefill ``W(Q)``). Paper
defaults (keys the config leaves out): ``max_new_tokens: 20``, ``temperature: 0``, ``stop: []``,
``no_needle: false`` for hard_coded / few_shot (they need a bias), ``samples: 1`` for those and for
greedy ``generation: explicit`` (10 otherwise).
"""

from __future__ import annotations

import itertools
from typing import Annotated, ClassVar, Literal, Mapping, Optional

import numpy as np
from pydantic import Field

from ..domain import PROCESS_TEXTS, coin_probs, die_probs
from ..engine import score_prompts
from ..errors import ConfigError
from ..generation import GenerationFields, provenance_array
from ..prompts import Prompt, encode_choices, encode_piece, normalize_ws, render
from ..stimuli import StimulusList, load_list
from . import paper, register
from .base import (ArraySpec, Family, Params, Protocol, RenderedCell, RunContext, cell_seed, template_problem,
                   use_chat)
from .gentext import sample_with
from .protocol import ProtocolStrategy

SPECS = {name: {"choices": list(t.choices), "needle": t.statement, "query": t.query,
                "task_instruct": t.instruction, "task_base": t.question}
         for name, t in PROCESS_TEXTS.items() if name in ("coin", "die")}
NO_NEEDLE = -1

PAPER_CUE = "Let\u2019s think about what this means for my distribution of coin flips, "
PAPER_CUE_INSTRUCT = "Let\u2019s think about what this means for your distribution of coin flips, "
PAPER_FEW_SHOT = ("Premise: I have a weighted coin that lands on head 30% of the time and lands on tail 70% of the "
                  "time.\nReasoning: When I toss this coin, I should expect to see tail more often and head less "
                  "often.\n\nPremise: I have a weighted coin that lands on head 80% of the time and lands on tail 20% "
                  "of the time.\nReasoning: When I toss this coin, I should expect to see head more often and tail "
                  "less often.\n\n")
# hard_coded variant: the text after the cue, for b = 0, 10, ..., 100 (bayesflip's own set; the study's
# texts from coin_flip_cot_sample_hard_coded.yaml are not shipped: point `hard_coded: file:<path>` at them)
DEFAULT_HARD_CODED = "set:cot_hard_coded"
CLEAN_CUE = "Let's think step by step."


def _join(*parts: str) -> str:
    return " ".join(x for x in parts if x)


class CoTProtocol(ProtocolStrategy):
    """What ``clean`` and ``paper`` CoT differ in: the texts (N, T, C, Q), the three prompts, the
    reasoning clean-up and whether anything is generated. ``chat``: the model gets the chat template."""

    def generates(self, p: "CoTParams") -> bool:
        raise NotImplementedError

    def cue(self, p: "CoTParams", chat: bool) -> str:
        raise NotImplementedError

    def needle_template(self, p: "CoTParams", chat: bool) -> str:
        raise NotImplementedError

    def task_text(self, p: "CoTParams", chat: bool) -> str:
        raise NotImplementedError

    def query(self, p: "CoTParams") -> str:
        raise NotImplementedError

    def gen_prompt(self, fam: "CoTFamily", p: "CoTParams", cell: dict, chat: bool) -> Prompt:
        raise NotImplementedError

    def cot_prompt(self, fam: "CoTFamily", p: "CoTParams", cell: dict, chat: bool, reasoning: str) -> Prompt:
        raise NotImplementedError

    def baseline_prompt(self, fam: "CoTFamily", p: "CoTParams", cell: dict, chat: bool) -> Prompt:
        raise NotImplementedError

    def clean_reasoning(self, text: str, chat: bool) -> str:
        raise NotImplementedError

    def validate(self, p: "CoTParams") -> None:
        """Protocol-specific checks of ``validate`` (raise ``ConfigError``)."""


class CleanCoT(CoTProtocol):
    """bayesflip's layout: ``N T C`` (base: T the question, instruct: the instruction), Q after R + newline."""

    name = "clean"

    def generates(self, p: "CoTParams") -> bool:
        return True

    def cue(self, p: "CoTParams", chat: bool) -> str:
        return CLEAN_CUE

    def needle_template(self, p: "CoTParams", chat: bool) -> str:
        return str(SPECS[p.process]["needle"])

    def task_text(self, p: "CoTParams", chat: bool) -> str:
        return str(SPECS[p.process]["task_instruct" if chat else "task_base"])

    def query(self, p: "CoTParams") -> str:
        return str(SPECS[p.process]["query"])

    def gen_prompt(self, fam: "CoTFamily", p: "CoTParams", cell: dict, chat: bool) -> Prompt:
        head = _join(fam.needle_text(p, cell), fam.task_text(p, chat), fam.cue(p))
        return Prompt(text="", messages=(("user", head),)) if chat else Prompt(text=head)

    def cot_prompt(self, fam: "CoTFamily", p: "CoTParams", cell: dict, chat: bool, reasoning: str) -> Prompt:
        g = self.gen_prompt(fam, p, cell, chat)
        return Prompt(text=g.text + reasoning + "\n" + fam.query_text(p), messages=g.messages)

    def baseline_prompt(self, fam: "CoTFamily", p: "CoTParams", cell: dict, chat: bool) -> Prompt:
        q = fam.query_text(p)
        head = _join(fam.needle_text(p, cell), fam.task_text(p, chat))
        return Prompt(text=q, messages=(("user", head),)) if chat else Prompt(text=head + "\n" + q)

    def clean_reasoning(self, text: str, chat: bool) -> str:
        return text.strip() if chat else text.rstrip()


class PaperCoT(CoTProtocol):
    """The coin-flip study's CoT scripts (module docstring): its needle / cue / query / instruct prompt
    (:data:`.paper.NEEDLE`), whitespace-normalised prompts, ``reasoning`` sampled / hard_coded / few_shot."""

    name = "paper"

    def defaults(self, data: dict) -> dict:
        fixed = data.get("reasoning", "sampled") != "sampled"
        greedy = not data.get("temperature") and data.get("generation", "explicit") == "explicit"
        return {"max_new_tokens": 20, "temperature": 0.0, "stop": [], "no_needle": not fixed,
                "samples": 1 if fixed or greedy else 10}

    def generates(self, p: "CoTParams") -> bool:
        return p.reasoning == "sampled"

    def cue(self, p: "CoTParams", chat: bool) -> str:
        """The study's "my" form, its "your" form with the chat template."""
        return PAPER_CUE_INSTRUCT if chat else PAPER_CUE

    def needle_template(self, p: "CoTParams", chat: bool) -> str:
        return paper.NEEDLE["coin"]["instruct_statement" if chat else "statement"]

    def task_text(self, p: "CoTParams", chat: bool) -> str:
        return paper.NEEDLE["coin"]["instruct_prompt"] if chat else ""

    def query(self, p: "CoTParams") -> str:
        return paper.NEEDLE["coin"]["query"]

    def gen_prompt(self, fam: "CoTFamily", p: "CoTParams", cell: dict, chat: bool) -> Prompt:
        n = normalize_ws(fam.needle_text(p, cell, chat))
        if chat:
            return Prompt(text=fam.cue(p, chat), messages=(("user", normalize_ws(f"{n} {fam.task_text(p, chat)}")),))
        return Prompt(text=f"{n} {fam.cue(p)}" if n else fam.cue(p))

    def cot_prompt(self, fam: "CoTFamily", p: "CoTParams", cell: dict, chat: bool, reasoning: str) -> Prompt:
        n, q, task, cue = fam.needle_text(p, cell, chat), fam.query_text(p), fam.task_text(p, chat), fam.cue(p, chat)
        if p.reasoning == "few_shot":
            ctx = f"{PAPER_FEW_SHOT}Premise: {n}\n"
            return (Prompt(text=normalize_ws(q), messages=(("user", ctx + task),)) if chat
                    else Prompt(text=ctx + q.rstrip(" ")))
        if p.reasoning == "hard_coded":
            ctx = f"{n} {cue}{fam.hard_coded_text(p, cell)}"
            return (Prompt(text=normalize_ws(q), messages=(("user", normalize_ws(f"{ctx} {task}")),)) if chat
                    else Prompt(text=normalize_ws(f"{ctx} {q}")))
        if chat:
            g = self.gen_prompt(fam, p, cell, chat)
            return Prompt(text=normalize_ws(f"{cue}{reasoning} {q}"), messages=g.messages)
        return Prompt(text=normalize_ws(f"{n} {cue}{reasoning} {q}"))

    def baseline_prompt(self, fam: "CoTFamily", p: "CoTParams", cell: dict, chat: bool) -> Prompt:
        q = fam.query_text(p)
        n = fam.needle_text(p, cell, chat)
        if chat:
            return Prompt(text=normalize_ws(q), messages=(("user", normalize_ws(f"{n} {fam.task_text(p, chat)}")),))
        return Prompt(text=normalize_ws(f"{n} {q}"))

    def clean_reasoning(self, text: str, chat: bool) -> str:
        return text  # the decoded continuation as is; the scored prompt is whitespace-normalised

    def validate(self, p: "CoTParams") -> None:
        if p.process != "coin":
            raise ConfigError("params.process", "the paper's chain-of-thought runs were coin only", allowed=["coin"])
        if p.reasoning != "sampled" and p.no_needle:
            raise ConfigError("params.no_needle", f"reasoning {p.reasoning!r} needs a bias statement",
                              allowed=[False])
        if p.reasoning == "hard_coded" and len(p.hard_coded) != len(p.biases) and not (
                len(p.hard_coded) == 11 and all(b % 10 == 0 for b in p.biases)):
            raise ConfigError("params.hard_coded", f"{len(p.hard_coded)} texts for {len(p.biases)} biases",
                              allowed=["one text per entry of params.biases, in order",
                                       "11 texts for b = 0, 10, ..., 100 (biases among them)"])


PROTOCOLS: dict[str, CoTProtocol] = {"clean": CleanCoT(), "paper": PaperCoT()}


class CoTParams(Params, GenerationFields):
    protocol: Protocol = "clean"
    reasoning: Literal["sampled", "hard_coded", "few_shot"] = "sampled"
    hard_coded: StimulusList = Field(default_factory=lambda: load_list(DEFAULT_HARD_CODED))
    process: Literal["coin", "die"] = "coin"
    biases: list[Annotated[int, Field(ge=0, le=100)]] = Field(
        default_factory=lambda: list(range(0, 101, 10)), min_length=1)
    no_needle: bool = True
    faces: list[Annotated[int, Field(ge=1, le=6)]] = Field(default_factory=lambda: [1, 6], min_length=1)
    samples: int = Field(10, ge=1)
    max_new_tokens: int = Field(96, ge=1, le=4096)
    cue: Optional[str] = None
    stop: list[str] = Field(default_factory=lambda: ["\n\n"])
    variant: Literal["auto", "base", "instruct"] = "auto"
    needle: Optional[str] = None
    task: Optional[str] = None
    query: Optional[str] = None

    PROTOCOLS: ClassVar[Mapping[str, ProtocolStrategy]] = PROTOCOLS


@register
class CoTFamily(Family):
    name = "cot"
    Params = CoTParams

    # ------------------------------------------------------------------ layout
    @staticmethod
    def spec(p: CoTParams) -> dict:
        return SPECS[p.process]

    @staticmethod
    def chat(p: CoTParams, model_kind: str) -> bool:
        return use_chat(p.variant, model_kind)

    @staticmethod
    def cue(p: CoTParams, chat: bool = False) -> str:
        """The CoT cue (``p.cue``, else the protocol's; paper: the study's "my" / chat "your" form)."""
        return p.cue if p.cue is not None else p.strategy.cue(p, chat)

    @staticmethod
    def generates(p: CoTParams) -> bool:
        return p.strategy.generates(p)

    def cells(self, p: CoTParams) -> list[dict]:
        biases = ([NO_NEEDLE] if p.no_needle else []) + list(p.biases)
        faces = p.faces if p.process == "die" else [None]
        out = []
        for b, f, s in itertools.product(biases, faces, range(p.samples)):
            c = {"bias": b, "sample": s}
            if f is not None:
                c["face"] = f
            out.append(c)
        return out

    def needle_text(self, p: CoTParams, cell: dict, chat: bool = False) -> str:
        if cell["bias"] == NO_NEEDLE:
            return ""
        tpl = p.needle if p.needle is not None else p.strategy.needle_template(p, chat)
        return tpl.format(b=cell["bias"], face=cell.get("face", ""))

    def task_text(self, p: CoTParams, chat: bool) -> str:
        return p.task or p.strategy.task_text(p, chat)

    def query_text(self, p: CoTParams) -> str:
        return p.query or p.strategy.query(p)

    def hard_coded_text(self, p: CoTParams, cell: dict) -> str:
        if len(p.hard_coded) == len(p.biases):  # one text per listed bias, in order
            return p.hard_coded[list(p.biases).index(cell["bias"])]
        return p.hard_coded[cell["bias"] // 10]  # the 0, 10, ..., 100 set

    def gen_prompt(self, p: CoTParams, cell: dict, model_kind: str) -> Prompt:
        return p.strategy.gen_prompt(self, p, cell, self.chat(p, model_kind))

    def cot_prompt(self, p: CoTParams, cell: dict, model_kind: str, reasoning: str) -> Prompt:
        """The scored prompt after the reasoning (paper: per ``p.reasoning``; ``reasoning`` is R when sampled)."""
        return p.strategy.cot_prompt(self, p, cell, self.chat(p, model_kind), reasoning)

    def baseline_prompt(self, p: CoTParams, cell: dict, model_kind: str) -> Prompt:
        return p.strategy.baseline_prompt(self, p, cell, self.chat(p, model_kind))

    def clean_reasoning(self, p: CoTParams, text: str, chat: bool) -> str:
        return p.strategy.clean_reasoning(text, chat)

    def p_stated(self, p: CoTParams, cell: dict) -> np.ndarray:
        """The stated distribution: coin (b, 1 − b); die b on ``face``, (1 − b)/5 elsewhere; NaN without needle."""
        k = len(self.spec(p)["choices"])
        if cell["bias"] == NO_NEEDLE:
            return np.full(k, np.nan)
        b = cell["bias"] / 100.0
        return coin_probs(b) if p.process == "coin" else die_probs(cell["face"], b)

    # ------------------------------------------------------------------ plug-in
    def arrays(self, p: CoTParams) -> dict[str, ArraySpec]:
        k = len(self.spec(p)["choices"])
        return {"logprobs": ArraySpec(("choice",), (k,), "float64", finite="all"),
                "logprobs_baseline": ArraySpec(("choice",), (k,), "float64", finite="all"),
                "p_stated": ArraySpec(("choice",), (k,), "float64"),
                "cot": ArraySpec((), (), "str"),
                "cot_tokens": ArraySpec((), (), "int32"),
                "stopped": ArraySpec((), (), "bool"),
                **({"generation_config": ArraySpec((), (), "str")} if p.generation == "model_defaults" else {})}

    def coords(self, p: CoTParams) -> dict[str, list]:
        return {"choice": self.spec(p)["choices"]}

    def validate(self, p: CoTParams, tokenizer, model_kind: str) -> None:
        if self.chat(p, model_kind) and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("params.variant", "instruct variant needs a tokenizer with a chat template",
                              allowed=["auto", "base"])
        p.strategy.validate(p)
        if p.needle is not None:
            if problem := template_problem(p.needle, {"b": 50, "face": 1}):
                raise ConfigError("params.needle", problem, allowed=["{b}", "{face}"])
        choices = self.spec(p)["choices"]
        cell = self.cells(p)[-1]
        encode_choices(tokenizer, choices, context_text=render(self.cot_prompt(p, cell, model_kind, " x."), tokenizer))
        encode_choices(tokenizer, choices, context_text=render(self.baseline_prompt(p, cell, model_kind), tokenizer))

    def render(self, p: CoTParams, cells: list[dict], tokenizer, model_kind: str, seed: int) -> list[RenderedCell]:
        """Per cell: the generation prompt (sampled reasoning), then the prompts scored (``stage`` cot / baseline;
        the cot prompt of sampled reasoning shows ``{reasoning}`` where R goes)."""
        gen = {**p.generation_settings(None).describe(), "generation": p.generation, "stop": list(p.stop)}
        choices = list(self.spec(p)["choices"])
        out = []
        for c in cells:
            if self.generates(p):
                out.append(RenderedCell(cell={**c, "stage": "generate"},
                                        text=render(self.gen_prompt(p, c, model_kind), tokenizer), generation=gen))
            out.append(RenderedCell(cell={**c, "stage": "cot"}, choices=choices,
                                    text=render(self.cot_prompt(p, c, model_kind, "{reasoning}"), tokenizer)))
            out.append(RenderedCell(cell={**c, "stage": "baseline"}, choices=choices,
                                    text=render(self.baseline_prompt(p, c, model_kind), tokenizer)))
        return out

    def run(self, p: CoTParams, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        tok = ctx.tokenizer
        chat = self.chat(p, ctx.model_kind)
        choices = self.spec(p)["choices"]
        if self.generates(p):
            settings = p.generation_settings(ctx.scorer)
            seeds = [cell_seed(ctx.seed, "cot", p.process, c["bias"], c.get("face"), c["sample"]) for c in cells]
            gens = sample_with(ctx.scorer, [self.gen_prompt(p, c, ctx.model_kind) for c in cells], seeds, settings,
                               extra_stops=p.stop)
            reasons = [self.clean_reasoning(p, g.text, chat) for g in gens]
            stopped = [g.stopped for g in gens]
        else:
            reasons = [self.hard_coded_text(p, c) if p.reasoning == "hard_coded" else "" for c in cells]
            stopped = [True] * len(cells)
        cot = score_prompts(ctx.scorer, [self.cot_prompt(p, c, ctx.model_kind, r) for c, r in zip(cells, reasons)],
                            choices)
        base_prompts = [self.baseline_prompt(p, c, ctx.model_kind) for c in cells]
        uniq = list(dict.fromkeys(base_prompts))  # the baseline does not depend on the sample
        base = dict(zip(uniq, score_prompts(ctx.scorer, uniq, choices)))
        return {"logprobs": np.stack([r.logprobs for r in cot]),
                "logprobs_baseline": np.stack([base[bp].logprobs for bp in base_prompts]),
                "p_stated": np.stack([self.p_stated(p, c) for c in cells]),
                "cot": np.asarray(reasons, dtype=str),
                "cot_tokens": np.asarray([len(encode_piece(tok, r)) if r else 0 for r in reasons], dtype=np.int32),
                "stopped": np.asarray(stopped, dtype=bool),
                **({"generation_config": provenance_array(p, p.generation_settings(ctx.scorer), len(cells))}
                   if p.generation == "model_defaults" else {})}
