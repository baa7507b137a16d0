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

**protocol: paper** (the coin-flip study's ``poisson.py``; docs/PROTOCOLS.md (section 2) lists every
difference). Markers ``* ^ # @ $ % & ! ~ <``, λ ∈ {0.1, 0.3, 0.5, 0.7, 0.9}, λ printed as Python
prints the float (``lambda=0.1``)::

    explicit, base      'I am going to tell you a long story and insert the "{c}" character between words
                         at a frequency following a Poisson distribution with lambda={λ}.\nOnce upon a time '
    explicit, instruct  user 'Generate a long, multi-paragraph story of your choice. You must insert the
                         "{c}" character between words at a frequency following a Poisson distribution
                         with lambda={λ}.'  (no prefill)
    icl, base           the marked story
    icl, instruct       user 'Complete the following story: {marked story}'

The story (``story``: inline text or ``file:<path>``; default bayesflip's own
``configs/stimuli/poisson_story.txt``) is cut to its first n words, n ∈ ``story_words`` (cells get the
coordinate ``prefix_words``); with ``insertion: paper`` one marker follows **each** word (the last
one too) when a Poisson(λ) draw is > 0 (per-word rate 1 − e^−λ); ``insertion: gaps`` puts
k ~ Poisson(λ) markers in each gap instead. One marked story per (marker, λ, n), shared by its samples
(as the original drew it once per condition). Sampling defaults to ``generation: model_defaults``
with ``temperature: 1.0, do_sample: true`` (the HF pipeline call), 100 new tokens, 10 samples. Counting is the
paper's on the continuation alone: ``n_markers`` = number of marker characters, ``n_gaps`` = words
of the continuation with the markers removed (``λ̂ = n_markers / n_gaps``); a sample with no word
is invalid and is redrawn (seed attempt a = 1, 2, … up to ``max_attempts``; ``n_attempts`` records
how many draws the stored sample took). ``prefix_*`` hold the same counts of the marked story (the
realised rate of the stimulus).
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, Mapping, Optional

import numpy as np
from pydantic import Field

from ..errors import ConfigError
from ..generation import GenerationFields, provenance_array
from ..prompts import Prompt, render
from ..stimuli import StimulusText, load_text
from . import register
from .base import (ArraySpec, Family, Params, Protocol, RenderedCell, RunContext, cell_seed, template_problem,
                   use_chat)
from .protocol import ProtocolStrategy
from .gentext import sample_with

MARKERS = ("*", "^", "#", "@", "$", "%", "&", "!", "~")
PAPER_MARKERS = MARKERS + ("<",)
Marker = Literal["*", "^", "#", "@", "$", "%", "&", "!", "~", "<"]

PAPER_EXPLICIT_BASE = ('I am going to tell you a long story and insert the "{c}" character between words at a '
                       'frequency following a Poisson distribution with lambda={lam}.\nOnce upon a time ')
PAPER_EXPLICIT_USER = ('Generate a long, multi-paragraph story of your choice. You must insert the "{c}" character '
                       'between words at a frequency following a Poisson distribution with lambda={lam}.')
PAPER_ICL_USER = "Complete the following story: {story}"
STORY = "file:stimuli/poisson_story.txt"
# what `protocol: paper` sets when the config leaves the key out
PAPER_DEFAULTS = {"markers": list(PAPER_MARKERS), "lambdas": [0.1, 0.3, 0.5, 0.7, 0.9], "samples": 10,
                  "max_new_tokens": 100, "generation": "model_defaults", "temperature": 1.0, "do_sample": True,
                  "story_words": [100, 250, 500], "insertion": "paper"}

INSTRUCTION = ('Write a short story. As you write, insert the "{marker}" character between words at a frequency '
               'following a Poisson distribution with lambda={lam}: between any two consecutive words, put k '
               '"{marker}" characters, where k is drawn independently from a Poisson distribution with mean {lam}. '
               'Separate each "{marker}" from the words with spaces.')

_ALNUM = re.compile(r"[^\W_]")


class PoissonParams(Params, GenerationFields):
    protocol: Protocol = "clean"
    mode: Literal["explicit", "icl"] = "explicit"
    markers: list[Marker] = Field(default_factory=lambda: list(MARKERS), min_length=1)  # type: ignore[arg-type]  # mypy types a lambda in Field's union context as list[str]
    lambdas: list[Annotated[float, Field(ge=0.0, le=10.0)]] = Field(
        default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], min_length=1)
    samples: int = Field(10, ge=1)
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
    # protocol: paper
    story: Optional[StimulusText] = None   # None: bayesflip's own story (STORY)
    story_words: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [100, 250, 500], min_length=1)
    insertion: Literal["paper", "gaps"] = "paper"
    max_attempts: int = Field(10, ge=1)

    PROTOCOLS: ClassVar[Mapping[str, ProtocolStrategy]] = {}   # CleanPoisson / PaperPoisson, set below


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


