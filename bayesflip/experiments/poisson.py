"""Family E: Poisson processes by generation — does the model insert a marker between words at rate λ?

Two modes (``params.mode``), cells = marker × λ × sample:

* ``explicit`` — the model is told the process. Instruction (``{marker}``, ``{lam}`` filled in,
  λ printed with ``:g``, e.g. ``0.5``)::

      Write a short story. As you write, insert the "#" character between words at a frequency
      following a Poisson distribution with lambda=0.5: between any two consecutive words, put k
      "#" characters, where k is drawn independently from a Poisson distribution with mean 0.5.
      Separate each "#" from the words with spaces.

  instruct models: the instruction is the user message and the assistant prefill is
  ``params.prefill`` (default empty); base models: ``instruction + "\\n\\n" + story_start``
  (default story start ``Story: Once upon a time``).
* ``icl`` — the model is shown a prefix with markers already in it. **How the prefix is made:**
  ``prefix_words`` consecutive words of real English prose (the sentence pool of
  :mod:`bayesflip.filler`, source ``pydoc``: prose of CPython's reference documentation),
  starting at a sentence start drawn with ``default_rng(cell_seed(seed, "poisson-prefix",
  marker, λ, sample))``. Every marker character is deleted from the words (words left without a
  letter or digit are dropped), so the prose itself holds no marker. Then, for **each of the
  prefix_words − 1 gaps** between consecutive words, independently k ~ Poisson(λ) (same rng)
  markers are put in the gap, space-separated: ``"The # # cat sat"`` has k = 2, 0. So λ is the
  expected number of markers per word gap (the per-word rate of a Poisson process in "word time");
  the prefix ends with a word, so the continuation starts in a gap. base: the prompt is
  ``icl_head + prefix``; instruct: user message ``icl_user``, assistant prefill = the prefix.

Sampling: ``scorer.generate`` with seed ``cell_seed(seed, "poisson", mode, marker, λ, sample)``,
``temperature``, at most ``max_new_tokens``; stops only at EOS / end of turn.

**Counting (λ̂).** The analysed text is ``tail + continuation`` where ``tail`` is the last
whitespace-delimited token of the prompt's own text (base text or assistant prefill; empty if it
ends in whitespace or is empty), so the gap between the prompt's last word and the first
generated word is counted. The text is split on whitespace; each whitespace token is split
further at every marker character. A *word* is a resulting piece with at least one letter or
digit (``time,`` and ``don't`` are words; ``-`` or ``...`` are nothing and do not split gaps).
Every marker character is one marker, whether standalone (``a # b``, ``a ## b`` = 2) or attached
to a word (``a# b``, ``a #b``, ``a#b`` all = 1 marker between a and b). Only markers lying
between the first and the last word count (trailing markers sit in a gap the sample never
finished; leading ones have no word before them)::

    n_gaps = n_words − 1,   n_markers = markers between word 1 and word n_words,
    λ̂ = n_markers / n_gaps   (NaN if n_gaps = 0)

``n_attached`` counts the markers among ``n_markers`` whose whitespace token also holds a word
character (for ``!`` these are usually exclamation marks; drop them in analysis if wanted).

Arrays per cell: ``lambda_hat``, ``n_markers``, ``n_attached``, ``n_gaps``, ``n_tokens`` (sampled
tokens), ``text`` (the continuation); icl also ``prefix_lambda_hat``, ``prefix_n_markers``,
``prefix_n_gaps`` (λ̂ of the prefix itself, by the same counter: exactly Σk / (prefix_words − 1)).
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from ..errors import ConfigError
from ..prompts import Prompt
from . import register
from .base import ArraySpec, Family, Params, RunContext, cell_seed, use_chat
from .gentext import sample_texts

MARKERS = ("*", "^", "#", "@", "$", "%", "&", "!", "~")
Marker = Literal["*", "^", "#", "@", "$", "%", "&", "!", "~"]

INSTRUCTION = ('Write a short story. As you write, insert the "{marker}" character between words at a frequency '
               'following a Poisson distribution with lambda={lam}: between any two consecutive words, put k '
               '"{marker}" characters, where k is drawn independently from a Poisson distribution with mean {lam}. '
               'Separate each "{marker}" from the words with spaces.')

_ALNUM = re.compile(r"[^\W_]")


class PoissonParams(Params):
    mode: Literal["explicit", "icl"] = "explicit"
    markers: list[Marker] = Field(default_factory=lambda: list(MARKERS), min_length=1)
    lambdas: list[Annotated[float, Field(ge=0.0, le=10.0)]] = Field(
        default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], min_length=1)
    samples: int = Field(10, ge=1)
    max_new_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0)
    variant: Literal["auto", "base", "instruct"] = "auto"
    # explicit
    instruction: str = INSTRUCTION
    story_start: str = "Story: Once upon a time"
    prefill: str = ""
    # icl
    prefix_words: int = Field(100, ge=2, le=20000)
    icl_head: str = ""
    icl_user: str = "Please continue the story."
    filler: str = "pydoc"


# ---------------------------------------------------------------------------- counting
@dataclass(frozen=True)
class MarkerCount:
    n_markers: int
    n_attached: int
    n_gaps: int

    @property
    def lambda_hat(self) -> float:
        return self.n_markers / self.n_gaps if self.n_gaps > 0 else float("nan")


def count_markers(text: str, marker: str) -> MarkerCount:
    """Markers per word gap of ``text`` (definitions in the module docstring)."""
    if len(marker) != 1:
        raise ValueError(f"marker must be one character, got {marker!r}")
    items: list[tuple[str, bool]] = []  # ("w", _) word, ("m", attached) marker
    for tok in text.split():
        attached = bool(_ALNUM.search(tok))
        for i, part in enumerate(tok.split(marker)):
            if i > 0:
                items.append(("m", attached))
            if _ALNUM.search(part):
                items.append(("w", False))
    words = [i for i, (kind, _) in enumerate(items) if kind == "w"]
    if len(words) < 2:
        return MarkerCount(0, 0, 0)
    inner = [att for kind, att in items[words[0]: words[-1]] if kind == "m"]
    return MarkerCount(n_markers=len(inner), n_attached=sum(inner), n_gaps=len(words) - 1)


# ---------------------------------------------------------------------------- ICL prefix
@functools.lru_cache(maxsize=4)
def prose_words(source: str = "pydoc") -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Words of the filler sentence pool (markers stripped) and the indices where sentences start."""
    from ..filler import load_sentences

    strip = str.maketrans("", "", "".join(MARKERS))
    words: list[str] = []
    starts: list[int] = []
    for s in load_sentences(source):
        ws = [w.translate(strip) for w in s.split()]
        ws = [w for w in ws if _ALNUM.search(w)]
        if ws:
            starts.append(len(words))
            words += ws
    return tuple(words), tuple(starts)


