"""Reduce: merge a sweep's stores, compare with the Bayesian references, write tables, figures, report.

``reduce_sweep(sweep, results_dir=None, out=None) -> Path`` (report.md) and ``reduce_cli(args)``.
Family reducers are plug-ins: one module per family in this package, registered with
:func:`bayesflip.reduce.base.register_reducer` (see :mod:`bayesflip.reduce.icl`).
"""

from __future__ import annotations

from .base import FamilyInput, Figure, Heading, ReducedFamily, Section, Table, Text, register_reducer
from .pipeline import reduce_cli, reduce_sweep

__all__ = ["reduce_sweep", "reduce_cli", "register_reducer", "FamilyInput", "ReducedFamily", "Section", "Text",
           "Table", "Figure", "Heading"]