# ---------------------------------------------------------------------------- paper protocol
def story_text(p: "PoissonParams") -> str:
    """The ICL story of the paper protocol: ``params.story`` or bayesflip's own."""
    return p.story if p.story is not None else load_text(STORY)


def paper_lam(lam: float) -> str:
    """λ as the original's f-string prints a Python float: ``0.1`` → ``'0.1'``."""
    return f"{float(lam)}"


def paper_count(text: str, marker: str) -> MarkerCount:
    """The coin-flip study's counts: every ``marker`` character, and the words of ``text`` with the markers
    removed (``n_gaps`` holds that denominator); ``n_attached`` = markers in a whitespace token with a word character."""
    attached = sum(tok.count(marker) for tok in text.split() if _ALNUM.search(tok))
    return MarkerCount(n_markers=text.count(marker), n_attached=attached,
                       n_gaps=len(text.replace(marker, "").split()))


def mark_story(story: str, n_words: int, marker: str, lam: float, rng: np.random.Generator,
               insertion: str = "paper") -> str:
    """The first ``n_words`` words of ``story`` with markers inserted.

    ``paper``: after **each** word one marker when a Poisson(λ) draw is > 0 (``poisson.py``'s
    ``modify_story_with_poisson``); ``gaps``: k ~ Poisson(λ) markers in each of the n − 1 gaps.
    Words are joined by single spaces either way.
    """
    words = story.split()[:n_words]
    out: list[str] = []
    if insertion == "paper":
        for w, k in zip(words, rng.poisson(lam, size=len(words))):
            out.append(w)
            if k > 0:
                out.append(marker)
    else:
        ks = rng.poisson(lam, size=max(len(words) - 1, 0))
        for j, w in enumerate(words):
            if j:
                out += [marker] * int(ks[j - 1])
            out.append(w)
    return " ".join(out)


# ---------------------------------------------------------------------------- protocols
def _lam_text(lam: float) -> str:
    return f"{lam:g}"


class PoissonProtocol(ProtocolStrategy):
    """What ``clean`` and ``paper`` Poisson cells differ in: grid, prompts, seeds and the marker counter."""

    def cells(self, p: PoissonParams) -> list[dict]:
        return [{"marker": m, "lam": float(lam), "sample": s}
                for m, lam, s in itertools.product(p.markers, p.lambdas, range(p.samples))]

    def extra_arrays(self, p: PoissonParams) -> dict[str, ArraySpec]:
        return {}

    def prompt(self, fam: "PoissonFamily", p: PoissonParams, cell: dict, chat: bool, seed: int) -> Prompt:
        raise NotImplementedError

    def validate(self, fam: "PoissonFamily", p: PoissonParams) -> None:
        """Checks of the params against the prompt sources (no tokenizer needed)."""

    def seed_of(self, p: PoissonParams, cell: dict, seed: int, attempt: int = 0) -> int:
        raise NotImplementedError

    def sample(self, fam: "PoissonFamily", p: PoissonParams, cells: list[dict], prompts: list[Prompt],
               ctx: RunContext, settings) -> tuple[list, list[MarkerCount], list[int]]:
        """(samples, counts, attempts) of these cells."""
        raise NotImplementedError

    def prefix_count(self, fam: "PoissonFamily", p: PoissonParams, cell: dict, seed: int) -> MarkerCount:
        """The counts of an icl cell's marked prompt text (the stimulus's realised rate)."""
        raise NotImplementedError


