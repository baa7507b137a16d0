"""``backend: hf`` — plain transformers in one process, on one device or (``device_map: auto``)
spread by accelerate over all visible GPUs."""

from __future__ import annotations

from typing import Any

from . import ATTENTION_MASS
from .base import Backend


class HFBackend(Backend):
    name = "hf"
    CAPABILITIES = frozenset({ATTENTION_MASS})
    DEVICE_MAP = True          # device_map: auto — accelerate spreads the model over the visible GPUs

    @classmethod
    def load(cls, spec, device: Any = None, dtype: str | None = None, **scorer_kwargs) -> "HFBackend":
        from ..models.loader import load_model

        return cls(load_model(spec, device=device, dtype=dtype), **scorer_kwargs)
