"""Mid-shard checkpoints for iterated-learning chains (families ``chains``, ``rules``, ``acronym``).

The store's unit of resume is the shard (a ``done`` record per shard, see
:mod:`bayesflip.store`). A chain shard can run for hours, so a chain family additionally
writes its progress after **every generation** to a sidecar file
``<ctx.workdir>/state.npz`` (``ctx.workdir`` = ``results/<sweep>/<exp>/<model>.work/shard-XXXXXX``,
set by :func:`bayesflip.job.run_task`). The file holds every output array filled so far,
the index of the next generation, every chain's RNG state and a *fingerprint* of
(family, params, cells, seed, model). It is replaced atomically (write to a temporary file,
fsync, ``os.replace``), so a kill at any moment leaves either the previous or the new
generation, never a torn file. On start, a family resumes from the file when its fingerprint
matches; a file of another config (e.g. after ``--overwrite`` with new params) is ignored and
replaced. Because all randomness comes from the per-chain ``numpy`` generators whose states
are saved, and every engine call after the resume point sees exactly the same batches, a
resumed shard equals an uninterrupted one.

Testing hook: ``BAYESFLIP_CHAINS_INTERRUPT=<g>`` raises :class:`ChainInterrupted` right after
generation ``g`` was checkpointed (simulates a preemption).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INTERRUPT_ENV = "BAYESFLIP_CHAINS_INTERRUPT"
STATE_FILE = "state.npz"


class ChainInterrupted(RuntimeError):
    """Raised by the testing hook after a checkpoint (a simulated preemption)."""


def fingerprint(family: str, params: Any, cells: list[dict], seed: int, model_name: str) -> str:
    """sha256 over the resolved params, the shard's cells, the seed and the model name."""
    blob = json.dumps({"family": family, "params": params.model_dump(mode="json"), "cells": cells, "seed": seed,
                       "model": model_name}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def rng_states(rngs: list[np.random.Generator]) -> str:
    return json.dumps([r.bit_generator.state for r in rngs])


def restore_rngs(rngs: list[np.random.Generator], blob: str) -> None:
    states = json.loads(blob)
    if len(states) != len(rngs):
        raise ValueError(f"checkpoint holds {len(states)} RNG states for {len(rngs)} chains")
    for r, s in zip(rngs, states):
        r.bit_generator.state = s


class ShardCheckpoint:
    """The sidecar of one shard (a no-op when ``workdir`` is None)."""

    def __init__(self, workdir: Path | None, fp: str):
        self.path = Path(workdir) / STATE_FILE if workdir is not None else None
        self.fp = fp

    def load(self) -> dict[str, np.ndarray] | None:
        """Saved arrays (incl. ``next_gen`` and ``rng``) when a matching checkpoint exists, else None."""
        if self.path is None or not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:  # unreadable = start again; say so
            log.warning("ignoring unreadable chain checkpoint %s: %s", self.path, e)
            return None
        if str(data.get("fingerprint", "")) != self.fp:
            log.warning("ignoring chain checkpoint %s of another config (fingerprint differs)", self.path)
            return None
        return data

    def save(self, arrays: dict[str, np.ndarray], next_gen: int, rngs: list[np.random.Generator]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays, next_gen=np.int64(next_gen), rng=np.array(rng_states(rngs)),  # type: ignore[arg-type]  # numpy stub: **kwds typed as allow_pickle's bool
                         fingerprint=np.array(self.fp))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def maybe_interrupt(generation: int) -> None:
    """The testing hook: raise after generation ``generation`` if ``$BAYESFLIP_CHAINS_INTERRUPT`` names it."""
    v = os.environ.get(INTERRUPT_ENV, "")
    if v and int(v) == generation:
        raise ChainInterrupted(f"interrupted after generation {generation} ({INTERRUPT_ENV}={v})")


def start_or_resume(family: Any, p: Any, cells: list[dict], ctx: Any, rngs: list[np.random.Generator]
                    ) -> tuple[dict[str, np.ndarray], ShardCheckpoint, int | None]:
    """Allocate a chain family's output arrays and resume them from the shard checkpoint.

    Returns ``(arrays, checkpoint, next_generation)``; ``next_generation`` is ``None`` for a
    fresh shard (the caller then writes generation 0), else the RNGs are restored in place.
    """
    specs = family.arrays(p)
    arr = {k: np.full((len(cells), *s.shape), s.fill,
                      dtype={"bool": bool, "str": object}.get(s.dtype, s.dtype)) for k, s in specs.items()}
    ck = ShardCheckpoint(ctx.workdir, fingerprint(family.name, p, cells, ctx.seed, ctx.model_name))
    saved = ck.load()
    if saved is None:
        return arr, ck, None
    for k in arr:
        arr[k][...] = saved[k]
    restore_rngs(rngs, str(saved["rng"]))
    return arr, ck, int(saved["next_gen"])
