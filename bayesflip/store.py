"""Zarr result stores: one per (sweep, experiment, model), one chunk per shard.

Layout of ``results/<sweep>/<experiment>/<model>.zarr``::

    <array>            (cell, *dims)   chunk = (shard_size, *dims)   dimension_names set
    coords/<field>     (cell,)         condition fields of every cell (theta, depth, sample, ...)
    labels/<dim>       (n,)            labels of a per-cell dim (choice strings, positions)
    attrs              provenance: config + hash, seed, model id + revision, versions, git commit

Completion is recorded per shard, **after** its chunks are written, as an atomically
renamed JSON file in ``<model>.records/shard-000012.json`` (status done|failed, timings,
host, job id, error). A shard without a ``done`` record is recomputed and its chunk
overwritten in place, so a crash mid-write never leaves duplicates or a half shard that
reduce would trust. Concurrent array tasks write disjoint chunks and disjoint record files.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .errors import ConfigError
from .experiments.base import ArraySpec
from .paths import REPO_ROOT, RESULTS_DIR


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e.__class__.__name__})"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("bayesflip", "torch", "transformers", "tokenizers", "numpy", "zarr", "submitit", "deepspeed",
                "scipy", "pandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def provenance(exp, model_spec) -> dict[str, Any]:
    return {
        "experiment": exp.name, "family": exp.family, "config": exp.raw, "config_hash": exp.hash,
        "seed": exp.seed, "shard_size": exp.shard_size,
        "model": model_spec.name, "model_id": model_spec.id, "model_revision": model_spec.revision,
        "model_spec": model_spec.model_dump(mode="json"),
        "versions": library_versions(), "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(),
    }


def store_path(sweep: str, experiment: str, model: str, root: Path | None = None) -> Path:
    return Path(root or RESULTS_DIR) / sweep / experiment / f"{model}.zarr"


def _np_coord(values: list) -> np.ndarray:
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return np.asarray(values, dtype=bool)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64)
    if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.float64)
    return np.asarray(["" if v is None else str(v) for v in values], dtype=str)


@dataclass
class ShardRecord:
    shard: int
    status: str
    data: dict


class ResultStore:
    """One Zarr store plus its per-shard completion records."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records_dir = self.path.with_suffix(".records")

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: Path, arrays: dict[str, ArraySpec], cells: list[dict], shard_size: int,
               labels: dict[str, list], attrs: dict, overwrite: bool = False) -> "ResultStore":
        """Create (or re-open an identical) store. A different config hash is an error unless overwrite."""
        st = cls(path)
        if overwrite and st.path.exists():
            shutil.rmtree(st.path)
            shutil.rmtree(st.records_dir, ignore_errors=True)
        if st.path.exists() and (st.path / "zarr.json").exists():
            old = st.attrs.get("config_hash")
            if old != attrs["config_hash"]:
                raise ConfigError("overwrite", f"{st.path} holds results of another config (hash {old}, now "
                                  f"{attrs['config_hash']}); use --overwrite or another sweep name")
            return st
        st.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=st.path.name + ".tmp-", dir=st.path.parent))
        root = zarr.open_group(tmp, mode="w")
        n = len(cells)
        for name, spec in arrays.items():
            dtype = str if spec.dtype == "str" else spec.dtype
            root.create_array(name, shape=(n, *spec.shape), chunks=(shard_size, *spec.shape), dtype=dtype,
                              fill_value=spec.fill, dimension_names=("cell", *spec.dims))
        co = root.create_group("coords")
        for field in cells[0].keys() if cells else []:
            a = _np_coord([c[field] for c in cells])
            co.create_array(field, shape=a.shape, dtype=str if a.dtype.kind == "U" else a.dtype,
                            chunks=(max(1, len(a)),), dimension_names=("cell",))[:] = a
        lb = root.create_group("labels")
        for dim, vals in labels.items():
            a = _np_coord(list(vals))
            lb.create_array(dim, shape=a.shape, dtype=str if a.dtype.kind == "U" else a.dtype,
                            chunks=(max(1, len(a)),), dimension_names=(dim,))[:] = a
        n_shards = (n + shard_size - 1) // shard_size
        root.attrs.update({**attrs, "n_cells": n, "n_shards": n_shards,
                           "arrays": {k: {"dims": ["cell", *v.dims], "dtype": v.dtype} for k, v in arrays.items()}})
        try:
            os.replace(tmp, st.path)  # atomic: concurrent creators see a whole store or none
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        return st

    @property
    def group(self):
        return zarr.open_group(self.path, mode="r+")

    @property
    def attrs(self) -> dict:
        return dict(zarr.open_group(self.path, mode="r").attrs)

    @property
    def n_shards(self) -> int:
        return int(self.attrs["n_shards"])

    def shard_slice(self, shard: int) -> slice:
        a = self.attrs
        lo = shard * a["shard_size"]
        return slice(lo, min(lo + a["shard_size"], a["n_cells"]))

    def cells(self) -> list[dict]:
        g = zarr.open_group(self.path, mode="r")
        co = g["coords"]
        names = sorted(co.array_keys())
        cols = {k: co[k][:] for k in names}
        n = self.attrs["n_cells"]
        return [{k: (cols[k][i].item() if hasattr(cols[k][i], "item") else cols[k][i]) for k in names} for i in range(n)]

    # ------------------------------------------------------------------ shards
    def _record_path(self, shard: int) -> Path:
        return self.records_dir / f"shard-{shard:06d}.json"

    def write_record(self, shard: int, status: str, **data) -> None:
        self.records_dir.mkdir(parents=True, exist_ok=True)
        rec = {"shard": shard, "status": status, "host": socket.gethostname(),
               "job_id": os.environ.get("SLURM_JOB_ID"), "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
               "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **data}
        fd, tmp = tempfile.mkstemp(dir=self.records_dir, prefix=".rec-")
        with os.fdopen(fd, "w") as f:
            json.dump(rec, f, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._record_path(shard))

    def records(self) -> dict[int, dict]:
        out = {}
        if self.records_dir.exists():
            for p in sorted(self.records_dir.glob("shard-*.json")):
                try:
                    rec = json.loads(p.read_text())
                except (json.JSONDecodeError, OSError) as e:  # a torn record counts as not done
                    rec = {"shard": int(p.stem.split("-")[1]), "status": "corrupt-record", "error": str(e)}
                out[int(rec["shard"])] = rec
        return out

    def done_shards(self) -> set[int]:
        return {s for s, r in self.records().items() if r.get("status") == "done"}

    def pending_shards(self) -> list[int]:
        done = self.done_shards()
        return [s for s in range(self.n_shards) if s not in done]

    def write_shard(self, shard: int, arrays: dict[str, np.ndarray], **record) -> None:
        g = self.group
        sl = self.shard_slice(shard)
        n = sl.stop - sl.start
        expected = set(self.attrs["arrays"])
        if set(arrays) != expected:
            raise ValueError(f"shard {shard}: family returned arrays {sorted(arrays)}, store has {sorted(expected)}")
        for name, a in arrays.items():
            a = np.asarray(a)
            if a.shape[0] != n:
                raise ValueError(f"shard {shard}: array {name} has {a.shape[0]} cells, expected {n}")
            g[name][sl] = a
        self.write_record(shard, "done", n_cells=n, **record)

    def read(self, name: str) -> np.ndarray:
        return zarr.open_group(self.path, mode="r")[name][:]

    def labels(self) -> dict[str, np.ndarray]:
        g = zarr.open_group(self.path, mode="r")
        return {k: g["labels"][k][:] for k in g["labels"].array_keys()}
