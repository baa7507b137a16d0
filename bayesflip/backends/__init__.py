"""Model backends: one interface over ways of running a model (plain transformers, DeepSpeed TP, ...).

    from bayesflip.backends import load_backend
    be = load_backend("llama-3.1-70b")          # the registry entry's `backend:` picks the class
    be.score_choices(reqs); be.score_curves(reqs); be.generate(...)
    if "attention_mass" in be.capabilities: be.attention_mass(...)
    if be.is_writer: store.write_shard(...)     # rank 0 of a tensor-parallel group

Every backend delegates scoring to the one engine (:class:`bayesflip.engine.Scorer`); a backend
only decides how the model is loaded and placed, and which optional capabilities it has.
A :class:`Backend` duck-types as the engine (``tokenizer``, ``model``, ``stats``, the scoring
methods), so it can be passed wherever a ``Scorer`` is expected (``RunContext.scorer``).
New backends register here (``BACKENDS.register_lazy(name, "module:Class")``).
"""

from __future__ import annotations

from typing import Any, Iterable

from ..registry import Registry

ATTENTION_MASS = "attention_mass"
CAPABILITIES = (ATTENTION_MASS,)   # optional capabilities a family may require (Family.requires)

BACKENDS: Registry = Registry("backend", key="backend")
BACKENDS.register_lazy("hf", "bayesflip.backends.hf:HFBackend")
BACKENDS.register_lazy("deepspeed", "bayesflip.backends.deepspeed:DeepSpeedBackend")


def backend_class(name: str):
    return BACKENDS.get(name)


def capabilities_of(spec) -> set[str]:
    """What the model's backend can do, from its registry entry alone (no model load)."""
    return set(backend_class(spec.backend).capabilities_for(spec))


def check_requirements(spec, requires: Iterable[str], what: str = "this experiment") -> None:
    """Planner check, before submission: the model's backend has every capability ``requires`` names."""
    from ..errors import ConfigError

    missing = sorted(set(requires) - capabilities_of(spec))
    if missing:
        able = [n for n in BACKENDS.names() if set(missing) <= set(backend_class(n).capabilities_for(spec))]
        raise ConfigError(f"models.{spec.name}.backend",
                          f"{what} needs {', '.join(missing)}, which backend {spec.backend!r} does not provide",
                          allowed=able)


def load_backend(spec_or_name: Any, device: Any = None, dtype: str | None = None, **scorer_kwargs):
    """Load a registry model (name or :class:`~bayesflip.models.registry.ModelSpec`) through its backend.

    ``scorer_kwargs`` go to the engine (``batch_tokens``, ``max_batch``, ``progress``, ``max_padding``).
    """
    from ..models.registry import get_model_spec

    spec = get_model_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    return backend_class(spec.backend).load(spec, device=device, dtype=dtype, **scorer_kwargs)


def backend_for(lm: Any, **scorer_kwargs):
    """A Backend around an already loaded model (``run_task(lm=...)`` in tests); a Backend passes through."""
    from .base import Backend

    if isinstance(lm, Backend):
        return lm
    if lm.spec.backend == "deepspeed":
        from .deepspeed import DeepSpeedBackend
        from .distributed import dist_env

        return DeepSpeedBackend(lm, dist_env(), **scorer_kwargs)
    return backend_class(lm.spec.backend)(lm, **scorer_kwargs)


__all__ = ["backend_for", "ATTENTION_MASS", "BACKENDS", "CAPABILITIES", "backend_class", "capabilities_of", "check_requirements",
           "load_backend"]
