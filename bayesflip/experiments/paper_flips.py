"""The coin-flip study's outcome-sequence processes: ``flips:`` of the ``icl`` family, ``protocol: paper``.

Each process draws what one generator of the original repository (``rcorona/llm-coin-flips``)
drew, so that with the same seed the sequences are those of its runs:

* ``numpy_legacy`` — ``create_icl_coin_flip_config.py``: ``np.random.seed(seed)``, then for
  θ = 0, 0.1, …, 1 **in that order** ``np.random.choice(["heads", "tails"], n, p=[θ, round(1 − θ, 1)])``.
  One sequence per θ, every N its prefix, shared by every (instruct prompt, query) pair. The
  whole 11-θ grid is always drawn and the listed θ selected from it (:func:`legacy_coin_flips`),
  so a subset of θ gets the same flips as the full grid.
* ``random_choices`` — the process behind the committed ``coin_flip_icl_v2`` and
  ``die_roll_icl_v2`` configs, i.e. the published ICL runs (``run_all_icl_exp*.sh``). The die
  configs are the output of ``create_icl_die_roll_config.py``; the coin configs were made by the
  same loop (the repository has no script for them; ``tests/test_paper_flips.py`` compares every
  committed file when ``BAYESFLIP_ORIGINAL_REPO`` points at a checkout). ``random.seed(seed)``, then

      for N in V2_NS:                       # outer: 0, 1, 3, 5, 10, 20, 100 (die: no 0)
        [for face in 1..6:]                 # die only
          for b in the bias grid:           # coin 0, 10, …, 100 %; die 0, 20, …, 100 %
            for q in 0..49:                 # inner: the 50 query paraphrases
              a fresh sequence of N outcomes, each random.choices(outcomes, weights=w_b)

  with ``w_b = [b/100, 1 − b/100]`` (coin) and ``b/100`` on the face, ``(1 − b/100)/5`` on each
  other face (die). A fresh sequence for every (N, b[, face], query): N values are not prefixes
  of one sequence. The original scored every (instruct prompt, query) pair of one config file, so
  the instruct prompts share the query's sequence. N = 0 draws nothing, so listing it (die) does
  not move the stream. :func:`v2_flips` draws the whole grid and the cells select from it; a
  value outside the grid is refused by :func:`check_v2` (never drawn differently).
* ``random_chain`` — ``create_posterior_chain_coin_flip_config.py`` (the posterior chain):
  ``random.seed(seed)``, then flip i = ``random.choices(["heads", "tails"], weights=[θ_i, 1 − θ_i])``
  with θ_i the regime of flip i (θ1 before the cutoff, θ2 from it). One sequence, every N its
  prefix, shared by every (instruct prompt, query) pair (:func:`chain_flips`).

Outcomes are returned as choice indices (0 = heads / face 1). ``random.choices`` picks by the
weights and one ``random()`` per call, so drawing indices equals drawing the labels.
"""

from __future__ import annotations

import functools
import random
from typing import Optional, Sequence

import numpy as np

LEGACY_THETAS = tuple(round(0.1 * i, 1) for i in range(11))
V2_NS = {"coin": (0, 1, 3, 5, 10, 20, 100), "die": (1, 3, 5, 10, 20, 100)}
V2_PERCENTS = {"coin": tuple(range(0, 101, 10)), "die": tuple(range(0, 101, 20))}
V2_FACES = (1, 2, 3, 4, 5, 6)
V2_QUERIES = 50


def grid_percent(theta: float, percents: Sequence[int]) -> Optional[int]:
    """θ as an integer percentage of ``percents`` (0.3 → 30), or None when θ is not on that grid."""
    b = round(theta * 100)
    return b if abs(theta * 100 - b) < 1e-9 and b in percents else None


def _fmt(xs) -> str:
    return "[" + ", ".join(f"{x:g}" for x in xs) + "]"


# ---------------------------------------------------------------------------- numpy_legacy
def check_legacy(thetas: Sequence[float]) -> None:
    """Every θ must be on the script's grid 0, 0.1, …, 1 (the draw is that whole grid, in order)."""
    bad = [t for t in thetas if grid_percent(t, V2_PERCENTS["coin"]) is None]
    if bad:
        raise ValueError(f"flips 'numpy_legacy' draws the script's grid θ = {_fmt(LEGACY_THETAS)} in order and "
                         f"selects from it; theta {bad[0]:g} is not on it (allowed otherwise: flips seeded)")


