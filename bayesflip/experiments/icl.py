"""Family C (in-context evidence) and D (distribution shift): coin and die learning curves.

A sequence of N outcomes is drawn i.i.d. from a known distribution and rendered as
``I tossed a coin and it landed on heads, then tails, then ...``; the model's next-outcome
distribution is read after **every** prefix 0..N from one forward pass.

* coin: P(heads) = θ;  die: face ``f`` has probability b, the other five (1−b)/5.
* shift ``switch``: θ1 for flips i < cutoff, θ2 after;  ``block``: θ2 for start ≤ i < end.

Arrays per cell: ``logprobs`` (position, choice) summed choice log-probs (float32; the
renormalised distribution and off-choice mass follow), ``outcomes`` (flip,) choice indices,
``p_true`` (position, choice) the generating distribution of the outcome at that position.

``protocol: paper`` (PAPER_PROTOCOLS.md C/D; :mod:`.paper`): head = the bias statement
(``statement: theta`` — the same θ, default without shift; ``theta2`` — the double-distribution
configs; ``none`` — the posterior chain, default with shift) + a query paraphrase ending in a space,
rendered as :func:`bayesflip.prompts.paper_prompt`; the flips follow joined by ``", then"`` with a
trailing ``", then"``. Cells get ``instruct`` and ``query`` indices (every pair of the original's
``product(instruct_prompts, queries)``). The sequence process is ``flips``
(:mod:`.paper_flips`, the original's generators):

* ``seeded`` (default) / ``numpy_legacy`` / ``random_chain``: one sequence per (θ[, θ2][, face],
  sample), shared by every (instruct prompt, query) pair; every prefix 0..n_flips is read from one
  pass, and ``read_ns`` (default 0, 1, 3, 5, 10, 20, 100, the paper's N) are the prefixes listed by
  ``bayesflip prompts``. ``numpy_legacy``: the coin script's numpy draw (whole 11-θ grid, then
  select); ``random_chain``: the posterior-chain script's ``random.choices`` chain (coin).
* ``random_choices``: the published ICL runs (the committed v2 configs) — a fresh sequence per
  (N, θ[, face], query), shared by the instruct prompts of that query. Cells get a coordinate ``n``
  (one per ``read_ns``, the sequence length); ``logprobs`` / ``p_true`` hold reads 0..n (the prefix
  reads of that cell's own sequence) and NaN after, ``outcomes`` −1 after flip n; ``n_flips`` is the
  largest N. ``bayesflip prompts`` lists each cell's whole sequence once. Reduce reads position N of
  the cells with n = N for the paper's TVD and only the n = n_flips cells for everything else
  (:func:`bayesflip.reduce.icl.sequence_length_view`).

Exchangeability: ``permutations: P`` scores P seeded random permutations of each cell's
evidence with the same head: arrays ``perm_logprobs`` (perm, position, choice) and
``perm_outcomes`` (perm, flip) (reduce: :func:`bayesflip.bayes.exchangeability_gap`).
"""

from __future__ import annotations

import itertools
from typing import Annotated, ClassVar, Generic, Literal, Mapping, Optional, TypeVar

import numpy as np
from pydantic import Field, field_validator

from ..domain import PROCESS_TEXTS, inverse_cdf, process_probs
from ..errors import ConfigError
from ..prompts import Prompt
from ..stimuli import StimulusList, StimulusText
from . import paper, paper_flips, register
from .base import (ArraySpec, template_problem, Family, Params, Protocol, RenderedCell, RunContext, cell_seed, evidence_kind,
                   use_chat)
from .protocol import ProtocolStrategy
from .seq import build_curve, sequence_text, validate_sequence_pieces

Prob = Annotated[float, Field(ge=0.0, le=1.0)]

COIN, DIE = ({"choices": list(t.choices), "head": t.query, "user": t.sequence_instruction}
             for t in (PROCESS_TEXTS["coin"], PROCESS_TEXTS["die"]))


