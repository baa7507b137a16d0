"""Faults of the job boundary, second round (issue 19): NaN never counts as done, the manifest is edited
under a lock and exists before sbatch, resubmit without sacct, fenced leases, status/reduce verify what
they read. Each test reproduces the fault on tiny-random or a synthetic store."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bayesflip.config import load_sweep
from bayesflip.store import ResultStore, store_path

MODEL = "tiny-random"


def _small_sweep(name: str, exps=("icl_coin", "needle_coin")):
    sw = load_sweep("test_group", MODEL)
    return dataclasses.replace(sw, name=name, experiments=[e for e in sw.experiments if e.name in exps])


# ---------------------------------------------------------------------- a. NaN never counts as done
def test_nan_logits_are_recorded_failed_and_status_names_them(tmp_path, tiny):
    import torch
    from torch.nn.modules.module import register_module_forward_hook

    from bayesflip.hpc.manifest import Manifest
    from bayesflip.hpc.status import render, sweep_status
    from bayesflip.job import run_local

    def nan_logits(mod, args, out):     # a broken checkpoint / fp16 overflow: every logit NaN
        lg = getattr(out, "logits", None)
        if isinstance(lg, torch.Tensor):
            out["logits"] = torch.full_like(lg, float("nan"))
        return out

    sweep = _small_sweep("nan")
    handle = register_module_forward_hook(nan_logits)
    try:
        run = run_local(sweep, results_dir=tmp_path, lm=tiny, progress=False, out=lambda s: None)
    finally:
        handle.remove()
    assert run.rc == 1 and run.n_failed > 0
    for e in sweep.experiments:
        st = ResultStore(store_path("nan", e.name, MODEL, tmp_path))
        states = st.shard_states()
        assert states and all(s.state == "failed" for s in states.values()), (e.name, states)
        msg = states[0].message
        assert "NonFiniteValues" in msg and "'logprobs'" in msg, msg
        assert not st.read("verified").any()
    s = sweep_status(Manifest.load("nan", tmp_path), use_sacct=False, results_dir=tmp_path)
    text = render(s)
    assert s.totals()["done"] == 0 and "NonFiniteValues" in text, text
    # the same sweep without the hook: every shard done (the check does not refuse finite numbers)
    run2 = run_local(sweep, results_dir=tmp_path, lm=tiny, progress=False, out=lambda s: None)
    assert run2.rc == 0
    s2 = sweep_status(Manifest.load("nan", tmp_path), use_sacct=False, results_dir=tmp_path)
    assert s2.totals()["done"] == sum(u.n_shards for u in s2.units)


def test_nonfinite_rules():
    from bayesflip.experiments.base import ArraySpec, nonfinite

    padded = np.array([[[-0.1, -2.0], [np.nan, np.nan]], [[-0.3, -1.0], [-0.2, -1.5]]])
    assert nonfinite("lp", ArraySpec(("p", "c"), (2, 2), finite="cell"), padded) is None
    assert "1 of 2 cells" in nonfinite("lp", ArraySpec(("p", "c"), (2, 2), finite="all"), padded)
    allnan = np.full((3, 2), np.nan)
    assert "3 of 3 cells" in nonfinite("lp", ArraySpec(("c",), (2,), finite="cell"), allnan)
    assert "first: cell 1" in nonfinite("lp", ArraySpec(("c",), (2,), finite="cell"),
                                        np.array([[0.0, -1.0], [-np.inf, -1.0]]))
    assert nonfinite("x", ArraySpec(("c",), (2,)), allnan) is None      # NaN is a value here
