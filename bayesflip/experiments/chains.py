"""Iterated learning with the LLM: coin / die chains (EXPERIMENTS.md section 3).

Generation ``g`` holds ``n`` outcomes ``data[g]``. A fresh learner (the model) sees
``data[g]`` rendered like :mod:`.icl` (``I tossed a coin and it landed on heads, then tails,
then``) and its predictive ``p_g`` over the K choices is read after the last separator
(renormalised over the choices; the raw log-probs give the off-choice mass). It then
produces ``data[g+1]`` by one of the learners:

* ``pm``: n i.i.d. draws from ``p_g``;
* ``sampler``: the model continues autoregressively: outcome ``i`` is drawn from the
  renormalised choice distribution read after ``data[g]`` **and** its own outcomes
  ``0..i-1`` (one engine call per step, all sampler chains of the shard together);
  outcome 0 is drawn from ``p_g`` itself; only these n outcomes are passed on;
* ``tempered`` (τ): n i.i.d. draws from ``p_g^(1/τ) / Σ_c p_g(c)^(1/τ)`` (= softmax(logprob/τ));
* ``greedy``: all n outcomes = ``argmax_c p_g(c)`` (the first maximum on an exact tie).

Stored ``tau``: ``pm`` and ``sampler`` 1.0, ``greedy`` 0.0, ``tempered`` its τ.

Filter (the "interaction phase"): produced data is accepted only if it holds at least
``min_count`` outcomes equal to choice ``filter_choice`` (coin: heads); otherwise the
learner redraws the whole generation (``sampler``: reruns its n autoregressive steps), at
most ``max_redraws`` times; after that the last draw is kept and ``accepted`` is False.
``greedy`` is deterministic, so a rejected greedy draw is kept at once (accepted False,
0 redraws). ``min_count = 0`` = no filter. Generation 0 is the given initial data and is
never filtered (``accepted[0]`` says whether it would pass).

Generation 0: ``init`` outcomes equal to choice ``init_choice`` and ``n - init`` others
(coin: tails; die: spread over the other faces as evenly as possible, lower faces first),
in the order of a seeded shuffle (``rng.permutation``) by the chain's own generator.

Randomness: one ``numpy.random.Generator`` per chain (``default_rng(cell_seed(seed, ...))``),
used in this order per generation: the init shuffle (generation 0 only), then the draws
(inverse-CDF of ``rng.random()`` uniforms). The model's reads are deterministic.

Arrays per cell (``generation`` = 0..G, reads after ``data[g]``, G+1 engine reads):
``logprobs`` (generation, choice) raw summed log-probs; ``probs`` renormalised ``p_g``;
``entropy`` (generation,) ``H(p_g) = -Σ_c p_g(c) log p_g(c)`` (nats); ``off_mass``
(generation,) ``1 - Σ_c exp(logprob_c)``; ``counts`` (generation, choice) of ``data[g]``;
``outcomes`` (generation, slot) the outcomes of ``data[g]`` (-1 beyond ``n``); ``redraws``
(generation,) rejected draws before ``data[g]`` was accepted; ``accepted`` (generation,).

Resume: progress is checkpointed after every generation (:mod:`.generational`, :mod:`.checkpoint`).
"""

from __future__ import annotations

import itertools
from typing import Annotated, Literal, Optional

import numpy as np
from pydantic import Field

from ..engine import ChoiceRequest, choice_distribution
from ..errors import ConfigError
from ..prompts import Prompt, encode_piece, encode_prompt, render
from ..bayes import entropy as _entropy
from . import register
from ..domain import draw
from .base import ArraySpec, Params, RenderedCell, cell_seed, evidence_kind, use_chat
from .generational import GenerationalFamily, GenState
from .icl import COIN, DIE
from .seq import validate_sequence_pieces

Learner = Literal["pm", "sampler", "tempered", "greedy"]
LEARNER_TAU = {"pm": 1.0, "sampler": 1.0, "greedy": 0.0}


