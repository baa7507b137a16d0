"""The protocol seam: a family's ``clean`` and ``paper`` objects behind one interface.

A family that reproduces an original study holds one *strategy* object per protocol
(``params.protocol``: ``clean`` is bayesflip's own protocol, ``paper`` the study's, see
docs/PROTOCOLS.md). Both objects of a family have the same methods — the family's prompt
rendering, grid, arrays and metrics hooks, declared by the family's own strategy base class — so
the family's code calls ``p.strategy.<hook>(...)`` and never asks which protocol it runs.

Contract:

* ``Params.PROTOCOLS`` maps each protocol name to the family's strategy object (class level, shared,
  stateless); :attr:`bayesflip.experiments.base.Params.strategy` is the one lookup (a dict access) —
  the only place the protocol's name decides anything.
* :meth:`ProtocolStrategy.defaults` (``data`` = the raw params mapping, before field validation):
  the values this protocol gives the keys the config leaves out (config values always win).
* :meth:`ProtocolStrategy.check` (after field validation): keys that belong to the other protocol
  are refused, protocol-specific values resolved (e.g. the paper's stimulus lists); raises
  ``ValueError`` with the one-line message pydantic turns into the config error.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ProtocolStrategy:
    """One protocol of one family (subclassed per family with that family's hooks)."""

    name: ClassVar[str]

    def defaults(self, data: dict) -> dict:
        """Values for the keys the config leaves out (``data``: the raw params mapping)."""
        return {}

    def check(self, p: Any) -> None:
        """Protocol-specific checks (and resolved values) on validated params ``p``."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} protocol={self.name!r}>"


def with_defaults(strategy: ProtocolStrategy, data: dict) -> dict:
    """``data`` with ``strategy.defaults(data)`` filled in for every key it lacks."""
    return {**{k: v for k, v in strategy.defaults(data).items() if k not in data}, **data}