class ICLProtocol(ProtocolStrategy):
    """What ``clean`` and ``paper`` ICL differ in: the grid, the head before the flips, the sequences."""

    def cells(self, p: "ICLParams", cells: list[dict]) -> list[dict]:
        """The protocol's cells from the (θ[, θ2][, face], sample) grid."""
        return cells

    def cell_head(self, fam: "ICLFamily", p: "ICLParams", cell: dict, model_kind: str) -> Prompt:
        """The prompt before the first outcome of this cell."""
        raise NotImplementedError

    def head(self, fam: "ICLFamily", p: "ICLParams", model_kind: str) -> Prompt:
        """The one head every cell shares (clean only)."""
        raise ConfigError("params.protocol", f"family {fam.name!r} has no paper rendering", allowed=["clean"])

    def sample_outcomes(self, p: "ICLParams", cell: dict, seed: int, probs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def validate_heads(self, fam: "ICLFamily", p: "ICLParams", tokenizer, model_kind: str) -> None:
        """The first outcome and the separator join every head cleanly."""
        raise NotImplementedError


class CleanICL(ICLProtocol):
    """bayesflip's head (``head`` / ``user``, the process's query and sequence instruction), one
    sequence per cell seeded by the cell."""

    name = "clean"

    def check(self, p: "ICLParams") -> None:
        paper.refuse_paper_keys(p, ("statement_template", "instruct_statement_template"))
        if p.statement not in (None, "none"):
            raise ValueError("key 'statement' needs protocol: paper (allowed protocols: clean, paper)")
        if p.flips != "seeded":
            raise ValueError(f"flips {p.flips!r} needs protocol: paper (allowed: seeded)")

    def cell_head(self, fam: "ICLFamily", p: "ICLParams", cell: dict, model_kind: str) -> Prompt:
        return self.head(fam, p, model_kind)

    def head(self, fam: "ICLFamily", p: "ICLParams", model_kind: str) -> Prompt:
        spec = _spec(p)
        text = p.head or spec["head"]
        chat = use_chat(p.variant, model_kind)
        return Prompt(text=text, messages=(("user", p.user or spec["user"]),) if chat else None)

    def sample_outcomes(self, p: "ICLParams", cell: dict, seed: int, probs: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(cell_seed(seed, "icl", p.process, p.shift, sorted(cell.items())))
        return inverse_cdf(probs, rng.random(p.n_flips))

    def validate_heads(self, fam: "ICLFamily", p: "ICLParams", tokenizer, model_kind: str) -> None:
        validate_sequence_pieces(tokenizer, self.head(fam, p, model_kind), _spec(p)["choices"], p.separator)


class PaperICL(ICLProtocol):
    """The coin-flip study's head (bias statement + query paraphrase, :mod:`.paper`), every (instruct
    prompt, query) pair, the sequences of ``flips`` (:mod:`.paper_flips`)."""

    name = "paper"

    def check(self, p: "ICLParams") -> None:
        paper.resolve_stimuli(p, ("head", "user"), paper.QUERY_SET[p.process], paper.INSTRUCT_SET[p.process])
        if p.statement is None:
            p.statement = "theta" if p.shift == "none" else "none"
        if p.statement == "theta2" and p.shift == "none":
            raise ValueError("statement 'theta2' needs a shift (allowed without shift: theta, none)")
        if p.flips == "numpy_legacy":
            if p.process != "coin" or p.shift != "none" or p.samples != 1:
                raise ValueError("flips 'numpy_legacy' reproduces the coin script: process coin, shift none, "
                                 "samples 1 (allowed otherwise: seeded)")
            paper_flips.check_legacy(p.thetas)
        if p.flips == "random_choices":
            if p.shift != "none" or p.samples != 1 or p.permutations:
                raise ValueError("flips 'random_choices' reproduces the v2 ICL configs: shift none, samples 1, "
                                 "permutations 0 (allowed otherwise: seeded)")
            assert p.queries is not None                                     # filled by resolve_stimuli
            paper_flips.check_v2(p.process, p.thetas, p.faces, p.read_ns, len(p.queries), p.n_flips)
        if p.flips == "random_chain" and (p.process != "coin" or p.samples != 1):
            raise ValueError("flips 'random_chain' reproduces the posterior-chain script: process coin, "
                             "samples 1 (allowed otherwise: seeded)")

    def cells(self, p: "ICLParams", cells: list[dict]) -> list[dict]:
        if p.flips == "random_choices":  # one sequence per (N, θ[, face], query)
            cells = [{"n": n, **c} for n in sorted(set(p.read_ns)) for c in cells]
        # every (instruct prompt, query) pair; instruct prompts share the query's sequence
        return [{**c, "instruct": i, "query": q} for c in cells for i, q in paper.pairs(*paper.stimuli(p))]

    def cell_head(self, fam: "ICLFamily", p: "ICLParams", cell: dict, model_kind: str) -> Prompt:
        chat = use_chat(p.variant, model_kind)
        return paper.render_prompt(statement_text(p, cell, chat), paper.stimuli(p)[0][cell["query"]],
                                   paper.stimuli(p)[1][cell["instruct"]], chat)

    def sample_outcomes(self, p: "ICLParams", cell: dict, seed: int, probs: np.ndarray) -> np.ndarray:
        # numpy_legacy / random_chain / seeded: one sequence per bias (and sample)
        if p.flips == "numpy_legacy":
            return paper_flips.legacy_sequence(seed, p.n_flips, cell["theta"])
        if p.flips == "random_choices":
            return paper_flips.v2_sequence(p.process, seed, cell["n"], cell["theta"], cell.get("face"), cell["query"])
        if p.flips == "random_chain":
            return paper_flips.chain_flips(seed, probs)
        key = sorted((k, v) for k, v in cell.items() if k not in ("instruct", "query"))
        rng = np.random.default_rng(cell_seed(seed, "icl-paper", p.process, p.shift, key))
        return inverse_cdf(probs, rng.random(p.n_flips))

    def validate_heads(self, fam: "ICLFamily", p: "ICLParams", tokenizer, model_kind: str) -> None:
        c0 = fam.cells(p)[-1]
        for q in range(len(paper.stimuli(p)[0])):  # the first choice joins every query ending
            try:
                validate_sequence_pieces(tokenizer, self.cell_head(fam, p, {**c0, "query": q, "instruct": 0}, model_kind),
                                         _spec(p)["choices"], p.separator)
            except ValueError as e:
                raise ConfigError(f"params.queries.{q}", str(e)) from None


PROTOCOLS: dict[str, ICLProtocol] = {"clean": CleanICL(), "paper": PaperICL()}


class ICLParams(Params):
    process: Literal["coin", "die"] = "coin"
    thetas: list[Prob] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)], min_length=1)
    faces: list[Annotated[int, Field(ge=1, le=6)]] = Field(default_factory=lambda: [1, 2, 3, 4, 5, 6], min_length=1)
    n_flips: int = Field(100, ge=1, le=4000)
    samples: int = Field(10, ge=1)
    separator: str = ", then"
    head: Optional[str] = None
    user: Optional[str] = None
    variant: Literal["auto", "base", "instruct"] = "auto"
    shift: Literal["none", "switch", "block"] = "none"
    theta2s: list[Prob] = Field(default_factory=list)
    cutoff: int = Field(50, ge=0)
    block: tuple[int, int] = (40, 60)
    protocol: Protocol = "clean"
    queries: Optional[StimulusList] = None            # paper: query paraphrases ending in a space
    instruct_prompts: Optional[StimulusList] = None   # paper: user messages of instruct models
    statement: Optional[Literal["theta", "theta2", "none"]] = None  # paper: which bias is stated
    statement_template: Optional[StimulusText] = None          # paper: override of the base ("I") statement
    instruct_statement_template: Optional[StimulusText] = None  # paper: override of the instruct ("you") statement
    flips: Literal["seeded", "numpy_legacy", "random_choices", "random_chain"] = "seeded"
    read_ns: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: list(paper.READ_NS), min_length=1)
    permutations: int = Field(0, ge=0)

    @field_validator("statement_template", "instruct_statement_template")
    @classmethod
    def _statement_fills(cls, v):
        """The statement is filled with ``{b}`` (the percent) and ``{face}``: anything else fails here, not in a job."""
        if v is not None and (problem := template_problem(v, {"b": paper.percent(0.5), "face": 1})):
            raise ValueError(f"{problem} (allowed placeholders: {{b}}, {{face}})")
        return v

    PROTOCOLS: ClassVar[Mapping[str, ProtocolStrategy]] = PROTOCOLS



