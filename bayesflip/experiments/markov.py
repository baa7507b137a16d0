"""Family F: in-context learning of a Markov chain's transition matrix.

A trajectory ``x_0 .. x_{N-1}`` of a chain over S state tokens (default `` A`` `` B`` `` C`` `` D``)
is rendered as ``<head> A, C, C, B, ...,`` (:func:`~bayesflip.experiments.seq.build_curve`
with separator ``","``) and the model's next-state distribution is read at **every**
position from one forward pass.

Transition matrices ``P`` (rows sum to 1, ``P[i, j] = P(x_{t+1}=j | x_t=i)``):

* ``uniform``: ``P[i, j] = 1/S``;
* ``sticky``:  ``P[i, i] = s`` (``sticky_prob``, default 0.7), ``P[i, j≠i] = (1 − s)/(S − 1)``;
* ``random``:  every row ``~ Dirichlet(α·1)`` (``dirichlet_alpha``), seeded by the experiment
  seed and the matrix index (``random_matrices`` distinct matrices, shared by their samples).

Initial state ``x_0 ~ π_0`` with ``init``: ``stationary`` (the chain's stationary
distribution π, π P = π, Σπ = 1, solved by least squares — for a chain without a unique one,
e.g. sticky_prob = 1, this is the minimum-norm solution, the uniform distribution) or
``uniform``. Then ``x_t ~ P[x_{t−1}]`` (inverse-CDF sampling of one uniform per step).

Arrays per cell (position i = the read before state i; i = N reads after the last state):

* ``logprobs`` (position, state): summed log-probs of the state tokens at each read;
* ``states`` (step,): the trajectory's state indices;
* ``true_row`` (position, state): the distribution the next state is drawn from —
  ``π_0`` at position 0, ``P[x_{i−1}]`` at position i ≥ 1 (so TVD(model, true_row) vs
  position is the learning curve);
* ``matrix`` (state, state2): the transition matrix ``P`` of the cell.

Cells: matrix kind × matrix index (coordinate ``matrix_name``; random only) × sample; the trajectory
length is fixed.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Literal, Optional

import numpy as np
from pydantic import AfterValidator, Field

from ..prompts import Prompt
from . import register
from .base import ArraySpec, Family, Params, RunContext, cell_seed, use_chat
from .seq import build_curve, validate_sequence_pieces



def _unit_interval(v: float) -> float:
    """Both bounds in the message (a Field(ge, le) error names only the violated one)."""
    if not 0.0 <= v <= 1.0:
        raise ValueError("must lie in [0, 1] (allowed: [0, 1])")
    return v


Prob = Annotated[float, AfterValidator(_unit_interval)]
KINDS = ("uniform", "sticky", "random")

HEAD = "Here is a sequence of states visited by a Markov chain over the states {names}:"
USER = ("Please simulate a Markov chain over the states {names} and list the states it visits, "
        "separated by commas.")
PREFILL = "The chain visited the states:"


class MarkovParams(Params):
    kinds: list[Literal["uniform", "sticky", "random"]] = Field(default_factory=lambda: list(KINDS), min_length=1)
    states: list[str] = Field(default_factory=lambda: [" A", " B", " C", " D"], min_length=2)
    sticky_prob: Prob = 0.7
    dirichlet_alpha: float = Field(1.0, gt=0.0)
    random_matrices: int = Field(3, ge=1)
    init: Literal["stationary", "uniform"] = "stationary"
    n_steps: int = Field(100, ge=1, le=4000)
    samples: int = Field(10, ge=1)
    separator: str = ","
    head: Optional[str] = None      # base prompt / instruct prefill; "{names}" is replaced by "A, B, C and D"
    user: Optional[str] = None      # instruct user message
    variant: Literal["auto", "base", "instruct"] = "auto"


def transition_matrix(kind: str, n_states: int, sticky_prob: float = 0.7, alpha: float = 1.0,
                      seed: int = 0) -> np.ndarray:
    """(S, S) row-stochastic matrix of one kind (see module docstring); ``seed`` only for ``random``."""
    if kind == "uniform":
        return np.full((n_states, n_states), 1.0 / n_states)
    if kind == "sticky":
        m = np.full((n_states, n_states), (1.0 - sticky_prob) / (n_states - 1))
        np.fill_diagonal(m, sticky_prob)
        return m
    if kind == "random":
        return np.random.default_rng(seed).dirichlet(np.full(n_states, alpha), size=n_states)
    from ..errors import ConfigError
    raise ConfigError("params.kinds", f"unknown matrix kind {kind!r}", allowed=KINDS)


def stationary(m: np.ndarray) -> np.ndarray:
    """π with π P = π and Σπ = 1: least squares on [Pᵀ − I; 1ᵀ] π = [0; 1] (minimum norm if not unique)."""
    s = m.shape[0]
    a = np.vstack([m.T - np.eye(s), np.ones((1, s))])
    b = np.zeros(s + 1)
    b[-1] = 1.0
    pi = np.linalg.lstsq(a, b, rcond=None)[0]
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def sample_trajectory(m: np.ndarray, init: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``x_0 ~ init``, ``x_t ~ m[x_{t−1}]``; one uniform per step, inverse CDF. Returns (n,) int32."""
    u = rng.random(n)
    cum = np.cumsum(m, axis=1)
    cum[:, -1] = 1.0
    c0 = np.cumsum(init)
    c0[-1] = 1.0
    x = np.empty(n, dtype=np.int32)
    x[0] = int(np.searchsorted(c0, u[0], side="right"))
    for t in range(1, n):
        x[t] = int(np.searchsorted(cum[x[t - 1]], u[t], side="right"))
    return x


