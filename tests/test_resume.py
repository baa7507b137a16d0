"""Kill a run part-way, run it again: no recomputation of done shards, same final store."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

pytestmark = pytest.mark.integration


def _debug(results: Path, *extra) -> subprocess.Popen:
    # one shard per engine call (no shard groups), so a kill lands between shard writes
    env = {**os.environ, "BAYESFLIP_RESULTS_DIR": str(results), "BAYESFLIP_GROUP_CELLS": "1"}
    return subprocess.Popen([sys.executable, "-m", "bayesflip.cli", "debug", "--exp", "test_resume", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(results: Path) -> dict[str, dict]:
    d = results / "test_resume" / "icl_coin" / "smollm2-135m-instruct.records"
    return {p.name: json.loads(p.read_text()) for p in d.glob("shard-*.json")} if d.exists() else {}


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = _debug(killed)
    deadline = time.time() + 240
    while len(_records(killed)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _records(killed)
    assert 3 <= len(before) < 12, f"kill landed at {len(before)} shards; the test needs a part-way kill"
    out = _debug(killed).communicate(timeout=300)[0]
    assert f"{12 - len(before)} shards done, {len(before)} already done, 0 failed" in out, out
    after = _records(killed)
    assert len(after) == 12 and all(r["status"] == "done" for r in after.values())
    for name, rec in before.items():  # completed shards were not recomputed
        assert after[name]["time"] == rec["time"] and after[name]["seconds"] == rec["seconds"]
    assert _debug(clean).wait(timeout=300) == 0
    a = zarr.open_group(killed / "test_resume/icl_coin/smollm2-135m-instruct.zarr", mode="r")
    b = zarr.open_group(clean / "test_resume/icl_coin/smollm2-135m-instruct.zarr", mode="r")
    for name in ("logprobs", "outcomes", "p_true"):
        assert np.array_equal(a[name][:], b[name][:]), name
    assert not np.isnan(a["logprobs"][:]).any()
    # re-running a finished sweep recomputes nothing; --overwrite recomputes everything
    out = _debug(killed).communicate(timeout=120)[0]
    assert "nothing to do, all 12 shards" in out