class ChainParams(Params):
    process: Literal["coin", "die"] = "coin"
    learners: list[Learner] = Field(default_factory=lambda: ["pm"], min_length=1)  # type: ignore[arg-type]  # mypy types a lambda in Field's union context as list[str]
    taus: list[Annotated[float, Field(gt=0.0)]] = Field(default_factory=lambda: [0.5])  # tempered only
    n: list[Annotated[int, Field(ge=1, le=1000)]] = Field(default_factory=lambda: [10], min_length=1)
    inits: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [5], min_length=1)
    init_choice: int = Field(0, ge=0)
    min_counts: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0], min_length=1)
    filter_choice: int = Field(0, ge=0)
    max_redraws: int = Field(1000, ge=0)
    generations: int = Field(30, ge=0, le=10000)
    chains: int = Field(100, ge=1)
    separator: str = ", then"
    head: Optional[str] = None
    user: Optional[str] = None
    variant: Literal["auto", "base", "instruct"] = "auto"


def _spec(p: ChainParams) -> dict:
    return COIN if p.process == "coin" else DIE


def initial_outcomes(k_choices: int, n: int, init: int, init_choice: int, rng: np.random.Generator) -> np.ndarray:
    """Generation-0 data: ``init`` × ``init_choice``, the rest spread over the other choices, shuffled."""
    others = [c for c in range(k_choices) if c != init_choice]
    rest = n - init
    base = [others[i % len(others)] for i in range(rest)]
    seq = np.array([init_choice] * init + sorted(base), dtype=np.int64)
    return seq[rng.permutation(n)]


def tempered(logprobs: np.ndarray, tau: float) -> np.ndarray:
    """``p^(1/τ)`` renormalised = softmax(logprob / τ)."""
    z = np.asarray(logprobs, dtype=np.float64) / tau
    z = np.exp(z - z.max())
    return z / z.sum()


