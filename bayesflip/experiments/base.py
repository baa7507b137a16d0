"""The narrow interface every experiment family implements.

A family turns validated params into *cells* (one condition × one sample each, in a
deterministic order), says what arrays each cell produces, and scores a shard of cells
with the shared :class:`~bayesflip.engine.Scorer`. Everything a family writes has a
leading ``cell`` dimension; per-cell dimensions are named (``position``, ``choice``, ...).
Cell coordinates (condition fields) are stored as 1-D arrays along ``cell``, so reduce can
unstack them into condition × sample tables.

Evidence kind (:meth:`Family.evidence`, written at plan time as the store attribute
``evidence``): what precedes the scored choice in a cell besides the query —

* ``statement``: the bias the prompt states: ``none``; ``theta`` the cell's own bias (ICL θ,
  needle ``bias``); ``theta2`` the cell's second-regime θ2 (shift);
* ``context``: ``none`` (the query alone, e.g. a paraphrase), ``outcomes`` (outcomes of the
  process, e.g. ICL flips, chain data), ``filler`` (filler text).

The attribute is ``{"statement": s, "context": c}`` for a store whose cells share one kind, or
``{"by": <cell coordinate>, "values": {<value>: {"statement": s, "context": c}}}`` when the kind
follows a coordinate (needle: ``condition``). Priors are only measured on ``statement: none``
evidence (reduce: :meth:`bayesflip.reduce.load.StoreData.cell_evidence`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

if TYPE_CHECKING:
    from ..engine import ScoringModel


class Params(BaseModel):
    """Base for family params: unknown keys are errors. ``PAPER_DEFAULTS`` (per family) are the
    values ``protocol: paper`` takes for every key the config leaves out."""

    model_config = ConfigDict(extra="forbid")
    PAPER_DEFAULTS: ClassVar[dict] = {}

    @model_validator(mode="before")
    @classmethod
    def _apply_paper_defaults(cls, data):
        if cls.PAPER_DEFAULTS and isinstance(data, dict) and data.get("protocol") == "paper":
            data = {**{k: v for k, v in cls.PAPER_DEFAULTS.items() if k not in data}, **data}
        return data


STATEMENTS = ("none", "theta", "theta2")
CONTEXTS = ("none", "outcomes", "filler")


def evidence_kind(statement: str, context: str) -> dict[str, str]:
    """One evidence kind ``{"statement": ..., "context": ...}`` (values from STATEMENTS / CONTEXTS)."""
    if statement not in STATEMENTS or context not in CONTEXTS:
        raise ValueError(f"evidence kind ({statement!r}, {context!r}): allowed statements {list(STATEMENTS)}, "
                         f"contexts {list(CONTEXTS)}")
    return {"statement": statement, "context": context}


Protocol = Literal["clean", "paper"]
"""``paper``: the original study's prompts, grids and sampling (docs/PROTOCOLS.md); ``clean``: bayesflip's own."""


@dataclass(frozen=True)
class RenderedCell:
    """What one cell feeds the model, for ``bayesflip prompts``: the cell's coordinates (plus
    any read point within it, e.g. ``{"n": 3}`` for the ICL prefix of 3 flips), the exact text
    given to the tokenizer (chat template applied, assistant prefill included), and either the
    scored ``choices`` (with the terminator appended) or the ``generation`` settings."""

    cell: dict
    text: str
    choices: list[str] | None = None
    generation: dict | None = None


@dataclass(frozen=True)
class ArraySpec:
    dims: tuple[str, ...]          # per-cell dims (the leading 'cell' dim is implicit)
    shape: tuple[int, ...]
    dtype: str = "float32"         # float32 | float64 | int32 | int64 | bool | str

    @property
    def fill(self):
        if self.dtype.startswith("float"):
            return np.nan
        if self.dtype == "bool":
            return False
        if self.dtype == "str":
            return ""
        return -1


@dataclass
class RunContext:
    """What a family gets in a job: the one engine, the model facts, and the seed."""

    scorer: ScoringModel           # the model's backend (bayesflip.backends.Backend; a bare engine Scorer in unit tests)
    model_kind: str                # "std" | "instruct"
    model_name: str
    seed: int
    workdir: Any = None            # optional pathlib.Path: a per-shard scratch dir for mid-shard checkpoints

    @property
    def tokenizer(self):
        return self.scorer.tokenizer


def cell_seed(seed: int, *parts: Any) -> int:
    """A stable 63-bit seed from the experiment seed and a cell's identity (order-independent of shards)."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class Family:
    """Plug-in base class. Subclasses set ``name`` and ``Params`` and implement the methods."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]]
    requires: ClassVar[frozenset[str]] = frozenset()   # optional backend capabilities (e.g. "attention_mass")
    # a cell's arrays depend only on the cell and the seed (seeded per cell, no per-shard state), so a
    # job may score several shards' cells in one run() and split the arrays back (bayesflip.job.run_task)
    batch_across_shards: ClassVar[bool] = True

    def cells(self, p: Any) -> list[dict]:
        """Condition fields + ``sample`` for every cell, deterministic order."""
        raise NotImplementedError

    def arrays(self, p: Any) -> dict[str, ArraySpec]:
        raise NotImplementedError

    def coords(self, p: Any) -> dict[str, list]:
        """Labels for per-cell dims (e.g. ``{"choice": [" heads", " tails"]}``)."""
        return {}

    def evidence(self, p: Any) -> dict | None:
        """The store attribute ``evidence`` (module docstring): what each cell's prompt states and holds
        besides the query; None when the family does not declare it."""
        return None

    def validate(self, p: Any, tokenizer, model_kind: str) -> None:
        """Checks that need the tokenizer (choices that tokenize badly, lengths); no model load."""

    def run(self, p: Any, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        """Arrays for these cells, each with leading dim len(cells)."""
        raise NotImplementedError

    def render(self, p: Any, cells: list[dict], tokenizer, model_kind: str, seed: int) -> list[RenderedCell]:
        """The exact inputs of these cells (``bayesflip prompts``), one or more per cell (a curve
        family lists its read points); generation-by-generation families render their first
        generation. Tokenizer only, no model load."""
        raise NotImplementedError(f"family {self.name!r} cannot list its prompts yet")

    def count_tokens(self, p: Any, cells: list[dict], tokenizer, model_kind: str, seed: int):
        """Estimated tokens the engine forwards (``prompt``) and samples (``generated``) for these cells
        (one shard), without a model: :func:`bayesflip.cost.count_rendered` over :meth:`render`.
        Override where rendering is too slow or misses work the run does."""
        from ..cost import count_rendered

        return count_rendered(self.render(p, cells, tokenizer, model_kind, seed), cells, tokenizer)


@dataclass
class ChoiceSet:
    labels: list[str]
    terminator: str = ""
    extra: dict = field(default_factory=dict)


def use_chat(variant: str, model_kind: str) -> bool:
    """Render the chat template when ``variant`` is ``instruct``, or ``auto`` with an instruct model."""
    return variant == "instruct" or (variant == "auto" and model_kind == "instruct")
