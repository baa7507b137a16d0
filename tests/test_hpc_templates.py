"""Job templates and status parsing without a cluster: validation names the key, the
partition comparison, SLURM time/Gres parsing, the TP rule, status classification."""

from __future__ import annotations

import json

import numpy as np

import pytest

from bayesflip.config import load_sweep
from bayesflip.errors import ConfigError
from bayesflip.hpc import templates as T
from bayesflip.hpc.launch import resolve_templates
from bayesflip.hpc import slurm
from bayesflip.hpc.manifest import Manifest
from bayesflip.hpc.status import log_error, render, sweep_status


def _write(tmp_path, name, text):
    (tmp_path / f"{name}.yaml").write_text(text)
    return T.load_template(name, tmp_path)


def test_shipped_templates_are_valid():
    names = T.template_names()
    assert {"cpu-debug", "gpu-small", "gpu-large"} <= set(names)
    cpu = T.load_template("cpu-debug")
    assert (cpu.partition, cpu.cpus_per_task, cpu.gpus_per_node, cpu.n_tasks) == ("debug", 1, 0, 1)
    assert cpu.time_min >= 3 and cpu.signal_delay_s < cpu.time_min * 60
    large = T.load_template("gpu-large")
    assert large.n_tasks == 4 and large.gpus_per_node == 4


def test_template_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'gpus': unknown key.*allowed: .*gpus_per_node"):
        _write(tmp_path, "a", "partition: p\nmem_gb: 1\ntime_min: 5\ngpus: 1\n")
    with pytest.raises(ConfigError, match=r"'time_min'.*\[3, inf"):
        _write(tmp_path, "b", "partition: p\nmem_gb: 1\ntime_min: 2\n")
    with pytest.raises(ConfigError, match=r"'mem_gb': required key missing"):
        _write(tmp_path, "c", "partition: p\ntime_min: 5\n")
    with pytest.raises(ConfigError, match=r"'signal_delay_s'.*shorter than time_min"):
        _write(tmp_path, "d", "partition: p\nmem_gb: 1\ntime_min: 3\nsignal_delay_s: 200\n")
    assert _write(tmp_path, "e", "partition: p\nmem_gb: 1\ntime_min: 5\n").name == "e"
    with pytest.raises(ConfigError, match=r"unknown job template 'zzz'.*allowed: .*e"):
        T.load_template("zzz", tmp_path)
    t = T.load_template("cpu-debug")
    with pytest.raises(ConfigError, match=r"time_min \(--time\).*\[3, inf"):
        T.with_overrides(t, time_min=1)
    assert T.with_overrides(t, time_min=30, partition="x").time_min == 30


def test_slurm_time_and_gres_parsing():
    assert slurm.parse_slurm_time("UNLIMITED") is None and slurm.parse_slurm_time("INFINITE") is None
    assert slurm.parse_slurm_time("1-02:03:00") == 1440 + 123
    assert slurm.parse_slurm_time("02:00:00") == 120
    assert slurm.parse_slurm_time("30:00") == 30 and slurm.parse_slurm_time("30:01") == 31
    assert slurm.parse_slurm_time("45") == 45 and slurm.parse_slurm_time("2-12") == 2 * 1440 + 720
    assert slurm.parse_gres_gpus("(null)") == 0
    assert slurm.parse_gres_gpus("gpu:a100:4(S:0-1)") == 4
    assert slurm.parse_gres_gpus("gpu:2,shard:8") == 2
    assert slurm.parse_gres_gpus("gpu:v100:2(S:0),gpu:a100:2(S:1)") == 4


def test_template_vs_partition():
    part = slurm.PartitionInfo("p", "UP", max_time_min=60, max_nodes=None, total_nodes=2, cpus_per_node=16,
                           mem_mb_per_node=128 * 1024, gpus_per_node=2)
    ok = T.JobTemplate(name="ok", partition="p", cpus_per_task=8, gpus_per_node=2, mem_gb=128, time_min=60, nodes=2)
    assert T.template_problems(ok, part) == []
    big = T.JobTemplate(name="big", partition="p", cpus_per_task=8, tasks_per_node=4, gpus_per_node=4,
                        mem_gb=200, time_min=90, nodes=3)
    assert [k for k, _ in T.template_problems(big, part)] == ["gpus_per_node", "cpus_per_task", "mem_gb",
                                                              "time_min", "nodes"]
    with pytest.raises(ConfigError, match=r"job_templates/big\.gpus_per_node.*at most 2"):
        T.check_against_partition(big, part)


def test_tp_degree_must_match_tasks():
    sweep = load_sweep("icl_coin", "llama-3.1-70b")
    assert resolve_templates(sweep)["llama-3.1-70b"].n_tasks == 4          # gpu-large: 4 ranks
    with pytest.raises(ConfigError, match=r"cpu-debug\.tasks_per_node \(--template\).*1 task.*llama-3.1-70b: tp=4"):
        resolve_templates(sweep, template="cpu-debug")      # fits no model of the sweep
    sweep = load_sweep("icl_coin", "smollm2-135m-instruct")
    t = resolve_templates(sweep, partition="other", time_min=20, shards_per_task=7)["smollm2-135m-instruct"]
    assert (t.name, t.partition, t.time_min, t.shards_per_task) == ("cpu-debug", "other", 20, 7)


