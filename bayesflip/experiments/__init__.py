"""Experiment families (plug-ins). Import a module here to register its family."""

from __future__ import annotations

from .base import Family

_FAMILIES: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    _FAMILIES[cls.name] = cls
    return cls


def _load_all() -> None:
    import importlib

    for mod in ("icl", "needle", "paraphrase", "markov", "poisson", "attention", "cot", "chains", "rules", "acronym"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise


def family_names() -> list[str]:
    _load_all()
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    _load_all()
    return _FAMILIES[name]()
