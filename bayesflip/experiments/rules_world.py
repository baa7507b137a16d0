"""The rule game's world (:mod:`.rules`): objects, the 243 hypotheses, the 31 input subsets, the rule's
output, examples, d⁰ and the per-generation metrics — pure functions of their arguments.

Both protocols' runs (:mod:`.rules_run`), the family (:mod:`.rules`) and the reducers
(:mod:`bayesflip.reduce.rules`, :mod:`bayesflip.reduce.rules_paper`) import them from here; the
formulas are in :mod:`.rules`' docstring and on each function.
"""

from __future__ import annotations

import itertools
import json
from functools import lru_cache

import numpy as np

from ..bayes import entropy as _entropy
from . import rules_paper as RP
from .base import cell_seed

OBJECTS = ("A", "B", "C", "D", "E")
VALUES = ("on", "off", "und")
ON, OFF, UND = 0, 1, 2


# ---------------------------------------------------------------------------- the world
@lru_cache(maxsize=1)
def hypotheses() -> tuple[tuple[str, ...], ...]:
    """All 243 rules, ``itertools.product(VALUES, repeat=5)`` order (A slowest)."""
    return tuple(itertools.product(VALUES, repeat=len(OBJECTS)))


@lru_cache(maxsize=4)
def subsets(objects: tuple[str, ...] = OBJECTS) -> tuple[tuple[str, ...], ...]:
    """The 31 non-empty subsets of the objects, by size then in object order (A..E: lexicographic)."""
    return tuple(s for r in range(1, len(objects) + 1) for s in itertools.combinations(objects, r))


def rule_output(rule: dict | tuple, subset, objects: tuple[str, ...] = OBJECTS) -> str:
    """on if any object of the subset is on, else und if any is und, else off."""
    vals = [rule[o] if isinstance(rule, dict) else rule[objects.index(o)] for o in subset]
    if "on" in vals:
        return "on"
    if "und" in vals:
        return "und"
    return "off"


def rule_text(h: tuple[str, ...]) -> str:
    """Canonical JSON of a rule: ``{"A": "on", "B": "off", ...}`` (keys A..E, json.dumps defaults)."""
    return json.dumps(dict(zip(OBJECTS, h)))


@lru_cache(maxsize=1)
def output_table() -> np.ndarray:
    """(243, 31) value index (0 on, 1 off, 2 und) of every rule on every subset."""
    return np.array([[VALUES.index(rule_output(h, s)) for s in subsets()] for h in hypotheses()], dtype=np.int64)


def parse_subset(text: str, objects: tuple[str, ...] = OBJECTS) -> int:
    """``"A, C"`` → index into :func:`subsets`."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    objs = tuple(sorted(names, key=lambda o: objects.index(o) if o in objects else -1))
    if objs not in subsets(objects):
        raise ValueError(f"{text!r} is not a non-empty set of distinct objects from {', '.join(objects)}")
    return subsets(objects).index(objs)


def render_examples(inputs, outputs) -> str:
    return "\n".join(f"Input: {', '.join(subsets()[int(i)])}\nOutput: {VALUES[int(o)]}" for i, o in zip(inputs, outputs))


def accuracy(d_inputs, d_outputs) -> np.ndarray:
    """(243,) fraction of the examples (d_inputs, d_outputs) each rule reproduces."""
    tab = output_table()
    return (tab[:, np.asarray(d_inputs)] == np.asarray(d_outputs)[None, :]).mean(axis=1)


def next_examples(h: int, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``m`` inputs drawn without replacement uniformly from the 31 subsets, labelled by rule ``h``."""
    ins = rng.choice(len(subsets()), size=m, replace=False)
    return ins, output_table()[h, ins]


def _typical_inputs(m: int, objects: tuple[str, ...]) -> np.ndarray:
    """``m`` distinct subset indices spread evenly over the 31 subsets (ordered by size): data of the
    typical length for the cost estimate (``count_tokens``), where the run draws or the model writes them."""
    n = len(subsets(objects))
    return np.array(sorted({min(n - 1, int((k + 0.5) * n / m)) for k in range(m)}), dtype=np.int64)


def consistent_pair(h_star: int, screen: int) -> np.ndarray:
    """Subset indices on which h* and h̄ (h* with the screen off) give the same output."""
    h = hypotheses()[h_star]
    bar = hypotheses().index(tuple("off" if k == screen else v for k, v in enumerate(h)))
    tab = output_table()
    return np.flatnonzero(tab[h_star] == tab[bar])


def tempered_pick(w: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """One draw from ``w^(1/T)`` renormalised (T = 0: the first argmax, no uniform used)."""
    w = np.asarray(w, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(w))
    with np.errstate(divide="ignore"):
        z = np.log(w) / temperature
    z = np.exp(z - z.max())
    cdf = np.cumsum(z / z.sum())
    cdf[-1] = 1.0
    return min(int(np.searchsorted(cdf, rng.random(), side="right")), len(w) - 1)


def metrics(P: np.ndarray, acc0: np.ndarray, screen: int) -> dict[str, float]:
    """entropy, p_screen_off, acc_d0, both of a distribution over the 243 rules."""
    off = np.array([h[screen] == "off" for h in hypotheses()])
    cons = acc0 == 1.0
    return {"entropy": float(_entropy(P)), "p_screen_off": float(P[off].sum()), "acc_d0": float(P @ acc0),
            "both": float(P[cons & off].sum())}


def _init_data(p) -> tuple[np.ndarray, np.ndarray]:
    """d⁰ of the clean protocol: ``init_inputs`` labelled by ``true_rule`` (subset and value indices)."""
    ins = np.array([parse_subset(s) for s in p.init_inputs], dtype=np.int64)
    outs = np.array([VALUES.index(rule_output(p.true_rule, subsets()[i])) for i in ins], dtype=np.int64)
    return ins, outs


def feasible_rules() -> list[int]:
    """The original's ``hcomp_df``: indices (into the 243) of the rules whose last object (screen) is not off."""
    return [k for k, h in enumerate(hypotheses()) if h[-1] != "off"]


def paper_d0(p, cell: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """d⁰ of a paper cell: ``d0_size`` inputs where h* and h̄ agree, by (experiment seed, h_index, d0 seed)."""
    h = feasible_rules()[cell["h_index"]]
    rng = np.random.default_rng(cell_seed(seed, "rules-d0", cell["h_index"], cell["d0_seed"]))
    ins = RP.sample_d0(consistent_pair(h, len(OBJECTS) - 1), p.d0_size, rng)
    return ins.astype(np.int64), output_table()[h, ins]
