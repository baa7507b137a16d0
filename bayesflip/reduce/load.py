"""Read every store of a sweep (complete or not) into trusted arrays + tidy tables + coverage.

Only cells of *verified* shards are trusted: a complete ``done`` record of this store whose
chunk files all match the checksums it carries. Everything else is collected into the
coverage table instead of raising (and those cells are never read):

=================  ==========================================================
status             meaning
=================  ==========================================================
done               record ``done``, checksums verified, every chunk of the shard decoded
missing            no record (never run, or still running)
failed             record ``failed`` (its error is kept)
corrupt-record     the record JSON could not be parsed, or lacks fields
stale-record       the record belongs to another (deleted / overwritten) store
corrupt-chunk      record ``done`` but a chunk file is missing, does not match its checksum,
                   or raised when read
missing-store      the manifest lists the store but it is not on disk
unreadable-store   the store's metadata / coords / labels raised when read
=================  ==========================================================

Evidence kind of every cell (:meth:`StoreData.cell_evidence`): the store attribute ``evidence``
written at plan time (:mod:`bayesflip.experiments.base`); a store written before it existed gets
the kind its family declares for its stored params (:func:`infer_evidence`), and a family that
declares none (or params that no longer validate) gives ``unknown``, which no prior uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from ..errors import ConfigError
from ..hpc.manifest import Manifest, ManifestError
from ..paths import RESULTS_DIR
from ..store import ResultStore, ShardState
from ..store_layout import array_dims, read_coords

log = logging.getLogger(__name__)

UNKNOWN_EVIDENCE = {"statement": "unknown", "context": "unknown"}

COVERAGE_COLUMNS = ["experiment", "model", "family", "shard", "cell_start", "cell_stop", "status", "error", "store"]


@dataclass
class StoreData:
    """The trusted part of one (experiment, model) store.

    ``cells``: one row per trusted cell, columns ``cell`` (index in the store), ``shard`` and
    the condition coords; ``arrays[name][i]`` belongs to ``cells.iloc[i]``.
    """

    sweep: str
    experiment: str
    model: str
    family: str
    path: Path
    attrs: dict
    cells: pd.DataFrame
    arrays: dict[str, np.ndarray]
    dims: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    n_cells: int
    n_shards: int
    records: dict[int, dict] = field(default_factory=dict)

    @property
    def params(self) -> dict:
        return dict((self.attrs.get("config") or {}).get("params") or {})

    @property
    def empty(self) -> bool:
        return len(self.cells) == 0

    @property
    def evidence(self) -> dict:
        """The store's ``evidence`` attribute, or for a store written before it existed the kind its
        family declares for its params (:func:`infer_evidence`)."""
        ev = self.attrs.get("evidence")
        return dict(ev) if ev else infer_evidence(self.family, self.params)

    def cell_evidence(self) -> pd.DataFrame:
        """Per trusted cell (rows of ``cells``): columns ``statement`` and ``context`` of its evidence kind;
        ``unknown`` where the declaration does not cover the cell."""
        ev = self.evidence
        n = len(self.cells)
        if "by" not in ev:
            return pd.DataFrame({"statement": [ev.get("statement", "unknown")] * n,
                                 "context": [ev.get("context", "unknown")] * n})
        vals = self.cells[ev["by"]].astype(str) if ev["by"] in self.cells else pd.Series(["?"] * n)
        kinds = [ev["values"].get(v, UNKNOWN_EVIDENCE) for v in vals]
        return pd.DataFrame({"statement": [k["statement"] for k in kinds], "context": [k["context"] for k in kinds]})

    @property
    def statement(self) -> str:
        """The one bias statement of every cell (``none``, ``theta``, ``theta2``), ``mixed`` when the cells
        differ, ``unknown`` when not declared."""
        s = set(self.cell_evidence()["statement"]) or {self.evidence.get("statement", "unknown")}
        return s.pop() if len(s) == 1 else "mixed"

    def tidy(self, name: str) -> pd.DataFrame:
        """Long table of one array: one row per (cell, *dims) with the cell coords and dim labels."""
        a = self.arrays[name]
        dims = self.dims[name][1:]
        clash = sorted(set(self.cells.columns) & ({name} | set(dims)))
        if clash:
            raise ValueError(f"{self.path}: array {name!r} / its dims clash with per-cell coordinate(s) {clash}; "
                             f"re-plan the store (coordinate names must differ from array names)")
        idx = np.indices(a.shape).reshape(a.ndim, -1)
        df = self.cells.iloc[idx[0]].reset_index(drop=True)
        for k, d in enumerate(dims, start=1):
            lab = self.labels.get(d)
            df[d] = lab[idx[k]] if lab is not None and len(lab) == a.shape[k] else idx[k]
        df[name] = a.reshape(-1)
        df.insert(0, "model", self.model)
        df.insert(0, "experiment", self.experiment)
        return df

    def to_dataset(self):
        """``xarray.Dataset`` of these cells: every array on (cell, *dims), the cell index, shard, conditions
        and ``verified`` as coordinates on ``cell``, dim labels as index coordinates, the store's attrs."""
        import xarray as xr

        cells = self.cells
        coords: dict = {c: ("cell", cells[c].to_numpy()) for c in cells.columns}
        coords.setdefault("verified", ("cell", np.ones(len(cells), dtype=bool)))
        sizes = {d: n for k, a in self.arrays.items() for d, n in zip(self.dims[k][1:], a.shape[1:])}
        for d, lab in self.labels.items():
            if d in sizes and len(lab) == sizes[d]:
                coords[d] = (d, np.asarray(lab))
        data = {k: (self.dims[k], a) for k, a in self.arrays.items()}
        return xr.Dataset(data, coords, attrs={**self.attrs, "sweep": self.sweep})


