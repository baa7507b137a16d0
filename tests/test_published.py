"""Published values: every entry names its source; recomputing them from the original repository matches.

The fast tests always run: sources are complete, the readers parse the original's file formats (on
synthetic files with the same layout), the check finds a changed value, the CLI exits 1 on it, and the
report's comparison tables carry each published row's source. The recomputation of every entry from a
real checkout of ``rcorona/llm-coin-flips`` runs when ``BAYESFLIP_ORIGINAL_REPO`` points to one.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import synthetic_store
from bayesflip.cli import main
from bayesflip.reduce import reduce_sweep
from bayesflip.reduce.original_results import (parse_averaged_stats, parse_printed_values, stated_face,
                                               stated_percent)
from bayesflip.reduce.published_values import (MODEL_KEYS, SOURCE_FIELDS, check_published, load_published,
                                               source_problems, sources_table)

COMMIT = "cc05196c5c6817bf16cb2fb995f5a02b56c32493"
ORIGINAL = os.environ.get("BAYESFLIP_ORIGINAL_REPO")


# ---------------------------------------------------------------------------- sources (always)
def test_every_entry_has_a_source_with_path_key_and_aggregation():
    pub = load_published()
    assert source_problems(pub) == []
    n = 0
    for key in MODEL_KEYS:
        assert pub[key], key
        for r in pub[key]:
            s = r["source"]
            for f in SOURCE_FIELDS:
                assert isinstance(s[f], str) and s[f].strip(), (key, r["published_name"], f)
            assert s["commit"] == COMMIT
            assert r["published_name"] in pub["result_dirs"]
            assert pub["result_dirs"][r["published_name"]] in s["path"] or s["path"].startswith("analysis/")
            assert "{dir}" not in s["path"] and "<dir>" not in s["path"]
            n += 1
    assert n > 400
    for c in pub["claims"]:
        assert c["source"]["path"] and c["source"]["commit"].startswith("bc63f7f") and c["direction"]
    assert {a["family"] for a in pub["absent"]} >= {"markov", "attention", "iicl"}
    st = sources_table(pub)
    assert set(st["family"]) == set(MODEL_KEYS) | {"claims"} and (st["commit"] != "").all()


def test_legacy_keys_and_row_fields_kept():
    pub = load_published()
    for key in ("source", "models", "prior", "icl_coin_tvd", "icl_die_tvd", "gamma", "poisson"):
        assert key in pub
    r = next(r for r in pub["prior"] if r["published_name"] == "Llama-3.1-8B")
    assert (r["model"], r["mean"], r["std"]) == ("llama-3.1-8b", 0.757, 0.124)
    assert "coin_flip_multiset/meta-llama_Llama-3.1-8B/averaged_stats.txt" in r["source"]["path"]
    assert "unconditional_point" in r["source"]["key"] and r["source"]["cite"]
    die = next(r for r in pub["icl_die_tvd"] if r["published_name"] == "Llama-3.1-8B" and r["bias"] == 0.6)
    assert (die["tvd"][1], die["tvd"][100]) == (0.381, 0.093)
    assert "face mean by bayesflip" in die["source"]["cite"]
    mistral = next(r for r in pub["gamma"] if r["published_name"] == "Mistral-7B-Instruct")
    assert mistral["gamma"] == 0.0 and "lower bound" in mistral["source"]["note"]
    assert "Phi-3.5-mini-instruct" not in {r["published_name"] for r in pub["gamma"]}


def test_poisson_entries_at_temperature_one_with_median_and_conditions():
    pub = load_published()
    rows = {(r["mode"], r["lam"]): r for r in pub["poisson"] if r["published_name"] == "Llama-3.1-8B"}
    ex, icl = rows[("explicit", 0.5)], rows[("icl", 0.5)]
    assert (ex["lambda_hat"], ex["lambda_hat_median"], ex["n_samples"]) == (0.716, 0.219, 100)
    assert (icl["lambda_hat"], icl["lambda_hat_median"]) == (0.48, 0.513)
    assert {r["temperature"] for r in pub["poisson"]} == {1.0}
    assert icl["conditions"].startswith("conditions ambiguous") and "story length" in icl["conditions"]
    assert "ambiguous" not in ex["conditions"] and "temperature 1.0" in ex["conditions"]
    assert icl["source"]["path"].endswith("stats_icl.pkl") and ex["source"]["path"].endswith("/stats.pkl")


# ---------------------------------------------------------------------------- readers
AVG = """unconditional_point
  choice_probs: [0.25 0.75] +/- [0.1 0.1]
  tvd: 0.25 +/- 0.1
