"""reduce --out owns only what it writes (issue 19, item 2).

A user's files in ``tables/`` and ``figures/`` of the output dir survive any number of reduce
runs; an own output that a later run no longer writes (a family whose store went away) is removed,
because it is listed in the previous run's ``reduce_outputs.json``.
"""

from __future__ import annotations

import json
import shutil

import pytest

from bayesflip.errors import BayesflipError
from bayesflip.reduce import reduce_sweep
from bayesflip.store import store_path
from test_reduce import COIN, DIE, DIE_ALPHA, beta_learner, dirichlet_learner, make_icl_store


def _user_files(out):
    files = {"tables/mine.csv": "a,b\n1,2\n", "tables/notes.parquet": "not really parquet",
             "figures/my_plot.png": "png bytes", "figures/draft.pdf": "pdf bytes", "README.txt": "mine"}
    for rel, text in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    return files


def test_user_files_survive_and_stale_outputs_go(tmp_path):
    root = tmp_path / "results"
    make_icl_store(root, "syn", "icl_coin", COIN, beta_learner(2.0, 5.0))
    make_icl_store(root, "syn", "icl_die", DIE, dirichlet_learner(DIE_ALPHA))
    out = tmp_path / "mine"
    user = _user_files(out)

    reduce_sweep("syn", results_dir=root, out=out, strict=True)
    listed = json.loads((out / "reduce_outputs.json").read_text())["files"]
    assert "figures/icl_prior_die.png" in listed and "figures/icl_prior_die.pdf" in listed
    assert "tables/coverage.csv" in listed and "report.md" in listed and "summary.json" in listed
    assert not set(user) & set(listed)                       # nothing of the user's is listed as ours
    assert (out / "figures" / "icl_prior_die.png").is_file()

    shutil.rmtree(store_path("syn", "icl_die", "synthetic-model", root))   # the die family goes away
    reduce_sweep("syn", results_dir=root, out=out, strict=True)
    assert not (out / "figures" / "icl_prior_die.png").exists()           # stale own output removed
    assert not (out / "figures" / "icl_prior_die.pdf").exists()
    assert (out / "figures" / "icl_prior_coin.png").is_file()
    for rel, text in user.items():                                         # the user's files are untouched
        assert (out / rel).read_text() == text, rel
    listed2 = json.loads((out / "reduce_outputs.json").read_text())["files"]
    assert "figures/icl_prior_die.png" not in listed2 and "figures/icl_prior_coin.png" in listed2


def test_outputs_list_cannot_delete_outside_the_dir(tmp_path):
    root = tmp_path / "results"
    make_icl_store(root, "syn", "icl_coin", COIN, beta_learner(2.0, 5.0))
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.csv"
    victim.write_text("keep")
    (out / "reduce_outputs.json").write_text(json.dumps({"files": ["../victim.csv", str(victim)]}))
    reduce_sweep("syn", results_dir=root, out=out, strict=True)
    assert victim.read_text() == "keep"


def test_unreadable_outputs_list_is_one_error(tmp_path):
    root = tmp_path / "results"
    make_icl_store(root, "syn", "icl_coin", COIN, beta_learner(2.0, 5.0))
    out = tmp_path / "out"
    out.mkdir()
    (out / "reduce_outputs.json").write_text("{not json")
    with pytest.raises(BayesflipError, match="reduce_outputs.json: not a reduce output list"):
        reduce_sweep("syn", results_dir=root, out=out, strict=True)
