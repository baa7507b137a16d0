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
from typing import Annotated, ClassVar, Literal, Mapping

import numpy as np
from pydantic import Field

from ..generation import SamplingFields
from ..errors import ConfigError
from ..prompts import Prompt, render
from ..stimuli import StimulusList
from . import acronym_paper as AP
from . import register
from .base import ArraySpec, Params, Protocol, RenderedCell, cell_seed, use_chat
from .acronym_run import clean_init, clean_step, paper_init, paper_step
from .acronym_words import (_halves, _seed_pairs, format_pair, paper_d0, parse_pair, pool_filter, rank,  # noqa: F401
                            word_stats, zipf)
from .generational import GenerationalFamily, GenState
from .protocol import ProtocolStrategy

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
class AcronymParams(Params, SamplingFields):
    protocol: Protocol = "clean"
    filters: list[Literal["none", "most", "least"]] = Field(default_factory=lambda: ["none", "most", "least"],  # type: ignore[arg-type]  # a list of the Literal's values
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
        default_factory=lambda: ["easy", "hard"], min_length=1)  # type: ignore[arg-type]  # a list of the Literal's values
    personas: dict[str, str] = Field(default_factory=lambda: dict(AP.PERSONAS))
    easy_set: StimulusList = Field("set:acronym_easy", validate_default=True)
    hard_set: StimulusList = Field("set:acronym_hard", validate_default=True)
    pairs: int = Field(20, ge=1, le=200)          # M: pairs asked per reply and kept by the filter
    m_easy: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [10], min_length=1)
    temperatures: list[Annotated[float, Field(ge=0.0)]] = Field(default_factory=lambda: [1.0], min_length=1)
    d0_seeds: list[int] = Field(default_factory=lambda: [10086, 42, 14843, 1314], min_length=1)
    reply_tokens: int = Field(1200, ge=16)
    max_redraws: int = Field(2, ge=0)

    PROTOCOLS: ClassVar[Mapping[str, ProtocolStrategy]] = {}   # CleanAcronym / PaperAcronym, set below


class AcronymProtocol(ProtocolStrategy):
    """What the clean pool-and-filter chain and the original notebook (``paper``) differ in: grid,
    arrays, checks, generation 1's request, the token count and the run (:mod:`.acronym_run`)."""

    def cells(self, p: AcronymParams) -> list[dict]:
        raise NotImplementedError

    def arrays(self, p: AcronymParams) -> dict[str, ArraySpec]:
        raise NotImplementedError

    def coords(self, p: AcronymParams) -> dict[str, list]:
        raise NotImplementedError

    def validate(self, p: AcronymParams) -> None:
        raise NotImplementedError

    def first_request(self, fam: "AcronymFamily", p: AcronymParams, cell: dict, model_kind: str, seed: int
                      ) -> tuple[Prompt, dict]:
        """Generation 1's (first) prompt of a cell and its generation settings."""
        raise NotImplementedError

    def count_tokens(self, fam: "AcronymFamily", p: AcronymParams, cells: list[dict], tokenizer, model_kind: str,
                     seed: int):
        raise NotImplementedError

    def init(self, fam: "AcronymFamily", s: GenState) -> None:
        raise NotImplementedError

    def step(self, fam: "AcronymFamily", s: GenState, g: int) -> None:
        raise NotImplementedError


class CleanAcronym(AcronymProtocol):
    """bayesflip's chain: ``pool`` one-line samples after ``shots`` shown pairs, pool-and-filter."""

    name = "clean"

    def cells(self, p: AcronymParams) -> list[dict]:
        return [{"filter": f, "sample": s} for f, s in itertools.product(p.filters, range(p.chains))]

    def arrays(self, p: AcronymParams) -> dict[str, ArraySpec]:
        g, k = p.generations + 1, max(p.keep, len(p.init_pairs))
        out = {"n_valid": ArraySpec(("generation",), (g,), "int32"),
               "carried": ArraySpec(("generation",), (g,), "bool"),
               "replies": ArraySpec(("generation", "reply"), (g, p.pool), "str"),
               "kept": ArraySpec(("generation", "kept_pair"), (g, k), "str")}
        for pre in ("", "prod_"):
            for m in ("share_common", "mean_rank", "mean_zipf"):
                out[pre + m] = ArraySpec(("generation",), (g,), "float64")
        return out

    def coords(self, p: AcronymParams) -> dict[str, list]:
        return {"generation": list(range(p.generations + 1)), "reply": list(range(p.pool)),
                "kept_pair": list(range(max(p.keep, len(p.init_pairs))))}

    def validate(self, p: AcronymParams) -> None:
        for i, s in enumerate(p.init_pairs):
            if parse_pair(s, p.length) is None:
                raise ConfigError(f"params.init_pairs[{i}]", f"{s!r} is not a valid pair",
                                  allowed=[f"'WORD: w1 ... w{p.length}' with {p.length} words spelling WORD"])
        if p.shots > min(p.keep, len(p.init_pairs)):
            raise ConfigError("params.shots", f"{p.shots} shots but a generation holds only "
                              f"min(keep, len(init_pairs)) = {min(p.keep, len(p.init_pairs))} pairs",
                              allowed=[f"[1, {min(p.keep, len(p.init_pairs))}]"])

    def first_request(self, fam: "AcronymFamily", p: AcronymParams, cell: dict, model_kind: str, seed: int
                      ) -> tuple[Prompt, dict]:
        rng = np.random.default_rng(cell_seed(seed, *fam.rng_key(p, cell)))
        prev = [format_pair(*parse_pair(x, p.length)) for x in p.init_pairs]  # type: ignore[misc]
        shown = [prev[j] for j in rng.choice(len(prev), size=min(p.shots, len(prev)), replace=False)]
        gen = {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "stop_strings": ["\n"],
               "seed": int(rng.integers(0, 2**62))}
        return fam.prompt(p, shown, model_kind), gen

    def count_tokens(self, fam: "AcronymFamily", p: AcronymParams, cells: list[dict], tokenizer, model_kind: str,
                     seed: int):
        from .tokens import TokenCount
        from ..prompts import encode_prompt

        out = TokenCount()
        lens: dict[tuple, int] = {}
        for c in cells:
            rng = np.random.default_rng(cell_seed(seed, *fam.rng_key(p, c)))
            prev = [format_pair(*parse_pair(x, p.length)) for x in p.init_pairs]  # type: ignore[misc]
            for _ in range(p.pool):
                shown = [prev[j] for j in rng.choice(len(prev), size=min(p.shots, len(prev)), replace=False)]
                rng.integers(0, 2**62)
                if tuple(shown) not in lens:
                    lens[tuple(shown)] = len(encode_prompt(tokenizer, fam.prompt(p, shown, model_kind)))
                out = out + TokenCount(lens[tuple(shown)], p.max_new_tokens, 1).scaled(p.generations)
        return out

    def init(self, fam: "AcronymFamily", s: GenState) -> None:
        clean_init(fam, s)

    def step(self, fam: "AcronymFamily", s: GenState, g: int) -> None:
        clean_step(fam, s, g)


