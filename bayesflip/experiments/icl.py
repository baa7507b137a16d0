"""Family C (in-context evidence) and D (distribution shift): coin and die learning curves.

A sequence of N outcomes is drawn i.i.d. from a known distribution and rendered as
``I tossed a coin and it landed on heads, then tails, then ...``; the model's next-outcome
distribution is read after **every** prefix 0..N from one forward pass.

* coin: P(heads) = θ;  die: face ``f`` has probability b, the other five (1−b)/5.
* shift ``switch``: θ1 for flips i < cutoff, θ2 after;  ``block``: θ2 for start ≤ i < end.

Arrays per cell: ``logprobs`` (position, choice) summed choice log-probs (float32; the
renormalised distribution and off-choice mass follow), ``outcomes`` (flip,) choice indices,
``p_true`` (position, choice) the generating distribution of the outcome at that position.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Literal, Optional

import numpy as np
from pydantic import Field

from ..prompts import Prompt
from . import register
from .base import ArraySpec, Family, Params, RunContext, cell_seed, use_chat
from .seq import build_curve, validate_sequence_pieces

Prob = Annotated[float, Field(ge=0.0, le=1.0)]

COIN = {"choices": [" heads", " tails"], "head": "I tossed a coin and it landed on",
        "user": "Please toss a coin several times and tell me what it landed on each time."}
DIE = {"choices": [f" {i}" for i in range(1, 7)], "head": "I rolled a die and it landed on",
       "user": "Please roll a die several times and tell me what it landed on each time."}


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


def _spec(p: ICLParams) -> dict:
    return COIN if p.process == "coin" else DIE


def outcome_probs(p: ICLParams, theta: float, face: int) -> np.ndarray:
    """Generating distribution over the choices for one bias."""
    if p.process == "coin":
        return np.array([theta, 1.0 - theta])
    q = np.full(6, (1.0 - theta) / 5.0)
    q[face - 1] = theta
    return q


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


@register
class ICLFamily(Family):
    name = "icl"
    Params = ICLParams

    def cells(self, p: ICLParams) -> list[dict]:
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
        return out

    def arrays(self, p: ICLParams) -> dict[str, ArraySpec]:
        k = len(_spec(p)["choices"])
        return {"logprobs": ArraySpec(("position", "choice"), (p.n_flips + 1, k)),
                "outcomes": ArraySpec(("flip",), (p.n_flips,), "int32"),
                "p_true": ArraySpec(("position", "choice"), (p.n_flips + 1, k))}

    def coords(self, p: ICLParams) -> dict[str, list]:
        return {"choice": _spec(p)["choices"], "position": list(range(p.n_flips + 1)), "flip": list(range(p.n_flips))}

    def head(self, p: ICLParams, model_kind: str) -> Prompt:
        spec = _spec(p)
        text = p.head or spec["head"]
        chat = use_chat(p.variant, model_kind)
        return Prompt(text=text, messages=(("user", p.user or spec["user"]),) if chat else None)

    def validate(self, p: ICLParams, tokenizer, model_kind: str) -> None:
        if p.shift != "none" and not p.theta2s:
            from ..errors import ConfigError
            raise ConfigError("params.theta2s", f"shift {p.shift!r} needs at least one theta2", allowed=["[0, 1]"])
        if p.shift == "block" and not (0 <= p.block[0] <= p.block[1] <= p.n_flips):
            from ..errors import ConfigError
            raise ConfigError("params.block", f"block {p.block} must satisfy 0 <= start <= end <= n_flips={p.n_flips}")
        validate_sequence_pieces(tokenizer, self.head(p, model_kind), _spec(p)["choices"], p.separator)

    def sample_outcomes(self, p: ICLParams, cell: dict, seed: int) -> np.ndarray:
        probs = per_flip_probs(p, cell)
        rng = np.random.default_rng(cell_seed(seed, "icl", p.process, p.shift, sorted(cell.items())))
        u = rng.random(p.n_flips)
        return (u[:, None] > np.cumsum(probs, axis=1)).sum(axis=1).astype(np.int32)

    def run(self, p: ICLParams, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        choices = _spec(p)["choices"]
        head = self.head(p, ctx.model_kind)
        outs = [self.sample_outcomes(p, c, ctx.seed) for c in cells]
        reqs = [build_curve(ctx.tokenizer, head, choices, o, p.separator) for o in outs]
        curves = ctx.scorer.score_curves(reqs)
        p_true = []
        for c in cells:
            rows = per_flip_probs(p, c)
            p_true.append(np.vstack([rows, rows[-1:]]))  # the read after the last flip: the last regime
        return {"logprobs": np.stack(curves).astype(np.float32), "outcomes": np.stack(outs),
                "p_true": np.stack(p_true).astype(np.float32)}
