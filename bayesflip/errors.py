"""Error types with messages a researcher can act on (key, value, allowed values)."""

from __future__ import annotations

from typing import Iterable


class BayesflipError(Exception):
    """Base class: every error the framework raises on purpose."""


class ConfigError(BayesflipError, ValueError):
    """A configuration value is invalid. The message names the key and the allowed values."""

    def __init__(self, key: str, message: str, allowed: Iterable[object] | None = None, source: str | None = None):
        self.key = key
        self.message = message
        self.allowed = list(allowed) if allowed is not None else None
        parts = []
        if source:
            parts.append(f"{source}: ")
        parts.append(f"config key '{key}': {message}")
        if self.allowed is not None:
            parts.append(f" (allowed: {', '.join(map(str, self.allowed))})")
        super().__init__("".join(parts))


class UnknownModelError(ConfigError):
    def __init__(self, name: str, known: Iterable[str]):
        super().__init__("model", f"unknown model {name!r}", allowed=sorted(known))


class ChoiceError(BayesflipError, ValueError):
    """A set of choices cannot be scored as asked (empty, duplicate, prefix conflict, bad tokenization)."""


class ContextLengthError(BayesflipError, ValueError):
    """A prompt (plus choice) is longer than the model's context window; we never truncate silently."""


class StoreIdentityError(BayesflipError):
    """A store was made by another config / model spec / code version than this run (or was replaced)."""


class StoreWriteError(BayesflipError):
    """Writing a shard, record or store failed (full disk, permissions, ...); nothing is marked done."""


class LeaseLost(BayesflipError):
    """Another live job took over a shard this process was computing; it writes nothing."""


class StoreReadError(BayesflipError):
    """A store cannot be opened (missing, damaged metadata); the message names it and why."""


class Interrupted(BayesflipError):
    """Ctrl-C (SIGINT) stopped a command; the message says what is kept and how to resume (exit 130)."""