class PaperAcronym(AcronymProtocol):
    """The original notebook (:mod:`.acronym_paper`): persona + request of M pairs, the bias type's
    selection from the pool; ``rank_top`` 60000 unless set (the original's COCA 60k list)."""

    name = "paper"

    def defaults(self, data: dict) -> dict:
        return {"rank_top": 60000}

    def cells(self, p: AcronymParams) -> list[dict]:
        return [{"bias_type": b, "m_easy": me, "temperature": float(t), "d0_seed": d, "sample": s}
                for b, me, t, d, s in itertools.product(p.bias_types, p.m_easy, p.temperatures, p.d0_seeds,
                                                        range(p.chains))]

    def arrays(self, p: AcronymParams) -> dict[str, ArraySpec]:
        g, M, P = p.generations + 1, p.pairs, 2 * p.pairs
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

    def coords(self, p: AcronymParams) -> dict[str, list]:
        return {"generation": list(range(p.generations + 1)), "pair": list(range(p.pairs)),
                "produced": list(range(2 * p.pairs))}

    def validate(self, p: AcronymParams) -> None:
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

    def first_request(self, fam: "AcronymFamily", p: AcronymParams, cell: dict, model_kind: str, seed: int
                      ) -> tuple[Prompt, dict]:
        gen = {"max_new_tokens": p.reply_tokens, "temperature": cell["temperature"], "agent": 1}
        return fam.paper_prompt(p, cell, paper_d0(p, cell, seed), model_kind), gen

    def count_tokens(self, fam: "AcronymFamily", p: AcronymParams, cells: list[dict], tokenizer, model_kind: str,
                     seed: int):
        from .tokens import TokenCount
        from ..prompts import encode_prompt

        out = TokenCount()
        for c in cells:
            n = len(encode_prompt(tokenizer, fam.paper_prompt(p, c, paper_d0(p, c, seed), model_kind)))
            out = out + TokenCount(n, p.reply_tokens, 1).scaled(p.generations * (1 + p.max_redraws))
        return out

    def init(self, fam: "AcronymFamily", s: GenState) -> None:
        paper_init(fam, s)

    def step(self, fam: "AcronymFamily", s: GenState, g: int) -> None:
        paper_step(fam, s, g)


PROTOCOLS: dict[str, AcronymProtocol] = {"clean": CleanAcronym(), "paper": PaperAcronym()}
AcronymParams.PROTOCOLS = PROTOCOLS


@register
class AcronymFamily(GenerationalFamily):
    name = "acronym"
    Params = AcronymParams
    first_step = 1

    def cells(self, p: AcronymParams) -> list[dict]:
        return p.strategy.cells(p)

    def arrays(self, p: AcronymParams) -> dict[str, ArraySpec]:
        return p.strategy.arrays(p)

    def coords(self, p: AcronymParams) -> dict[str, list]:
        return p.strategy.coords(p)

    def validate(self, p: AcronymParams, tokenizer, model_kind: str) -> None:
        try:
            zipf("the")
        except ModuleNotFoundError as e:
            raise ConfigError("family", "the acronym family needs the 'wordfreq' package (pip install wordfreq)") \
                from e
        p.strategy.validate(p)

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
            pr, gen = p.strategy.first_request(self, p, c, model_kind, seed)
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
        return p.strategy.count_tokens(self, p, cells, tokenizer, model_kind, seed)

    # ------------------------------------------------------------------ run (GenerationalFamily)
    def rng_key(self, p: AcronymParams, cell: dict) -> tuple:
        return ("acronym", sorted(cell.items()))

    def last_generation(self, p: AcronymParams) -> int:
        return p.generations

    _filter = staticmethod(pool_filter)

    def init(self, s: GenState) -> None:
        s.p.strategy.init(self, s)

    def step(self, s: GenState, g: int) -> None:
        s.p.strategy.step(self, s, g)
