"""The rank-aware job path without SLURM: ``run_task`` (a :class:`~bayesflip.plan.TaskPlan`) under ``torchrun --nproc_per_node 2`` on
``tiny-random-llama-tp2`` (DeepSpeed AutoTP, gloo on CPU), the injection hook, and SweepTask's
device check (see tests/test_tp_slurm.py for the same through a real 2-task SLURM job)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bayesflip.config import load_sweep
from bayesflip.job import FAIL_ENV, _injected
from bayesflip.plan import plan_sweep
from bayesflip.store import ResultStore, store_path

REPO = Path(__file__).resolve().parent.parent
SWEEP, TP_MODEL = "test_tp", "tiny-random-llama-tp2"
WORK = [("icl_coin", s) for s in range(4)] + [("icl_die", s) for s in range(2)] + [("attention_coin", s) for s in range(2)]

RANK_SCRIPT = """
import json, sys
from pathlib import Path
from bayesflip.job import run_task
from bayesflip.plan import TaskPlan
root = Path(sys.argv[1])
work = [tuple(w) for w in json.loads(sys.argv[2])]
r = run_task(TaskPlan.resolve("test_tp", "tiny-random-llama-tp2", work, root), device="cpu", progress=False)
import torch.distributed as dist
(root / f"rank{r.rank}.json").write_text(json.dumps({"done": r.done, "skipped": r.skipped, "failed": r.failed,
                                                     "runs": r.runs, "rank": r.rank, "world_size": r.world_size}))
dist.barrier()
dist.destroy_process_group()
"""


def test_injection_hook_parses_rank_targets(monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "icl_coin:1@rank1,needle:3")
    assert _injected() == {("icl_coin", 1, 1), ("needle", 3, None)}
    monkeypatch.setenv(FAIL_ENV, "icl_coin:1@r1")
    with pytest.raises(ValueError, match="expected experiment:shard@rankN"):
        _injected()


def test_sweep_task_checks_the_device_before_loading(tmp_path):
    import torch

    from bayesflip.backends.distributed import DeviceError
    from bayesflip.hpc.launch import SweepTask
    from bayesflip.plan import TaskPlan

    if torch.cuda.is_available():
        pytest.skip("this node has CUDA")
    task = SweepTask(template={"name": "gpu-small", "gpus_per_node": 1})
    with pytest.raises(DeviceError, match=r"job template 'gpu-small' asks for 1 GPU.*no usable CUDA device"):
        task(TaskPlan.resolve("test_tp", "tiny-random", [("icl_coin", 0)], tmp_path))
    assert not (tmp_path / "test_tp").exists()          # nothing planned or written
    assert SweepTask().template is None                 # no template given: the model's own template


def test_rendezvous_variables_already_set_are_respected(monkeypatch):
    """A SLURM task's env:// variables: missing ones are derived from SLURM, ones already set (by SLURM's
    launcher, submitit or the site) are kept — submitit's export(overwrite=False) raised here."""
    import submitit

    from bayesflip.backends.distributed import RENDEZVOUS_VARS, export_rendezvous

    for k in RENDEZVOUS_VARS:
        monkeypatch.delenv(k, raising=False)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
             "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "node7"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("MASTER_PORT", "31337")
    with pytest.raises(RuntimeError, match="MASTER_ADDR is already set"):   # what launch.py called before
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    got = export_rendezvous()
    assert got == {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "31337", "RANK": "1", "WORLD_SIZE": "2",
                   "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert os.environ["RANK"] == "1" and os.environ["MASTER_PORT"] == "31337"
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.setenv("RANK", "0")                  # set by a launcher: kept, too
    got = export_rendezvous()
    assert got["RANK"] == "0" and got["MASTER_PORT"] == str(20000 + (4242 * 131) % 20000)


def _torchrun(root: Path, work, env_extra: dict | None = None) -> list[dict]:
    script = root / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env_extra or {})}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29900 + os.getpid() % 90), str(script), str(root), json.dumps(work)],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((root / f"rank{i}.json").read_text()) for i in range(2)]


@pytest.mark.integration
def test_tp2_run_task_rank0_writes_and_a_rank1_failure_fails_the_shard_everywhere(tmp_path):
    plan_sweep(load_sweep(SWEEP, TP_MODEL), results_dir=tmp_path)
    ranks = _torchrun(tmp_path, WORK, {FAIL_ENV: "icl_coin:1@rank1"})
    assert [d["rank"] for d in ranks] == [0, 1] and {d["world_size"] for d in ranks} == {2}
    r0, r1 = ranks
    assert r0["done"] == r1["done"] and r0["failed"] == r1["failed"]          # the same lists on every rank
    assert [tuple(x[:2]) for x in r0["failed"]] == [("icl_coin", 1)]
    assert "icl_coin:1 failed on rank 1 of 2" in r0["failed"][0][2]
    assert len(r0["done"]) == 7
    # groups: icl_coin (fails, then 4 single-shard runs), icl_die, attention_coin
    assert r0["runs"] == r1["runs"] == 1 + 4 + 1 + 1
    recs = {(e, s): r for e in ("icl_coin", "icl_die", "attention_coin")
            for s, r in ResultStore(store_path(SWEEP, e, TP_MODEL, tmp_path)).records().items()}
    assert len(recs) == 8 and all(r["writer_rank"] == 0 and r["world_size"] == 2 for r in recs.values())
    assert recs[("icl_coin", 1)]["status"] == "failed"

    before = {k: v for k, v in recs.items() if v["status"] == "done"}
    ranks = _torchrun(tmp_path, WORK)                # resume: only the failed shard is computed
    assert [d["done"] for d in ranks] == [[["icl_coin", 1]]] * 2
    assert all(len(d["skipped"]) == 7 for d in ranks)
    after = {(e, s): r for e in ("icl_coin", "icl_die", "attention_coin")
             for s, r in ResultStore(store_path(SWEEP, e, TP_MODEL, tmp_path)).records().items()}
    assert {k: after[k] for k in before} == before and after[("icl_coin", 1)]["status"] == "done"