@dataclass
class SweepData:
    sweep: str
    root: Path
    stores: list[StoreData]
    coverage: pd.DataFrame
    manifest: Manifest | None

    def by_family(self) -> dict[str, list[StoreData]]:
        out: dict[str, list[StoreData]] = {}
        for s in self.stores:
            out.setdefault(s.family, []).append(s)
        return out

    def store_summary(self) -> pd.DataFrame:
        """Per store: shards and cells total / trusted, and the count of each problem status."""
        cov = self.coverage
        rows = []
        for (exp, model), g in cov.groupby(["experiment", "model"], sort=True):
            shard_rows = g[g["shard"] >= 0]
            done = shard_rows[shard_rows["status"] == "done"]
            rows.append({"experiment": exp, "model": model, "family": g["family"].iloc[0],
                         "shards_total": int(len(shard_rows)), "shards_done": int(len(done)),
                         "cells_total": int((shard_rows["cell_stop"] - shard_rows["cell_start"]).sum()),
                         "cells_trusted": int((done["cell_stop"] - done["cell_start"]).sum()),
                         "problems": ", ".join(f"{k}: {v}" for k, v in
                                               g.loc[g["status"] != "done", "status"].value_counts().sort_index().items())})
        return pd.DataFrame(rows, columns=["experiment", "model", "family", "shards_total", "shards_done",
                                           "cells_total", "cells_trusted", "problems"])

    def problems(self) -> pd.DataFrame:
        return self.coverage[self.coverage["status"] != "done"].reset_index(drop=True)


def infer_evidence(family: str, params: dict) -> dict:
    """The evidence kind a store of ``family`` with these stored ``params`` has: the family's own
    :meth:`~bayesflip.experiments.base.Family.evidence` of the params (keys the Params no longer know
    are dropped); ``UNKNOWN_EVIDENCE`` for an unknown family, one that declares none, or params that
    do not validate (logged)."""
    from ..experiments import family_names, get_family

    if family not in family_names():
        return dict(UNKNOWN_EVIDENCE)
    fam = get_family(family)
    try:
        p = fam.Params(**{k: v for k, v in params.items() if k in fam.Params.model_fields})
    except ValueError as e:   # pydantic's ValidationError: the kind stays unknown, no prior uses the store
        log.warning("family %s: stored params do not validate (%s); evidence kind unknown", family, e)
        return dict(UNKNOWN_EVIDENCE)
    return fam.evidence(p) or dict(UNKNOWN_EVIDENCE)


def _cov(exp, model, family, shard, lo, hi, status, error, store) -> dict:
    return {"experiment": exp, "model": model, "family": family, "shard": shard, "cell_start": lo,
            "cell_stop": hi, "status": status, "error": error, "store": str(store)}


def _discover(root: Path, manifest: Manifest | None) -> dict[tuple[str, str], Path]:
    """(experiment, model) -> ``root/<experiment>/<model>.zarr`` for every unit of the manifest and
    every store on disk (paths are taken under ``root``, so a moved or copied sweep still reads)."""
    keys = {(u.experiment, u.model) for u in (manifest.units if manifest else [])}
    keys |= {(p.parent.name, p.stem) for p in root.glob("*/*.zarr")}
    return {k: root / k[0] / f"{k[1]}.zarr" for k in sorted(keys)}


def _runs(shards: list[int]) -> list[tuple[int, int]]:
    """Sorted shard ids → [(first, last+1)] runs of consecutive ids."""
    out: list[tuple[int, int]] = []
    for s in sorted(shards):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


def _read_arrays(g, names: list[str], shards: list[int], shard_size: int, n_cells: int,
                 ) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """Read only the given (verified) shards of every array, run by run; a chunk that raises marks
    its shard corrupt (``{shard: error}``). Cells of other shards stay at the fill value, unread."""
    bad: dict[int, str] = {}
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        arr = g[name]
        out = np.full(arr.shape, arr.fill_value, dtype=arr.dtype)
        for a, b in _runs(shards):
            lo, hi = a * shard_size, min(b * shard_size, n_cells)
            try:
                out[lo:hi] = arr[lo:hi]
                continue
            except Exception as e:  # corrupt chunk somewhere in the run: localise it shard by shard
                log.info("%s: read of shards %d-%d failed (%s), reading shard by shard", name, a, b - 1, e)
            for s in range(a, b):
                lo, hi = s * shard_size, min((s + 1) * shard_size, n_cells)
                try:
                    out[lo:hi] = arr[lo:hi]
                except Exception as e:  # recorded in the coverage table as corrupt-chunk
                    bad.setdefault(s, f"array {name!r}: {type(e).__name__}: {e}")
        arrays[name] = out
    return arrays, bad


