"""Bad configs fail before any model loads, naming the key and the allowed values."""

import pytest

from bayesflip.config import load_experiment, load_sweep
from bayesflip.errors import ConfigError


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"'colour': unknown key \(allowed: description, family, params, seed, shard_size\)"):
        load_experiment("icl_coin", {"colour": 1})


def test_unknown_param_key_lists_allowed():
    with pytest.raises(ConfigError, match=r"params\.n_flip'.*unknown key.*allowed:.*n_flips"):
        load_experiment("icl_coin", {"params": {"n_flip": 3}})


@pytest.mark.parametrize("override,key,allowed", [
    ({"params": {"thetas": [0.5, 1.5]}}, "params.thetas.1", "[0.0, 1.0]"),
    ({"params": {"n_flips": -3}}, "params.n_flips", "[1, 4000]"),
    ({"params": {"process": "dice"}}, "params.process", "'coin' or 'die'"),
    ({"params": {"faces": [7]}}, "params.faces.0", "[1, 6]"),
])
def test_bad_values_name_key_and_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as e:
        load_experiment("icl_coin", override)
    assert f"'{key}'" in str(e.value) and allowed in str(e.value)


def test_bad_seed_and_shard_size():
    with pytest.raises(ConfigError, match="'seed'"):
        load_experiment("icl_coin", {"seed": -1})
    with pytest.raises(ConfigError, match="'shard_size'"):
        load_experiment("icl_coin", {"shard_size": 0})


def test_unknown_experiment_and_family():
    with pytest.raises(ConfigError, match=r"unknown experiment or sweep 'nope'.*icl_coin"):
        load_sweep("nope")
    with pytest.raises(ConfigError, match=r"'family'.*allowed:.*icl"):
        load_experiment("icl_coin", {"family": "iclx"})


def test_same_seed_same_sequences():
    from bayesflip.experiments import get_family

    exp = load_experiment("icl_coin", {"params": {"n_flips": 50}})
    fam = get_family("icl")
    cells = fam.cells(exp.params)
    a = fam.sample_outcomes(exp.params, cells[55], exp.seed)
    b = fam.sample_outcomes(exp.params, cells[55], exp.seed)
    c = fam.sample_outcomes(exp.params, cells[55], exp.seed + 1)
    assert (a == b).all() and not (a == c).all()
    # outcomes follow θ: θ=0 → all tails (index 1), θ=1 → all heads (index 0)
    assert (fam.sample_outcomes(exp.params, cells[0], exp.seed) == 1).all()
    assert (fam.sample_outcomes(exp.params, cells[-1], exp.seed) == 0).all()
