"""bayesflip: measure how language models simulate random processes and update on evidence.

Results in Python: ``bayesflip.open_store``, ``bayesflip.open_sweep``, ``bayesflip.tidy``
(see :mod:`bayesflip.api`; imported on first use so ``import bayesflip`` stays cheap).
"""

__version__ = "0.1.0"

__all__ = ["open_store", "open_sweep", "tidy", "__version__"]


def __getattr__(name: str):
    if name in ("open_store", "open_sweep", "tidy"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'bayesflip' has no attribute {name!r}")