def _spec(p: ICLParams) -> dict:
    return COIN if p.process == "coin" else DIE


def outcome_probs(p: ICLParams, theta: float, face: int) -> np.ndarray:
    """Generating distribution over the choices for one bias."""
    return process_probs(p.process, theta, face)


def statement_text(p: ICLParams, cell: dict, chat: bool) -> str:
    """The paper head's bias statement ('' for ``statement: none``)."""
    if p.statement in (None, "none"):
        return ""
    theta = cell["theta"] if p.statement == "theta" else cell["theta2"]
    forms = paper.ICL_STATEMENT[p.process]
    tpl = (p.instruct_statement_template or forms["instruct_statement"]) if chat else \
        (p.statement_template or forms["statement"])
    return tpl.format(b=paper.percent(theta), face=cell.get("face", 1))


def per_flip_probs(p: ICLParams, cell: dict) -> np.ndarray:
    """(N, K) generating distribution of every flip (shift-aware)."""
    first = outcome_probs(p, cell["theta"], cell.get("face", 1))
    rows = np.repeat(first[None], p.n_flips, axis=0)
    if p.shift != "none":
        second = outcome_probs(p, cell["theta2"], cell.get("face", 1))
        idx = np.arange(p.n_flips)
        sel = idx >= p.cutoff if p.shift == "switch" else (idx >= p.block[0]) & (idx < p.block[1])
        rows[sel] = second
    return rows


