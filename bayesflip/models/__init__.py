"""Model registry (YAML specs) and loading."""

from .registry import ModelSpec, load_registry, get_model_spec, models_of_type  # noqa: F401
