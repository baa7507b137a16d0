"""Where a store keeps its coordinates, so that ``xarray.open_zarr(store)`` reads it fully labelled.

Layout 3 (current), every array at the root of the group::

    <array>      (cell, *dims)  data; attribute ``coordinates`` lists the per-cell coordinates
    cell         (cell,)        0 .. n-1 (index of the cell in the store)
    <field>      (cell,)        condition of every cell (theta, depth, sample, ...)
    <dim>        (n,)           labels of a per-cell dim (choice strings; 0 .. n-1 when the family gives none)
    verified     (cell,) bool   True for cells of shards with a ``done`` record, one chunk per shard;
                                written by the writer (never part of the chunk checksums) — a hint for
                                plain xarray users; bayesflip's readers re-verify the checksums
    zarr.json    attributes + consolidated metadata (re-consolidated after every metadata change)

Layout 2 (before): per-cell conditions in ``coords/<field>``, labels in ``labels/<dim>``; readers
accept it and ``bayesflip migrate --sweep S`` rewrites it in place (data chunks untouched, so
the records' checksums stay valid).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from .atomic import atomic_write_text
from .errors import ConfigError

LAYOUT = 3
RESERVED = ("cell", "verified")
# dims of layout 2 that had the name of a data array (xarray cannot hold both) -> their layout-3 name
DIM_RENAMES = {"kept": "kept_pair"}


def _renames(attrs: dict) -> dict[str, str]:
    """The DIM_RENAMES that apply to a layout-2 store: dims named like one of its data arrays."""
    return {} if is_current(attrs) else {d: r for d, r in DIM_RENAMES.items() if d in attrs.get("arrays", {})}


def array(g: zarr.Group, name: str) -> zarr.Array:
    """The member ``name`` of a store's group: every member read by name is an array (zarr types a
    member ``Array | Group``; type-only, nothing is checked)."""
    return cast(zarr.Array, g[name])


def read_array(g: zarr.Group, name: str, sel: Any = slice(None)) -> np.ndarray:
    """``g[name][sel]`` (zarr types a read ``NDArrayLike | scalar``; with the default numpy buffers a
    slice reads an ``np.ndarray``; type-only, nothing is converted)."""
    return cast(np.ndarray, array(g, name)[sel])


def np_coord(values: list) -> np.ndarray:
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return np.asarray(values, dtype=bool)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64)
    if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.float64)
    return np.asarray(["" if v is None else str(v) for v in values], dtype=str)


def check_names(arrays: dict[str, tuple[str, ...]], shapes: dict[str, tuple[int, ...]], fields: list[str],
                labels: dict[str, Any], where: str = "") -> None:
    """Per-cell coordinates, label dims and data arrays must have distinct names (xarray puts them in one
    namespace), a dim has one size across arrays, and labels match it. ``arrays``: name -> per-cell dims."""
    pre = f"{where}: " if where else ""
    dims = {d for ds in arrays.values() for d in ds}
    clash = sorted(set(fields) & set(arrays))
    if clash:
        raise ConfigError("coords", f"{pre}per-cell coordinate(s) {clash} have the name of a data array of the "
                          f"same store; rename the coordinate (family returns both)")
    for what, names in (("per-cell coordinate", set(fields)), ("data array", set(arrays))):
        bad = sorted(names & (dims | set(RESERVED)))
        if bad:
            raise ConfigError("coords", f"{pre}{what}(s) {bad} have the name of a dimension or of a reserved "
                              f"coordinate ({', '.join(RESERVED)}); rename them")
    size: dict[str, tuple[int, str]] = {}
    for name, ds in arrays.items():
        for d, n in zip(ds, shapes[name]):
            if d in size and size[d][0] != n:
                raise ConfigError("arrays", f"{pre}dim {d!r} has size {size[d][0]} in array {size[d][1]!r} but {n} "
                                  f"in {name!r}; give the dims distinct names")
            size.setdefault(d, (n, name))
    for d, vals in labels.items():
        if d in size and len(vals) != size[d][0]:
            raise ConfigError("coords", f"{pre}{len(vals)} labels for dim {d!r} of size {size[d][0]}")


def _put(root, name: str, a: np.ndarray, dims: tuple[str, ...], chunk: int, overwrite: bool = False) -> None:
    root.create_array(name, shape=a.shape, dtype=str if a.dtype.kind == "U" else a.dtype, chunks=(max(1, chunk),),
                      dimension_names=dims, overwrite=overwrite)[:] = a


def write_coords(root, arrays: dict[str, tuple[str, ...]], shapes: dict[str, tuple[int, ...]],
                 cell_coords: dict[str, np.ndarray], labels: dict[str, np.ndarray], n: int, shard_size: int,
                 overwrite: bool = False) -> dict:
    """Root coordinate arrays of layout 3 + each data array's ``coordinates``; returns the attrs to add."""
    check_names(arrays, shapes, list(cell_coords), labels)
    _put(root, "cell", np.arange(n, dtype=np.int64), ("cell",), n, overwrite)
    for k, a in cell_coords.items():
        _put(root, k, a, ("cell",), n, overwrite)
    sizes = {d: s for name, ds in arrays.items() for d, s in zip(ds, shapes[name])}
    all_labels = {d: np.asarray(labels[d]) if d in labels else np.arange(s, dtype=np.int64) for d, s in sizes.items()}
    for d, a in all_labels.items():
        _put(root, d, a, (d,), len(a), overwrite)
    root.create_array("verified", shape=(n,), chunks=(max(1, shard_size),), dtype=bool, fill_value=False,
                      dimension_names=("cell",), overwrite=overwrite)
    coords = " ".join([*cell_coords, "verified"])
    for name in arrays:
        root[name].attrs["coordinates"] = coords
    return {"store_layout": LAYOUT, "cell_coords": list(cell_coords), "label_dims": sorted(all_labels)}


