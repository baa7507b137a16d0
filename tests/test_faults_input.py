"""Bad inputs end with one ``bayesflip: error:`` line and exit 2, before anything is written; Ctrl-C
ends with one line and exit 130 (issue 19, items 7-8).

Each case runs the real CLI entry point, ``cli.main``, in-process (a private ``configs/`` through
``BAYESFLIP_CONFIG_DIR``) and asserts the exit code, that stderr is exactly one line naming the key,
no traceback, and an empty results dir. ``test_one_line_from_a_real_process`` repeats two cases in a
subprocess (integration tier), where a stray log line or warning would also reach stderr. The models
are tiny-random (context 512) and the embedded smollm2-135m-instruct's tokenizer (context 8192);
nothing is loaded but tokenizers and configs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bayesflip import cli
from bayesflip.config import MAX_CELLS, load_experiment
from bayesflip.environment import check_environment
from bayesflip.errors import BayesflipError, ConfigError
from bayesflip.experiments import get_family
from bayesflip.experiments.base import template_problem
from bayesflip.store import ResultStore, store_path
from conftest import private_configs

REPO = Path(__file__).resolve().parent.parent

SWEEPS = {
    "f_samples": "models: [tiny-random]\nexperiments:\n  icl_coin: {params: {samples: 1000000000}}\n",
    "f_shard": "models: [tiny-random]\nexperiments:\n  icl_coin: {shard_size: 1000000000000}\n",
    "f_tpl_unknown": ("models: [tiny-random]\nexperiments:\n  paper_icl_coin: {params: {instruct_statement_template: "
                      "\"The coin lands heads {bias}% of the time.\"}}\n"),
    "f_tpl_open": ("models: [tiny-random]\nexperiments:\n  paper_icl_coin: {params: {statement_template: "
                   "\"The coin lands heads {b% of the time.\"}}\n"),
    "f_needle_open": "models: [tiny-random]\nexperiments:\n  needle_coin: {params: {needle: \"The coin is {b\"}}\n",
    "f_long_smol": ("models: [smollm2-135m-instruct]\nexperiments:\n"
                    "  icl_coin: {shard_size: 1, params: {n_flips: 4000, samples: 1, thetas: [0.5]}}\n"),
    "f_long_tiny": ("models: [tiny-random]\nexperiments:\n"
                    "  icl_coin: {shard_size: 1, params: {n_flips: 400, samples: 1, thetas: [0.5]}}\n"),
    "f_ok": ("models: [tiny-random]\nexperiments:\n"
             "  icl_coin: {shard_size: 2, params: {n_flips: 12, samples: 2, thetas: [0.5]}}\n"),
}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return private_configs(tmp_path_factory.mktemp("cfg"), SWEEPS)


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def bayesflip(cfg, monkeypatch, capsys):
    """``bayesflip(results, *args, env=...)``: ``cli.main`` in-process with the private configs; what a
    subprocess would give (exit code, stdout, stderr). ``argparse`` usage errors exit through SystemExit."""
    def run(results, *args, env=None):
        monkeypatch.setenv("BAYESFLIP_CONFIG_DIR", str(cfg))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        try:
            rc = cli.main([*args, *(["--results-dir", str(results)] if results is not None else [])])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        out = capsys.readouterr()
        for k in env or {}:
            monkeypatch.delenv(k)
        return Ran(rc, out.out, out.err)
    return run


def subprocess_bayesflip(cfg, results, *args, env=None):
    e = {**os.environ, "BAYESFLIP_CONFIG_DIR": str(cfg), "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "bayesflip.cli", *args, "--results-dir", str(results)],
                          capture_output=True, text=True, env=e, timeout=600)


def one_error_line(r, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bayesflip: error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("sweep,needles", [
    ("f_samples", ["experiments.icl_coin.params", "11,000,000,000 cells", "samples=1000000000"]),
    ("f_shard", ["experiments.icl_coin.shard_size", "too large"]),
    ("f_tpl_unknown", ["params.instruct_statement_template", "unknown placeholder(s) {bias}"]),
    ("f_tpl_open", ["params.statement_template", "malformed"]),
    ("f_needle_open", ["params.needle", "malformed"]),
    ("f_long_smol", ["experiments.icl_coin.params", "12054 tokens", "context of 8192"]),
    ("f_long_tiny", ["experiments.icl_coin.params", "context of 512"]),
])
@pytest.mark.parametrize("dry", [True, False])
def test_bad_config_is_one_line_at_plan(bayesflip, tmp_path, sweep, needles, dry):
    results = tmp_path / "results"
    r = bayesflip(results, "plan", "--exp", sweep, *(["--dry-run"] if dry else []))
    one_error_line(r, *needles)
    assert not results.exists() or not any(results.iterdir())     # nothing written


@pytest.mark.parametrize("var,value,needle", [
    ("BAYESFLIP_LEASE_TTL", "abc", "BAYESFLIP_LEASE_TTL='abc': not a number of seconds > 0"),
    ("BAYESFLIP_LEASE_TTL", "-5", "BAYESFLIP_LEASE_TTL='-5'"),
    ("BAYESFLIP_GROUP_CELLS", "abc", "BAYESFLIP_GROUP_CELLS='abc': not an integer >= 1"),
    ("BAYESFLIP_GROUP_CELLS", "0", "BAYESFLIP_GROUP_CELLS='0'"),
    ("BAYESFLIP_INJECT_FAILURE", "garbage", "'garbage' is not experiment:shard"),
    ("BAYESFLIP_INJECT_FAILURE", "icl_coin:0@node1", "'icl_coin:0@node1' is not"),
    ("BAYESFLIP_DIST_TIMEOUT_MIN", "soon", "BAYESFLIP_DIST_TIMEOUT_MIN='soon'"),
    ("BAYESFLIP_CONFIG_DIR", "/nonexistent", "BAYESFLIP_CONFIG_DIR='/nonexistent': not a directory"),
])
def test_bad_environment_is_one_line_before_anything(bayesflip, tmp_path, var, value, needle):
    results = tmp_path / "results"
    r = bayesflip(results, "debug", "--exp", "f_ok", env={var: value})
    one_error_line(r, needle)
    assert not results.exists()                                   # no store was created


def test_environment_values_that_are_fine():
    check_environment({"BAYESFLIP_CONFIG_DIR": str(REPO / "configs"), "BAYESFLIP_LEASE_TTL": "0.5", "BAYESFLIP_GROUP_CELLS": "16", "BAYESFLIP_DIST_TIMEOUT_MIN": "",
                       "BAYESFLIP_INJECT_FAILURE": "icl_coin:0,needle_coin:3@rank1"})
    with pytest.raises(BayesflipError, match="BAYESFLIP_LEASE_TTL='inf'"):
        check_environment({"BAYESFLIP_LEASE_TTL": "inf"})


def test_where_and_template_path_are_refused(bayesflip, tmp_path):
    results = tmp_path / "results"
    one_error_line(bayesflip(results, "plan", "--exp", "f_ok", "--dry-run", "--template",
                             "../job_templates/cpu-debug"), "is a path")
    for where, needle in (("thta=0.5", "unknown key 'thta'; did you mean 'theta'"),
                          ("theta=abc", "theta='abc' does not parse")):
        r = bayesflip(None, "prompts", "--exp", "f_ok", "--where", where)
        one_error_line(r, "--where", needle)
        assert r.stdout == ""


@pytest.mark.integration
@pytest.mark.parametrize("args,env,needle", [
    (["plan", "--exp", "f_long_smol"], {}, "12054 tokens"),
    (["debug", "--exp", "f_ok"], {"BAYESFLIP_GROUP_CELLS": "0"}, "BAYESFLIP_GROUP_CELLS='0'"),
])
def test_one_line_from_a_real_process(cfg, tmp_path, args, env, needle):
    """The same contract from a real process: nothing else (a log line, a warning) reaches stderr."""
    results = tmp_path / "results"
    one_error_line(subprocess_bayesflip(cfg, results, *args, env=env), needle)
    assert not results.exists() or not any(results.iterdir())


def test_template_problem_values():
    s = {"b": 50, "face": 1}
    assert template_problem("heads {b}% of the time", s) is None
    assert template_problem("{{literal}} {b}", s) is None
    assert "unknown placeholder(s) {bias}" in template_problem("{bias}", s)
    assert "malformed" in template_problem("heads {b", s)
    assert "positional" in template_problem("heads {}", s)
    assert "lacks {b}" in template_problem("no bias here", s, ("b",))
    assert "cannot be filled" in template_problem("{face:%}", {"face": "x"})


def test_cell_estimate_bounds_the_grid_without_building_it():
    exp = load_experiment("icl_coin", {"params": {"samples": 3}})
    fam = get_family("icl")
    assert fam.cell_estimate(exp.params) == len(fam.cells(exp.params)) == 11 * 3
    exp = load_experiment("markov")                 # the estimate is an upper bound
    fam = get_family("markov")
    assert fam.cell_estimate(exp.params) >= len(fam.cells(exp.params))
    with pytest.raises(ConfigError, match=f"over the limit of {MAX_CELLS:,}"):
        load_experiment("icl_coin", {"params": {"samples": MAX_CELLS}})


# ---------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_in_debug_is_one_line_then_resume_completes(tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt raised inside the 4th engine call (one shard per call) of ``debug``:
    exit 130, one line "interrupted; 3/12 shards done, resume with `...`", the 3 shards kept;
    the resume command then completes the other 9."""
    from bayesflip.experiments.icl import ICLFamily

    calls = {"n": 0}
    real_run = ICLFamily.run

    def run(self, p, cells, ctx):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_run(self, p, cells, ctx)

    monkeypatch.setenv("BAYESFLIP_GROUP_CELLS", "1")
    monkeypatch.setattr(ICLFamily, "run", run)
    args = ["debug", "--exp", "test_resume", "--model-type", "tiny-random", "--results-dir", str(tmp_path),
            "--device", "cpu"]
    assert cli.main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    resume = f"bayesflip debug --exp test_resume --model-type tiny-random --results-dir {tmp_path}"
    assert err[-1] == f"bayesflip: interrupted; 3/12 shards done, resume with `{resume}`"
    assert not any("Traceback" in line for line in err)
    st = ResultStore(store_path("test_resume", "icl_coin", "tiny-random", tmp_path))
    assert sorted(s for s, ss in st.shard_states().items() if ss.state == "done") == [0, 1, 2]

    monkeypatch.setattr(ICLFamily, "run", real_run)
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "9 shards done, 3 already done, 0 failed" in out
    assert all(ss.state == "done" for ss in st.shard_states().values())


def test_ctrl_c_in_reduce_is_one_line(tmp_path, monkeypatch, capsys):
    import bayesflip.reduce.pipeline as pipeline

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "load_sweep_data", boom)
    assert cli.main(["reduce", "--sweep", "anything", "--results-dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bayesflip: interrupted; the report is incomplete (the stores are untouched), re-run "
                   f"`bayesflip reduce --sweep anything --results-dir {tmp_path}`"]