def test_status_from_records_and_task_states(tmp_path):
    """Classification without SLURM: records decide done/failed, the manifest the rest."""
    from conftest import synthetic_store

    st, *_ = synthetic_store(tmp_path, "s", "icl_coin", "icl", {"thetas": [0.5], "n_flips": 4, "samples": 4}, 1, 0,
                             model="m")
    store = st.path
    shapes = {k: st.group[k].shape[1:] for k in st.attrs["arrays"]}
    st.write_shard(0, {k: np.zeros((1, *shapes[k]), dtype=st.group[k].dtype) for k in shapes})   # verified done
    st.write_record(1, "failed", error="RuntimeError: boom")
    log = tmp_path / "t.err"
    log.write_text("Traceback (most recent call last):\n  File x\nbayesflip.hpc.launch.ShardsFailed: 1 of 3 shard(s)"
                   " failed\n  icl_coin:1: RuntimeError: boom\nsrun: error: vm: task 0: Exited with exit code 1\n"
                   "slurmstepd: error: Detected 1 oom-kill event(s)\n")
    manifest = {"sweep": "s", "units": [{"experiment": "icl_coin", "model": "m", "store": str(store), "n_shards": 4}],
                "submissions": [{"executor": "local", "time": "2000-01-01T00:00:00+00:00", "arrays": [
                    {"model": "m", "array_id": "7", "tasks": [{"job_id": "7_0", "stderr": str(log),
                                                               "work": [["icl_coin", 0], ["icl_coin", 1],
                                                                        ["icl_coin", 2]]}]}]}]}
    s = sweep_status(Manifest.model_validate(json.loads(json.dumps(manifest))), results_dir=tmp_path)
    u = s.units[0]
    assert u.shards == {0: "done", 1: "failed", 2: "pending", 3: "pending"}
    assert "boom" in u.errors[1]
    assert s.totals() == {"done": 1, "running": 0, "pending": 2, "failed": 1, "corrupt": 0}
    assert "1/4" in render(s) and "RuntimeError: boom" in render(s)
    msg = log_error(str(log))
    assert msg.splitlines()[0].startswith("bayesflip.hpc.launch.ShardsFailed") and "oom-kill" in msg
    assert "Exited with exit code" not in msg
    got = slurm.parse_sacct("JobID|State\n9_[2-4%2]|PENDING\n8_[1,5-6]|PENDING\n7_0|CANCELLED by 0\n7_1|\n"
                            "6.batch|COMPLETED\n")
    assert got == {"9_2": "PENDING", "9_3": "PENDING", "9_4": "PENDING", "8_1": "PENDING", "8_5": "PENDING",
                   "8_6": "PENDING", "7_0": "CANCELLED", "7_1": "UNKNOWN"}


def test_tp_picks_the_template(tmp_path):
    """A model's tp picks a compatible template: tp 8 on a 4-task entry gets the 8-GPU template without
    edits; --template applies per model type (to the models whose tp fits it); ties and misses name the
    templates that fit."""
    from bayesflip.models.registry import get_model_spec

    big = get_model_spec("llama-3.1-70b")
    assert (big.template, T.template_for(big).name) == ("gpu-large", "gpu-large")
    tp8 = big.model_copy(update={"tp": 8})
    t = T.template_for(tp8)
    assert (t.name, t.n_tasks, t.gpus_per_node) == ("gpu-tp8", 8, 8)
    small = get_model_spec("smollm2-135m-instruct")
    both = T.templates_for([big, small], "gpu-small")           # gpu-small: 1 task → only the 1-rank model
    assert (both["llama-3.1-70b"].name, both["smollm2-135m-instruct"].name) == ("gpu-large", "gpu-small")
    both = T.templates_for([tp8, small], "gpu-tp8,cpu-debug")
    assert (both["llama-3.1-70b"].name, both["smollm2-135m-instruct"].name) == ("gpu-tp8", "cpu-debug")
    for n in ("gpu-small", "gpu-large", "gpu-tp8"):                  # a private template dir with a tie
        (tmp_path / f"{n}.yaml").write_text((T.TEMPLATE_DIR / f"{n}.yaml").read_text())
    (tmp_path / "gpu-tp8b.yaml").write_text((T.TEMPLATE_DIR / "gpu-tp8.yaml").read_text())
    with pytest.raises(ConfigError, match=r"models\.llama-3\.1-70b\.template.*tp=8.*several.*gpu-tp8, gpu-tp8b"):
        T.template_for(tp8, template_dir=tmp_path)
    assert T.template_for(tp8, "gpu-tp8b", template_dir=tmp_path).name == "gpu-tp8b"
    tp3 = big.model_copy(update={"tp": 3})
    with pytest.raises(ConfigError, match=r"tp=3.*no other GPU template starts 3"):
        T.template_for(tp3)
