"""Word-preference chains (acronyms), EXPERIMENTS.md section 3.

A *pair* is an acronym word W of ``length`` letters (default 7) and ``length`` input words
whose first letters spell W, written on one line ``FREEDOM: friends run east every day on
mountains``. A chain's generation 0 is the configured ``init_pairs`` (checked at plan time).

Generation g → g+1: the agent writes ``pool`` (default 20) new pairs. Each is one seeded
sample (:meth:`Scorer.generate`, ``temperature``, at most ``max_new_tokens`` tokens, stopped
at the first newline) after a prompt showing ``shots`` pairs drawn without replacement
(the chain's numpy generator) from generation g's kept pairs. Prompt: chat models get the
user message ``instruction`` and an assistant prefill holding the shown pairs, one per line,
followed by a newline, so the model continues the list; base models get
``instruction + "\\n\\n" + pairs + "\\n"``. A reply is valid when its first line matches
``WORD: w1 ... wL`` (separator ``:`` or ``=``, words = runs of letters/apostrophes) with
exactly L words whose first letters spell WORD (case-insensitive).

Pool-and-filter: every valid pair gets a score = mean Zipf frequency of its L input words
(``wordfreq.zipf_frequency(w, "en")``, log10 of occurrences per billion words); filter
``most`` keeps the ``keep`` highest-scoring pairs, ``least`` the lowest, ``none`` a seeded
random ``keep`` of them. Ties keep production order. If no reply is valid, the chain keeps
its previous pairs (``carried`` True).

Metrics per generation over the input words of the kept pairs (and, ``prod_``, of all valid
produced pairs): ``share_common`` = fraction with Zipf ≥ ``common_zipf`` (default 4.0 = at
least 10 per million words); ``mean_rank`` = mean 1-based rank in
``wordfreq.top_n_list("en", rank_top)`` (a word outside that list counts as ``rank_top + 1``);
``mean_zipf``. Also ``n_valid`` per generation and the text of every reply and kept pair.
Checkpointed after every generation like :mod:`.chains`.
"""

from __future__ import annotations

import itertools
import re
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import ConfigError
from ..prompts import Prompt, encode_prompt
from . import register
from .base import ArraySpec, Family, Params, RunContext, cell_seed, use_chat
from .checkpoint import start_or_resume, maybe_interrupt

INIT_PAIRS = [
    "FREEDOM: friends run east every day on mountains",
    "HISTORY: he is still telling old raw yarns",
    "BALANCE: big apples lie alone near crowded edges",
    "CAPTAIN: cold air passes through all inner nights",
    "MACHINE: many animals can hear in new environments",
    "WEATHER: we eat apples together hoping everyone rests",
]
INSTRUCTION = ("Each line gives a seven-letter word, a colon, and seven words whose first letters spell that word. "
               "Write one more line in exactly the same format.")
_LINE = re.compile(r"^\s*([A-Za-z]+)\s*[:=]\s*(.+?)\s*$")
_WORD = re.compile(r"[A-Za-z']+")


def parse_pair(line: str, length: int) -> tuple[str, list[str]] | None:
    """``(WORD, [words])`` if the first line is a valid pair of this length, else None."""
    first = line.strip().split("\n", 1)[0] if line.strip() else ""
    m = _LINE.match(first)
    if not m:
        return None
    word, words = m.group(1), _WORD.findall(m.group(2))
    if len(word) != length or len(words) != length:
        return None
    if "".join(w[0] for w in words).lower() != word.lower():
        return None
    return word.upper(), [w.lower() for w in words]


def format_pair(word: str, words: list[str]) -> str:
    return f"{word.upper()}: {' '.join(words)}"


def zipf(word: str) -> float:
    """Zipf frequency of an English word (``wordfreq``; 0 for unknown words)."""
    from wordfreq import zipf_frequency

    return float(zipf_frequency(word, "en"))


