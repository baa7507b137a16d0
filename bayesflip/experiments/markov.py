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

Cells: kind × ``matrix_name`` × sample (``matrix_name``: ``uniform``, ``sticky``, ``random0``,
``random1``, … for the generated kinds; the cell coordinate is not called ``matrix``, which is the
stored array); the trajectory length is fixed. Besides ``kinds``, cells come from:

* ``named``: matrices of the coin-flip study's ``configs/exps/mdp`` (:data:`NAMED`: ``uniform_mdp``,
  ``simple_mdp``, ``all_hard_states``, ``last_hard_state``), kind ``named``;
* ``non_uniformity``: the study's sweep u ∈ [0, 1] (``analysis/explore_mdp.ipynb``):
  ``M = clip(1/S + U(−1, 1)·u, 0)`` row-normalised, kind ``non_uniform``, name ``non_uniform_{u:.1f}``.
  ``matrices`` says where the U(−1, 1) draws come from:

  - ``seeded`` (clean default): one ``default_rng`` per u, seeded by the experiment seed;
  - ``paper`` (paper default): the study's own seeded process, :func:`paper_non_uniform_matrices` —
    ``np.random.seed(412415)``, then one 4×4 draw per u = ``np.arange(0.1, 1.1, 0.1)`` in that order
    (u = 0 is the uniform matrix); this equals the committed ``configs/exps/mdp/non_uniform_mdp_*.yaml``
    bit for bit. Only u ∈ {0.0, 0.1, …, 1.0} and 4 states;
* ``custom``: ``{name: S×S rows}`` from the config (rows must sum to 1), kind ``custom``.

``init: start`` starts every trajectory in state ``start_state`` (1-based), as the study did.

``trajectories`` says where the states come from: ``cell`` (default) draws each cell's trajectory
from its own seed (:func:`sample_trajectory`); ``paper`` reproduces ``mdp.py`` (needs ``init: start``):
``np.random.seed(42)`` once per matrix, then trajectory k = 0, 1, … starts at ``start_state`` and draws
``n_steps − 1`` next states with ``np.random.choice(states, p=P[x])`` — one ``random_sample()`` each,
inverse CDF on ``cumsum(p) / cumsum(p)[-1]`` (:func:`paper_trajectories`); sample k is trajectory k.

