"""The :class:`Backend` interface: a loaded model + the one engine, plus optional capabilities.

A backend owns its placement: :meth:`Backend.validate_spec` checks a registry entry's placement
options (``tp``, ``device_map``) when the model registry is read, :meth:`Backend.load` loads and
places the model, :meth:`Backend.wrap` wraps an already loaded one. Importing a backend class is
light (no torch, no engine): the model registry validates every entry through its backend class,
and the engine is imported when a backend is constructed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence, TypeVar

from ..errors import BayesflipError, ConfigError
from . import ATTENTION_MASS, BACKENDS

if TYPE_CHECKING:
    import numpy as np

    from ..engine import ChoiceRequest, CurveRequest, EngineStats

T = TypeVar("T")


class CapabilityError(BayesflipError, NotImplementedError):
    """A backend was asked for an optional capability it does not have."""


class Backend(ABC):
    """One model, loaded once per job, scored through the shared :class:`~bayesflip.engine.Scorer`.

    Subclasses implement :meth:`load` (how weights are read and placed), say which placement
    options they accept (``TENSOR_PARALLEL``, ``DEVICE_MAP``; or override :meth:`validate_spec`) and
    may widen ``CAPABILITIES`` / :meth:`capabilities_for`; the scoring methods are the engine's.
    """

    name: ClassVar[str]
    CAPABILITIES: ClassVar[frozenset[str]] = frozenset()
    TENSOR_PARALLEL: ClassVar[bool] = False    # accepts ``tp > 1`` (one process per rank)
    DEVICE_MAP: ClassVar[bool] = False         # accepts ``device_map: auto`` (one process over all GPUs)

    def __init__(self, lm, **scorer_kwargs):
        from ..engine import Scorer

        self.lm = lm                              # bayesflip.models.loader.LoadedModel
        self.scorer = Scorer(lm, **scorer_kwargs)

    # ------------------------------------------------------------------ construction
    @classmethod
    @abstractmethod
    def load(cls, spec, device: Any = None, dtype: str | None = None, **scorer_kwargs) -> "Backend":
        """Load ``spec`` (a ModelSpec) and return the ready backend."""

    @classmethod
    def wrap(cls, lm, **scorer_kwargs) -> "Backend":
        """This backend around an already loaded model (``run_task(lm=...)`` in tests)."""
        return cls(lm, **scorer_kwargs)

    @classmethod
    def validate_spec(cls, spec) -> None:
        """Check a registry entry's placement options for this backend; called when the model registry
        is read (:func:`bayesflip.models.registry.parse_entry`), before anything runs. Raises a one-line
        :class:`ConfigError` naming ``models.<name>.backend`` and the backends that would accept the entry."""
        if spec.tp != 1 and not cls.TENSOR_PARALLEL:
            raise ConfigError(f"models.{spec.name}.backend",
                              f"tp > 1 needs backend: {_able('TENSOR_PARALLEL')}")
        if spec.device_map is not None and not cls.DEVICE_MAP:
            raise ConfigError(f"models.{spec.name}.backend",
                              f"device_map needs backend: {_able('DEVICE_MAP')} ({cls.name} places the model itself)")

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


def _able(flag: str) -> str:
    """The registered backends whose ``flag`` is set ("a or b")."""
    return " or ".join(n for n in BACKENDS.names() if getattr(BACKENDS.get(n), flag, False)) or "none registered"
