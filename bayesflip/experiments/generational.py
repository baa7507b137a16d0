"""One base for generation-by-generation families (``chains``, ``rules``, ``acronym``).

A generational family fills its output arrays one generation at a time. The base owns the
loop every such family shares: one seeded ``numpy`` generator per cell
(``default_rng(cell_seed(seed, *family.rng_key(p, cell)))``), allocating the arrays and
resuming them from the shard checkpoint (:mod:`.checkpoint`), writing generation 0
(:meth:`init`, fresh shards only), then for every later generation :meth:`step`, a
checkpoint and the testing interrupt hook. A family implements ``rng_key``, ``init``,
``step`` and ``last_generation`` (and ``first_step``: the first generation ``step`` writes).

Resume contract: everything a ``step`` needs must be readable from the arrays and the RNGs
(no hidden Python state), so a resumed shard equals an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import Family, RunContext, cell_seed
from .checkpoint import maybe_interrupt, start_or_resume


@dataclass
class GenState:
    """What one step sees: params, the shard's cells, the run context, the arrays, the per-cell RNGs."""

    p: Any
    cells: list[dict]
    ctx: RunContext
    arr: dict[str, np.ndarray]
    rngs: list[np.random.Generator]
    cache: dict = field(default_factory=dict)   # per-run derived data (encoded pieces); never resume state


def plain(arr: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Object (text) arrays as fixed-width ``str`` arrays (what the store and the checkpoint hold)."""
    return {k: (v.astype(str) if v.dtype == object else v) for k, v in arr.items()}


class GenerationalFamily(Family):
    """Base class: subclasses implement :meth:`rng_key`, :meth:`init`, :meth:`step`, :meth:`last_generation`."""

    # resumable per shard: the mid-shard checkpoint lives in the shard's own workdir (ctx.workdir)
    batch_across_shards = False
    first_step: int = 0            # the first generation written by step() (init() writes what comes before)

    def rng_key(self, p: Any, cell: dict) -> tuple:
        raise NotImplementedError

    def last_generation(self, p: Any) -> int:
        raise NotImplementedError

    def init(self, s: GenState) -> None:
        """Write what precedes ``first_step`` (the initial data) on a fresh shard."""

    def step(self, s: GenState, g: int) -> None:
        raise NotImplementedError

    def count_tokens(self, p: Any, cells: list[dict], tokenizer, model_kind: str, seed: int):
        """Generation 0's rendered read (and generation, if any) once per generation ``first_step..last``
        (later generations' contexts differ in content, not much in length: an estimate). Families whose
        later generations do more than generation 0's read (``rules``, ``acronym``: model turns, chat
        history, written examples, redraws) override this to follow their run call by call."""
        one = super().count_tokens(p, cells, tokenizer, model_kind, seed)
        return one.scaled(max(1, self.last_generation(p) + 1 - self.first_step))

    def run(self, p: Any, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        rngs = [np.random.default_rng(cell_seed(ctx.seed, *self.rng_key(p, c))) for c in cells]
        arr, ck, start = start_or_resume(self, p, cells, ctx, rngs)
        s = GenState(p, cells, ctx, arr, rngs)
        if start is None:
            self.init(s)
            start = self.first_step
        for g in range(start, self.last_generation(p) + 1):
            self.step(s, g)
            ck.save(plain(arr), g + 1, rngs)
            maybe_interrupt(g)
        return plain(arr)
