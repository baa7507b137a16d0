"""Cost before submitting (bayesflip.hpc.cost): token counts against the engine and a hand count, the
proxy tokenizer for unprepared Hub models, template throughput keys and calibration files, packing
of shards into tasks by estimated time, and ``plan --dry-run`` writing nothing. Tokenizers and the
tiny random model only (no weights downloaded)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bayesflip.hpc import cost
from bayesflip.config import load_experiment, load_sweep
from bayesflip.errors import ConfigError
from bayesflip.experiments import get_family
from bayesflip.hpc import templates as T
from bayesflip.hpc.launch import plan_arrays
from bayesflip.plan import plan_sweep
from bayesflip.prompts import encode_piece, encode_text

from conftest import private_configs

REPO = Path(__file__).resolve().parent.parent
NEEDLE = {"shard_size": 5, "params": {"lengths": [10, 40], "depths": [0.5], "biases": [20, 80], "samples": 2}}
ICL = {"shard_size": 2, "params": {"thetas": [0.2, 0.8], "n_flips": 10, "samples": 2}}
SWEEP = f"""models: [tiny-random, llama-3.1-8b]
experiments:
  needle_coin: {json.dumps(NEEDLE)}
  icl_coin: {json.dumps(ICL)}
"""


def _tok():
    from bayesflip.models.loader import load_tokenizer
    from bayesflip.models.registry import get_model_spec

    return load_tokenizer(get_model_spec("tiny-random"))


def _hand_count(name: str, ov: dict, tok) -> int:
    """Prompt tokens by hand: needle = every cell's rendered prompt; icl = every cell's longest read
    (its read points are prefixes of one sequence); the choices are single tokens."""
    exp = load_experiment(name, ov)
    fam = get_family(exp.family)
    cells = fam.cells(exp.params)
    rendered = fam.render(exp.params, cells, tok, "std", exp.seed)
    assert all(len(encode_piece(tok, c)) == 1 for r in rendered for c in r.choices)
    longest: dict = {}
    for r in rendered:
        key = tuple(sorted((k, repr(v)) for k, v in r.cell.items() if k in cells[0]))
        longest[key] = max(longest.get(key, ""), r.text, key=len)
    assert len(longest) == len(cells)
    return sum(len(encode_text(tok, t)) for t in longest.values())


def test_counts_match_the_engine_and_a_hand_count():
    from bayesflip.backends import load_backend
    from bayesflip.experiments.base import RunContext
    from bayesflip.models.registry import get_model_spec

    be = load_backend(get_model_spec("tiny-random"), device="cpu")
    for name, ov in (("needle_coin", NEEDLE), ("icl_coin", ICL)):
        exp = load_experiment(name, ov)
        fam = get_family(exp.family)
        cells = fam.cells(exp.params)
        n = fam.count_tokens(exp.params, cells, be.tokenizer, "std", exp.seed)
        assert n.prompt == _hand_count(name, ov, be.tokenizer) and n.generated == 0
        be.scorer.stats.reset()
        fam.run(exp.params, cells, RunContext(scorer=be, model_kind="std", model_name="tiny-random", seed=exp.seed))
        assert n.prompt == be.scorer.stats.real_tokens      # what the engine really forwarded
        per = cost.experiment_tokens(exp, cells, be.tokenizer, "std")
        assert per.exact and round(sum(per.prompt)) == n.prompt


def test_generation_rows_count_max_new_tokens():
    exp = load_experiment("paper_cot_coin", {})
    fam = get_family(exp.family)
    cells = fam.cells(exp.params)
    n = fam.count_tokens(exp.params, cells, _tok(), "std", exp.seed)
    assert n.rows == len(cells) and n.generated == len(cells) * exp.params.max_new_tokens and n.prompt > 0


def test_big_grids_are_sampled_and_interpolated():
    picks = cost.sample_shards(300, 50)
    assert picks[0] == 0 and picks[-1] == 299 and len(picks) <= cost.SAMPLE_SHARDS
    assert cost.sample_shards(3, 50) == [0, 1, 2]
    exp = load_experiment("paper_markov", {})
    cells = get_family(exp.family).cells(exp.params)
    per = cost.experiment_tokens(exp, cells, _tok(), "std")
    assert not per.exact and len(per.prompt) == 300 and min(per.prompt) > 0


def test_formulas():
    # an 8B reference at 25k scored tok/s: a 2B model is 4x faster to score, loads in a quarter of the time
    s, g, ld = cost.model_speed(25000, 2000, 90, 8, 2)
    assert (s, g, ld) == (100000, 8000, 22.5)
    s, g, ld = cost.model_speed(25000, 2000, 90, 8, 8, active_params_b=1)   # mixture of experts
    assert (s, g, ld) == (200000, 2000, 90)
    assert cost.shard_seconds(50000, 2000, 25000, 2000) == 3.0
    assert cost.task_seconds(90, [3.0, 7.0]) == 100.0


def test_pack_work_respects_the_target():
    secs = [100.0] * 50                       # 5000 s of work, 1800 s tasks with a 300 s load → 1500 s of room
    groups = cost.pack_work(secs, 1800, 300)
    assert len(groups) == math.ceil(5000 / 1500) == 4
    assert [i for g in groups for i in g] == list(range(50))            # contiguous, in order
    assert all(300 + sum(secs[i] for i in g) <= 1800 for g in groups)
    assert max(map(len, groups)) - min(map(len, groups)) <= 1            # balanced
    assert cost.pack_work([5000.0, 1.0], 1800, 300) == [[0], [1]]          # a long shard gets a task of its own
    assert cost.pack_work([1.0] * 7, 1800, 300) == [list(range(7))]
    assert cost.pack_work([], 1800, 300) == []


def _template(**kw):
    base = dict(name="synthetic", partition="debug", mem_gb=1, time_min=120, shards_per_task=2)
    return T.JobTemplate(**{**base, **kw})


def test_packing_with_a_synthetic_throughput(tmp_path):
    sweep = load_sweep("test_slurm")                       # smollm2, 6 shards of 1 cell
    thr = T.Throughput(score_tokens_per_s=10, gen_tokens_per_s=1, load_s=5, ref_params_b=0.135)
    t = _template(target_task_min=1, throughput=thr)
    templates = {m: t for m in sweep.models}
    costs = cost.estimate_models(sweep, [], templates)
    units = plan_sweep(sweep, results_dir=tmp_path, create=False)
    mc = costs[sweep.models[0]]
    secs = [mc.shard_seconds(u.experiment.name, s) for u in units for s in u.pending]
    tasks = [t for a in plan_arrays(sweep, units, templates, costs=costs) for t in a.tasks]
    assert len(tasks) == max(1, math.ceil(sum(secs) / (60 - 5)))
    for task in tasks:
        est = cost.task_seconds(5, [mc.shard_seconds(e, s) for e, s in task.work])
        assert est <= 60 or len(task.work) == 1
        exps = [e for e, _ in task.work]
        assert exps == sorted(exps, key=[u.experiment.name for u in units].index)   # experiments contiguous
    # no costs (an explicit --shards-per-task) or no target: fixed shards_per_task
    fixed = [t for a in plan_arrays(sweep, units, templates) for t in a.tasks]
    assert [len(t.work) for t in fixed] == [2, 2, 2]
    plain = {m: _template(throughput=thr) for m in sweep.models}
    costs2 = cost.estimate_models(sweep, [], plain)
    assert [len(t.work) for a in plan_arrays(sweep, units, plain, costs=costs2) for t in a.tasks] == [2, 2, 2]
    assert not list(tmp_path.iterdir())                   # planning without create writes nothing


def test_template_keys_are_checked(tmp_path):
    def write(name, text):
        (tmp_path / f"{name}.yaml").write_text(text)
        return T.load_template(name, tmp_path)

    base = "partition: p\nmem_gb: 1\ntime_min: 60\n"
    with pytest.raises(ConfigError, match=r"'throughput.tokens_per_s': unknown key.*allowed: .*score_tokens_per_s"):
        write("a", base + "throughput: {tokens_per_s: 5}\n")
    with pytest.raises(ConfigError, match=r"'throughput.score_tokens_per_s'.*greater than 0"):
        write("b", base + "throughput: {score_tokens_per_s: 0, gen_tokens_per_s: 1, load_s: 1, ref_params_b: 1}\n")
    with pytest.raises(ConfigError, match=r"'target_task_min'.*at most 0.75·time_min = 45"):
        write("c", base + "target_task_min: 50\n")
    with pytest.raises(ConfigError, match=r"'throughput': must be a mapping"):
        write("d", base + "throughput: 5\n")
    t = write("e", base + "target_task_min: 45\nthroughput: {score_tokens_per_s: 9, gen_tokens_per_s: 1, "
                          "load_s: 1, ref_params_b: 1}\n")
    assert t.target_task_min == 45 and t.throughput.score_tokens_per_s == 9
    with pytest.raises(ConfigError, match=r"target_task_min \(--target-task-min\)"):
        T.with_overrides(t, target_task_min=0)
    for name in T.template_names():                        # the shipped ones carry figures
        assert T.load_template(name).throughput is not None


def test_calibration_file_overrides_the_template(tmp_path, monkeypatch):
    monkeypatch.setenv("BAYESFLIP_CACHE", str(tmp_path))
    t = T.load_template("gpu-small")
    thr, src = cost.template_throughput(t)
    assert thr == t.throughput and "template default" in src
    path = tmp_path / "throughput" / "gpu-small.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"score_tokens_per_s": 50000, "gen_tokens_per_s": 4000, "ref_params_b": 7.5,
                                "device": "NVIDIA H100", "measured": "2026-11-30T00:00:00Z"}))
    thr, src = cost.template_throughput(t)
    assert (thr.score_tokens_per_s, thr.gen_tokens_per_s, thr.ref_params_b) == (50000, 4000, 7.5)
    assert thr.load_s == pytest.approx(t.throughput.load_s * 7.5 / 8)      # the template's load time per parameter
    assert thr.curve_tokens_per_s == pytest.approx(50000 * 16000 / 25000)  # the template's curve/score ratio
    assert "calibrated" in src and "NVIDIA H100" in src
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable calibration file"):
        cost.template_throughput(t)


def test_gpu_check_writes_a_calibration_file(tmp_path, monkeypatch):
    from bayesflip.gpu_check import write_calibration

    monkeypatch.setenv("BAYESFLIP_CACHE", str(tmp_path))
    res = {"calibration": {"device": "cpu", "throughput": {"score_tokens_per_s": 123.0, "gen_tokens_per_s": 4.0,
                                                           "ref_params_b": 0.01}}, "git_commit": None}
    path = write_calibration(res, "cpu-debug")
    assert path == tmp_path / "throughput" / "cpu-debug.json"
    thr, src = cost.template_throughput(T.load_template("cpu-debug"))
    assert thr.score_tokens_per_s == 123.0 and str(path) in src
    with pytest.raises(ConfigError, match="unknown job template"):
        write_calibration(res, "no-such-template")


# ---------------------------------------------------------------------- the command line
def _bf(args, cfg, hub, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO), "BAYESFLIP_CONFIG_DIR": str(cfg), "HF_HUB_CACHE": str(hub),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "bayesflip.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.integration
def test_plan_dry_run_costs_unprepared_models_and_writes_nothing(tmp_path):
    cfg = private_configs(tmp_path, {"cost_tiny": SWEEP})
    hub = tmp_path / "hub"                                  # an empty Hub cache: llama-3.1-8b is not prepared
    hub.mkdir()
    res = tmp_path / "results"
    r = _bf(["plan", "--exp", "cost_tiny", "--dry-run", "--results-dir", str(res)], cfg, hub)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "nothing written" in out and "estimates" in out
    assert "llama-3.1-8b*" in out and "tiny-random " in out and "tiny-random*" not in out
    assert "proxy tokenizer smollm2-135m-instruct (model not prepared): llama-3.1-8b" in out
    assert "device-min" in out and out.splitlines()[-1].startswith("template ")
    r = _bf(["plan", "--exp", "cost_tiny", "--dry-run", "--json", "--results-dir", str(res)], cfg, hub)
    assert r.returncode == 0, r.stderr
    rows = {m["model"]: m for m in json.loads(r.stdout)["models"]}
    tok = _tok()
    want = _hand_count("needle_coin", NEEDLE, tok) + _hand_count("icl_coin", ICL, tok)
    n_cells = 1 + 2 * 2 + 2 * 2 * 2 + 2 * 2      # needle: no_context + no_needle + needle; icl: thetas × samples
    n_shards = math.ceil(13 / 5) + math.ceil(4 / 2)
    for m in ("tiny-random", "llama-3.1-8b"):       # the proxy is the SmolLM2 tokenizer, tiny-random's own
        assert (rows[m]["cells"], rows[m]["prompt_tokens"], rows[m]["generated_tokens"]) == (n_cells, want, 0)
        assert rows[m]["shards"] == n_shards and rows[m]["exact_tokens"]
    assert rows["llama-3.1-8b"]["proxy_tokenizer"] and not rows["tiny-random"]["proxy_tokenizer"]
    assert rows["llama-3.1-8b"]["packed"] and rows["llama-3.1-8b"]["tasks"] == 1
    assert rows["llama-3.1-8b"]["device_minutes"] > 0 and rows["llama-3.1-8b"]["device_unit"] == "GPU"
    assert not rows["tiny-random"]["packed"] and rows["tiny-random"]["tasks"] == math.ceil(n_shards / 4)
    assert rows["tiny-random"]["device_unit"] == "CPU"
    # an explicit --shards-per-task overrides the packing
    r = _bf(["plan", "--exp", "cost_tiny", "--dry-run", "--json", "--shards-per-task", "1",
             "--results-dir", str(res)], cfg, hub)
    rows = {m["model"]: m for m in json.loads(r.stdout)["models"]}
    assert rows["llama-3.1-8b"]["tasks"] == n_shards and not rows["llama-3.1-8b"]["packed"]
    # submit --dry-run costs it too; a real submit still refuses the unprepared model
    r = _bf(["submit", "--exp", "cost_tiny", "--dry-run", "--executor", "local", "--results-dir", str(res)], cfg, hub)
    assert r.returncode == 0, r.stderr
    assert "would submit llama-3.1-8b" in r.stdout and "cost estimate of sweep cost_tiny" in r.stdout
    assert not res.exists() or not any(res.rglob("*"))                  # no stores, manifest or records
    r = _bf(["submit", "--exp", "cost_tiny", "--executor", "local", "--results-dir", str(res)], cfg, hub)
    assert r.returncode == 2 and "not prepared" in r.stderr and "bayesflip models prepare llama-3.1-8b" in r.stderr
    assert not res.exists() or not any(res.rglob("*"))


def test_a_shorter_time_lowers_the_target():
    t = T.load_template("gpu-small")
    assert t.target_task_min == 30
    assert T.with_overrides(t, time_min=20).target_task_min == 15
    assert T.with_overrides(t, time_min=120).target_task_min == 30
    with pytest.raises(ConfigError, match=r"target_task_min \(--target-task-min\).*0.75·time_min"):
        T.with_overrides(t, time_min=20, target_task_min=20)


# ---------------------------------------------------------------------- generation-by-generation families
RULES = {"shard_size": 2, "params": {"biases": ["strong"], "interactions": ["self_check"], "generations": 1,
                                     "chains": 1, "choice_chunk": 81}}
PAPER_RULES = {"shard_size": 1, "params": {"biases": ["strong"], "positions": ["start"],
                                           "interactions": ["hypothesis"], "h_indices": [0], "d0_seeds": [42],
                                           "temperatures": [1.0], "generations": 1, "max_new_tokens": 16,
                                           "max_redraws": 1, "look_back": 1}}
ACRONYM = {"shard_size": 2, "params": {"filters": ["none", "most"], "generations": 2, "chains": 1, "pool": 3,
                                       "max_new_tokens": 8}}
CHAINS = {"shard_size": 4, "params": {"learners": ["pm", "sampler"], "n": [6], "inits": [3], "min_counts": [0],
                                     "generations": 3, "chains": 2}}
PAPER_ACRONYM = {"shard_size": 1, "params": {"bias_types": ["easy"], "d0_seeds": [42], "generations": 1,
                                             "reply_tokens": 24, "max_redraws": 1, "pairs": 6, "m_easy": [3]}}


class _Counting:
    """The backend, counting generated rows and their sampled tokens (EngineStats counts forwarded ones)."""

    def __init__(self, be):
        self.be, self.rows, self.sampled = be, 0, 0

    def __getattr__(self, k):
        return getattr(self.be, k)

    def generate(self, prompts, max_new_tokens, seeds, **kw):
        outs = self.be.generate(prompts, max_new_tokens, seeds, **kw)
        self.rows += len(prompts)
        self.sampled += sum(map(len, outs))
        return outs


@pytest.mark.parametrize("name,ov,factor", [("chain_coin", CHAINS, 1.05), ("rules", RULES, 1.1),
                                            ("paper_rules", PAPER_RULES, 1.5), ("acronym", ACRONYM, 1.5),
                                            ("paper_acronym", PAPER_ACRONYM, 1.5)])
def test_generational_counts_follow_the_run(name, ov, factor):
    """count_tokens follows every engine call of every generation: the estimated forwarded tokens
    (prompt + the decoding steps of every row at max_new_tokens) are within ``factor`` of what the
    engine really forwarded (EngineStats.real_tokens); the old count (generation 0's read once per
    generation) was 1.5-20x too low for the model-turn families. Model-written text is counted at its
    upper bound (max_new_tokens, every redraw), which the tiny random model (no parse, rarely EOS)
    nearly meets; the rules' drawn examples are counted at a typical length."""
    from bayesflip.backends import load_backend
    from bayesflip.experiments.base import RunContext
    from bayesflip.models.registry import get_model_spec

    # the tiny model with a longer (learned, random) position table: the paper game's chat history
    be = load_backend(get_model_spec("tiny-random").model_copy(update={"max_length": 2048}), device="cpu")
    exp = load_experiment(name, ov)
    fam = get_family(exp.family)
    cells = fam.cells(exp.params)
    est = fam.count_tokens(exp.params, cells, be.tokenizer, "std", exp.seed)
    old = super(type(fam), fam).count_tokens(exp.params, cells, be.tokenizer, "std", exp.seed)
    cb = _Counting(be)
    be.scorer.stats.reset()
    for lo in range(0, len(cells), exp.shard_size):
        fam.run(exp.params, cells[lo: lo + exp.shard_size],
                RunContext(scorer=cb, model_kind="std", model_name="tiny-random", seed=exp.seed))
    real = be.scorer.stats.real_tokens
    forwarded = est.prompt + est.generated - est.rows      # the last sampled token of a row is not forwarded
    assert real / factor <= forwarded <= real * factor, (est, real)
    assert est.rows == cb.rows and est.generated >= cb.sampled
    assert old.prompt + old.generated < forwarded / 1.5 or name in ("rules", "chain_coin")


