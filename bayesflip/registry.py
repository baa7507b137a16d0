"""One small registry mechanism: named plug-ins, registered eagerly or lazily.

The one mechanism behind every plug-in kind: backends (:data:`bayesflip.backends.BACKENDS`),
experiment families (:data:`bayesflip.experiments.FAMILIES`) and family reducers
(:data:`bayesflip.reduce.base.REDUCERS`). Each kind lists its built-in plug-ins as lazy entries
(name → ``"module:attribute"``) in one place, so names are known without importing anything
heavy, and a plug-in module is imported on its first :meth:`Registry.get`.

    BACKENDS = Registry("backend")
    BACKENDS.register_lazy("hf", "bayesflip.backends.hf:HFBackend")   # imported on first get()

    @BACKENDS.register("mine")                                         # or eagerly, as a decorator
    class MyBackend(Backend): ...

    BACKENDS.get("hf")      # -> the class; unknown names raise ConfigError listing the allowed ones

A name registered twice is an error (eager or lazy alike), so two plug-ins can never shadow
each other silently — except that a module may register (e.g. with a decorator) the very object
its own lazy entry names: that is the entry resolving, not a second claim. Lazy entries keep heavy imports (torch, deepspeed) out of ``--help`` and
out of the planner.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import BayesflipError, ConfigError

T = TypeVar("T")


class DuplicateNameError(BayesflipError, ValueError):
    """Two plug-ins claim the same name in one registry."""


class Registry(Generic[T]):
    """A mapping name -> object (usually a class), filled by ``register`` / ``register_lazy``."""

    def __init__(self, kind: str, key: str | None = None):
        self.kind = kind            # "backend", "family", "reducer": used in error messages
        self.key = key or kind      # the config key an unknown name is reported under
        self._objs: dict[str, T] = {}
        self._lazy: dict[str, str] = {}

    # ------------------------------------------------------------------ registration
    def _claim(self, name: str, obj: object = None) -> None:
        """Reserve ``name`` for ``obj``: free, or its lazy entry names ``obj`` itself (the entry resolves),
        or ``obj`` is already registered under it; anything else is a :class:`DuplicateNameError`."""
        if obj is not None and (self._objs.get(name) is obj or self._lazy.get(name) == _target_of(obj)):
            self._lazy.pop(name, None)
            return
        if name in self._objs or name in self._lazy:
            where = self._lazy.get(name) or repr(self._objs[name])
            raise DuplicateNameError(f"{self.kind} {name!r} is registered twice (first: {where})")

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """``register(name, obj)`` or ``@register(name)``."""
        if obj is not None:
            self._claim(name, obj)
            self._objs[name] = obj
            return obj

        def deco(o: T) -> T:
            self._claim(name, o)
            self._objs[name] = o
            return o

        return deco

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``"package.module:attribute"``, imported on first :meth:`get`."""
        if ":" not in target:
            raise ValueError(f"lazy target {target!r} must look like 'package.module:attribute'")
        self._claim(name)
        self._lazy[name] = target

    def unregister(self, name: str) -> None:
        """Remove a name (tests and plug-in reloads)."""
        self._objs.pop(name, None)
        self._lazy.pop(name, None)

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> T:
        if name in self._objs:
            return self._objs[name]
        if name in self._lazy:
            mod, attr = self._lazy[name].split(":", 1)
            obj = getattr(importlib.import_module(mod), attr)   # may resolve the entry itself (a decorator)
            self._lazy.pop(name, None)
            self._objs[name] = obj
            return obj
        raise ConfigError(self.key, f"unknown {self.kind} {name!r}", allowed=self.names())

    def get_or_none(self, name: str) -> T | None:
        """The plug-in, or None for an unknown name (kinds where a missing plug-in is not an error)."""
        return self.get(name) if name in self else None

    def names(self) -> list[str]:
        return sorted({*self._objs, *self._lazy})

    def __contains__(self, name: object) -> bool:
        return name in self._objs or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._objs) + len(self._lazy)


def _target_of(obj: object) -> str:
    """``"module:qualname"`` of a class or function (what a lazy entry pointing at it reads)."""
    return f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}"