@register
class ChainFamily(GenerationalFamily):
    name = "chains"
    Params = ChainParams

    def cells(self, p: ChainParams) -> list[dict]:
        out = []
        for learner in p.learners:
            taus = p.taus if learner == "tempered" else [LEARNER_TAU[learner]]
            for tau, n, init, mc, s in itertools.product(taus, p.n, p.inits, p.min_counts, range(p.chains)):
                out.append({"learner": learner, "tau": float(tau), "n": n, "init": init, "min_count": mc,
                            "sample": s})
        return out

    def evidence(self, p: ChainParams) -> dict:
        """Every read: the previous generation's outcomes as context, no statement."""
        return evidence_kind("none", "outcomes")

    def arrays(self, p: ChainParams) -> dict[str, ArraySpec]:
        k = len(_spec(p)["choices"])
        g = p.generations + 1
        return {"logprobs": ArraySpec(("generation", "choice"), (g, k)),
                "probs": ArraySpec(("generation", "choice"), (g, k)),
                "entropy": ArraySpec(("generation",), (g,)),
                "off_mass": ArraySpec(("generation",), (g,)),
                "counts": ArraySpec(("generation", "choice"), (g, k), "int32"),
                "outcomes": ArraySpec(("generation", "slot"), (g, max(p.n)), "int32"),
                "redraws": ArraySpec(("generation",), (g,), "int32"),
                "accepted": ArraySpec(("generation",), (g,), "bool")}

    def coords(self, p: ChainParams) -> dict[str, list]:
        return {"choice": _spec(p)["choices"], "generation": list(range(p.generations + 1)),
                "slot": list(range(max(p.n)))}

    def head(self, p: ChainParams, model_kind: str) -> Prompt:
        spec = _spec(p)
        chat = use_chat(p.variant, model_kind)
        return Prompt(text=p.head or spec["head"], messages=(("user", p.user or spec["user"]),) if chat else None)

    def validate(self, p: ChainParams, tokenizer, model_kind: str) -> None:
        k = len(_spec(p)["choices"])
        for key, v in (("init_choice", p.init_choice), ("filter_choice", p.filter_choice)):
            if v >= k:
                raise ConfigError(f"params.{key}", f"choice index {v} out of range for {p.process}",
                                  allowed=list(range(k)))
        if "tempered" in p.learners and not p.taus:
            raise ConfigError("params.taus", "learner 'tempered' needs at least one tau", allowed=["(0, inf)"])
        for key, vals in (("inits", p.inits), ("min_counts", p.min_counts)):
            bad = [v for v in vals if v > min(p.n)]
            if bad:
                raise ConfigError(f"params.{key}", f"{bad} exceed the smallest n = {min(p.n)}",
                                  allowed=[f"[0, {min(p.n)}]"])
        validate_sequence_pieces(tokenizer, self.head(p, model_kind), _spec(p)["choices"], p.separator)

    def render(self, p: ChainParams, cells: list[dict], tokenizer, model_kind: str, seed: int) -> list[RenderedCell]:
        """Generation 0's read: the head, then the seeded initial outcomes each followed by the separator."""
        choices = _spec(p)["choices"]
        out = []
        for c in cells:
            rng = np.random.default_rng(cell_seed(seed, *self.rng_key(p, c)))
            seq = initial_outcomes(len(choices), c["n"], c["init"], p.init_choice, rng)
            text = render(self.head(p, model_kind), tokenizer) + "".join(choices[int(o)] + p.separator for o in seq)
            out.append(RenderedCell(cell={**c, "generation": 0}, text=text, choices=list(choices)))
        return out

    def count_tokens(self, p: ChainParams, cells: list[dict], tokenizer, model_kind: str, seed: int):
        """Tokens of these cells' run, engine call by engine call (no model): per cell one read of the K
        choices after ``head + data[g]`` for every generation 0..G and, for the ``sampler`` learner, the
        ``n - 1`` autoregressive reads after ``data[g]`` + its own outcomes (contexts of n+1..2n-1
        outcomes) for every g < G. Assumptions: later generations' data have generation 0's mean
        tokens per outcome; a filtered sampler generation is drawn once (the run redraws it while the
        filter rejects it, a model-dependent number of times up to ``max_redraws``); pm / tempered /
        greedy draws cost no engine call."""
        from .tokens import TokenCount, branch_tokens

        choices = _spec(p)["choices"]
        head = len(encode_prompt(tokenizer, self.head(p, model_kind)))
        sep = encode_piece(tokenizer, p.separator)
        piece = [len(encode_piece(tokenizer, c)) + len(sep) for c in choices]
        branch = branch_tokens([encode_piece(tokenizer, c) for c in choices])
        out = TokenCount()
        for c in cells:
            rng = np.random.default_rng(cell_seed(seed, *self.rng_key(p, c)))
            seq = initial_outcomes(len(choices), c["n"], c["init"], p.init_choice, rng)
            per = float(np.mean([piece[int(o)] for o in seq])) if len(seq) else 0.0
            ctx0 = head + sum(piece[int(o)] for o in seq)
            n = ctx0 + branch + p.generations * (head + round(c["n"] * per) + branch)
            if c["learner"] == "sampler":
                n += p.generations * sum(head + round((c["n"] + i) * per) + branch for i in range(1, c["n"]))
            out.prompt += n
        return out

    # ------------------------------------------------------------------ run (GenerationalFamily)
    def rng_key(self, p: ChainParams, cell: dict) -> tuple:
        return ("chains", p.process, sorted(cell.items()))

    def last_generation(self, p: ChainParams) -> int:
        return p.generations

    def _pieces(self, s: GenState):
        """(context(seq) -> ids, choice ids), built once per run from the tokenizer."""
        if "pieces" not in s.cache:
            tok = s.ctx.tokenizer
            head_ids = encode_prompt(tok, self.head(s.p, s.ctx.model_kind))
            choice_ids = [encode_piece(tok, c) for c in _spec(s.p)["choices"]]
            sep_ids = encode_piece(tok, s.p.separator)
            piece = [c + sep_ids for c in choice_ids]

            def context(seq) -> list[int]:
                ids = list(head_ids)
                for o in seq:
                    ids += piece[int(o)]
                return ids

            s.cache["pieces"] = (context, choice_ids)
        return s.cache["pieces"]

    def init(self, s: GenState) -> None:
        K = len(_spec(s.p)["choices"])
        for i, c in enumerate(s.cells):
            seq = initial_outcomes(K, c["n"], c["init"], s.p.init_choice, s.rngs[i])
            self._set_data(s.arr, i, 0, seq, K, redraws=0, accepted=self._accept(s.p, c, seq))

    def step(self, s: GenState, g: int) -> None:
        p, cells, arr = s.p, s.cells, s.arr
        K = len(_spec(p)["choices"])
        context, choice_ids = self._pieces(s)
        datas = [arr["outcomes"][i, g, : c["n"]] for i, c in enumerate(cells)]
        lp = np.stack(s.ctx.scorer.score_choices([ChoiceRequest(context(d), choice_ids) for d in datas]))
        probs, off = choice_distribution(lp)
        arr["logprobs"][:, g] = lp
        arr["probs"][:, g] = probs
        arr["entropy"][:, g] = _entropy(probs)
        arr["off_mass"][:, g] = off
        if g < p.generations:
            self._produce(p, cells, s.ctx, arr, g, lp, probs, datas, s.rngs, context, choice_ids, K)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _accept(p: ChainParams, cell: dict, seq: np.ndarray) -> bool:
        return int(np.sum(seq == p.filter_choice)) >= cell["min_count"]

    @staticmethod
    def _set_data(arr, i: int, g: int, seq: np.ndarray, K: int, redraws: int, accepted: bool) -> None:
        arr["outcomes"][i, g, : len(seq)] = seq
        arr["counts"][i, g] = np.bincount(seq, minlength=K)
        arr["redraws"][i, g] = redraws
        arr["accepted"][i, g] = accepted

    def _produce(self, p, cells, ctx, arr, g, lp, probs, datas, rngs, context, choice_ids, K) -> None:
        """Draw ``data[g+1]`` for every chain (with filter redraws)."""
        new: dict[int, np.ndarray] = {}
        tries = {i: 0 for i in range(len(cells))}
        pending = list(range(len(cells)))
        while pending:
            samplers = [i for i in pending if cells[i]["learner"] == "sampler"]
            for i in pending:
                c = cells[i]
                if c["learner"] == "pm":
                    new[i] = draw(probs[i], c["n"], rngs[i])
                elif c["learner"] == "tempered":
                    new[i] = draw(tempered(lp[i], c["tau"]), c["n"], rngs[i])
                elif c["learner"] == "greedy":
                    new[i] = np.full(c["n"], int(np.argmax(probs[i])), dtype=np.int64)
            if samplers:
                new.update(self._sample_autoregressive(samplers, cells, ctx, probs, datas, rngs, context,
                                                       choice_ids))
            still = []
            for i in pending:
                c = cells[i]
                ok = self._accept(p, c, new[i])
                if ok or tries[i] >= p.max_redraws or c["learner"] == "greedy":
                    self._set_data(arr, i, g + 1, new[i], K, redraws=tries[i], accepted=ok)
                else:
                    tries[i] += 1
                    still.append(i)
            pending = still

    @staticmethod
    def _sample_autoregressive(idx, cells, ctx, probs, datas, rngs, context, choice_ids) -> dict[int, np.ndarray]:
        """The ``sampler`` learner: outcome i ~ renormalised read after data + own outcomes 0..i-1."""
        outs = {i: [int(draw(probs[i], 1, rngs[i])[0])] for i in idx}
        while True:
            active = [i for i in idx if len(outs[i]) < cells[i]["n"]]
            if not active:
                break
            reqs = [ChoiceRequest(context(list(datas[i]) + outs[i]), choice_ids) for i in active]
            q, _ = choice_distribution(np.stack(ctx.scorer.score_choices(reqs)))
            for row, i in enumerate(active):
                outs[i].append(int(draw(q[row], 1, rngs[i])[0]))
        return {i: np.array(o, dtype=np.int64) for i, o in outs.items()}