def test_kind_speed_per_kind_size_and_dtype():
    """Per kind of work: reads cost the curve figure's extra time; a small model's figures bend the size
    scaling (launch-bound); float32 uses measured figures, else on-paper factors on GPU templates only."""
    thr = T.Throughput(score_tokens_per_s=25000, gen_tokens_per_s=2000, load_s=90, ref_params_b=8,
                       curve_tokens_per_s=20000)
    sp = cost.kind_speed(thr, 8)
    assert (sp.score, sp.gen, sp.load) == pytest.approx((25000, 2000, 90))
    assert sp.read_s == pytest.approx(1 / 20000 - 1 / 25000)                # 10 µs per read
    assert cost.shard_seconds(50000, 2000, sp.score, sp.gen, 50000, sp.read_s) == pytest.approx(2 + 1 + 0.5)
    lin = cost.kind_speed(thr, 2)                                            # no small figure: linear, as model_speed
    assert (lin.score, lin.gen, lin.load) == pytest.approx(cost.model_speed(25000, 2000, 90, 8, 2))
    assert cost.kind_speed(thr, 8, active_params_b=1).score == pytest.approx(200000)   # mixture of experts
    small = thr.model_copy(update={"small": T.KindRates(score_tokens_per_s=100000, gen_tokens_per_s=4000,
                                                        ref_params_b=0.135)})
    tiny = cost.kind_speed(small, 0.05)                                      # below the small size: its own rate
    assert (tiny.score, tiny.gen) == pytest.approx((100000, 4000))
    mid = cost.kind_speed(small, 2)                                          # between: on the line through both
    t = 1 / 100000 + (1 / 25000 - 1 / 100000) * (2 - 0.135) / (8 - 0.135)
    assert mid.score == pytest.approx(1 / t) and mid.score < lin.score      # launch-bound: slower than linear
    fp = cost.kind_speed(thr, 8, dtype="float32")                            # on paper: ÷8 scoring, ÷2 decoding
    assert (fp.score, fp.gen) == pytest.approx((25000 / 8, 1000))
    assert cost.kind_speed(thr, 8, dtype="float32", gpu=False).score == pytest.approx(25000)   # CPU: no factor
    meas = thr.model_copy(update={"float32": T.KindRates(score_tokens_per_s=4000, gen_tokens_per_s=900)})
    assert cost.kind_speed(meas, 16, dtype="float32").score == pytest.approx(2000)    # measured, scaled by size
    with pytest.raises(ValueError, match="small needs its own ref_params_b"):
        T.Throughput(score_tokens_per_s=1, gen_tokens_per_s=1, load_s=1, ref_params_b=1,
                     small={"score_tokens_per_s": 1, "gen_tokens_per_s": 1})


