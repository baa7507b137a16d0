"""Faults of the SLURM side, second round (issue 19), on the REAL local cluster (tiny-random):
``resubmit`` when ``sacct`` fails (a PATH-shadowed ``sacct`` that exits 1) falls back to ``squeue`` and
submits no shard a queued task still owns; when ``squeue`` fails too it refuses in one line (exit 2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
    pytest.skip("SLURM client tools not installed; start the local cluster with `make slurm-up`",
                allow_module_level=True)

from bayesflip.hpc.manifest import Manifest  # noqa: E402
from conftest import private_configs as configs  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

REPO = Path(__file__).resolve().parent.parent
SWEEP = """models: [tiny-random]
experiments:
  icl_coin: {shard_size: 2, params: {thetas: [0.2, 0.8], n_flips: 6, samples: 4}}
"""


@pytest.fixture(scope="module")
def cluster():
    r = subprocess.run(["bash", str(REPO / "hpc" / "slurm_status.sh")], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.fail(f"local SLURM cluster not usable ({r.stdout.strip()}); run `make slurm-up`")


def _failing(bin_dir: Path, *tools: str) -> str:
    bin_dir.mkdir(exist_ok=True)
    for t in tools:
        p = bin_dir / t
        p.write_text(f"#!/bin/sh\necho '{t}: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
        p.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def bf(args, cfg, **env):
    e = {**os.environ, "PYTHONPATH": str(REPO), "BAYESFLIP_CONFIG_DIR": str(cfg), **env}
    return subprocess.run([sys.executable, "-m", "bayesflip.cli", *args], env=e, capture_output=True, text=True,
                          timeout=300)


def test_resubmit_without_sacct_uses_squeue_and_refuses_without_both(cluster, tmp_path):
    cfg = configs(tmp_path, {"sq": SWEEP})
    root = tmp_path / "res"
    # the array is submitted held (an sbatch wrapper adds --hold): its 4 tasks stay PENDING for the whole test
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "sbatch").write_text(f"#!/bin/sh\nexec {shutil.which('sbatch')} --hold \"$@\"\n")
    (hold / "sbatch").chmod(0o755)
    r = bf(["submit", "--exp", "sq", "--results-dir", str(root), "--shards-per-task", "1"], cfg,
           PATH=f"{hold}:{os.environ['PATH']}")
    assert r.returncode == 0, r.stdout + r.stderr
    arrays = Manifest.load("sq", root).slurm_array_ids()
    assert len(arrays) == 1
    try:
        path_nosacct = _failing(tmp_path / "bin1", "sacct")
        r = bf(["resubmit", "--sweep", "sq", "--results-dir", str(root)], cfg, PATH=path_nosacct)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "nothing to submit" in r.stdout and "4 still queued/running, skipped" in r.stdout, r.stdout
        assert Manifest.load("sq", root).slurm_array_ids() == arrays          # no duplicate array
        st = bf(["status", "--sweep", "sq", "--results-dir", str(root)], cfg, PATH=path_nosacct)
        assert "queued/running tasks from squeue" in st.stdout and "4 of the pending shard(s) are queued" \
            in st.stdout, st.stdout + st.stderr

        path_none = _failing(tmp_path / "bin2", "sacct", "squeue")
        r = bf(["resubmit", "--sweep", "sq", "--results-dir", str(root)], cfg, PATH=path_none)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot tell which tasks of sweep sq are still queued or running" in lines[0]
        assert Manifest.load("sq", root).slurm_array_ids() == arrays
    finally:
        subprocess.run(["scancel", *arrays], capture_output=True, timeout=60)
