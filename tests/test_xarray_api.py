"""Results researchers can open anywhere: layout-3 stores in plain xarray, the public API, the
``verified`` flags, layout-2 stores (read + ``bayesflip migrate``) and the notebook tour.

The demo sweep runs once (module fixture, tmp results dir, ~1-4 min on CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from bayesflip.errors import ConfigError
from bayesflip.store import ResultStore

from conftest import synthetic_store

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MODEL = "smollm2-135m-instruct"


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "bayesflip.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    res = tmp_path_factory.mktemp("xr") / "results"
    r = _cli("demo", "--results-dir", str(res))
    assert r.returncode == 0, r.stderr[-3000:]
    return res


def _open(path):
    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no consolidated-metadata (or any other) warning
        return xr.open_zarr(path)


# ---------------------------------------------------------------------- the demo stores in plain xarray
@pytest.mark.integration          # runs the whole demo (real SmolLM2)
def test_every_demo_store_opens_labelled_without_warnings(demo):
    paths = sorted((demo / "demo").glob("*/*.zarr"))
    assert len(paths) >= 10
    for p in paths:
        ds = _open(p)
        attrs = ds.attrs
        assert attrs["store_layout"] == 3, p
        for d in ds.dims:                                   # every dim carries its labels
            assert d in ds.indexes, (p, d)
        for c in [*attrs["cell_coords"], "verified"]:      # conditions are coordinates on cell
            assert c in ds.coords and ds[c].dims == ("cell",), (p, c)
        assert set(ds.data_vars) == set(attrs["arrays"]), p
        assert bool(ds["verified"].all()), p                # the demo completes every shard
        for d in attrs["label_dims"]:                       # .sel on a label works
            first = ds[d].values[0]
            sub = ds.sel({d: first})
            assert d not in sub.dims
        cond = attrs["cell_coords"][0]
        assert ds.isel(cell=ds[cond] == ds[cond].values[0]).sizes["cell"] >= 1      # select cells by condition
    ds = _open(demo / "demo" / "icl_coin" / f"{MODEL}.zarr")
    heads = ds["logprobs"].sel(choice=" heads")
    assert heads.dims == ("cell", "position") and np.isfinite(heads.values).all()
    assert sorted(set(ds["theta"].values)) == sorted(set(ds["theta"].values.tolist()))


@pytest.mark.integration          # runs the whole demo (real SmolLM2)
def test_icl_tidy_equals_the_reduce_icl_curves_table(demo):
    import bayesflip

    curves = pd.read_parquet(demo / "demo" / "reduce" / "tables" / "icl_curves.parquet")
    cur = curves[(curves["experiment"] == "icl_coin") & (curves["model"] == MODEL)]
    df = bayesflip.tidy("demo", "icl_coin", "logprobs", results_dir=demo)
    assert {"experiment", "model", "cell", "shard", "theta", "sample", "position", "choice", "logprobs"} <= set(df)
    wide = df.pivot_table(index=["cell", "position"], columns="choice", values="logprobs").reset_index()
    p = np.exp(wide[[" heads", " tails"]].to_numpy(float))
    wide["p_model"] = p[:, 0] / p.sum(1)
    heads = df[df["choice"] == " heads"].drop(columns=["choice", "logprobs", "shard"])
    mine = heads.merge(wide[["cell", "position", "p_model"]], on=["cell", "position"])
    shared = [c for c in mine.columns if c in cur.columns]
    assert set(shared) >= {"experiment", "model", "cell", "sample", "theta", "position", "p_model"}
    key = ["cell", "position"]
    a = mine[shared].sort_values(key).reset_index(drop=True)
    b = cur[shared].sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) == len(cur)
    for c in shared:
        if c == "p_model":
            np.testing.assert_allclose(a[c].to_numpy(float), b[c].to_numpy(float), rtol=1e-6, atol=1e-9)
        else:
            assert (a[c].astype(str) == b[c].astype(str)).all(), c


@pytest.mark.integration          # runs the whole demo (real SmolLM2)
def test_open_sweep_is_a_tree_of_every_store(demo):
    import bayesflip

    tree = bayesflip.open_sweep("demo", results_dir=demo)
    exps = sorted(p.parent.name for p in (demo / "demo").glob("*/*.zarr"))
    assert sorted(tree.children) == exps
    ds = tree["icl_coin"][MODEL].to_dataset()
    one = bayesflip.open_store("demo", "icl_coin", MODEL, results_dir=demo)
    np.testing.assert_array_equal(ds["logprobs"].values, one["logprobs"].values)
    np.testing.assert_array_equal(one["logprobs"].values, _open(demo / "demo" / "icl_coin" / f"{MODEL}.zarr")
                                  ["logprobs"].values)


@pytest.mark.integration          # runs the whole demo (real SmolLM2)
def test_the_analysis_example_runs_and_reproduces_the_report_curve(demo, tmp_path):
    out = tmp_path / "icl.png"
    r = subprocess.run([PY, str(REPO / "examples" / "analysis.py"), "--results-dir", str(demo), "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                         "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.stat().st_size > 1000
    import bayesflip

    ds = bayesflip.open_store("demo", "icl_coin", MODEL, results_dir=demo)     # the example's three lines
    p = np.exp(ds["logprobs"])
    curve = (p / p.sum("choice")).sel(choice=" heads").groupby("theta").mean("cell")
    pos = pd.read_parquet(demo / "demo" / "reduce" / "tables" / "icl_by_position.parquet")
    pos = pos[(pos["experiment"] == "icl_coin") & (pos["model"] == MODEL) & (pos["condition"] != "all")]
    for theta in curve["theta"].values:
        ref = pos[pos["condition"] == f"θ={theta:g}"].sort_values("position")
        np.testing.assert_allclose(curve.sel(theta=theta).values, ref["p_model"].to_numpy(float), rtol=1e-6)


# ---------------------------------------------------------------------- verified flags
def _icl(tmp: Path, n: int = 3) -> ResultStore:
    st, fam, p, cells = synthetic_store(tmp, "sw", "icl_coin", "icl", {"thetas": [0.2, 0.8], "n_flips": 4,
                                                                        "samples": n}, 2, 0)
    return st


def _data(st: ResultStore, s: int) -> dict:
    arrays = st.attrs["arrays"]
    n = st.shard_slice(s).stop - st.shard_slice(s).start
    shapes = {k: st.group[k].shape[1:] for k in arrays}
    return {k: np.full((n, *shapes[k]), s + 0.5 if arrays[k]["dtype"].startswith("float") else s,
                       dtype=arrays[k]["dtype"]) for k in arrays}


def _flags(st: ResultStore) -> list[bool]:
    return zarr.open_group(st.path, mode="r")["verified"][:].tolist()


def test_verified_follows_the_records_and_is_not_checksummed(tmp_path):
    st = _icl(tmp_path)                         # 6 cells, 3 shards of 2
    assert _flags(st) == [False] * 6
    for s in range(3):
        st.write_shard(s, _data(st, s))
    assert _flags(st) == [True] * 6
    assert set(st.records()[0]["checksums"]) == set(st.attrs["arrays"])        # verified is not checksummed
    f = st.chunk_files(1)["logprobs"]                                          # damage shard 1
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 1
    f.write_bytes(bytes(b))
    (st.records_dir / "shard-000002.json").unlink()                             # shard 2's record goes
    assert st.sync_verified() == 2
    assert _flags(st) == [True, True, False, False, False, False]
    st.write_shard(1, _data(st, 1))                                            # recomputed
    assert _flags(st) == [True, True, True, True, False, False]
    st.write_record(0, "failed", error="boom")
    assert _flags(st)[:2] == [False, False]
    assert all(st.classify(s, r).state != "done" or s == 1 for s, r in st.records().items())
    ds = _open(st.path)
    assert ds["verified"].values.tolist() == _flags(st)


def test_open_store_returns_verified_cells_only_unless_asked(tmp_path):
    import bayesflip

    st = _icl(tmp_path)
    st.write_shard(0, _data(st, 0))
    st.write_shard(2, _data(st, 2))
    f = st.chunk_files(2)["outcomes"]
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))      # corrupt, still marked verified
    ds = bayesflip.open_store("sw", "icl_coin", "synthetic-model", results_dir=tmp_path)
    assert ds["cell"].values.tolist() == [0, 1] and bool(ds["verified"].all())
    full = bayesflip.open_store("sw", "icl_coin", "synthetic-model", results_dir=tmp_path, verified_only=False)
    assert full["verified"].values.tolist() == [True, True, False, False, False, False]
    assert np.isnan(full["logprobs"].sel(cell=[2, 3, 4, 5]).values).all()     # never read
    df = bayesflip.tidy("sw", "icl_coin", "p_true", results_dir=tmp_path)
    assert sorted(df["cell"].unique()) == [0, 1] and {"theta", "sample", "position", "choice"} <= set(df)


def test_attribute_updates_are_reconsolidated(tmp_path):
    st = _icl(tmp_path)
    st.update_attrs(note="re-checked")
    assert _open(st.path).attrs["note"] == "re-checked" and st.attrs["note"] == "re-checked"
    assert zarr.open_group(st.path, mode="r").attrs["note"] == "re-checked"


# ---------------------------------------------------------------------- names
def test_names_of_coordinates_dims_and_arrays_never_clash(tmp_path):
    from bayesflip.experiments.base import ArraySpec

    spec = {"x": ArraySpec(("choice",), (2,))}
    for cells, arrays, labels, msg in [
        ([{"choice": 1}], spec, {}, r"per-cell coordinate\(s\) \['choice'\].*dimension"),
        ([{"verified": 1}], spec, {}, r"\['verified'\].*reserved"),
        ([{"a": 1}], {"x": ArraySpec(("x",), (2,))}, {}, r"data array\(s\) \['x'\].*dimension"),
        ([{"a": 1}], {**spec, "y": ArraySpec(("choice",), (3,))}, {}, r"dim 'choice' has size 2 .* 3"),
        ([{"a": 1}], spec, {"choice": ["h", "t", "x"]}, r"3 labels for dim 'choice' of size 2"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            ResultStore.create(tmp_path / "a.zarr", arrays, cells, 1, labels, {"config_hash": "h"})
        assert not (tmp_path / "a.zarr").exists()


# ---------------------------------------------------------------------- layout 2 (older stores)
def _to_layout2(path: Path) -> None:
    """Rewrite a layout-3 store as the older bayesflip wrote it: coords/ + labels/ groups, no root
    coordinates, no verified flags, no consolidated metadata (data chunks untouched)."""
    g = zarr.open_group(path, mode="r+", use_consolidated=False)
    attrs = dict(g.attrs)
    for grp, names, dim in (("coords", attrs["cell_coords"], None), ("labels", attrs["label_dims"], "")):
        sub = g.create_group(grp)
        for k in names:
            a = np.asarray(g[k][:])
            a = np.asarray(a.tolist(), dtype=str) if a.dtype.kind in "TUO" else a
            sub.create_array(k, shape=a.shape, dtype=str if a.dtype.kind == "U" else a.dtype, chunks=a.shape,
                             dimension_names=("cell",) if dim is None else (k,))[:] = a
    for k in ("cell", "verified", *attrs["cell_coords"], *attrs["label_dims"]):
        shutil.rmtree(path / k)
    root = json.loads((path / "zarr.json").read_text())
    root.pop("consolidated_metadata", None)
    for k in ("store_layout", "cell_coords", "label_dims"):
        root["attributes"].pop(k)
    (path / "zarr.json").write_text(json.dumps(root))
    for k in attrs["arrays"]:
        meta = json.loads((path / k / "zarr.json").read_text())
        meta.get("attributes", {}).pop("coordinates", None)
        (path / k / "zarr.json").write_text(json.dumps(meta))


def test_layout2_store_still_reduces_and_migrates_in_place(tmp_path):
    from bayesflip.reduce.load import load_store

    st = _icl(tmp_path)
    for s in range(3):
        st.write_shard(s, _data(st, s))
    new, _ = load_store("sw", "icl_coin", "synthetic-model", st.path)
    _to_layout2(st.path)
    assert not (st.path / "theta").exists() and (st.path / "coords" / "theta").exists()
    old, cov = load_store("sw", "icl_coin", "synthetic-model", st.path)     # readers accept layout 2
    assert {r["status"] for r in cov} == {"done"}
    pd.testing.assert_frame_equal(old.cells, new.cells)
    assert old.dims == new.dims and sorted(old.labels) == sorted(new.labels)
    for k in new.arrays:
        np.testing.assert_array_equal(old.arrays[k], new.arrays[k])
    r = _cli("migrate", "--sweep", "sw", "--results-dir", str(tmp_path))
    assert r.returncode == 0 and "migrated" in r.stdout, r.stderr
    assert not (st.path / "coords").exists()
    st2 = ResultStore(st.path)
    assert all(s.state == "done" for s in st2.shard_states().values())      # records still valid
    ds = _open(st.path)
    assert bool(ds["verified"].all()) and "theta" in ds.coords and ds.sel(choice=" tails")["logprobs"].ndim == 2
    again, _ = load_store("sw", "icl_coin", "synthetic-model", st.path)
    pd.testing.assert_frame_equal(again.cells, new.cells)
    assert "current" in _cli("migrate", "--sweep", "sw", "--results-dir", str(tmp_path)).stdout


def test_layout2_acronym_dim_is_renamed_on_read_and_migrate(tmp_path):
    from bayesflip.reduce.load import load_store

    st, *_ = synthetic_store(tmp_path, "sw", "acr", "acronym", {}, 1, 0)
    _to_layout2(st.path)
    meta = json.loads((st.path / "kept" / "zarr.json").read_text())          # as the older family named it
    meta["dimension_names"] = ["cell", "generation", "kept"]
    (st.path / "kept" / "zarr.json").write_text(json.dumps(meta))
    root = json.loads((st.path / "zarr.json").read_text())
    root["attributes"]["arrays"]["kept"]["dims"] = ["cell", "generation", "kept"]
    (st.path / "zarr.json").write_text(json.dumps(root))
    (st.path / "labels" / "kept_pair").rename(st.path / "labels" / "kept")
    data, _ = load_store("sw", "acr", "synthetic-model", st.path)
    assert data.dims["kept"] == ["cell", "generation", "kept_pair"] and "kept_pair" in data.labels
    assert _cli("migrate", "--sweep", "sw", "--results-dir", str(tmp_path)).returncode == 0
    assert _open(st.path)["kept"].dims == ("cell", "generation", "kept_pair")


# ---------------------------------------------------------------------- API surface
def test_api_errors_are_one_line_and_import_is_lazy(tmp_path):
    import bayesflip

    _icl(tmp_path)
    with pytest.raises(ConfigError, match=r"no stores of experiment 'nope'.*allowed: icl_coin"):
        bayesflip.open_store("sw", "nope", "synthetic-model", results_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"no store of model 'm'.*allowed: synthetic-model"):
        bayesflip.open_store("sw", "icl_coin", "m", results_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"no array 'nope'.*allowed: logprobs"):
        bayesflip.tidy("sw", "icl_coin", "nope", results_dir=tmp_path)
    with pytest.raises(ConfigError, match="no results for sweep 'zz'"):
        bayesflip.open_sweep("zz", results_dir=tmp_path)
    r = _cli("migrate", "--sweep", "zz", "--results-dir", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    code = "import sys, bayesflip; print(sorted(m for m in ('xarray', 'zarr', 'pandas') if m in sys.modules))"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.strip() == "[]"