def test_calibration_per_kind_and_tp_templates(tmp_path, monkeypatch):
    """gpu-check's calibration (per kind, float32, small) feeds the planner; a TP template gets the one-GPU
    figures × GPUs × the assumed efficiency (marked derived) and keeps its load time per parameter."""
    from bayesflip.gpu_check import TP_EFFICIENCY, write_calibration

    monkeypatch.setenv("BAYESFLIP_CACHE", str(tmp_path))
    one = {"score_tokens_per_s": 30000.0, "curve_tokens_per_s": 18000.0, "gen_tokens_per_s": 2500.0,
           "ref_params_b": 8.03, "dtype": "bfloat16",
           "float32": {"score_tokens_per_s": 3000.0, "curve_tokens_per_s": 2000.0, "gen_tokens_per_s": 1200.0},
           "small": {"score_tokens_per_s": 200000.0, "curve_tokens_per_s": 90000.0, "gen_tokens_per_s": 9000.0,
                     "ref_params_b": 0.135}}
    res = {"calibration": {"device": "NVIDIA H100 80GB HBM3", "throughput": one}, "git_commit": None}
    write_calibration(res, "gpu-small")
    thr, src = cost.template_throughput(T.load_template("gpu-small"))
    assert (thr.score_tokens_per_s, thr.curve_tokens_per_s, thr.float32.score_tokens_per_s,
            thr.small.ref_params_b) == (30000, 18000, 3000, 0.135)
    assert thr.load_s == pytest.approx(90 * 8.03 / 8) and "calibrated" in src
    path = write_calibration(res, "gpu-large")
    doc = json.loads(path.read_text())
    assert doc["score_tokens_per_s"] == pytest.approx(30000 * 4 * TP_EFFICIENCY["score_tokens_per_s"])
    assert doc["float32"]["gen_tokens_per_s"] == pytest.approx(1200 * 4 * TP_EFFICIENCY["gen_tokens_per_s"])
    assert "assumed TP efficiency" in doc["derived"]
    thr, _ = cost.template_throughput(T.load_template("gpu-large"))
    sp = cost.kind_speed(thr, 70.6)
    assert sp.load == pytest.approx(600 * 70.6 / 70, rel=1e-6)          # the template's 600 s for 70B, kept


def test_markov_counts_its_reads():
    """Every position of a paper Markov curve is a read; a needle prompt is one read."""
    for name, per_cell in (("paper_markov", None), ("needle_coin", 1)):
        exp = load_experiment(name, {})
        fam = get_family(exp.family)
        cells = fam.cells(exp.params)[:2]
        n = fam.count_tokens(exp.params, cells, _tok(), "std", exp.seed)
        if per_cell is None:
            assert n.reads > 100 and n.reads <= n.prompt
        else:
            assert n.reads == per_cell * len(cells)
