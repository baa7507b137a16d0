"""The coin-flip study's sequence processes (``flips:`` of the icl family, protocol paper) and the
published shift direction.

The reference processes below are written here from the description of the original generators
(PROTOCOLS.md §1.8/§1.9), independently of :mod:`bayesflip.experiments.paper_flips`:

* v2 ICL configs: ``random.seed(42)``; for N (outer), [die: face], b, query (inner) a fresh
  sequence of N draws ``random.choices(outcomes, weights)``;
* numpy script: ``np.random.seed(42)``; per θ = 0, 0.1, …, 1 in order ``np.random.choice``;
* posterior chain: ``random.seed(42)``; flip i ~ ``random.choices`` at θ1 (i < cutoff) or θ2.

With ``BAYESFLIP_ORIGINAL_REPO`` pointing at a checkout of ``rcorona/llm-coin-flips``, one more test
compares every committed ``coin_flip_icl_v2`` / ``die_roll_icl_v2`` config with bayesflip's prompts.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import synthetic_store
from test_paper_protocol import run_prompts
from bayesflip.config import load_experiment, validate_params
from bayesflip.engine import Scorer
from bayesflip.errors import ConfigError
from bayesflip.experiments import get_family
from bayesflip.experiments.base import RunContext
from bayesflip.experiments.icl import per_flip_probs
from bayesflip.reduce import reduce_sweep

ROOT = Path(__file__).resolve().parents[1]


def params(**kw):
    return validate_params(get_family("icl").Params, {"samples": 1, **kw}, "params")


def v2_reference(process: str, seed: int = 42) -> dict:
    """(N, percent, face, query) -> list of outcome labels, the v2 configs' loop."""
    rng = random.Random(seed)
    out = {}
    if process == "coin":
        for n in [0, 1, 3, 5, 10, 20, 100]:
            for b in range(0, 101, 10):
                for q in range(50):
                    out[(n, b, None, q)] = [rng.choices(["heads", "tails"], weights=[b / 100, 1 - b / 100])[0]
                                            for _ in range(n)]
        return out
    faces = ["1", "2", "3", "4", "5", "6"]
    for n in [1, 3, 5, 10, 20, 100]:
        for f in faces:
            for b in range(0, 101, 20):
                w = [b / 100 if x == f else (1 - b / 100) / 5 for x in faces]
                for q in range(50):
                    out[(n, b, int(f), q)] = [rng.choices(faces, weights=w)[0] for _ in range(n)]
    return out


def labels(process, idx):
    return [(["heads", "tails"] if process == "coin" else ["1", "2", "3", "4", "5", "6"])[i] for i in idx]


# ---------------------------------------------------------------------------- random_choices
@pytest.mark.parametrize("process", ["coin", "die"])
def test_random_choices_reproduces_the_v2_process(process):
    exp = load_experiment(f"paper_icl_{process}")
    p, fam = exp.params, get_family("icl")
    assert p.flips == "random_choices" and exp.seed == 42           # the paper default
    ref = v2_reference(process)
    cells = fam.cells(p)
    assert len(cells) == 7 * len(p.thetas) * len(p.faces if process == "die" else [1]) * 250
    seen = {}
    for c in cells:
        o = fam.sample_outcomes(p, c, exp.seed)
        key = (c["n"], round(c["theta"] * 100), c.get("face"), c["query"])
        want = ref.get(key, [])                                         # die N = 0: no original run, no flips
        assert labels(process, o) == want, (c, want)
        seen.setdefault(key, set()).add(tuple(o))
    assert all(len(s) == 1 for s in seen.values())                      # the instruct prompts share the sequence
    assert set(ref) <= set(seen) and {k[0] for k in set(seen) - set(ref)} <= {0}   # every reference sequence is a cell
    # N are not prefixes of one sequence: the N = 3 and N = 5 sequences of one (θ, query) differ somewhere
    assert any(ref[(5, b, f, q)][:3] != ref[(3, b, f, q)] for (n, b, f, q) in ref if n == 3)