def consolidate(path: Path) -> None:
    """Write consolidated metadata into the root zarr.json (xarray opens without a warning)."""
    with warnings.catch_warnings():     # "consolidated metadata is not part of the v3 spec": known, wanted
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def is_current(attrs: dict) -> bool:
    return attrs.get("store_layout") == LAYOUT


def array_dims(attrs: dict) -> dict[str, list[str]]:
    """Data array -> its dims (cell first) as layout 3 names them (layout-2 dims renamed)."""
    ren = _renames(attrs)
    return {k: [ren.get(d, d) for d in v["dims"]] for k, v in attrs["arrays"].items()}


def read_coords(g, attrs: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(per-cell coordinates, dim labels) of either layout (layout-2 label dims renamed as array_dims does)."""
    if is_current(attrs):
        return ({k: g[k][:] for k in sorted(attrs["cell_coords"])}, {k: g[k][:] for k in sorted(attrs["label_dims"])})
    if "coords" in g and "labels" in g:
        return ({k: g["coords"][k][:] for k in sorted(g["coords"].array_keys())},
                {_renames(attrs).get(k, k): g["labels"][k][:] for k in sorted(g["labels"].array_keys())})
    raise ValueError("neither layout 3 attributes (store_layout) nor the coords/ + labels/ groups of layout 2")


def coord_arrays(g, attrs: dict) -> list:
    """Every coordinate array (to check that its metadata opens)."""
    if is_current(attrs):
        return [g[k] for k in ("cell", "verified", *attrs["cell_coords"], *attrs["label_dims"])]
    return [g[grp][k] for grp in ("coords", "labels") for k in g[grp].array_keys()]


def _rename_dims(meta: Path, dims: list[str]) -> None:
    """Rewrite an array's dimension_names in its zarr.json (metadata only; chunks untouched)."""
    m = json.loads(meta.read_text())
    m["dimension_names"] = dims
    atomic_write_text(meta, json.dumps(m, indent=2))


def migrate(path: Path) -> bool:
    """Rewrite a layout-2 store in place to layout 3; False when it already is. Data chunks are not touched.
    Safe to re-run after an interruption: the old groups go only after the new layout is complete."""
    path = Path(path)
    g = zarr.open_group(path, mode="r+", use_consolidated=False)
    attrs: dict[str, Any] = dict(g.attrs)
    if not is_current(attrs):
        cell_coords, labels = read_coords(g, attrs)
        n, shard_size = int(attrs["n_cells"]), int(attrs["shard_size"])
        dims = {k: tuple(v[1:]) for k, v in array_dims(attrs).items()}
        for k, v in attrs["arrays"].items():
            if list(v["dims"][1:]) != list(dims[k]):
                _rename_dims(path / k / "zarr.json", ["cell", *dims[k]])
        attrs["arrays"] = {k: {**v, "dims": ["cell", *dims[k]]} for k, v in attrs["arrays"].items()}
        shapes = {k: tuple(array(g, k).shape[1:]) for k in dims}
        cell_coords = {k: v for k, v in cell_coords.items() if len(v) == n}
        try:
            extra = write_coords(g, dims, shapes, cell_coords, labels, n, shard_size, overwrite=True)
        except ConfigError as e:
            raise ConfigError("migrate", f"{path}: cannot be migrated ({e}); re-run its sweep with --overwrite") from None
        g.attrs.update({**extra, "arrays": attrs["arrays"]})
    for grp in ("coords", "labels"):
        if grp in g:
            del g[grp]
    consolidate(path)
    return not is_current(attrs)
