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
"""

from __future__ import annotations

import itertools
from typing import Annotated, Literal, Optional

import numpy as np
from pydantic import Field

from ..engine import score_prompts
from ..errors import ConfigError
from ..prompts import Prompt, encode_choices, encode_piece, render
from . import register
from .base import ArraySpec, Family, Params, RunContext, cell_seed, use_chat
from .gentext import sample_texts

SPECS = {
    "coin": {"choices": [" heads", " tails"],
             "needle": "When I flip coins they land on heads {b}% of the time.",
             "query": "I tossed a coin and it landed on",
             "task_instruct": "Please toss a coin and tell me whether it landed on heads or tails.",
             "task_base": "Question: I am going to toss a coin. Will it land on heads or tails?\nAnswer:"},
    "die": {"choices": [f" {i}" for i in range(1, 7)],
            "needle": "When I roll dice they land on {face} {b}% of the time.",
            "query": "I rolled a die and it landed on",
            "task_instruct": "Please roll a die and tell me which number it landed on.",
            "task_base": "Question: I am going to roll a die. Which number will it land on?\nAnswer:"},
}
NO_NEEDLE = -1


class CoTParams(Params):
    process: Literal["coin", "die"] = "coin"
    biases: list[Annotated[int, Field(ge=0, le=100)]] = Field(
        default_factory=lambda: list(range(0, 101, 10)), min_length=1)
    no_needle: bool = True
    faces: list[Annotated[int, Field(ge=1, le=6)]] = Field(default_factory=lambda: [1, 6], min_length=1)
    samples: int = Field(10, ge=1)
    max_new_tokens: int = Field(96, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0)
    cue: str = "Let's think step by step."
    stop: list[str] = Field(default_factory=lambda: ["\n\n"])
    variant: Literal["auto", "base", "instruct"] = "auto"
    needle: Optional[str] = None
    task: Optional[str] = None
    query: Optional[str] = None


def _join(*parts: str) -> str:
    return " ".join(x for x in parts if x)


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

    def needle_text(self, p: CoTParams, cell: dict) -> str:
        if cell["bias"] == NO_NEEDLE:
            return ""
        return (p.needle or self.spec(p)["needle"]).format(b=cell["bias"], face=cell.get("face", ""))

    def task_text(self, p: CoTParams, chat: bool) -> str:
        return p.task or self.spec(p)["task_instruct" if chat else "task_base"]

    def gen_prompt(self, p: CoTParams, cell: dict, model_kind: str) -> Prompt:
        chat = self.chat(p, model_kind)
        head = _join(self.needle_text(p, cell), self.task_text(p, chat), p.cue)
        return Prompt(text="", messages=(("user", head),)) if chat else Prompt(text=head)

    def cot_prompt(self, p: CoTParams, cell: dict, model_kind: str, reasoning: str) -> Prompt:
        g = self.gen_prompt(p, cell, model_kind)
        q = p.query or self.spec(p)["query"]
        return Prompt(text=g.text + reasoning + "\n" + q, messages=g.messages)

    def baseline_prompt(self, p: CoTParams, cell: dict, model_kind: str) -> Prompt:
        chat = self.chat(p, model_kind)
        head = _join(self.needle_text(p, cell), self.task_text(p, chat))
        q = p.query or self.spec(p)["query"]
        return Prompt(text=q, messages=(("user", head),)) if chat else Prompt(text=head + "\n" + q)

    def clean_reasoning(self, text: str, chat: bool) -> str:
        return text.strip() if chat else text.rstrip()

    def p_stated(self, p: CoTParams, cell: dict) -> np.ndarray:
        k = len(self.spec(p)["choices"])
        if cell["bias"] == NO_NEEDLE:
            return np.full(k, np.nan)
        b = cell["bias"] / 100.0
        if p.process == "coin":
            return np.array([b, 1.0 - b])
        q = np.full(6, (1.0 - b) / 5.0)
        q[cell["face"] - 1] = b
        return q

    # ------------------------------------------------------------------ plug-in
    def arrays(self, p: CoTParams) -> dict[str, ArraySpec]:
        k = len(self.spec(p)["choices"])
        return {"logprobs": ArraySpec(("choice",), (k,), "float64"),
                "logprobs_baseline": ArraySpec(("choice",), (k,), "float64"),
                "p_stated": ArraySpec(("choice",), (k,), "float64"),
                "cot": ArraySpec((), (), "str"),
                "cot_tokens": ArraySpec((), (), "int32"),
                "stopped": ArraySpec((), (), "bool")}

    def coords(self, p: CoTParams) -> dict[str, list]:
        return {"choice": self.spec(p)["choices"]}

    def validate(self, p: CoTParams, tokenizer, model_kind: str) -> None:
        if self.chat(p, model_kind) and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("params.variant", "instruct variant needs a tokenizer with a chat template",
                              allowed=["auto", "base"])
        if p.needle is not None:
            try:
                p.needle.format(b=50, face=1)
            except (KeyError, IndexError) as e:
                raise ConfigError("params.needle", f"unknown placeholder {e}", allowed=["{b}", "{face}"]) from None
        choices = self.spec(p)["choices"]
        cell = self.cells(p)[-1]
        encode_choices(tokenizer, choices, context_text=render(self.cot_prompt(p, cell, model_kind, " x."), tokenizer))
        encode_choices(tokenizer, choices, context_text=render(self.baseline_prompt(p, cell, model_kind), tokenizer))

    def run(self, p: CoTParams, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        tok = ctx.tokenizer
        chat = self.chat(p, ctx.model_kind)
        choices = self.spec(p)["choices"]
        seeds = [cell_seed(ctx.seed, "cot", p.process, c["bias"], c.get("face"), c["sample"]) for c in cells]
        gens = sample_texts(ctx.scorer, [self.gen_prompt(p, c, ctx.model_kind) for c in cells], seeds,
                            p.max_new_tokens, p.temperature, extra_stops=p.stop)
        reasons = [self.clean_reasoning(g.text, chat) for g in gens]
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
                "stopped": np.asarray([g.stopped for g in gens], dtype=bool)}