@lru_cache(maxsize=4)
def _ranks(top: int) -> dict[str, int]:
    from wordfreq import top_n_list

    return {w: i + 1 for i, w in enumerate(top_n_list("en", top))}


def rank(word: str, top: int) -> int:
    """1-based rank in ``top_n_list("en", top)``; ``top + 1`` when outside it."""
    return _ranks(top).get(word.lower(), top + 1)


def word_stats(pairs: list[tuple[str, list[str]]], common_zipf: float, top: int) -> tuple[float, float, float]:
    """(share_common, mean_rank, mean_zipf) over all input words of the pairs (NaN if none)."""
    words = [w for _, ws in pairs for w in ws]
    if not words:
        return float("nan"), float("nan"), float("nan")
    z = np.array([zipf(w) for w in words])
    r = np.array([rank(w, top) for w in words], dtype=float)
    return float(np.mean(z >= common_zipf)), float(r.mean()), float(z.mean())


class AcronymParams(Params):
    filters: list[Literal["none", "most", "least"]] = Field(default_factory=lambda: ["none", "most", "least"],
                                                            min_length=1)
    length: int = Field(7, ge=2, le=20)
    init_pairs: list[str] = Field(default_factory=lambda: list(INIT_PAIRS), min_length=1)
    pool: int = Field(20, ge=1)
    keep: int = Field(10, ge=1)
    shots: int = Field(4, ge=1)
    generations: int = Field(10, ge=0, le=1000)
    chains: int = Field(5, ge=1)
    instruction: str = INSTRUCTION
    max_new_tokens: int = Field(40, ge=4)
    temperature: float = Field(1.0, ge=0.0)
    common_zipf: float = 4.0
    rank_top: int = Field(50000, ge=100)
    variant: Literal["auto", "base", "instruct"] = "auto"


