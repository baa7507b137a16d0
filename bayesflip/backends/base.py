"""The :class:`Backend` interface: a loaded model + the one engine, plus optional capabilities."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Sequence, TypeVar

import numpy as np

from ..engine import ChoiceRequest, CurveRequest, EngineStats, Scorer
from ..errors import BayesflipError
from . import ATTENTION_MASS

T = TypeVar("T")


class CapabilityError(BayesflipError, NotImplementedError):
    """A backend was asked for an optional capability it does not have."""


class Backend(ABC):
    """One model, loaded once per job, scored through the shared :class:`~bayesflip.engine.Scorer`.

    Subclasses implement :meth:`load` (how weights are read and placed) and may widen
    ``CAPABILITIES`` / :meth:`capabilities_for`; the scoring methods are the engine's.
    """

    name: ClassVar[str]
    CAPABILITIES: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, lm, **scorer_kwargs):
        self.lm = lm                              # bayesflip.models.loader.LoadedModel
        self.scorer = Scorer(lm, **scorer_kwargs)

    # ------------------------------------------------------------------ construction
    @classmethod
    @abstractmethod
    def load(cls, spec, device: Any = None, dtype: str | None = None, **scorer_kwargs) -> "Backend":
        """Load ``spec`` (a ModelSpec) and return the ready backend."""

    @classmethod
    def capabilities_for(cls, spec) -> frozenset[str]:
        """Capabilities for a registry entry, known before loading (the planner asks this)."""
        return cls.CAPABILITIES

    # ------------------------------------------------------------------ model facts
    @property
    def spec(self):
        return self.lm.spec

    @property
    def model_name(self) -> str:
        return self.lm.spec.name

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def max_length(self) -> int:
        return self.lm.max_length

    @property
    def revision(self) -> str:
        return self.lm.revision

    @property
    def device(self):
        return self.lm.device

    @property
    def model(self):
        """The underlying module (an InferenceEngine for DeepSpeed; ``.module`` unwraps it)."""
        return self.lm.model

    @property
    def config(self):
        """The model's (text) config: what families read instead of reaching into the module."""
        return self.scorer.config

    @property
    def n_layers(self) -> int:
        return self.scorer.n_layers

    @property
    def generation_config(self):
        """The model's ``generation_config`` (families with ``generation: model_defaults`` read it)."""
        return self.scorer.generation_config

    @property
    def stats(self) -> EngineStats:
        return self.scorer.stats

    @property
    def capabilities(self) -> frozenset[str]:
        return self.capabilities_for(self.spec)

    # distribution: a single process unless a subclass says otherwise
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def is_writer(self) -> bool:
        """Whether this process writes results (rank 0)."""
        return self.rank == 0

    def agree(self, fn: Callable[[], T], what: str = "shard") -> T:
        """Run ``fn``; an error on any rank is raised identically on all ranks (single process: a call)."""
        return fn()

    # ------------------------------------------------------------------ the engine
    def score_choices(self, requests: Sequence[ChoiceRequest]) -> list[np.ndarray]:
        return self.scorer.score_choices(requests)

    def score_curves(self, requests: Sequence[CurveRequest]) -> list[np.ndarray]:
        return self.scorer.score_curves(requests)

    def generate(self, prompts, max_new_tokens: int, seeds, **settings):
        """Seeded on-device sampling (``temperature``, ``top_k``, ``top_p``, ``stop_strings``, ``stop_at_eos``)."""
        return self.scorer.generate(prompts, max_new_tokens, seeds, **settings)

    def require(self, capability: str, what: str = "") -> None:
        if capability not in self.capabilities:
            raise CapabilityError(f"{what or capability}: backend {self.name!r} of model {self.model_name!r} has no "
                                  f"{capability!r} capability (it has: {', '.join(sorted(self.capabilities)) or 'none'})")

    def attention_mass(self, ids, query_positions, key_groups, layers=None) -> dict[str, np.ndarray]:
        """Optional capability ``attention_mass`` (see :meth:`bayesflip.engine.Scorer.attention_mass`)."""
        self.require(ATTENTION_MASS, "attention_mass")
        return self.scorer.attention_mass(ids, query_positions, key_groups, layers=layers)

    def attention_stats(self, ids, query_positions, key_groups, layers=None) -> dict[str, dict[str, np.ndarray]]:
        """Optional capability ``attention_mass``: mean and max-over-heads-then-layers mass
        (see :meth:`bayesflip.engine.Scorer.attention_stats`)."""
        self.require(ATTENTION_MASS, "attention_stats")
        return self.scorer.attention_stats(ids, query_positions, key_groups, layers)

    def close(self) -> None:  # noqa: B027  (an optional hook: a no-op unless a backend holds resources)
        """Release the model (end of a job)."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.model_name}, device={self.device}, rank={self.rank}/{self.world_size}, "
                f"revision={self.revision})")
