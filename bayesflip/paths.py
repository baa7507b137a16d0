"""Where things live: repository root, configs, results, caches (all overridable by env vars)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(os.environ.get("BAYESFLIP_RESULTS_DIR", REPO_ROOT / "results"))
TEMPLATE_DIR = Path(os.environ.get("BAYESFLIP_TEMPLATE_DIR", REPO_ROOT / "job_templates"))
CACHE_DIR = Path(os.environ.get("BAYESFLIP_CACHE", Path.home() / ".cache" / "bayesflip"))


def configs_dir(given: "str | os.PathLike[str] | None" = None) -> Path:
    """``given`` when a caller names a config directory, else ``$BAYESFLIP_CONFIG_DIR`` or the repository's
    ``configs/``, read at each call (a test or a notebook may point it elsewhere after import)."""
    return Path(given or os.environ.get("BAYESFLIP_CONFIG_DIR") or REPO_ROOT / "configs")
