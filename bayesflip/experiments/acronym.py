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
Checkpointed after every generation (:mod:`.generational`).

``protocol: paper`` runs the original notebook instead (:mod:`.acronym_paper`: templates,
reply parsing, pool filter): cells = bias type × ``m_easy`` × temperature T × d⁰ seed × chain;
d⁰ = ``m_easy`` pairs of ``easy_set`` (acronym word ranked ≤ ``rank_top``) and ``pairs − m_easy``
of ``hard_set`` (ranked beyond), shuffled; generation g: one reply of ``pairs`` (M) pairs from
agent 1 (T) or 2 (T/2), parsed pairs join the pool, the filter picks ``d^g``. Paper arrays:
``data_output`` / ``data_input`` / ``data_rank`` / ``data_generation`` (generation, pair) = d^g;
``produced_*`` (generation, produced) the parsed pairs of the reply (at most 2M kept);
``mean_rank`` / ``prod_mean_rank`` / ``share_top`` / ``mean_len`` (generation,) over the acronym
words; ``n_parsed``, ``n_invalid``, ``n_spelled``, ``redraws``, ``agent``, ``temperature_used``,
``carried``, ``reply``.
"""

from __future__ import annotations

import itertools
import re
from functools import lru_cache
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from ..generation import SamplingFields
from ..errors import ConfigError
from ..prompts import Prompt, render
from ..stimuli import StimulusList
from . import acronym_paper as AP
from . import register
from .base import ArraySpec, Params, Protocol, RenderedCell, cell_seed, use_chat
from .generational import GenerationalFamily, GenState

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


def pool_filter(kind: str, valid: list, keep: int, rng: np.random.Generator) -> list:
    """Pool-and-filter: top / bottom ``keep`` by mean Zipf of the input words, or a random ``keep``."""
    if kind == "none":
        idx = sorted(rng.choice(len(valid), size=min(keep, len(valid)), replace=False).tolist())
        return [valid[j] for j in idx]
    score = [float(np.mean([zipf(w) for w in ws])) for _, ws in valid]
    order = sorted(range(len(valid)), key=lambda j: (-score[j] if kind == "most" else score[j], j))
    return [valid[j] for j in order[:keep]]


class AcronymParams(Params, SamplingFields):
    protocol: Protocol = "clean"
    filters: list[Literal["none", "most", "least"]] = Field(default_factory=lambda: ["none", "most", "least"],  # type: ignore[arg-type]  # mypy types a lambda in Field's union context as list[str]
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
    rank_top: int = Field(50000, ge=100)         # paper: 60000 unless set (the original's COCA 60k list)
    variant: Literal["auto", "base", "instruct"] = "auto"
    # ---- paper protocol only (acronym_paper.py)
    bias_types: list[Literal["easy", "hard", "easylong", "easyshort", "random", "imitation"]] = Field(
        default_factory=lambda: ["easy", "hard"], min_length=1)  # type: ignore[arg-type]  # mypy types a lambda in Field's union context as list[str]
    personas: dict[str, str] = Field(default_factory=lambda: dict(AP.PERSONAS))
    easy_set: StimulusList = Field("set:acronym_easy", validate_default=True)
    hard_set: StimulusList = Field("set:acronym_hard", validate_default=True)
    pairs: int = Field(20, ge=1, le=200)          # M: pairs asked per reply and kept by the filter
    m_easy: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [10], min_length=1)
    temperatures: list[Annotated[float, Field(ge=0.0)]] = Field(default_factory=lambda: [1.0], min_length=1)
    d0_seeds: list[int] = Field(default_factory=lambda: [10086, 42, 14843, 1314], min_length=1)
    reply_tokens: int = Field(1200, ge=16)
    max_redraws: int = Field(2, ge=0)

    def model_post_init(self, _ctx) -> None:
        if self.protocol == "paper" and "rank_top" not in self.model_fields_set:
            self.rank_top = 60000


def _seed_pairs(p: AcronymParams, key: str) -> list[tuple[str, str]]:
    try:
        return [AP.seed_pair(x) for x in getattr(p, key)]
    except ValueError as e:
        raise ConfigError(f"params.{key}", str(e), allowed=["'ACRONYM: word1, word2, ...'",
                                                             "'ACRONYM<TAB>word1 word2 ...'"]) from None


def _halves(p: AcronymParams) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The easy set's pairs ranked within ``rank_top`` and the hard set's ranked beyond it."""
    easy = [x for x in _seed_pairs(p, "easy_set") if rank(x[0], p.rank_top) <= p.rank_top]
    hard = [x for x in _seed_pairs(p, "hard_set") if rank(x[0], p.rank_top) > p.rank_top]
    return easy, hard