def load_store(sweep: str, experiment: str, model: str, path: Path, family_hint: str = "?",
               trusted_only: bool = True) -> tuple[StoreData | None, list[dict]]:
    """One store → (StoreData of its trusted cells or None, coverage rows).

    ``trusted_only=False`` keeps every cell, with a boolean ``verified`` column in ``cells``; the
    arrays of unverified cells stay at their fill value (never read)."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        return None, [_cov(experiment, model, family_hint, -1, 0, 0, "missing-store", "store not on disk", path)]
    st = ResultStore(path)
    try:
        untrusted = st.integrity()
        g = zarr.open_group(path, mode="r")
        attrs: dict[str, Any] = dict(g.attrs)
        n_cells, shard_size, n_shards = int(attrs["n_cells"]), int(attrs["shard_size"]), int(attrs["n_shards"])
        family = str(attrs.get("family", family_hint))
        if untrusted is not None:     # a newer layout/format, or edited attributes: nothing of it is trusted
            return None, [_cov(experiment, model, family_hint, -1, 0, 0, "unreadable-store", untrusted, path)]
        dims = array_dims(attrs)
        coords, labels = read_coords(g, attrs)
        records = st.records()
    except Exception as e:  # the whole store is unusable: one coverage row says why
        return None, [_cov(experiment, model, family_hint, -1, 0, 0, "unreadable-store", f"{type(e).__name__}: {e}", path)]
    status, errors = {}, {}
    for s in range(n_shards):
        try:
            ss = st.classify(s, records.get(s))
        except Exception as e:  # a shard whose check itself raised is not trusted
            ss = ShardState("corrupt", "corrupt-chunk", f"{type(e).__name__}: {e}")
        status[s] = ss.kind
        errors[s] = ss.message
    done = [s for s in range(n_shards) if status[s] == "done"]
    arrays, bad = _read_arrays(g, list(dims), done, shard_size, n_cells)
    for s, err in bad.items():
        status[s], errors[s] = "corrupt-chunk", err
    rows = [_cov(experiment, model, family, s, s * shard_size, min((s + 1) * shard_size, n_cells), status[s],
                 errors[s], path) for s in range(n_shards)]
    trusted = np.zeros(n_cells, dtype=bool)
    for s in range(n_shards):
        if status[s] == "done":
            trusted[s * shard_size: min((s + 1) * shard_size, n_cells)] = True
    cells = pd.DataFrame({"cell": np.arange(n_cells), "shard": np.arange(n_cells) // shard_size,
                          **{k: v for k, v in coords.items() if len(v) == n_cells}})
    if trusted_only:
        cells, arrays = cells[trusted].reset_index(drop=True), {k: v[trusted] for k, v in arrays.items()}
    else:
        cells["verified"] = trusted
    data = StoreData(sweep=sweep, experiment=experiment, model=model, family=family, path=path, attrs=attrs,
                     cells=cells, arrays=arrays, dims=dims, labels=labels,
                     n_cells=n_cells, n_shards=n_shards, records=records)
    return data, rows


def sweep_root(sweep: str, results_dir: Path | str | None = None) -> Path:
    from ..config import check_name

    check_name(sweep, "--sweep")
    base = Path(results_dir or RESULTS_DIR)
    root = base / sweep
    if not root.is_dir():
        known = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        raise ConfigError("--sweep", f"no results for sweep {sweep!r} under {base}", allowed=known)
    return root


def load_sweep_data(sweep: str, results_dir: Path | str | None = None, trusted_only: bool = True) -> SweepData:
    """Every store of ``results/<sweep>`` (from the manifest and from disk), trusted cells only
    (``trusted_only=False``: every cell, see :func:`load_store`)."""
    root = sweep_root(sweep, results_dir)
    mpath = Manifest.path(sweep, results_dir)
    manifest = None
    rows: list[dict] = []
    try:
        manifest = Manifest.read_if_exists(sweep, results_dir)
    except ManifestError as e:
        rows.append(_cov("(manifest)", "", "", -1, 0, 0, "unreadable-store", f"manifest.json: {e}", mpath))
    stores: list[StoreData] = []
    fam_of = {e: (c or {}).get("family", "?") for e, c in (manifest.experiments if manifest else {}).items()}
    for (exp, model), path in _discover(root, manifest).items():
        data, cov = load_store(sweep, exp, model, path, fam_of.get(exp, "?"), trusted_only)
        rows.extend(cov)
        if data is not None:
            stores.append(data)
    coverage = pd.DataFrame(rows, columns=COVERAGE_COLUMNS)
    coverage = coverage.astype({"shard": "int64", "cell_start": "int64", "cell_stop": "int64"})
    return SweepData(sweep=sweep, root=root, stores=stores, coverage=coverage, manifest=manifest)