**protocol: paper** (``mdp.py``): states are the raw digit tokens ``1``..``S`` (the last token of
``tokenizer.tokenize(str(state))``, as the original), the sequence is ``[BOS] x_0 x_1 … x_{N−1}``
with no text, no separator and no chat template (EOS stands in for a tokenizer without BOS); the
read at position i is the logit row after BOS + i states, so ``logprobs`` keeps its (N+1, S) shape.
Paper defaults (when the config leaves the key out): ``named`` all four, ``non_uniformity``
0.0..1.0 step 0.1, ``matrices: paper``, ``kinds: []``, ``init: start``, ``start_state: 1``,
``n_steps: 1000``, ``samples: 1000``.
"""

from __future__ import annotations

import functools
import itertools
from typing import Annotated, ClassVar, Literal, Mapping, Optional

import numpy as np
from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from ..engine import CurveRequest
from ..errors import ConfigError
from ..prompts import Prompt
from . import register
from .base import ArraySpec, Family, Params, Protocol, RenderedCell, RunContext, cell_seed, use_chat
from .protocol import ProtocolStrategy
from .seq import build_curve, sequence_text, validate_sequence_pieces



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

# the coin-flip study's configs/exps/mdp/*.yaml (states 1..4)
NAMED: dict[str, list[list[float]]] = {
    "uniform_mdp": [[0.25] * 4] * 4,
    "simple_mdp": [[0.0, 0.5, 0.0, 0.5], [0.2, 0.0, 0.8, 0.0], [0.1, 0.2, 0.1, 0.6], [0.1, 0.1, 0.1, 0.7]],
    "all_hard_states": [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]],
    "last_hard_state": [[0.1, 0.1, 0.1, 0.7]] * 4,
}
PAPER_U = [round(0.1 * i, 1) for i in range(11)]
PAPER_MATRIX_SEED = 412415     # analysis/explore_mdp.ipynb: np.random.seed(412415) before the u sweep
PAPER_TRAJECTORY_SEED = 42     # mdp.py: --seed default, np.random.seed(args.seed)
PAPER_DEFAULTS = {"kinds": [], "named": list(NAMED), "non_uniformity": list(PAPER_U), "matrices": "paper",
                  "states": ["1", "2", "3", "4"], "init": "start", "start_state": 1, "n_steps": 1000,
                  "samples": 1000}


class MarkovParams(Params):
    protocol: Protocol = "clean"
    kinds: list[Literal["uniform", "sticky", "random"]] = Field(default_factory=lambda: list(KINDS))  # type: ignore[arg-type]  # a list of the Literal's values
    named: list[Literal["uniform_mdp", "simple_mdp", "all_hard_states", "last_hard_state"]] = Field(
        default_factory=list)
    matrices: Literal["seeded", "paper"] = "seeded"     # where the non-uniform matrices' draws come from
    non_uniformity: list[Prob] = Field(default_factory=list)
    custom: dict[str, list[list[float]]] = Field(default_factory=dict)
    start_state: int = Field(1, ge=1)
    states: list[str] = Field(default_factory=lambda: [" A", " B", " C", " D"], min_length=2)
    sticky_prob: Prob = 0.7
    dirichlet_alpha: float = Field(1.0, gt=0.0)
    random_matrices: int = Field(3, ge=1)
    init: Literal["stationary", "uniform", "start"] = "stationary"
    trajectories: Literal["cell", "paper"] = "cell"     # per-cell seeds, or mdp.py's seed-42 sequence
    n_steps: int = Field(100, ge=1, le=4000)
    samples: int = Field(10, ge=1)
    separator: str = ","
    head: Optional[str] = None      # base prompt / instruct prefill; "{names}" is replaced by "A, B, C and D"
    user: Optional[str] = None      # instruct user message
    variant: Literal["auto", "base", "instruct"] = "auto"

    PROTOCOLS: ClassVar[Mapping[str, ProtocolStrategy]] = {}   # CleanMarkov / PaperMarkov, set below

    @model_validator(mode="after")
    def _some_matrix(self):
        if not (self.kinds or self.named or self.non_uniformity or self.custom):
            raise ValueError("no matrices: kinds, named, non_uniformity and custom are all empty "
                             "(allowed: at least one of them non-empty)")
        return self

    @field_validator("non_uniformity")
    @classmethod
    def _paper_u(cls, v: list[float], info: ValidationInfo) -> list[float]:
        if info.data.get("matrices") == "paper":
            bad = [u for u in v if not any(abs(u - w) < 1e-9 for w in PAPER_U)]
            if bad:
                raise ValueError(f"matrices 'paper' has the study's u values only, not {bad[0]} "
                                 f"(allowed: {', '.join(map(str, PAPER_U))}; or matrices: seeded)")
        return v

    @field_validator("trajectories")
    @classmethod
    def _paper_start(cls, v: str, info: ValidationInfo) -> str:
        if v == "paper" and info.data.get("init") != "start":
            raise ValueError(f"trajectories 'paper' start every trajectory in start_state as mdp.py did, not "
                             f"init {info.data.get('init')!r} (allowed with trajectories paper: init start)")
        return v


def non_uniform_matrix(n_states: int, u: float, rng) -> np.ndarray:
    """The study's non-uniformity sweep: ``clip(1/S + U(−1, 1)·u, 0)``, rows renormalised (a zero row → uniform);
    ``rng``: a ``numpy.random.Generator`` or a legacy ``RandomState`` (one ``uniform(−1, 1, (S, S))`` draw)."""
    m = np.maximum(np.full((n_states, n_states), 1.0 / n_states) + rng.uniform(-1, 1, (n_states, n_states)) * u, 0)
    s = m.sum(axis=1, keepdims=True)
    return np.where(s > 0, m / np.where(s > 0, s, 1), 1.0 / n_states)


@functools.lru_cache(maxsize=1)
def _paper_non_uniform() -> dict[float, np.ndarray]:
    rs = np.random.RandomState(PAPER_MATRIX_SEED)
    out = {0.0: np.full((4, 4), 0.25)}
    for u in np.arange(0.1, 1.1, 0.1):  # the notebook's factors, e.g. 0.30000000000000004, in this order
        out[round(float(u), 1)] = non_uniform_matrix(4, float(u), rs)
    return out


def paper_non_uniform_matrices() -> dict[float, np.ndarray]:
    """The coin-flip study's non-uniform matrices, regenerated by its seeded process
    (``analysis/explore_mdp.ipynb``, cell "Create non-uniform data"): ``np.random.seed(412415)``, then for
    u = ``np.arange(0.1, 1.1, 0.1)`` in order ``M_u = clip(1/4 + U(−1, 1)^{4×4}·u, 0)``, rows divided by
    their sums; u = 0 is the uniform matrix (``non_uniform_mdp_0.0.yaml``). Keys: u rounded to 0.1.
    Equals the committed ``configs/exps/mdp/non_uniform_mdp_{u}.yaml`` exactly (tests)."""
    return {u: m.copy() for u, m in _paper_non_uniform().items()}


@functools.lru_cache(maxsize=16)
def _paper_trajectories(m_bytes: bytes, n_states: int, start: int, n_steps: int, n_traj: int) -> np.ndarray:
    m = np.frombuffer(m_bytes, dtype=np.float64).reshape(n_states, n_states)
    u = np.random.RandomState(PAPER_TRAJECTORY_SEED).random_sample((n_traj, n_steps - 1))
    cdf = np.cumsum(m, axis=1)
    cdf /= cdf[:, -1:]
    x = np.empty((n_traj, n_steps), dtype=np.int32)
    x[:, 0] = start
    for t in range(1, n_steps):  # searchsorted(cdf, u, side="right") = #{cdf ≤ u}
        x[:, t] = (cdf[x[:, t - 1]] <= u[:, t - 1, None]).sum(axis=1)
    x.setflags(write=False)
    return x


def paper_trajectories(m: np.ndarray, start: int, n_steps: int, n_traj: int) -> np.ndarray:
    """(n_traj, n_steps) state indices as ``mdp.py`` drew them for one matrix (one process per config):
    ``np.random.seed(42)``; per trajectory ``x_0 = start``, then ``n_steps − 1`` times
    ``x_t = np.random.choice(states, p=m[x_{t−1}])``, i.e. one ``random_sample()`` u per draw and
    ``x_t = searchsorted(c, u, side="right")`` with ``c = cumsum(p) / cumsum(p)[-1]``. Trajectory k uses
    draws k·(n_steps − 1) … (k+1)·(n_steps − 1) − 1 of the stream."""
    m = np.ascontiguousarray(m, dtype=np.float64)
    return _paper_trajectories(m.tobytes(), m.shape[0], int(start), int(n_steps), int(n_traj)).copy()


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


def paper_state_ids(tokenizer, states: list[str]) -> list[int]:
    """Token id of each state as ``mdp.py`` took it: the last token of ``tokenizer.tokenize(str(state))``."""
    ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(str(s)))[-1] for s in states]
    if len(set(ids)) != len(ids):
        raise ConfigError("params.states", f"states {states!r} do not map to distinct tokens",
                          allowed=["states whose last tokens differ, e.g. '1'..'4'"])
    return ids


def paper_bos(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


class MarkovProtocol(ProtocolStrategy):
    """What ``clean`` and ``paper`` Markov cells differ in: how a trajectory becomes token ids."""

    def validate(self, fam: "MarkovFamily", p: MarkovParams, tokenizer, model_kind: str) -> None:
        """The states tokenize as this protocol renders them."""
        raise NotImplementedError

    def request(self, fam: "MarkovFamily", p: MarkovParams, tokenizer, model_kind: str, x: np.ndarray) -> CurveRequest:
        """The one curve pass of trajectory ``x``: its ids, read positions and state tokens."""
        raise NotImplementedError

    def text(self, fam: "MarkovFamily", p: MarkovParams, tokenizer, model_kind: str, x: np.ndarray) -> str:
        """The rendered sequence ``bayesflip prompts`` lists."""
        raise NotImplementedError


class CleanMarkov(MarkovProtocol):
    """bayesflip's head (base text / instruct user + prefill) and ``separator``-joined state strings."""

    name = "clean"

    def validate(self, fam: "MarkovFamily", p: MarkovParams, tokenizer, model_kind: str) -> None:
        validate_sequence_pieces(tokenizer, fam.head(p, model_kind), p.states, p.separator)

    def request(self, fam: "MarkovFamily", p: MarkovParams, tokenizer, model_kind: str, x: np.ndarray) -> CurveRequest:
        return build_curve(tokenizer, fam.head(p, model_kind), p.states, x, p.separator)

    def text(self, fam: "MarkovFamily", p: MarkovParams, tokenizer, model_kind: str, x: np.ndarray) -> str:
        return sequence_text(tokenizer, fam.head(p, model_kind), p.states, x, p.separator)


