"""``bayesflip migrate --sweep S``: rewrite a sweep's layout-2 stores (``coords/`` + ``labels/``) in
place to layout 3 (every coordinate at the root, consolidated metadata, the ``verified`` flags), so
``xarray.open_zarr`` reads them labelled. Data chunks are not touched, so every record's chunk
checksums stay valid; ``verified`` is then set from the checked records."""

from __future__ import annotations

from pathlib import Path

from . import store_layout as layout
from .errors import ConfigError
from .hpc import slurm
from .store import ResultStore, version_problem


def migrate_store(path: Path) -> str:
    """``migrated`` | ``current``; refuses while a live job holds one of its shards."""
    st = ResultStore(path, slurm.live_jobs)
    if (st.path / "zarr.json").exists() and (newer := version_problem(st.read_attrs())):
        raise ConfigError("migrate", f"{path}: {newer}")
    damaged = st.damage()
    if damaged:
        raise ConfigError("migrate", f"{path} is damaged ({damaged}); re-run its sweep (it is moved aside and rebuilt)")
    busy = st.leases.live_holders()
    if busy:
        raise ConfigError("migrate", f"{path}: {len(busy)} shard(s) are being computed right now "
                          f"(shards {sorted(busy)[:5]}); migrate when the jobs have finished")
    changed = layout.migrate(path)
    ResultStore(path).sync_verified()
    return "migrated" if changed else "current"


def migrate_sweep(sweep: str, results_dir: Path | str | None = None) -> list[tuple[Path, str]]:
    from .reduce.load import sweep_root

    root = sweep_root(sweep, results_dir)
    paths = sorted(root.glob("*/*.zarr"))
    if not paths:
        raise ConfigError("--sweep", f"no stores under {root}")
    return [(p, migrate_store(p)) for p in paths]