def test_random_choices_subset_selects_and_lists_each_sequence_once(tmp_path):
    fam = get_family("icl")
    full = load_experiment("paper_icl_die").params
    sub = params(protocol="paper", process="die", thetas=[0.6], faces=[2, 5], flips="random_choices",
                 queries=["I rolled a die and it landed on ", "I just rolled a die, and it came up "],
                 instruct_prompts=["Please complete this sentence: I rolled a six-sided die and it came up "])
    cells = fam.cells(sub)
    assert [c["n"] for c in cells[:: len(cells) // 7]] == [0, 1, 3, 5, 10, 20, 100]
    for c in cells:  # a subset of θ, faces and queries gets the full grid's sequences
        assert np.array_equal(fam.sample_outcomes(sub, c, 42), fam.sample_outcomes(full, c, 42))
    from bayesflip.models.loader import load_tokenizer
    from bayesflip.models.registry import get_model_spec

    tok = load_tokenizer(get_model_spec("tiny-random"))
    rendered = fam.render(sub, cells, tok, "std", 42)
    assert len(rendered) == len(cells)                                  # one prompt per (N, b, face, query)
    for r, c in zip(rendered, cells):
        flips = labels("die", fam.sample_outcomes(sub, c, 42))
        assert r.cell == c
        assert r.text.endswith(sub.queries[c["query"]].rstrip() + "".join(f" {x}, then" for x in flips))


def test_random_choices_run_pads_after_n(tiny):
    fam = get_family("icl")
    p = params(protocol="paper", thetas=[0.3], flips="random_choices", read_ns=[0, 3, 10], n_flips=10,
               queries=["I tossed a coin and it landed on "], instruct_prompts=["Toss: "])
    cells = fam.cells(p)
    out = fam.run(p, cells, RunContext(scorer=Scorer(tiny), model_kind="std", model_name="tiny-random", seed=42))
    assert out["logprobs"].shape == (3, 11, 2)
    for i, c in enumerate(cells):
        n = c["n"]
        assert np.isfinite(out["logprobs"][i, : n + 1]).all() and np.isnan(out["logprobs"][i, n + 1:]).all()
        assert (out["outcomes"][i, n:] == -1).all() and (out["outcomes"][i, :n] >= 0).all()
        np.testing.assert_allclose(out["p_true"][i, : n + 1], [[0.3, 0.7]] * (n + 1), atol=1e-7)
        assert np.isnan(out["p_true"][i, n + 1:]).all()


@pytest.mark.parametrize("kw, key", [
    ({"thetas": [0.25]}, "theta 0.25"), ({"read_ns": [0, 2, 100]}, "read_ns 2"), ({"n_flips": 50}, "n_flips"),
    ({"queries": [f"Q{i} " for i in range(51)]}, "51 queries"), ({"samples": 2}, "samples 1"),
    ({"process": "die", "thetas": [0.1]}, "theta 0.1")])
def test_random_choices_refuses_values_off_the_original_grid(kw, key):
    with pytest.raises(ConfigError) as e:
        params(**{"protocol": "paper", "flips": "random_choices", **kw})
    assert key in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="needs protocol: paper"):
        params(flips="random_choices")


def test_attention_refuses_random_choices():
    fam = get_family("attention")
    p = validate_params(fam.Params, {"protocol": "paper", "flips": "random_choices", "samples": 1}, "params")
    with pytest.raises(ConfigError, match="flips"):
        fam.validate(p, None, "std")


# ---------------------------------------------------------------------------- numpy_legacy
def test_numpy_legacy_theta_subset_draws_the_full_grid():
    np.random.seed(42)
    ref = {t: list(np.random.choice(["heads", "tails"], 100, p=[t / 100, round(1 - t / 100, 1)]))
           for t in range(0, 101, 10)}
    fam = get_family("icl")
    for thetas in ([0.3, 0.7], [0.7, 0.3], [1.0]):
        p = params(protocol="paper", flips="numpy_legacy", thetas=thetas)
        for c in fam.cells(p)[::97]:
            assert labels("coin", fam.sample_outcomes(p, c, 42)) == ref[round(c["theta"] * 100)]
    with pytest.raises(ConfigError, match=r"theta 0.25 is not on it") as e:
        params(protocol="paper", flips="numpy_legacy", thetas=[0.25])
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------- shift: the published direction
def chain_reference(theta1, theta2, cutoff=50, n=100, seed=42):
    rng = random.Random(seed)
    return [rng.choices(["heads", "tails"], weights=[t, 1 - t])[0]
            for t in (theta1 if i < cutoff else theta2 for i in range(n))]


@pytest.mark.parametrize("exp, t1, t2", [("paper_shift_coin", 0.75, 0.25), ("paper_shift_coin_reverse", 0.25, 0.75)])
def test_prompts_shift_renders_the_published_direction(tiny, exp, t1, t2):
    recs = run_prompts("--exp", exp, "--model", "tiny-random", "--json", "--where", "n=100")
    assert len(recs) == 250                                             # 50 queries x 5 instruct prompts
    seqs = set()
    for r in recs:
        assert r["cell"]["theta"] == t1 and r["cell"]["theta2"] == t2
        body = r["text"].split(", then")
        assert body[-1] == ""
        seqs.add(tuple(x.split()[-1] for x in body[:-1]))
    assert len(seqs) == 1                                               # one chain shared by every prompt
    flips = list(seqs.pop())
    assert len(flips) == 100 and flips == chain_reference(t1, t2)       # the chain script's process, seed 42
    first, second = (np.mean([f == "heads" for f in half]) for half in (flips[:50], flips[50:]))
    assert (first > 0.6 and second < 0.4) if t1 > t2 else (first < 0.4 and second > 0.6)
    # the stored generating distribution: t1 for flips 0..49 (reads 0..49), t2 from flip 50 on
    e = load_experiment(exp)
    fam = get_family("icl")
    cell = fam.cells(e.params)[0]
    out = fam.run(e.params, [cell], RunContext(scorer=Scorer(tiny), model_kind="std", model_name="tiny-random",
                                               seed=e.seed))
    np.testing.assert_allclose(out["p_true"][0, :50, 0], t1, atol=1e-7)
    np.testing.assert_allclose(out["p_true"][0, 50:, 0], t2, atol=1e-7)
    assert labels("coin", out["outcomes"][0]) == flips
    np.testing.assert_allclose(per_flip_probs(e.params, cell)[:, 0], [t1] * 50 + [t2] * 50)


# ---------------------------------------------------------------------------- reduce: each N from its own cell
MODEL = "synthetic-model"


def test_reduce_paper_tvd_reads_position_n_of_the_n_cell(tmp_path):
    # statement: none, so that the prior fit (statement-free evidence only) reads these curves too
    prm = {"protocol": "paper", "process": "coin", "thetas": [0.2, 0.7], "flips": "random_choices",
           "read_ns": [0, 1, 3, 10], "n_flips": 10, "samples": 1, "statement": "none",
           "queries": ["I tossed a coin and it landed on ", "The coin fell on "], "instruct_prompts": ["Toss: "]}
    st, fam, p, cells = synthetic_store(tmp_path, "syn", "icl_v2", "icl", prm, 5, 42, MODEL)
    P = p.n_flips + 1

    def delta(n, q):  # the model's P(heads) − θ at the read after the cell's own n flips
        return 0.01 * (n + 1) * (1 if q == 0 else 2)

    ph = np.full((len(cells), P), np.nan)
    outs = np.full((len(cells), p.n_flips), -1)
    p_true = np.full((len(cells), P, 2), np.nan)
    for i, c in enumerate(cells):
        n = c["n"]
        ph[i, :n] = 0.5                                                 # prefix reads: a different value
        ph[i, n] = c["theta"] + delta(n, c["query"])
        o = fam.sample_outcomes(p, c, 42)
        outs[i, :n] = o
        p_true[i, : n + 1] = [c["theta"], 1 - c["theta"]]
    probs = np.stack([ph, 1 - ph], axis=-1)
    arrays = {"logprobs": np.log(0.9 * probs).astype(np.float32), "outcomes": outs.astype(np.int32),
              "p_true": p_true.astype(np.float32)}
    for s in range(st.n_shards):
        sl = st.shard_slice(s)
        st.write_shard(s, {k: v[sl] for k, v in arrays.items()})
    report = reduce_sweep("syn", results_dir=tmp_path, strict=True)
    tables = report.parent / "tables"
    bt = pd.read_csv(tables / "icl_paper_by_theta.csv")
    assert set(bt["sequences"]) == {"one per N"} and (bt["n_prompts"] == 2).all()
    for _, r in bt.iterrows():
        want = np.mean([delta(r["N"], 0), delta(r["N"], 1)])
        assert r["tvd_paper"] == pytest.approx(want, abs=1e-6), r.to_dict()
    ng = pd.read_csv(tables / "icl_paper_ngrid.csv").set_index("N")
    assert list(ng.index) == [0, 1, 3, 10]
    assert ng.loc[3, "tvd_paper"] == pytest.approx(0.01 * 4 * 1.5, abs=1e-6)
    # every curve-based metric reads only the full-length (n = 10) cells: no NaN reads, no shorter sequences
    s = pd.read_csv(tables / "icl_summary.csv").set_index("experiment")
    assert s.loc["icl_v2", "n_cells"] == 2 * 2 and s.loc["icl_v2", "n_positions"] == P
    assert np.isfinite(s.loc["icl_v2", ["tvd_true", "tvd_uniform", "tvd_fitted", "off_choice_mass"]].astype(float)).all()
    curves = pd.read_csv(tables / "icl_curves.csv")
    assert len(curves) == 4 * P and curves["p_model"].notna().all()
    fits = pd.read_csv(tables / "icl_prior_fits.csv")
    assert fits["alpha"].notna().all() and (fits["n_points"] == 4 * P).all()


# ---------------------------------------------------------------------------- against the original repository
ORIGINAL = os.environ.get("BAYESFLIP_ORIGINAL_REPO")


@pytest.mark.skipif(not ORIGINAL, reason="BAYESFLIP_ORIGINAL_REPO (a checkout of rcorona/llm-coin-flips) not set")
@pytest.mark.parametrize("process", ["coin", "die"])
def test_random_choices_equals_the_committed_v2_configs(process):
    """bayesflip's base prompts, with the original's own queries, equal the committed configs' input
    prompts after the statement: same flips, same text (whitespace-normalised as the original renders)."""
    import yaml

    from bayesflip.models.loader import load_tokenizer
    from bayesflip.models.registry import get_model_spec

    base = Path(ORIGINAL) / "configs" / "exps" / "contextual" / f"{process}_{'flip' if process == 'coin' else 'roll'}_icl_v2"
    files = sorted(base.glob("icl_*/bias_*.yaml"))
    assert len(files) == (77 if process == "coin" else 216)
    first = yaml.safe_load(files[0].read_text())
    queries = [re.sub(r"(heads|tails|[1-6])(, then (heads|tails|[1-6]))*, then $", "", s) for s in first["input_prompt"]]
    fam = get_family("icl")
    p = load_experiment(f"paper_icl_{process}", {"params": {"queries": queries,
                                                            "instruct_prompts": first["instruct_prompt"]}}).params
    tok = load_tokenizer(get_model_spec("tiny-random"))
    by_key = {}
    for c in fam.cells(p):
        if c["instruct"] == 0:
            by_key[(c["n"], round(c["theta"] * 100), c.get("face"), c["query"])] = c
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        n = int(f.parent.name.split("_")[1])
        parts = f.stem.split("_")[1:]
        face, b = (None, int(parts[0])) if process == "coin" else (int(parts[0]), int(parts[1]))
        cells = [by_key[(n, b, face, q)] for q in range(50)]
        for r, want in zip(fam.render(p, cells, tok, "std", 42), cfg["input_prompt"]):
            assert " ".join(r.text.split()) == " ".join(f"{cfg['bias_needles'][0]} {want}".split()), f