@dataclass(frozen=True)
class Prefix:
    text: str
    counts: np.ndarray   # (n_words − 1,) markers put in each gap


def make_prefix(n_words: int, marker: str, lam: float, rng: np.random.Generator, source: str = "pydoc") -> Prefix:
    """``n_words`` prose words with k_g ~ Poisson(λ) markers in every gap g (space-separated)."""
    words, starts = prose_words(source)
    if n_words > len(words):
        raise ConfigError("params.prefix_words", f"{n_words} words requested, the prose source has {len(words)}",
                          allowed=[f"[2, {len(words)}]"])
    ok = [s for s in starts if s + n_words <= len(words)]
    start = ok[int(rng.integers(len(ok)))]
    ws = words[start: start + n_words]
    k = rng.poisson(lam, size=n_words - 1)
    parts = [ws[0]]
    for kg, w in zip(k, ws[1:]):
        parts += [marker] * int(kg) + [w]
    return Prefix(text=" ".join(parts), counts=k)


# ---------------------------------------------------------------------------- family
def _lam_text(lam: float) -> str:
    return f"{lam:g}"


@register
class PoissonFamily(Family):
    name = "poisson"
    Params = PoissonParams

    def cells(self, p: PoissonParams) -> list[dict]:
        return [{"marker": m, "lam": float(lam), "sample": s}
                for m, lam, s in itertools.product(p.markers, p.lambdas, range(p.samples))]

    def arrays(self, p: PoissonParams) -> dict[str, ArraySpec]:
        out = {"lambda_hat": ArraySpec((), (), "float64"), "n_markers": ArraySpec((), (), "int32"),
               "n_attached": ArraySpec((), (), "int32"), "n_gaps": ArraySpec((), (), "int32"),
               "n_tokens": ArraySpec((), (), "int32"), "text": ArraySpec((), (), "str")}
        if p.mode == "icl":
            out.update({"prefix_lambda_hat": ArraySpec((), (), "float64"),
                        "prefix_n_markers": ArraySpec((), (), "int32"),
                        "prefix_n_gaps": ArraySpec((), (), "int32")})
        return out

    @staticmethod
    def chat(p: PoissonParams, model_kind: str) -> bool:
        return use_chat(p.variant, model_kind)

    def prefix(self, p: PoissonParams, cell: dict, seed: int) -> Prefix:
        rng = np.random.default_rng(cell_seed(seed, "poisson-prefix", cell["marker"], cell["lam"], cell["sample"]))
        return make_prefix(p.prefix_words, cell["marker"], cell["lam"], rng, p.filler)

    def prompt(self, p: PoissonParams, cell: dict, model_kind: str, seed: int) -> Prompt:
        chat = self.chat(p, model_kind)
        if p.mode == "explicit":
            instr = p.instruction.format(marker=cell["marker"], lam=_lam_text(cell["lam"]))
            if chat:
                return Prompt(text=p.prefill, messages=(("user", instr),))
            return Prompt(text=instr + "\n\n" + p.story_start)
        text = self.prefix(p, cell, seed).text
        if chat:
            return Prompt(text=text, messages=(("user", p.icl_user),))
        return Prompt(text=p.icl_head + text)

    def validate(self, p: PoissonParams, tokenizer, model_kind: str) -> None:
        if self.chat(p, model_kind) and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("params.variant", "instruct variant needs a tokenizer with a chat template",
                              allowed=["auto", "base"])
        if p.mode == "explicit":
            try:
                p.instruction.format(marker="#", lam="0.5")
            except (KeyError, IndexError) as e:
                raise ConfigError("params.instruction", f"unknown placeholder {e}", allowed=["{marker}", "{lam}"]) \
                    from None
        else:
            self.prefix(p, self.cells(p)[0], 0)  # the prose source can supply prefix_words words

    def run(self, p: PoissonParams, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        prompts = [self.prompt(p, c, ctx.model_kind, ctx.seed) for c in cells]
        seeds = [cell_seed(ctx.seed, "poisson", p.mode, c["marker"], c["lam"], c["sample"]) for c in cells]
        samples = sample_texts(ctx.scorer, prompts, seeds, p.max_new_tokens, p.temperature)
        out: dict[str, list] = {k: [] for k in self.arrays(p)}
        for c, pr, smp in zip(cells, prompts, samples):
            tail = re.search(r"\S*$", pr.text).group(0)  # type: ignore[union-attr]
            mc = count_markers(tail + smp.text, c["marker"])
            out["lambda_hat"].append(mc.lambda_hat)
            out["n_markers"].append(mc.n_markers)
            out["n_attached"].append(mc.n_attached)
            out["n_gaps"].append(mc.n_gaps)
            out["n_tokens"].append(smp.n_tokens)
            out["text"].append(smp.text)
            if p.mode == "icl":
                pc = count_markers(self.prefix(p, c, ctx.seed).text, c["marker"])
                out["prefix_lambda_hat"].append(pc.lambda_hat)
                out["prefix_n_markers"].append(pc.n_markers)
                out["prefix_n_gaps"].append(pc.n_gaps)
        dt = self.arrays(p)
        return {k: np.asarray(v, dtype=str if dt[k].dtype == "str" else dt[k].dtype) for k, v in out.items()}
