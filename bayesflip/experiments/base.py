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
import re
import string
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from .protocol import ProtocolStrategy, with_defaults


class Params(BaseModel):
    """Base for family params: unknown keys are errors. A family with a ``protocol`` key lists its
    protocol strategies in ``PROTOCOLS`` (name → object, :mod:`.protocol`): the chosen one fills the
    keys the config leaves out (its ``defaults``) and checks the validated params (its ``check``)."""

    model_config = ConfigDict(extra="forbid")
    PROTOCOLS: ClassVar[Mapping[str, ProtocolStrategy]] = {}

    @model_validator(mode="before")
    @classmethod
    def _protocol_defaults(cls, data):
        if cls.PROTOCOLS and isinstance(data, dict):
            chosen = cls.PROTOCOLS.get(data.get("protocol", cls.model_fields["protocol"].default))
            if chosen is not None:   # an unknown protocol is left to the field's own error
                data = with_defaults(chosen, data)
        return data

    @model_validator(mode="after")
    def _protocol_check(self):
        if self.PROTOCOLS:
            self.strategy.check(self)
        return self

    @property
    def strategy(self) -> Any:
        """The strategy object of ``self.protocol`` (``PROTOCOLS[self.protocol]``)."""
        return self.PROTOCOLS[self.protocol]  # type: ignore[attr-defined]


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
    """One stored array. ``finite``: where a number is required (a model read, e.g. log-probs) — ``"all"``:
    every value of every cell finite; ``"cell"``: no ±inf and at least one finite value per cell (NaN only as
    the family's padding, e.g. an ICL curve shorter than ``n_flips``); ``""``: NaN is a legitimate value.
    A shard whose values break it is recorded failed, never done (:func:`nonfinite`)."""

    dims: tuple[str, ...]          # per-cell dims (the leading 'cell' dim is implicit)
    shape: tuple[int, ...]
    dtype: str = "float32"         # float32 | float64 | int32 | int64 | bool | str
    finite: str = ""               # "" | "all" | "cell"

    @property
    def fill(self):
        if self.dtype.startswith("float"):
            return np.nan
        if self.dtype == "bool":
            return False
        if self.dtype == "str":
            return ""
        return -1


def nonfinite(name: str, spec: ArraySpec, values: np.ndarray) -> str | None:
    """None when ``values`` (cell, *spec.shape) meets ``spec.finite``, else what is wrong, e.g.
    ``array 'logprobs': NaN/inf in 4 of 4 cells (first: cell 0)``."""
    if not spec.finite or not spec.dtype.startswith("float"):
        return None
    a = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    if spec.finite == "all":
        bad = ~np.isfinite(a).all(axis=1)
        what = "NaN/inf"
    else:
        bad = np.isinf(a).any(axis=1) | ~np.isfinite(a).any(axis=1)
        what = "inf or no finite value"
    if not bad.any():
        return None
    return (f"array {name!r}: {what} in {int(bad.sum())} of {len(a)} cells (first: cell {int(np.argmax(bad))}); "
            f"a number is required there (the model's output is not finite)")


@dataclass
class RunContext:
    """What a family gets in a job: the one engine, the model facts, and the seed."""

    scorer: Any                    # the model's backend (bayesflip.backends.Backend; a bare engine Scorer in unit tests)
    model_kind: str                # "std" | "instruct"
    model_name: str
    seed: int
    workdir: Any = None            # optional pathlib.Path: a per-shard scratch dir for mid-shard checkpoints

    @property
    def tokenizer(self):
        return self.scorer.tokenizer


def template_problem(tpl: str, sample: dict[str, Any], required: tuple[str, ...] = ()) -> str | None:
    """What is wrong with a ``str.format`` template whose placeholders must be keys of ``sample``
    (and include every key of ``required``), or None. Checked at config load / plan so a template
    never fails half-way through a run: malformed braces (``"{b"``), unknown or positional
    placeholders, missing required ones, and a format spec the sample values cannot take."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(tpl) if f is not None]
    except ValueError as e:
        return f"template {tpl!r} is malformed ({e}; write {{{{ and }}}} for literal braces)"
    names = {re.split(r"[.\[]", f, maxsplit=1)[0] for f in fields}
    unknown = sorted(n for n in names if n not in sample)
    if unknown:
        return (f"template {tpl!r} uses unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}"
                if all(unknown) else f"template {tpl!r} has a positional placeholder {{}}")
    missing = [k for k in required if k not in names]
    if missing:
        return f"template {tpl!r} lacks {', '.join('{' + k + '}' for k in missing)}"
    try:
        tpl.format(**sample)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        return f"template {tpl!r} cannot be filled ({type(e).__name__}: {e})"
    return None


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

    # integer params that repeat the whole grid (cells grow linearly in each)
    repeat_params: ClassVar[tuple[str, ...]] = ("samples", "chains", "random_matrices")

    def cell_estimate(self, p: Any) -> int:
        """An upper bound on ``len(self.cells(p))`` without materialising the full grid:
        ``len(cells(p'))·∏ p.r`` where ``p'`` sets every repeat param ``r`` (:attr:`repeat_params`) to 1.
        The config loader refuses a grid above its limit before any cell is built; override where
        a family's cells grow faster than linearly in a repeat param."""
        reps = {k: v for k in self.repeat_params
                if isinstance(v := getattr(p, k, None), int) and not isinstance(v, bool) and v > 1}
        n = len(self.cells(p.model_copy(update={k: 1 for k in reps})))
        for v in reps.values():
            n *= v
        return n

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

    def longest_input(self, p: Any, cells: list[dict], tokenizer, model_kind: str, seed: int) -> int:
        """Tokens of the longest sequence the run feeds the model for these cells, as the engine
        counts it: a rendered prompt plus its longest choice less one (the last choice token is
        read, not forwarded), or plus ``max_new_tokens`` for a generation item
        (:meth:`render`). The planner checks it against the model's context on probe cells
        (:func:`bayesflip.plan.probe_cells`), so an over-long prompt fails at plan, not in a job.
        Override where the run forwards more than :meth:`render` lists (ICL curves)."""
        from ..prompts import encode_piece, encode_text

        longest = 0
        for r in self.render(p, cells, tokenizer, model_kind, seed):
            extra = int((r.generation or {}).get("max_new_tokens") or 0)
            if r.choices:
                extra = max(extra, max(len(encode_piece(tokenizer, c)) for c in r.choices) - 1)
            longest = max(longest, len(encode_text(tokenizer, r.text)) + extra)
        return longest

    def count_tokens(self, p: Any, cells: list[dict], tokenizer, model_kind: str, seed: int):
        """Estimated tokens the engine forwards (``prompt``) and samples (``generated``) for these cells
        (one shard), without a model: :func:`bayesflip.experiments.tokens.count_rendered` over :meth:`render`.
        Override where rendering is too slow or misses work the run does."""
        from .tokens import count_rendered

        return count_rendered(self.render(p, cells, tokenizer, model_kind, seed), cells, tokenizer)


@dataclass
class ChoiceSet:
    labels: list[str]
    terminator: str = ""
    extra: dict = field(default_factory=dict)


def use_chat(variant: str, model_kind: str) -> bool:
    """Render the chat template when ``variant`` is ``instruct``, or ``auto`` with an instruct model."""
    return variant == "instruct" or (variant == "auto" and model_kind == "instruct")