def true_rows(m: np.ndarray, init: np.ndarray, states: np.ndarray) -> np.ndarray:
    """(N+1, S): ``init`` at position 0, ``m[x_{i−1}]`` at position i ≥ 1."""
    return np.vstack([init[None], m[states]])


def _names(states: list[str]) -> str:
    n = [s.strip() for s in states]
    return ", ".join(n[:-1]) + " and " + n[-1]


@register
class MarkovFamily(Family):
    name = "markov"
    Params = MarkovParams

    def cells(self, p: MarkovParams) -> list[dict]:
        out = []
        for kind in p.kinds:
            mats = range(p.random_matrices) if kind == "random" else [0]
            for mi, s in itertools.product(mats, range(p.samples)):
                out.append({"kind": kind, "matrix_name": mi, "sample": s})
        return out

    def arrays(self, p: MarkovParams) -> dict[str, ArraySpec]:
        s, n = len(p.states), p.n_steps
        return {"logprobs": ArraySpec(("position", "state"), (n + 1, s)),
                "states": ArraySpec(("step",), (n,), "int32"),
                "true_row": ArraySpec(("position", "state"), (n + 1, s)),
                "matrix": ArraySpec(("state", "state2"), (s, s))}

    def coords(self, p: MarkovParams) -> dict[str, list]:
        return {"state": list(p.states), "state2": list(p.states), "position": list(range(p.n_steps + 1)),
                "step": list(range(p.n_steps))}

    def head(self, p: MarkovParams, model_kind: str) -> Prompt:
        names = _names(p.states)
        chat = use_chat(p.variant, model_kind)
        text = (p.head or (PREFILL if chat else HEAD)).replace("{names}", names)
        return Prompt(text=text, messages=(("user", (p.user or USER).replace("{names}", names)),) if chat else None)

    def validate(self, p: MarkovParams, tokenizer, model_kind: str) -> None:
        from ..errors import ConfigError
        if len(set(p.states)) != len(p.states):
            raise ConfigError("params.states", f"duplicate state in {p.states!r}", allowed=["distinct strings"])
        validate_sequence_pieces(tokenizer, self.head(p, model_kind), p.states, p.separator)

    def matrix(self, p: MarkovParams, cell: dict, seed: int) -> np.ndarray:
        return transition_matrix(cell["kind"], len(p.states), p.sticky_prob, p.dirichlet_alpha,
                                 seed=cell_seed(seed, "markov-matrix", len(p.states), p.dirichlet_alpha, cell["matrix_name"]))

    def init(self, p: MarkovParams, m: np.ndarray) -> np.ndarray:
        return stationary(m) if p.init == "stationary" else np.full(m.shape[0], 1.0 / m.shape[0])

    def trajectory(self, p: MarkovParams, cell: dict, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(matrix, initial distribution, states) of one cell."""
        m = self.matrix(p, cell, seed)
        init = self.init(p, m)
        rng = np.random.default_rng(cell_seed(seed, "markov", p.init, sorted(cell.items())))
        return m, init, sample_trajectory(m, init, p.n_steps, rng)

    def run(self, p: MarkovParams, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        head = self.head(p, ctx.model_kind)
        trajs = [self.trajectory(p, c, ctx.seed) for c in cells]
        reqs = [build_curve(ctx.tokenizer, head, p.states, x, p.separator) for _, _, x in trajs]
        curves = ctx.scorer.score_curves(reqs)
        return {"logprobs": np.stack(curves).astype(np.float32),
                "states": np.stack([x for _, _, x in trajs]),
                "true_row": np.stack([true_rows(m, i, x) for m, i, x in trajs]).astype(np.float32),
                "matrix": np.stack([m for m, _, _ in trajs]).astype(np.float32)}