@functools.lru_cache(maxsize=32)
def legacy_coin_flips(seed: int, n: int) -> dict[float, np.ndarray]:
    """θ → outcome indices: ``np.random.seed(seed)``, then per θ of :data:`LEGACY_THETAS` in order
    ``np.random.choice(["heads", "tails"], n, p=[θ, round(1 − θ, 1)])``."""
    rs = np.random.RandomState(seed)
    return {th: rs.choice(2, n, p=[th, round(1.0 - th, 1)]).astype(np.int32) for th in LEGACY_THETAS}


def legacy_sequence(seed: int, n: int, theta: float) -> np.ndarray:
    pct = grid_percent(theta, V2_PERCENTS["coin"])
    assert pct is not None, f"theta {theta} is not on the legacy grid (checked by check_legacy)"
    return legacy_coin_flips(seed, n)[LEGACY_THETAS[pct // 10]].copy()


# ---------------------------------------------------------------------------- random_choices (v2)
def v2_weights(process: str, b: int, face: Optional[int]) -> list[float]:
    """The original's weights for bias ``b`` %: coin ``[b/100, 1 − b/100]``; die ``b/100`` on the face,
    ``(1 − b/100)/5`` on the others (in face order 1..6)."""
    p = b / 100.0
    if process == "coin":
        return [p, 1 - p]
    other = (1.0 - p) / (len(V2_FACES) - 1)
    return [p if f == face else other for f in V2_FACES]


def check_v2(process: str, thetas: Sequence[float], faces: Sequence[int], read_ns: Sequence[int], n_queries: int,
             n_flips: int) -> None:
    """The cells must lie on the original's grid (the draw is the whole grid; cells select)."""
    ns = sorted(set(V2_NS[process]) | {0})
    bad_t = [t for t in thetas if grid_percent(t, V2_PERCENTS[process]) is None]
    if bad_t:
        raise ValueError(f"flips 'random_choices' draws the original's {process} grid b = "
                         f"{_fmt(p / 100 for p in V2_PERCENTS[process])}; theta {bad_t[0]:g} is not on it "
                         "(allowed otherwise: flips seeded)")
    bad_n = [n for n in read_ns if n not in ns]
    if bad_n:
        raise ValueError(f"flips 'random_choices' draws one sequence per N of the original's grid {_fmt(ns)}; "
                         f"read_ns {bad_n[0]} is not on it (allowed otherwise: flips seeded)")
    if max(read_ns) != n_flips:
        raise ValueError(f"flips 'random_choices' stores each sequence in n_flips + 1 positions: n_flips must equal "
                         f"the largest read_ns ({max(read_ns)}), got {n_flips}")
    if n_queries > V2_QUERIES:
        raise ValueError(f"flips 'random_choices' draws one sequence per query of the original's {V2_QUERIES}; "
                         f"got {n_queries} queries (allowed: at most {V2_QUERIES}, or flips seeded)")
    if process == "die" and any(f not in V2_FACES for f in faces):
        raise ValueError(f"flips 'random_choices' draws faces {_fmt(V2_FACES)}")


@functools.lru_cache(maxsize=8)
def v2_flips(process: str, seed: int) -> dict[tuple, np.ndarray]:
    """(N, b, face, query) → outcome indices of the whole v2 grid (face None for a coin), drawn in the
    original's order (module docstring)."""
    rng = random.Random(seed)
    faces = V2_FACES if process == "die" else (None,)
    out = {}
    for n in V2_NS[process]:
        for face in faces:
            for b in V2_PERCENTS[process]:
                w = v2_weights(process, b, face)
                idx = range(len(w))
                for q in range(V2_QUERIES):
                    out[(n, b, face, q)] = np.array([rng.choices(idx, weights=w)[0] for _ in range(n)], dtype=np.int32)
    return out


def v2_sequence(process: str, seed: int, n: int, theta: float, face: Optional[int], query: int) -> np.ndarray:
    """The sequence of one cell (N, θ[, face], query) of the v2 grid."""
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    b = grid_percent(theta, V2_PERCENTS[process])
    return v2_flips(process, seed)[(n, b, face if process == "die" else None, query)].copy()


# ---------------------------------------------------------------------------- random_chain
def chain_flips(seed: int, probs: np.ndarray) -> np.ndarray:
    """One sequence: ``random.seed(seed)``, then flip i = ``random.choices(range(K), weights=probs[i])``
    (``probs`` (N, K): the generating distribution of every flip, e.g. θ1 before the cutoff, θ2 after)."""
    rng = random.Random(seed)
    idx = range(probs.shape[1])
    return np.array([rng.choices(idx, weights=[float(x) for x in row])[0] for row in probs], dtype=np.int32)
