"""One home for the shared domain of the random processes: choices, distributions, sampling.

Every family that speaks of coins and dice (ICL, needle, paraphrase, chains, CoT, attention)
takes its choice strings and generating distributions from here, never from a local copy.

* coin: choices ``" heads"``, ``" tails"``; P = (θ, 1 − θ).
* die:  choices ``" 1"`` .. ``" 6"``; face ``f`` has probability b, the other five (1 − b)/5.
* number: choices ``" 1"`` .. ``" 10"``, answered with the terminator ``"."`` (`` 1`` is a
  token-prefix of `` 10``); "always even|odd": uniform 1/5 on that parity.
* inverse-CDF sampling: one uniform u per draw, outcome = #{k : u > F_k} (F the CDF).

Process texts (:data:`PROCESS_TEXTS`): bayesflip's own wording of each process, the one table the
clean protocol's families (needle, paraphrase, ICL, chains, CoT) render from — the query the choice
follows, the explicit bias statement, the instruction of instruct models (one outcome, or a
sequence of them) and the question of CoT's base prompt. The original studies' templates (``protocol:
paper``) are the studies' own strings and live with them (:mod:`bayesflip.experiments.paper`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

COIN_CHOICES: tuple[str, ...] = (" heads", " tails")
DIE_CHOICES: tuple[str, ...] = tuple(f" {i}" for i in range(1, 7))
NUMBER_CHOICES: tuple[str, ...] = tuple(f" {i}" for i in range(1, 11))
CHOICES: dict[str, tuple[str, ...]] = {"coin": COIN_CHOICES, "die": DIE_CHOICES, "number": NUMBER_CHOICES}


@dataclass(frozen=True)
class ProcessText:
    """bayesflip's wording of one process (placeholders: ``{b}`` percent, ``{face}``, ``{parity}``)."""

    choices: tuple[str, ...]
    query: str                    # the choice follows it directly: "... landed on" + " heads"
    statement: str                # the explicit bias statement (needle)
    instruction: str              # instruct models, one outcome (user message; the query is the prefill)
    terminator: str = ""          # appended to every choice (number: "." so " 1." vs " 10.")
    sequence_instruction: Optional[str] = None   # instruct models, a sequence of outcomes (ICL, chains)
    question: Optional[str] = None               # CoT's base prompt: the task as a question + "Answer:"


PROCESS_TEXTS: dict[str, ProcessText] = {
    "coin": ProcessText(
        choices=COIN_CHOICES,
        query="I tossed a coin and it landed on",
        statement="When I flip coins they land on heads {b}% of the time.",
        instruction="Please toss a coin and tell me whether it landed on heads or tails.",
        sequence_instruction="Please toss a coin several times and tell me what it landed on each time.",
        question="Question: I am going to toss a coin. Will it land on heads or tails?\nAnswer:"),
    "die": ProcessText(
        choices=DIE_CHOICES,
        query="I rolled a die and it landed on",
        statement="When I roll dice they land on {face} {b}% of the time.",
        instruction="Please roll a die and tell me which number it landed on.",
        sequence_instruction="Please roll a die several times and tell me what it landed on each time.",
        question="Question: I am going to roll a die. Which number will it land on?\nAnswer:"),
    "number": ProcessText(
        choices=NUMBER_CHOICES,
        query="I picked a random number between 1 and 10 and it was",
        statement="When I pick a random number between 1 and 10, it is always {parity}.",
        instruction="Please pick a random number between 1 and 10 and tell me what it was.",
        terminator="."),
}


def coin_probs(theta: float) -> np.ndarray:
    """P over (heads, tails) for P(heads) = θ:  (θ, 1 − θ)."""
    return np.array([theta, 1.0 - theta])


def die_probs(face: int, b: float) -> np.ndarray:
    """P over faces 1..6 when ``face`` has probability b:  p_face = b, p_other = (1 − b)/5."""
    q = np.full(6, (1.0 - b) / 5.0)
    q[face - 1] = b
    return q


def parity_probs(parity: str) -> np.ndarray:
    """P over 1..10 when numbers are "always even|odd": uniform 1/5 on the stated parity."""
    q = np.array([1.0 if (n % 2 == 0) == (parity == "even") else 0.0 for n in range(1, 11)])
    return q / q.sum()


def process_probs(process: str, theta: float, face: int = 1) -> np.ndarray:
    """The generating distribution of one bias for ``coin`` (θ) or ``die`` (face, b = θ)."""
    return coin_probs(theta) if process == "coin" else die_probs(face, theta)


def inverse_cdf(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Outcome indices for uniforms ``u`` under (row-wise) ``probs``:  i = #{k : u > F_k}.

    ``probs`` is (K,) or (N, K) with N = len(u); the last index is clamped to K − 1 so a
    distribution that sums to slightly less than 1 never yields K.
    """
    probs = np.asarray(probs, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    cdf = np.cumsum(probs, axis=-1)
    if cdf.ndim == 1:
        idx = (u[..., None] > cdf).sum(axis=-1)
    else:
        idx = (u[:, None] > cdf).sum(axis=-1)
    return np.minimum(idx, probs.shape[-1] - 1).astype(np.int32)


def draw(probs: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` i.i.d. outcome indices from ``probs`` by inverse CDF (one uniform each)."""
    return inverse_cdf(probs, rng.random(size))
