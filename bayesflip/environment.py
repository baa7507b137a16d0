"""The ``BAYESFLIP_*`` environment variables, checked before any command runs.

``check_environment(env)`` raises :class:`~bayesflip.errors.BayesflipError` naming the first variable
whose value cannot be used, with the form it must have; the CLI calls it before it imports
anything else, so a bad value ends every command with one ``bayesflip: error:`` line and nothing
written (the modules that read these variables — ``store`` for the lease TTL, ``job`` for the
grouping and the failure hook, ``backends.distributed`` for the rendezvous timeout — parse them
later and would otherwise raise a traceback half-way through a run).

=============================  =========================================================
``BAYESFLIP_LEASE_TTL``        seconds, a finite number > 0
``BAYESFLIP_GROUP_CELLS``      cells per engine call, an integer >= 1
``BAYESFLIP_DIST_TIMEOUT_MIN`` minutes, a finite number > 0
``BAYESFLIP_INJECT_FAILURE``   ``experiment:shard[@rankN]``, comma-separated (testing hook)
``BAYESFLIP_CONFIG_DIR``       an existing directory (a copy of ``configs/``, or the parts a command reads)
=============================  =========================================================

An empty value counts as unset (the default applies).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping, Optional

from .errors import BayesflipError

_FAIL_PART = re.compile(r"[^\s,:@]+:\d+(@rank\d+)?")


def _positive_number(name: str, value: str, unit: str) -> None:
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and x > 0):
        raise BayesflipError(f"environment variable {name}={value!r}: not a number of {unit} > 0")


def check_environment(env: Optional[Mapping[str, str]] = None) -> None:
    """Raise BayesflipError for the first ``BAYESFLIP_*`` variable of ``env`` (default ``os.environ``) that is unusable."""
    env = os.environ if env is None else env
    if v := env.get("BAYESFLIP_LEASE_TTL", "").strip():
        _positive_number("BAYESFLIP_LEASE_TTL", v, "seconds")
    if v := env.get("BAYESFLIP_DIST_TIMEOUT_MIN", "").strip():
        _positive_number("BAYESFLIP_DIST_TIMEOUT_MIN", v, "minutes")
    if v := env.get("BAYESFLIP_GROUP_CELLS", "").strip():
        if not (v.isdigit() and int(v) >= 1):
            raise BayesflipError(f"environment variable BAYESFLIP_GROUP_CELLS={v!r}: not an integer >= 1 "
                                 "(cells per engine call)")
    if v := env.get("BAYESFLIP_CONFIG_DIR", "").strip():
        if not Path(v).is_dir():
            raise BayesflipError(f"environment variable BAYESFLIP_CONFIG_DIR={v!r}: not a directory (point it at a "
                                 "copy of the repository's configs/, or unset it)")
    if v := env.get("BAYESFLIP_INJECT_FAILURE", "").strip():
        bad = [p for p in v.split(",") if p and not _FAIL_PART.fullmatch(p)]
        if bad:
            raise BayesflipError(f"environment variable BAYESFLIP_INJECT_FAILURE={v!r}: {bad[0]!r} is not "
                                 "experiment:shard or experiment:shard@rankN (comma-separated)")
