"""The public Python API: a sweep's results as xarray / pandas, through the reducers' own loader.

``open_store`` → ``xarray.Dataset`` of one (experiment, model) store, ``open_sweep`` →
``xarray.DataTree`` (``/<experiment>/<model>``), ``tidy`` → long ``pandas.DataFrame``. Everything
goes through :func:`bayesflip.reduce.load.load_store`, so only cells of verified shards (a ``done``
record whose chunk checksums match) are returned unless ``verified_only=False`` (then every cell,
``verified`` says which are trusted, and unverified cells hold the fill value: they are never read).
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError, StoreReadError
from .reduce.load import StoreData, load_store, load_sweep_data, sweep_root


def _stores(sweep: str, experiment: str, model: str | None, results_dir) -> list[Path]:
    root = sweep_root(sweep, results_dir)
    exps = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.zarr")))
    if experiment not in exps:
        raise ConfigError("experiment", f"no stores of experiment {experiment!r} in sweep {sweep!r} ({root})",
                          allowed=exps)
    models = sorted(p.stem for p in (root / experiment).glob("*.zarr"))
    if model is not None and model not in models:
        raise ConfigError("model", f"no store of model {model!r} for {sweep}/{experiment}", allowed=models)
    return [root / experiment / f"{m}.zarr" for m in ([model] if model is not None else models)]


def _load(sweep: str, path: Path, verified_only: bool) -> StoreData:
    data, cov = load_store(sweep, path.parent.name, path.stem, path, trusted_only=verified_only)
    if data is None:
        raise StoreReadError(f"cannot open {path}: {cov[0]['status']}: {cov[0]['error']}")
    return data


def open_store(sweep: str, experiment: str, model: str, results_dir: str | Path | None = None,
               verified_only: bool = True):
    """One store as an ``xarray.Dataset`` (dims labelled, conditions as coordinates on ``cell``)."""
    return _load(sweep, _stores(sweep, experiment, model, results_dir)[0], verified_only).to_dataset()


def open_sweep(sweep: str, results_dir: str | Path | None = None, verified_only: bool = True):
    """Every store of a sweep as an ``xarray.DataTree``: ``tree[experiment][model]`` is its Dataset."""
    import xarray as xr

    data = load_sweep_data(sweep, results_dir, trusted_only=verified_only)
    tree = xr.DataTree.from_dict({f"{st.experiment}/{st.model}": st.to_dataset() for st in data.stores})
    tree.attrs["sweep"] = sweep
    return tree


def tidy(sweep: str, experiment: str, array: str, model: str | None = None,
         results_dir: str | Path | None = None):
    """Long table of one array of an experiment (one model or all): one row per (cell, *dims) of a
    verified cell, with ``experiment``, ``model``, ``cell``, ``shard``, every condition and the dim labels."""
    import pandas as pd

    frames = []
    for path in _stores(sweep, experiment, model, results_dir):
        st = _load(sweep, path, True)
        if array not in st.arrays:
            raise ConfigError("array", f"{path} has no array {array!r}", allowed=sorted(st.arrays))
        frames.append(st.tidy(array))
    return pd.concat(frames, ignore_index=True)