def paper_d0(p: AcronymParams, cell: dict, seed: int) -> list[tuple[str, str]]:
    """``generate_d0``: m_easy easy + (M − m_easy) hard pairs, shuffled, by (seed, m_easy, d0 seed)."""
    easy, hard = _halves(p)
    rng = np.random.default_rng(cell_seed(seed, "acronym-d0", cell["m_easy"], cell["d0_seed"]))
    pick_e = rng.choice(len(easy), size=cell["m_easy"], replace=False)
    pick_h = rng.choice(len(hard), size=p.pairs - cell["m_easy"], replace=False)
    d0 = [easy[j] for j in pick_e] + [hard[j] for j in pick_h]
    return [d0[j] for j in rng.permutation(len(d0))]


@register
class AcronymFamily(GenerationalFamily):
    name = "acronym"
    Params = AcronymParams
    first_step = 1

    def cells(self, p: AcronymParams) -> list[dict]:
        if p.protocol == "paper":
            return [{"bias_type": b, "m_easy": me, "temperature": float(t), "d0_seed": d, "sample": s}
                    for b, me, t, d, s in itertools.product(p.bias_types, p.m_easy, p.temperatures, p.d0_seeds,
                                                            range(p.chains))]
        return [{"filter": f, "sample": s} for f, s in itertools.product(p.filters, range(p.chains))]

    def arrays(self, p: AcronymParams) -> dict[str, ArraySpec]:
        g = p.generations + 1
        if p.protocol == "paper":
            M, P = p.pairs, 2 * p.pairs
            out = {f"data_{k}": ArraySpec(("generation", "pair"), (g, M), t)
                   for k, t in (("output", "str"), ("input", "str"), ("rank", "int32"), ("generation", "int32"))}
            out.update({f"produced_{k}": ArraySpec(("generation", "produced"), (g, P), t)
                        for k, t in (("output", "str"), ("input", "str"), ("rank", "int32"), ("spelled", "bool"))})
            for k in ("mean_rank", "prod_mean_rank", "share_top", "mean_len", "temperature_used"):
                out[k] = ArraySpec(("generation",), (g,), "float64")
            for k in ("n_parsed", "n_invalid", "n_spelled", "redraws", "agent"):
                out[k] = ArraySpec(("generation",), (g,), "int32")
            out["carried"] = ArraySpec(("generation",), (g,), "bool")
            out["reply"] = ArraySpec(("generation",), (g,), "str")
            return out
        n_kept = max(p.keep, len(p.init_pairs))
        out = {"n_valid": ArraySpec(("generation",), (g,), "int32"),
               "carried": ArraySpec(("generation",), (g,), "bool"),
               "replies": ArraySpec(("generation", "reply"), (g, p.pool), "str"),
               "kept": ArraySpec(("generation", "kept_pair"), (g, n_kept), "str")}
        for pre in ("", "prod_"):
            for m in ("share_common", "mean_rank", "mean_zipf"):
                out[pre + m] = ArraySpec(("generation",), (g,), "float64")
        return out

    def coords(self, p: AcronymParams) -> dict[str, list]:
        if p.protocol == "paper":
            return {"generation": list(range(p.generations + 1)), "pair": list(range(p.pairs)),
                    "produced": list(range(2 * p.pairs))}
        return {"generation": list(range(p.generations + 1)), "reply": list(range(p.pool)),
                "kept_pair": list(range(max(p.keep, len(p.init_pairs))))}

    def validate(self, p: AcronymParams, tokenizer, model_kind: str) -> None:
        try:
            zipf("the")
        except ModuleNotFoundError as e:
            raise ConfigError("family", "the acronym family needs the 'wordfreq' package (pip install wordfreq)") \
                from e
        if p.protocol == "paper":
            self._validate_paper(p)
            return
        for i, s in enumerate(p.init_pairs):
            if parse_pair(s, p.length) is None:
                raise ConfigError(f"params.init_pairs[{i}]", f"{s!r} is not a valid pair",
                                  allowed=[f"'WORD: w1 ... w{p.length}' with {p.length} words spelling WORD"])
        if p.shots > min(p.keep, len(p.init_pairs)):
            raise ConfigError("params.shots", f"{p.shots} shots but a generation holds only "
                              f"min(keep, len(init_pairs)) = {min(p.keep, len(p.init_pairs))} pairs",
                              allowed=[f"[1, {min(p.keep, len(p.init_pairs))}]"])

    def _validate_paper(self, p: AcronymParams) -> None:
        missing = [b for b in p.bias_types if b not in p.personas]
        if missing:
            raise ConfigError("params.personas", f"no persona for bias types {missing}", allowed=sorted(AP.PERSONAS))
        easy, hard = _halves(p)
        for m in p.m_easy:
            if m > p.pairs:
                raise ConfigError("params.m_easy", f"{m} easy pairs of M = {p.pairs}", allowed=[f"[0, {p.pairs}]"])
            if m > len(easy) or p.pairs - m > len(hard):
                raise ConfigError("params.easy_set" if m > len(easy) else "params.hard_set",
                                  f"d0 needs {m} easy and {p.pairs - m} hard pairs; the sets hold {len(easy)} easy "
                                  f"(acronym ranked <= {p.rank_top}) and {len(hard)} hard (ranked beyond)",
                                  allowed=[f"m_easy in [{max(0, p.pairs - len(hard))}, {min(p.pairs, len(easy))}]"])

    # ------------------------------------------------------------------ prompts
    def prompt(self, p: AcronymParams, shown: list[str], model_kind: str) -> Prompt:
        block = "\n".join(shown) + "\n"
        chat = use_chat(p.variant, model_kind)
        if chat:
            return Prompt(text=block, messages=(("user", p.instruction),))
        return Prompt(text=f"{p.instruction}\n\n{block}")

    def paper_prompt(self, p: AcronymParams, cell: dict, data: list[tuple[str, str]], model_kind: str) -> Prompt:
        """System = persona, user = the request (base models: persona, newline, request, blank line)."""
        persona = p.personas[cell["bias_type"]]
        user = AP.request(data, p.pairs, persona)
        if use_chat(p.variant, model_kind):
            return Prompt(text="", messages=(("system", persona), ("user", user)))
        return Prompt(text=f"{persona}\n{user}\n\n")

    def render(self, p: AcronymParams, cells: list[dict], tokenizer, model_kind: str, seed: int) -> list[RenderedCell]:
        """Generation 1's request (clean: the first of the chain's ``pool`` prompts)."""
        out = []
        for c in cells:
            rng = np.random.default_rng(cell_seed(seed, *self.rng_key(p, c)))
            if p.protocol == "paper":
                pr = self.paper_prompt(p, c, paper_d0(p, c, seed), model_kind)
                gen = {"max_new_tokens": p.reply_tokens, "temperature": c["temperature"], "agent": 1}
            else:
                prev = [format_pair(*parse_pair(x, p.length)) for x in p.init_pairs]  # type: ignore[misc]
                shown = [prev[j] for j in rng.choice(len(prev), size=min(p.shots, len(prev)), replace=False)]
                pr = self.prompt(p, shown, model_kind)
                gen = {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "stop_strings": ["\n"],
                       "seed": int(rng.integers(0, 2**62))}
            out.append(RenderedCell(cell={**c, "generation": 1}, text=render(pr, tokenizer), generation=gen))
        return out

    def count_tokens(self, p: AcronymParams, cells: list[dict], tokenizer, model_kind: str, seed: int):
        """Tokens of these cells' run, engine call by engine call, generations 1..G (no model).

        * clean: per cell and generation, ``pool`` generation rows (one prompt of ``shots`` shown
          pairs each) sampling ``max_new_tokens`` (upper bound: rows stop at the first newline);
        * paper: per cell and generation, one request row sampling ``reply_tokens``, tried
          ``1 + max_redraws`` times (upper bound: the run redraws only while no pair parses).

        Assumption where the text depends on the model: the pairs shown in later generations (the
        kept / selected model-written pairs) are as long as generation 1's (clean: the init pairs
        the chain's generator shows; paper: d⁰), so generation 1's prompts are rendered (as the run
        renders them, ``encode_prompt``) and counted for every generation."""
        from ..cost import TokenCount
        from ..prompts import encode_prompt

        G = p.generations
        out = TokenCount()
        lens: dict[tuple, int] = {}
        for c in cells:
            if p.protocol == "paper":
                n = len(encode_prompt(tokenizer, self.paper_prompt(p, c, paper_d0(p, c, seed), model_kind)))
                out = out + TokenCount(n, p.reply_tokens, 1).scaled(G * (1 + p.max_redraws))
                continue
            rng = np.random.default_rng(cell_seed(seed, *self.rng_key(p, c)))
            prev = [format_pair(*parse_pair(x, p.length)) for x in p.init_pairs]  # type: ignore[misc]
            for _ in range(p.pool):
                shown = [prev[j] for j in rng.choice(len(prev), size=min(p.shots, len(prev)), replace=False)]
                rng.integers(0, 2**62)
                if tuple(shown) not in lens:
                    lens[tuple(shown)] = len(encode_prompt(tokenizer, self.prompt(p, shown, model_kind)))
                out = out + TokenCount(lens[tuple(shown)], p.max_new_tokens, 1).scaled(G)
        return out

    # ------------------------------------------------------------------ run (GenerationalFamily)
    def rng_key(self, p: AcronymParams, cell: dict) -> tuple:
        return ("acronym", sorted(cell.items()))

    def last_generation(self, p: AcronymParams) -> int:
        return p.generations

    _filter = staticmethod(pool_filter)

    def init(self, s: GenState) -> None:
        from .acronym_run import clean_init, paper_init

        (paper_init if s.p.protocol == "paper" else clean_init)(self, s)

    def step(self, s: GenState, g: int) -> None:
        from .acronym_run import clean_step, paper_step

        (paper_step if s.p.protocol == "paper" else clean_step)(self, s, g)