class PaperMarkov(MarkovProtocol):
    """``mdp.py``: BOS + the raw state tokens, no text, separator or chat template; every position read."""

    name = "paper"

    def defaults(self, data: dict) -> dict:
        return PAPER_DEFAULTS

    def validate(self, fam: "MarkovFamily", p: MarkovParams, tokenizer, model_kind: str) -> None:
        paper_state_ids(tokenizer, p.states)

    def request(self, fam: "MarkovFamily", p: MarkovParams, tokenizer, model_kind: str, x: np.ndarray) -> CurveRequest:
        sid = paper_state_ids(tokenizer, p.states)
        ids = [paper_bos(tokenizer)] + [sid[int(s)] for s in x]
        return CurveRequest(ids=ids, positions=list(range(len(ids))), choices=[[t] for t in sid])

    def text(self, fam: "MarkovFamily", p: MarkovParams, tokenizer, model_kind: str, x: np.ndarray) -> str:
        return tokenizer.decode(self.request(fam, p, tokenizer, model_kind, x).ids)


PROTOCOLS: dict[str, MarkovProtocol] = {"clean": CleanMarkov(), "paper": PaperMarkov()}
MarkovParams.PROTOCOLS = PROTOCOLS


@register
class MarkovFamily(Family):
    name = "markov"
    Params = MarkovParams

    def cells(self, p: MarkovParams) -> list[dict]:
        out = []
        for kind in p.kinds:
            names = [f"random{i}" for i in range(p.random_matrices)] if kind == "random" else [kind]
            for nm, s in itertools.product(names, range(p.samples)):
                out.append({"kind": kind, "matrix_name": nm, "sample": s})
        extra: list[tuple[str, list[str]]] = [
            ("named", list(p.named)), ("non_uniform", [f"non_uniform_{u:.1f}" for u in p.non_uniformity]),
            ("custom", list(p.custom))]
        for group, group_names in extra:
            for nm, s in itertools.product(group_names, range(p.samples)):
                out.append({"kind": group, "matrix_name": nm, "sample": s})
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
        if len(set(p.states)) != len(p.states):
            raise ConfigError("params.states", f"duplicate state in {p.states!r}", allowed=["distinct strings"])
        if not self.cells(p):
            raise ConfigError("params.kinds", "no matrices: kinds, named, non_uniformity and custom are all empty",
                              allowed=list(KINDS))
        S = len(p.states)
        if p.named and S != 4:
            raise ConfigError("params.named", f"the study's matrices have 4 states, params.states has {S}",
                              allowed=["4 states"])
        if p.matrices == "paper" and p.non_uniformity and S != 4:
            raise ConfigError("params.matrices", f"the study's non-uniform matrices have 4 states, params.states "
                              f"has {S}", allowed=["seeded", "paper with 4 states"])
        for nm, rows in p.custom.items():
            m = np.asarray(rows, dtype=float)
            if m.shape != (S, S) or (m < 0).any() or not np.allclose(m.sum(1), 1.0, atol=1e-6):
                raise ConfigError(f"params.custom.{nm}", f"must be {S}×{S} with non-negative rows summing to 1",
                                  allowed=[f"{S} rows of {S} probabilities"])
        if p.start_state > S:
            raise ConfigError("params.start_state", f"state {p.start_state} of {S}", allowed=[f"[1, {S}]"])
        p.strategy.validate(self, p, tokenizer, model_kind)

    def matrix(self, p: MarkovParams, cell: dict, seed: int) -> np.ndarray:
        kind, nm, S = cell["kind"], cell["matrix_name"], len(p.states)
        if kind == "named":
            return np.asarray(NAMED[nm], dtype=float)
        if kind == "custom":
            return np.asarray(p.custom[nm], dtype=float)
        if kind == "non_uniform":
            u = float(nm.rsplit("_", 1)[1])
            if p.matrices == "paper":
                return paper_non_uniform_matrices()[round(u, 1)]
            return non_uniform_matrix(S, u, np.random.default_rng(cell_seed(seed, "markov-non-uniform", S, nm)))
        index = int(nm[len("random"):]) if kind == "random" else 0
        return transition_matrix(kind, S, p.sticky_prob, p.dirichlet_alpha,
                                 seed=cell_seed(seed, "markov-matrix", S, p.dirichlet_alpha, index))

    def init(self, p: MarkovParams, m: np.ndarray) -> np.ndarray:
        if p.init == "start":
            return np.eye(m.shape[0])[p.start_state - 1]
        return stationary(m) if p.init == "stationary" else np.full(m.shape[0], 1.0 / m.shape[0])

    def trajectory(self, p: MarkovParams, cell: dict, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(matrix, initial distribution, states) of one cell."""
        m = self.matrix(p, cell, seed)
        init = self.init(p, m)
        if p.trajectories == "paper":  # every sample of the matrix from the one seed-42 stream
            return m, init, paper_trajectories(m, p.start_state - 1, p.n_steps, p.samples)[cell["sample"]]
        rng = np.random.default_rng(cell_seed(seed, "markov", p.init, sorted(cell.items())))
        return m, init, sample_trajectory(m, init, p.n_steps, rng)

    def request(self, p: MarkovParams, tokenizer, model_kind: str, x: np.ndarray) -> CurveRequest:
        return p.strategy.request(self, p, tokenizer, model_kind, x)

    def render(self, p: MarkovParams, cells: list[dict], tokenizer, model_kind: str, seed: int) -> list[RenderedCell]:
        """One entry per cell: the whole sequence (every position is a read point); paper: its tokens decoded."""
        out = []
        for c in cells:
            text = p.strategy.text(self, p, tokenizer, model_kind, self.trajectory(p, c, seed)[2])
            out.append(RenderedCell(cell={**c, "n": p.n_steps}, text=text, choices=list(p.states)))
        return out

    def count_tokens(self, p: MarkovParams, cells: list[dict], tokenizer, model_kind: str, seed: int):
        """The exact ids of every cell's one curve pass (decoded digit runs would re-tokenize differently),
        and its read positions (every position under the paper protocol)."""
        from .tokens import TokenCount

        reqs = [self.request(p, tokenizer, model_kind, self.trajectory(p, c, seed)[2]) for c in cells]
        return TokenCount(prompt=sum(len(r.ids) for r in reqs), reads=sum(len(r.positions) for r in reqs))

    def run(self, p: MarkovParams, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        trajs = [self.trajectory(p, c, ctx.seed) for c in cells]
        reqs = [self.request(p, ctx.tokenizer, ctx.model_kind, x) for _, _, x in trajs]
        curves = ctx.scorer.score_curves(reqs)
        return {"logprobs": np.stack(curves).astype(np.float32),
                "states": np.stack([x for _, _, x in trajs]),
                "true_row": np.stack([true_rows(m, i, x) for m, i, x in trajs]).astype(np.float32),
                "matrix": np.stack([m for m, _, _ in trajs]).astype(np.float32)}