def _pad(a: np.ndarray, length: int, fill) -> np.ndarray:
    """``a`` extended along its first axis to ``length`` with ``fill`` (a shorter random_choices sequence)."""
    a = np.asarray(a)
    if len(a) == length:
        return a
    out = np.full((length, *a.shape[1:]), fill, dtype=np.result_type(a.dtype, np.asarray(fill).dtype))
    out[: len(a)] = a
    return out


P = TypeVar("P", bound=ICLParams)   # the Params of ICL or of a family built on it (attention)


@register
class ICLFamily(Family, Generic[P]):
    name = "icl"
    Params = ICLParams

    def cells(self, p: P) -> list[dict]:
        theta2s = p.theta2s if p.shift != "none" else [None]
        faces = p.faces if p.process == "die" else [None]
        out = []
        for theta, theta2, face, s in itertools.product(p.thetas, theta2s, faces, range(p.samples)):
            c = {"theta": theta, "sample": s}
            if theta2 is not None:
                c["theta2"] = theta2
            if face is not None:
                c["face"] = face
            out.append(c)
        return p.strategy.cells(p, out)

    def evidence(self, p: P) -> dict:
        """Every cell: the flips as context, after the bias statement ``p.statement`` (clean: none)."""
        return evidence_kind(p.statement or "none", "outcomes")

    def arrays(self, p: P) -> dict[str, ArraySpec]:
        k = len(_spec(p)["choices"])
        out = {"logprobs": ArraySpec(("position", "choice"), (p.n_flips + 1, k), finite="cell"),
               "outcomes": ArraySpec(("flip",), (p.n_flips,), "int32"),
               "p_true": ArraySpec(("position", "choice"), (p.n_flips + 1, k))}
        if p.permutations:
            out["perm_logprobs"] = ArraySpec(("perm", "position", "choice"), (p.permutations, p.n_flips + 1, k),
                                             finite="cell")
            out["perm_outcomes"] = ArraySpec(("perm", "flip"), (p.permutations, p.n_flips), "int32")
        return out

    def coords(self, p: P) -> dict[str, list]:
        out = {"choice": _spec(p)["choices"], "position": list(range(p.n_flips + 1)), "flip": list(range(p.n_flips))}
        if p.permutations:
            out["perm"] = list(range(p.permutations))
        return out

    def cell_head(self, p: P, cell: dict, model_kind: str) -> Prompt:
        """The prompt before the first outcome of this cell (clean: the same for every cell)."""
        return p.strategy.cell_head(self, p, cell, model_kind)

    def read_ns(self, p: P) -> list[int]:
        """The N listed by ``bayesflip prompts`` (paper grid capped at n_flips)."""
        return sorted({min(n, p.n_flips) for n in p.read_ns})

    def render(self, p: P, cells: list[dict], tokenizer, model_kind: str, seed: int) -> list[RenderedCell]:
        choices = _spec(p)["choices"]
        out = []
        for c in cells:
            head = self.cell_head(p, c, model_kind)
            o = self.sample_outcomes(p, c, seed)
            if "n" in c:  # random_choices: the cell's own sequence of n outcomes, read at n
                out.append(RenderedCell(cell=dict(c), text=sequence_text(tokenizer, head, choices, o, p.separator),
                                        choices=list(choices)))
                continue
            for n in self.read_ns(p):
                out.append(RenderedCell(cell={**c, "n": n}, text=sequence_text(tokenizer, head, choices, o[:n], p.separator),
                                        choices=list(choices)))
        return out

    def longest_input(self, p: P, cells: list[dict], tokenizer, model_kind: str, seed: int) -> int:
        """The full curve of each cell (head + every outcome and separator), as :meth:`run` forwards it."""
        choices = _spec(p)["choices"]
        reqs = [build_curve(tokenizer, self.cell_head(p, c, model_kind), choices, self.sample_outcomes(p, c, seed),
                            p.separator) for c in cells]
        return max(len(r.ids) + max(len(c) for c in r.choices) - 1 for r in reqs)

    def head(self, p: P, model_kind: str) -> Prompt:
        """The head every clean cell shares (paper: a ConfigError; its heads are per cell)."""
        return p.strategy.head(self, p, model_kind)

    def validate(self, p: P, tokenizer, model_kind: str) -> None:
        if type(self).run is not ICLFamily.run:  # a subclass with its own run (attention)
            if p.permutations:
                raise ConfigError("params.permutations", f"family {self.name!r} does not score permutations", allowed=[0])
            if p.flips == "random_choices":
                raise ConfigError("params.flips", f"family {self.name!r} reads one full-length sequence per cell",
                                  allowed=["seeded", "numpy_legacy", "random_chain"])
        if p.shift != "none" and not p.theta2s:
            raise ConfigError("params.theta2s", f"shift {p.shift!r} needs at least one theta2", allowed=["[0, 1]"])
        if p.shift == "block" and not (0 <= p.block[0] <= p.block[1] <= p.n_flips):
            raise ConfigError("params.block", f"block {p.block} must satisfy 0 <= start <= end <= n_flips={p.n_flips}")
        p.strategy.validate_heads(self, p, tokenizer, model_kind)

    def sample_outcomes(self, p: P, cell: dict, seed: int) -> np.ndarray:
        """The cell's outcome indices: ``n_flips`` of them, or ``cell["n"]`` under ``random_choices``."""
        return p.strategy.sample_outcomes(p, cell, seed, per_flip_probs(p, cell))

    def permuted(self, p: P, cell: dict, outcomes: np.ndarray, seed: int) -> np.ndarray:
        """(P, N) seeded random permutations of a cell's evidence."""
        rng = np.random.default_rng(cell_seed(seed, "perm", sorted(cell.items())))
        return np.stack([outcomes[rng.permutation(len(outcomes))] for _ in range(p.permutations)]).astype(np.int32)

    def run(self, p: P, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        choices = _spec(p)["choices"]
        tok = ctx.tokenizer
        heads = [self.cell_head(p, c, ctx.model_kind) for c in cells]
        outs = [self.sample_outcomes(p, c, ctx.seed) for c in cells]
        reqs = [build_curve(tok, h, choices, o, p.separator) for h, o in zip(heads, outs)]
        curves = paper.score_curves_once(ctx.scorer, reqs)
        p_true = []
        for c, o in zip(cells, outs):
            rows = per_flip_probs(p, c)
            rows = np.vstack([rows, rows[-1:]])  # the read after the last flip: the last regime
            p_true.append(_pad(rows[: len(o) + 1], p.n_flips + 1, np.nan))
        res = {"logprobs": np.stack([_pad(cv, p.n_flips + 1, np.nan) for cv in curves]).astype(np.float32),
               "outcomes": np.stack([_pad(o, p.n_flips, -1) for o in outs]).astype(np.int32),
               "p_true": np.stack(p_true).astype(np.float32)}
        if p.permutations:
            perms = [self.permuted(p, c, o, ctx.seed) for c, o in zip(cells, outs)]
            preqs = [build_curve(tok, h, choices, po, p.separator) for h, ps in zip(heads, perms) for po in ps]
            pc = paper.score_curves_once(ctx.scorer, preqs)
            k = len(choices)
            res["perm_logprobs"] = np.stack(pc).astype(np.float32).reshape(len(cells), p.permutations, p.n_flips + 1, k)
            res["perm_outcomes"] = np.stack(perms)
        return res