biased_point
  When I roll dice, they land on 3 60% of the time.
    expected_dist: [0.6        0.07999994 0.07999994 0.07999994 0.07999994
 0.07999994] +/- [1.e-07 1.e-07 1.e-07 1.e-07 1.e-07
 1.e-07]
    tvd: 0.4 +/- 0.2
  tvd_auc: 0.0 +/- 0.0
"""


def test_parse_averaged_stats_wrapped_arrays_and_statement_numbers():
    d = parse_averaged_stats(AVG)
    np.testing.assert_allclose(d["unconditional_point"]["choice_probs"]["mean"], [0.25, 0.75])
    st = d["biased_point"]["When I roll dice, they land on 3 60% of the time."]
    assert st["expected_dist"]["mean"].shape == (6,) and st["expected_dist"]["std"].shape == (6,)
    assert st["tvd"] == {"mean": 0.4, "std": 0.2} and d["biased_point"]["tvd_auc"]["mean"] == 0.0
    key = "When I roll dice, they land on 3 60% of the time."
    assert (stated_face(key), stated_percent(key)) == (3, 60)
    assert parse_printed_values("a_b-1: [0.5]\nmistral: [0.]\nnoise\n") == {"a_b-1": 0.5, "mistral": 0.0}


# ---------------------------------------------------------------------------- the check on a fake checkout
def _fake_checkout(root: Path) -> Path:
    """A checkout with one model's prior file and the γ notebook, in the original's layout."""
    d = root / "exps/contextual/coin_flip_multiset/meta-llama_Llama-3.1-8B"
    d.mkdir(parents=True)
    (d / "averaged_stats.txt").write_text("unconditional_point\n  choice_probs: [0.7572 0.2428] +/- [0.1236 0.1236]\n")
    nb = {"cells": [{"cell_type": "code", "outputs": []}] * 8 + [
        {"cell_type": "code", "outputs": [{"output_type": "stream", "text": ["meta-llama_Llama-3.1-8B: [0.88073904]\n"]}]}]}
    (root / "analysis").mkdir()
    (root / "analysis/posterior_chain_vis.ipynb").write_text(json.dumps(nb))
    return root


def _subset(pub: dict) -> dict:
    out = copy.deepcopy(pub)
    for key in MODEL_KEYS:
        out[key] = [r for r in out[key] if r["published_name"] == "Llama-3.1-8B" and key in ("prior", "gamma")]
    return out


def test_check_matches_and_fails_on_a_changed_value(tmp_path):
    repo = _fake_checkout(tmp_path)
    pub = _subset(load_published())
    ok = check_published(repo, pub)
    assert ok.ok and ok.n_rows == 2 and ok.n_values == 3
    pub["prior"][0]["mean"] = 0.760                       # off by 0.0028 > 3-decimal rounding
    bad = check_published(repo, pub)
    assert not bad.ok and [(m.family, m.field) for m in bad.mismatches] == [("prior", "mean")]
    assert bad.mismatches[0].recomputed == pytest.approx(0.7572)
    (repo / "analysis/posterior_chain_vis.ipynb").unlink()
    gone = check_published(repo, pub)
    assert any(m.family == "gamma" and "not recomputable" in str(m.recomputed) for m in gone.mismatches)


def test_cli_check_exit_codes(tmp_path, capsys):
    repo = _fake_checkout(tmp_path)
    assert main(["published", "--check", str(repo)]) == 1          # most entries have no file in the fake
    out = capsys.readouterr().out
    assert "mismatch" in out and "not recomputable" in out and "prior Llama-3.1-8B " not in out
    assert "poisson Llama-3.1-8B [mode=icl, lam=0.5]" in out
    assert main(["published", "--check", str(tmp_path / "nothing")]) == 2


# ---------------------------------------------------------------------------- against the original repository
@pytest.mark.skipif(not ORIGINAL, reason="set BAYESFLIP_ORIGINAL_REPO to a checkout of rcorona/llm-coin-flips")
def test_every_entry_recomputes_from_the_original_repository():
    res = check_published(ORIGINAL)
    assert res.ok, "\n".join(map(str, res.mismatches[:30]))
    assert res.n_rows == sum(len(load_published()[k]) for k in MODEL_KEYS) and res.n_values > 7000
    # the old Poisson value (a mean over four temperatures) is not the temperature-1.0 one
    pub = copy.deepcopy(load_published())
    row = next(r for r in pub["poisson"] if r["published_name"] == "Llama-3.1-8B" and r["lam"] == 0.5
               and r["mode"] == "icl")
    row["lambda_hat"] = 0.448
    bad = check_published(ORIGINAL, pub, families=("poisson",))
    assert [m.field for m in bad.mismatches] == ["lambda_hat"]


# ---------------------------------------------------------------------------- the report shows the sources
NEEDLE = {"process": "coin", "lengths": [0, 10], "depths": [0.5], "biases": [30, 60], "samples": 2,
          "protocol": "paper"}


def test_needle_and_explicit_comparisons_show_sources_and_every_published_series(tmp_path):
    st, fam, p, cells = synthetic_store(tmp_path, "pub", "paper_needle_coin", "needle", NEEDLE, 13, 7, "llama-3.1-8b")
    probs = np.array([[c["bias"] / 100 + 0.1, 0.9 - c["bias"] / 100] if c["condition"] == "needle" else [0.7, 0.3]
                      for c in cells])
    stated = np.array([[c["bias"] / 100, 1 - c["bias"] / 100] if c["condition"] == "needle" else [np.nan, np.nan]
                       for c in cells])
    st.write_shard(0, {"logprobs": np.log(probs).astype(np.float32), "p_stated": stated.astype(np.float32),
                       "token_length": np.array([c["length"] for c in cells], dtype=np.int32),
                       "token_depth": np.full(len(cells), 3, dtype=np.int32),
                       "prompt_tokens": np.full(len(cells), 30, dtype=np.int32)})
    report = reduce_sweep("pub", results_dir=tmp_path, strict=True)
    out = report.parent
    pub = load_published()
    nd = pd.read_csv(out / "tables" / "papers_needle.csv")
    ref = nd[nd["source"] == "published"]
    assert len(ref) == len(pub["needle_coin"]) and ref["published_source"].str.contains("needle_pivot_table").all()
    llama = next(r for r in pub["needle_coin"] if r["model"] == "llama-3.1-8b")
    i, j = llama["lengths"].index(10), llama["depths"].index(0.5)
    assert ref.loc[ref["model"] == "llama-3.1-8b", "L=10, d=0.5"].iloc[0] == llama["tvd"][i][j]
    assert nd.loc[nd["source"] == "ours", "L=10, d=0.5"].iloc[0] == pytest.approx(0.1, abs=1e-6)
    ex = pd.read_csv(out / "tables" / "papers_explicit.csv")
    mine = ex[ex["source"] == "ours"].iloc[0]
    assert mine["θ=0.3"] == pytest.approx(0.1, abs=1e-6)
    assert set(ex.loc[ex["source"] == "published", "model"]) == {r["model"] for r in pub["explicit_coin_tvd"]}
    md = report.read_text()
    sec = md.split("## Against the papers", 1)[1]
    assert "published_source" in sec and "Sources of the published values" in sec
    assert "coin_flip_multiset averaged_stats.txt: biased_point tvd" in sec
    for f in ("papers_needle_tvd", "papers_explicit_tvd"):
        assert (out / "figures" / f"{f}.png").exists() and f"figures/{f}.png" in md
