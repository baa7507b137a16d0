"""Model backends: one interface over ways of running a model (plain transformers, DeepSpeed TP, ...).

    from bayesflip.backends import load_backend
    be = load_backend(get_model_spec("llama-3.1-70b"))   # the registry entry's `backend:` picks the class
    be.score_choices(reqs); be.score_curves(reqs); be.generate(...)
    if "attention_mass" in be.capabilities: be.attention_mass(...)
    if be.is_writer: store.write_shard(...)     # rank 0 of a tensor-parallel group

Every backend delegates scoring to the one engine (:class:`bayesflip.engine.Scorer`); a backend
only decides how the model is loaded and placed, and which optional capabilities it has.
A :class:`Backend` duck-types as the engine (``tokenizer``, ``model``, ``stats``, the scoring
methods), so it can be passed wherever a ``Scorer`` is expected (``RunContext.scorer``).
New backends register here (``BACKENDS.register_lazy(name, "module:Class")``): one module + one
line (``docs/BACKENDS.md``). A backend owns its placement (:meth:`~.base.Backend.validate_spec`,
:meth:`~.base.Backend.load`, :meth:`~.base.Backend.wrap`); callers never branch on a backend's name.

Layering: this package sits below the model registry (which validates every entry through its
backend class) and above the loader and the engine; it never imports the model registry, the
planner or the cluster layer (``tests/test_architecture.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from ..errors import ConfigError
from ..registry import Registry

if TYPE_CHECKING:
    from .base import Backend

ATTENTION_MASS = "attention_mass"
CAPABILITIES = (ATTENTION_MASS,)   # optional capabilities a family may require (Family.requires)

BACKENDS: Registry[type[Backend]] = Registry("backend", key="backend")
BACKENDS.register_lazy("hf", "bayesflip.backends.hf:HFBackend")
BACKENDS.register_lazy("deepspeed", "bayesflip.backends.deepspeed:DeepSpeedBackend")


def backend_class(name: str) -> type[Backend]:
    return BACKENDS.get(name)


def validate_spec(spec) -> None:
    """A registry entry checked by its backend (unknown name: one line listing the backends)."""
    if spec.backend not in BACKENDS:
        raise ConfigError(f"models.{spec.name}.backend", f"unknown backend {spec.backend!r}", allowed=BACKENDS.names())
    backend_class(spec.backend).validate_spec(spec)


def capabilities_of(spec) -> set[str]:
    """What the model's backend can do, from its registry entry alone (no model load)."""
    return set(backend_class(spec.backend).capabilities_for(spec))


def check_requirements(spec, requires: Iterable[str], what: str = "this experiment") -> None:
    """Planner check, before submission: the model's backend has every capability ``requires`` names."""
    missing = sorted(set(requires) - capabilities_of(spec))
    if missing:
        able = [n for n in BACKENDS.names() if set(missing) <= set(backend_class(n).capabilities_for(spec))]
        raise ConfigError(f"models.{spec.name}.backend",
                          f"{what} needs {', '.join(missing)}, which backend {spec.backend!r} does not provide",
                          allowed=able)


def load_backend(spec: Any, device: Any = None, dtype: str | None = None, **scorer_kwargs) -> Backend:
    """Load a registry model (a :class:`~bayesflip.models.registry.ModelSpec`) through its backend.

    ``scorer_kwargs`` go to the engine (``batch_tokens``, ``max_batch``, ``progress``, ``max_padding``).
    """
    if isinstance(spec, str):
        raise TypeError(f"load_backend takes a ModelSpec, not the name {spec!r}: "
                        f"load_backend(bayesflip.models.registry.get_model_spec({spec!r}))")
    return backend_class(spec.backend).load(spec, device=device, dtype=dtype, **scorer_kwargs)


def backend_for(lm: Any, **scorer_kwargs) -> Backend:
    """A Backend around an already loaded model (``run_task(lm=...)`` in tests); a Backend passes through."""
    from .base import Backend

    if isinstance(lm, Backend):
        return lm
    return backend_class(lm.spec.backend).wrap(lm, **scorer_kwargs)


__all__ = ["backend_for", "ATTENTION_MASS", "BACKENDS", "CAPABILITIES", "backend_class", "capabilities_of", "check_requirements",
           "load_backend", "validate_spec"]