@register
class AcronymFamily(Family):
    name = "acronym"
    Params = AcronymParams

    def cells(self, p: AcronymParams) -> list[dict]:
        return [{"filter": f, "sample": s} for f, s in itertools.product(p.filters, range(p.chains))]

    def arrays(self, p: AcronymParams) -> dict[str, ArraySpec]:
        g = p.generations + 1
        k = max(p.keep, len(p.init_pairs))
        out = {"n_valid": ArraySpec(("generation",), (g,), "int32"),
               "carried": ArraySpec(("generation",), (g,), "bool"),
               "replies": ArraySpec(("generation", "reply"), (g, p.pool), "str"),
               "kept": ArraySpec(("generation", "kept"), (g, k), "str")}
        for pre in ("", "prod_"):
            for m in ("share_common", "mean_rank", "mean_zipf"):
                out[pre + m] = ArraySpec(("generation",), (g,), "float64")
        return out

    def coords(self, p: AcronymParams) -> dict[str, list]:
        return {"generation": list(range(p.generations + 1)), "reply": list(range(p.pool)),
                "kept": list(range(max(p.keep, len(p.init_pairs))))}

    def validate(self, p: AcronymParams, tokenizer, model_kind: str) -> None:
        for i, s in enumerate(p.init_pairs):
            if parse_pair(s, p.length) is None:
                raise ConfigError(f"params.init_pairs[{i}]", f"{s!r} is not a valid pair",
                                  allowed=[f"'WORD: w1 ... w{p.length}' with {p.length} words spelling WORD"])
        if p.shots > min(p.keep, len(p.init_pairs)):
            raise ConfigError("params.shots", f"{p.shots} shots but a generation holds only "
                              f"min(keep, len(init_pairs)) = {min(p.keep, len(p.init_pairs))} pairs",
                              allowed=[f"[1, {min(p.keep, len(p.init_pairs))}]"])
        try:
            zipf("the")
        except ModuleNotFoundError as e:
            raise ConfigError("family", "the acronym family needs the 'wordfreq' package (pip install wordfreq)") \
                from e

    def prompt(self, p: AcronymParams, shown: list[str], model_kind: str) -> Prompt:
        block = "\n".join(shown) + "\n"
        chat = use_chat(p.variant, model_kind)
        if chat:
            return Prompt(text=block, messages=(("user", p.instruction),))
        return Prompt(text=f"{p.instruction}\n\n{block}")

    def run(self, p: AcronymParams, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        G, C = p.generations, len(cells)
        tok = ctx.tokenizer
        rngs = [np.random.default_rng(cell_seed(ctx.seed, "acronym", sorted(c.items()))) for c in cells]
        arr, ck, start = start_or_resume(self, p, cells, ctx, rngs)
        if start is None:
            init = [parse_pair(s, p.length) for s in p.init_pairs]
            sc, mr, mz = word_stats(init, p.common_zipf, p.rank_top)  # type: ignore[arg-type]
            for i in range(C):
                arr["kept"][i, 0, : len(init)] = [format_pair(*x) for x in init]  # type: ignore[misc]
                arr["n_valid"][i, 0] = len(init)
                for pre in ("", "prod_"):
                    arr[pre + "share_common"][i, 0], arr[pre + "mean_rank"][i, 0], arr[pre + "mean_zipf"][i, 0] = \
                        sc, mr, mz
            start = 1
        for g in range(start, G + 1):
            prompts, seeds = [], []
            for i in range(C):
                prev = [s for s in arr["kept"][i, g - 1] if s]
                for _ in range(p.pool):
                    shown = [prev[j] for j in rngs[i].choice(len(prev), size=min(p.shots, len(prev)), replace=False)]
                    prompts.append(encode_prompt(tok, self.prompt(p, shown, ctx.model_kind)))
                    seeds.append(int(rngs[i].integers(0, 2**62)))
            outs = ctx.scorer.generate(prompts, p.max_new_tokens, seeds, temperature=p.temperature,
                                       stop_strings=["\n"])
            for i, c in enumerate(cells):
                texts = [tok.decode(o, skip_special_tokens=True) for o in outs[i * p.pool: (i + 1) * p.pool]]
                arr["replies"][i, g] = [t.split("\n", 1)[0] for t in texts]
                valid = [x for x in (parse_pair(t, p.length) for t in texts) if x is not None]
                arr["n_valid"][i, g] = len(valid)
                if not valid:
                    kept = [parse_pair(s, p.length) for s in arr["kept"][i, g - 1] if s]
                    arr["carried"][i, g] = True
                else:
                    kept = self._filter(c["filter"], valid, p.keep, rngs[i])
                arr["kept"][i, g, : len(kept)] = [format_pair(*x) for x in kept]  # type: ignore[misc]
                for pre, pairs in (("", kept), ("prod_", valid)):
                    s = word_stats(pairs, p.common_zipf, p.rank_top)  # type: ignore[arg-type]
                    arr[pre + "share_common"][i, g], arr[pre + "mean_rank"][i, g], arr[pre + "mean_zipf"][i, g] = s
            ck.save({k: (v.astype(str) if v.dtype == object else v) for k, v in arr.items()}, g + 1, rngs)
            maybe_interrupt(g)
        return {k: (v.astype(str) if v.dtype == object else v) for k, v in arr.items()}

    @staticmethod
    def _filter(kind: str, valid: list, keep: int, rng: np.random.Generator) -> list:
        """Pool-and-filter: top / bottom ``keep`` by mean Zipf of the input words, or a random ``keep``."""
        if kind == "none":
            idx = sorted(rng.choice(len(valid), size=min(keep, len(valid)), replace=False).tolist())
            return [valid[j] for j in idx]
        score = [float(np.mean([zipf(w) for w in ws])) for _, ws in valid]
        order = sorted(range(len(valid)), key=lambda j: (-score[j] if kind == "most" else score[j], j))
        return [valid[j] for j in order[:keep]]
