"""``backend: example`` — the smallest complete backend (docs/BACKENDS.md; tests/test_architecture.py).

One process, the whole model on one device, scored by the shared engine. A backend decides only
how a model is placed and which placement options and optional capabilities it has.
"""

from __future__ import annotations

from bayesflip.backends.base import Backend
from bayesflip.errors import ConfigError


class ExampleBackend(Backend):
    name = "example"
    CAPABILITIES = frozenset()       # optional capabilities (e.g. ATTENTION_MASS): none here
    TENSOR_PARALLEL = False          # tp > 1 refused when the model registry is read
    DEVICE_MAP = False               # device_map: auto refused likewise

    @classmethod
    def validate_spec(cls, spec) -> None:
        """Registry time: the placement options this backend accepts (one-line ConfigError)."""
        super().validate_spec(spec)
        if spec.fp32_head:
            raise ConfigError(f"models.{spec.name}.fp32_head", "backend example keeps the model's dtype")

    @classmethod
    def load(cls, spec, device=None, dtype=None, **scorer_kwargs) -> "ExampleBackend":
        """Job time: read the weights (on the CPU), place them, hand them to the engine."""
        from bayesflip.models.loader import load_model

        def place(model, torch_dtype, device):
            return model.to(device), device

        return cls(load_model(spec, device=device or "cpu", dtype=dtype, place=place), **scorer_kwargs)