class CleanPoisson(PoissonProtocol):
    """bayesflip's instruction / prose prefix, every gap's marker count (:func:`count_markers`)."""

    name = "clean"

    def prompt(self, fam: "PoissonFamily", p: PoissonParams, cell: dict, chat: bool, seed: int) -> Prompt:
        if p.mode == "explicit":
            instr = p.instruction.format(marker=cell["marker"], lam=_lam_text(cell["lam"]))
            if chat:
                return Prompt(text=p.prefill, messages=(("user", instr),))
            return Prompt(text=instr + "\n\n" + p.story_start)
        text = fam.prefix(p, cell, seed).text
        if chat:
            return Prompt(text=text, messages=(("user", p.icl_user),))
        return Prompt(text=p.icl_head + text)

    def validate(self, fam: "PoissonFamily", p: PoissonParams) -> None:
        if p.mode == "explicit":
            if problem := template_problem(p.instruction, {"marker": "#", "lam": "0.5"}):
                raise ConfigError("params.instruction", problem, allowed=["{marker}", "{lam}"])
        else:
            fam.prefix(p, fam.cells(p)[0], 0)  # the prose source can supply prefix_words words

    def seed_of(self, p: PoissonParams, cell: dict, seed: int, attempt: int = 0) -> int:
        return cell_seed(seed, "poisson", p.mode, cell["marker"], cell["lam"], cell["sample"])

    def sample(self, fam: "PoissonFamily", p: PoissonParams, cells: list[dict], prompts: list[Prompt],
               ctx: RunContext, settings) -> tuple[list, list[MarkerCount], list[int]]:
        samples = sample_with(ctx.scorer, prompts, [self.seed_of(p, c, ctx.seed) for c in cells], settings)
        counts = []
        for c, pr, smp in zip(cells, prompts, samples):
            tail = re.search(r"\S*$", pr.text).group(0)  # type: ignore[union-attr]
            counts.append(count_markers(tail + smp.text, c["marker"]))
        return samples, counts, [1] * len(cells)

    def prefix_count(self, fam: "PoissonFamily", p: PoissonParams, cell: dict, seed: int) -> MarkerCount:
        return count_markers(fam.prefix(p, cell, seed).text, cell["marker"])


class PaperPoisson(PoissonProtocol):
    """The coin-flip study's ``poisson.py``: its prompts and marked story, its counter, redraws of wordless samples."""

    name = "paper"

    def defaults(self, data: dict) -> dict:
        return PAPER_DEFAULTS

    def cells(self, p: PoissonParams) -> list[dict]:
        if p.mode == "icl":
            return [{"marker": m, "lam": float(lam), "prefix_words": n, "sample": s}
                    for m, lam, n, s in itertools.product(p.markers, p.lambdas, p.story_words, range(p.samples))]
        return super().cells(p)

    def extra_arrays(self, p: PoissonParams) -> dict[str, ArraySpec]:
        return {"n_attempts": ArraySpec((), (), "int32")}

    def prompt(self, fam: "PoissonFamily", p: PoissonParams, cell: dict, chat: bool, seed: int) -> Prompt:
        if p.mode == "explicit":
            fill = {"c": cell["marker"], "lam": paper_lam(cell["lam"])}
            if chat:
                return Prompt(text="", messages=(("user", PAPER_EXPLICIT_USER.format(**fill)),))
            return Prompt(text=PAPER_EXPLICIT_BASE.format(**fill))
        story = fam.paper_story(p, cell, seed)
        if chat:
            return Prompt(text="", messages=(("user", PAPER_ICL_USER.format(story=story)),))
        return Prompt(text=story)

    def validate(self, fam: "PoissonFamily", p: PoissonParams) -> None:
        n = len(story_text(p).split())
        if p.mode == "icl" and max(p.story_words) > n:
            raise ConfigError("params.story_words", f"{max(p.story_words)} words requested, the story has {n}",
                              allowed=[f"[1, {n}]"])

    def seed_of(self, p: PoissonParams, cell: dict, seed: int, attempt: int = 0) -> int:
        return cell_seed(seed, "poisson-paper", p.mode, cell["marker"], cell["lam"], cell.get("prefix_words"),
                         cell["sample"], attempt)

    def sample(self, fam: "PoissonFamily", p: PoissonParams, cells: list[dict], prompts: list[Prompt],
               ctx: RunContext, settings) -> tuple[list, list[MarkerCount], list[int]]:
        samples = sample_with(ctx.scorer, prompts, [self.seed_of(p, c, ctx.seed) for c in cells], settings)
        attempts = [1] * len(cells)
        # the original kept sampling until a continuation had at least one word
        counts = [paper_count(smp.text, c["marker"]) for c, smp in zip(cells, samples)]
        for a in range(1, p.max_attempts):
            redo = [i for i, mc in enumerate(counts) if mc.n_gaps == 0]
            if not redo:
                break
            new = sample_with(ctx.scorer, [prompts[i] for i in redo],
                              [self.seed_of(p, cells[i], ctx.seed, a) for i in redo], settings)
            for i, smp in zip(redo, new):
                samples[i], counts[i], attempts[i] = smp, paper_count(smp.text, cells[i]["marker"]), a + 1
        return samples, counts, attempts

    def prefix_count(self, fam: "PoissonFamily", p: PoissonParams, cell: dict, seed: int) -> MarkerCount:
        return paper_count(fam.paper_story(p, cell, seed), cell["marker"])


