"""The reducer plug-in interface: report blocks, sections, and the per-family registry.

A family reducer is a function ``fn(inp: FamilyInput) -> ReducedFamily`` registered with
``@register_reducer("<family>")`` in its own module ``bayesflip/reduce/<family>.py`` and listed
as a lazy entry of :data:`REDUCERS` (one :class:`~bayesflip.registry.Registry`, like families and
backends): adding a reducer is one module + one line there; the module is imported on first use.
Families without a reducer are listed in the report as "raw data only".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import numpy as np
import pandas as pd

from ..registry import Registry
from .load import StoreData


# ---------------------------------------------------------------------------- report blocks
@dataclass
class Text:
    """A Markdown paragraph (supported inline: `code`, **bold**; lines starting with "- " are a list)."""

    md: str


@dataclass
class Table:
    """A table shown in the report (the first ``max_rows`` rows; the full table belongs in ``tables``)."""

    df: pd.DataFrame
    caption: str = ""
    max_rows: int = 60


@dataclass
class Figure:
    """A figure written by :func:`bayesflip.reduce.figures.save` (``path`` is the PNG; a PDF sits beside it)."""

    path: Path
    caption: str = ""


@dataclass
class Heading:
    text: str
    level: int = 3


Block = Union[Text, Table, Figure, Heading]


@dataclass
class Section:
    """One ``## title`` section of the report."""

    title: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def figures(self) -> list[Path]:
        return [b.path for b in self.blocks if isinstance(b, Figure)]


# ---------------------------------------------------------------------------- reducer io
@dataclass
class FamilyInput:
    """What a reducer gets: the stores of its family that hold at least one trusted cell."""

    family: str
    sweep: str
    stores: list[StoreData]
    figures_dir: Path
    tables_dir: Path
    # Results of the families reduced before this one in this run (reducer order, ``_ORDER`` first),
    # e.g. ``earlier["icl"].tables["icl_prior_fits"]`` for the priors fitted to each model.
    earlier: dict[str, "ReducedFamily"] = field(default_factory=dict)


@dataclass
class ReducedFamily:
    """What a reducer returns.

    ``tables``: name -> tidy DataFrame (written as CSV + Parquet under ``reduce/tables``).
    ``figures``: every figure file it wrote (PNG paths). ``summary``: JSON-able; the key
    ``"models"`` (``{model: {...}}``) is merged into summary.json per model under the family
    name, anything else goes under ``families.<family>``. ``sections``: report sections; a
    section whose title another family already used (e.g. "Priors") is appended to that one.
    """

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)


Reducer = Callable[[FamilyInput], ReducedFamily]

LOW_MASS = 0.10
"""An on-choice mass ``Σ_c exp(logprob_c)`` below this is flagged beside the renormalised probability it carries."""


def protocol_of(st: StoreData) -> str:
    """``paper`` or ``clean`` (the experiment's ``params.protocol``; stores written before it existed: clean)."""
    return str(st.params.get("protocol", "clean"))


def reduce_by_protocol(inp: FamilyInput, reduce_clean: Callable[[FamilyInput, list], ReducedFamily],
                       paper_section: Callable[[FamilyInput, list], tuple]) -> ReducedFamily:
    """Clean stores through ``reduce_clean``; ``protocol: paper`` stores through ``paper_section``
    (→ tables, figures, per-model summary, one report section), merged into one result."""
    paper = [st for st in inp.stores if protocol_of(st) == "paper"]
    clean = [st for st in inp.stores if protocol_of(st) != "paper"]
    out = reduce_clean(inp, clean) if clean else ReducedFamily(summary={"models": {}})
    if paper:
        tables, figs, summ, sec = paper_section(inp, paper)
        out.tables.update(tables)
        out.figures.extend(figs)
        for m, v in summ.items():
            out.summary.setdefault("models", {}).setdefault(m, {}).update(v)
        out.sections.append(sec)
    return out


def mean_se_by(cells: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """Per group of ``keys``: ``n_chains`` (rows), the mean of each metric and its standard error
    ``<metric>_se`` = std(ddof=1) / sqrt(count of non-NaN values)."""
    g = cells.groupby(keys, sort=True)
    out = g[metrics].mean()
    n_ok = g[metrics].count()
    out = out.join((g[metrics].std(ddof=1) / np.sqrt(n_ok.where(n_ok > 0))).add_suffix("_se"))
    out.insert(0, "n_chains", g.size())
    return out.reset_index()
REDUCERS: Registry[Reducer] = Registry("reducer", key="family")
for _fam in ("icl", "chains", "rules", "acronym", "attention", "cot", "markov", "needle", "paraphrase", "poisson"):
    REDUCERS.register_lazy(_fam, f"bayesflip.reduce.{_fam}:reduce_{_fam}")
_ORDER = ["icl", "chains", "rules", "acronym"]  # reduce/report order: these first, then the others alphabetically


def register_reducer(family: str) -> Callable[[Reducer], Reducer]:
    """Decorator: ``fn`` is ``family``'s reducer (resolves its lazy entry; a new name is an eager entry)."""
    def deco(fn: Reducer) -> Reducer:
        REDUCERS.register(family, fn)
        return fn

    return deco


def reducer_names() -> list[str]:
    return sorted(REDUCERS.names(), key=lambda f: (_ORDER.index(f) if f in _ORDER else len(_ORDER), f))


def get_reducer(family: str) -> Reducer | None:
    """``family``'s reducer, or None when it has none (its data is reported raw)."""
    return REDUCERS.get_or_none(family)
