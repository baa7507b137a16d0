"""Experiment families (plug-ins), in one :class:`~bayesflip.registry.Registry` with lazy entries.

    FAMILIES.get("icl")      # -> the Family class (its module is imported on first use)
    get_family("icl")        # -> an instance; family_names() -> every registered name

A family module decorates its class with ``@register`` (the entry resolving to that class);
adding a family = its module + one ``FAMILIES.register_lazy`` line below.
"""

from __future__ import annotations

from ..registry import Registry
from .base import Family

FAMILIES: Registry[type[Family]] = Registry("family")
for _name, _target in (("icl", "icl:ICLFamily"), ("needle", "needle:NeedleFamily"),
                       ("paraphrase", "paraphrase:ParaphraseFamily"), ("markov", "markov:MarkovFamily"),
                       ("poisson", "poisson:PoissonFamily"), ("attention", "attention:AttentionFamily"),
                       ("cot", "cot:CoTFamily"), ("chains", "chains:ChainFamily"), ("rules", "rules:RulesFamily"),
                       ("acronym", "acronym:AcronymFamily")):
    FAMILIES.register_lazy(_name, f"{__name__}.{_target}")


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: ``cls`` under ``cls.name`` (resolves its lazy entry; a new name is an eager entry)."""
    FAMILIES.register(cls.name, cls)
    return cls


def family_names() -> list[str]:
    return FAMILIES.names()


def get_family(name: str) -> Family:
    """An instance of family ``name``; an unknown name is a one-line ConfigError listing the families."""
    return FAMILIES.get(name)()