PROTOCOLS: dict[str, PoissonProtocol] = {"clean": CleanPoisson(), "paper": PaperPoisson()}
PoissonParams.PROTOCOLS = PROTOCOLS


# ---------------------------------------------------------------------------- family


@register
class PoissonFamily(Family):
    name = "poisson"
    Params = PoissonParams

    def cells(self, p: PoissonParams) -> list[dict]:
        return p.strategy.cells(p)

    def arrays(self, p: PoissonParams) -> dict[str, ArraySpec]:
        out = {"lambda_hat": ArraySpec((), (), "float64"), "n_markers": ArraySpec((), (), "int32"),
               "n_attached": ArraySpec((), (), "int32"), "n_gaps": ArraySpec((), (), "int32"),
               "n_tokens": ArraySpec((), (), "int32"), "text": ArraySpec((), (), "str")}
        if p.mode == "icl":
            out.update({"prefix_lambda_hat": ArraySpec((), (), "float64"),
                        "prefix_n_markers": ArraySpec((), (), "int32"),
                        "prefix_n_gaps": ArraySpec((), (), "int32")})
        out.update(p.strategy.extra_arrays(p))
        if p.generation == "model_defaults":
            out["generation_config"] = ArraySpec((), (), "str")
        return out

    @staticmethod
    def chat(p: PoissonParams, model_kind: str) -> bool:
        return use_chat(p.variant, model_kind)

    def prefix(self, p: PoissonParams, cell: dict, seed: int) -> Prefix:
        rng = np.random.default_rng(cell_seed(seed, "poisson-prefix", cell["marker"], cell["lam"], cell["sample"]))
        return make_prefix(p.prefix_words, cell["marker"], cell["lam"], rng, p.filler)

    def paper_story(self, p: PoissonParams, cell: dict, seed: int) -> str:
        """The marked story of a paper icl cell: one per (marker, λ, story length), shared by its samples."""
        rng = np.random.default_rng(cell_seed(seed, "poisson-paper-story", p.insertion, cell["marker"], cell["lam"],
                                              cell["prefix_words"]))
        return mark_story(story_text(p), cell["prefix_words"], cell["marker"], cell["lam"], rng, p.insertion)

    def prompt(self, p: PoissonParams, cell: dict, model_kind: str, seed: int) -> Prompt:
        return p.strategy.prompt(self, p, cell, self.chat(p, model_kind), seed)

    def validate(self, p: PoissonParams, tokenizer, model_kind: str) -> None:
        if self.chat(p, model_kind) and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("params.variant", "instruct variant needs a tokenizer with a chat template",
                              allowed=["auto", "base"])
        p.strategy.validate(self, p)

    def render(self, p: PoissonParams, cells: list[dict], tokenizer, model_kind: str, seed: int) -> list[RenderedCell]:
        gen = {**p.generation_settings(None).describe(), "generation": p.generation}
        return [RenderedCell(cell=dict(c), text=render(self.prompt(p, c, model_kind, seed), tokenizer), generation=gen)
                for c in cells]

    def seed_of(self, p: PoissonParams, cell: dict, seed: int, attempt: int = 0) -> int:
        return p.strategy.seed_of(p, cell, seed, attempt)

    def run(self, p: PoissonParams, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        settings = p.generation_settings(ctx.scorer)
        prompts = [self.prompt(p, c, ctx.model_kind, ctx.seed) for c in cells]
        samples, counts, attempts = p.strategy.sample(self, p, cells, prompts, ctx, settings)
        out: dict[str, list] = {k: [] for k in self.arrays(p)}
        for c, smp, mc, att in zip(cells, samples, counts, attempts):
            out["lambda_hat"].append(mc.lambda_hat)
            out["n_markers"].append(mc.n_markers)
            out["n_attached"].append(mc.n_attached)
            out["n_gaps"].append(mc.n_gaps)
            out["n_tokens"].append(smp.n_tokens)
            out["text"].append(smp.text)
            if "n_attempts" in out:
                out["n_attempts"].append(att)
            if p.mode == "icl":
                pc = p.strategy.prefix_count(self, p, c, ctx.seed)
                out["prefix_lambda_hat"].append(pc.lambda_hat)
                out["prefix_n_markers"].append(pc.n_markers)
                out["prefix_n_gaps"].append(pc.n_gaps)
        if p.generation == "model_defaults":
            out["generation_config"] = list(provenance_array(p, settings, len(cells)))
        dt = self.arrays(p)
        return {k: np.asarray(v, dtype=str if dt[k].dtype == "str" else dt[k].dtype) for k, v in out.items()}
