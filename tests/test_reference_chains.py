"""Tests for bayesflip.reference_chains (exact iterated-learning reference chains)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from bayesflip import reference_chains as rc

N = 10
KS = np.arange(N + 1)


@pytest.mark.parametrize(
    "learner,tau", [("sampler", None), ("pm", None), ("map", None), ("tempered", 0.5), ("greedy", None)]
)
def test_rows_sum_to_one(learner: str, tau: float | None) -> None:
    for alpha, beta in [(1.0, 1.0), (2.0, 1.0), (0.3, 0.7)]:
        T = rc.transition_matrix(learner, alpha, beta, N, tau=tau)
        assert T.shape == (N + 1, N + 1)
        assert np.all(T >= 0)
        np.testing.assert_allclose(T.sum(axis=1), 1.0, atol=1e-12)


def test_transition_rows_closed_form() -> None:
    k = 3
    T = rc.transition_matrix("sampler", 2.0, 1.0, N)
    np.testing.assert_allclose(T[k], stats.betabinom.pmf(KS, N, 2.0 + k, 1.0 + N - k))
    T = rc.transition_matrix("pm", 2.0, 1.0, N)
    np.testing.assert_allclose(T[k], stats.binom.pmf(KS, N, (2.0 + k) / 13.0))
    T = rc.transition_matrix("map", 2.0, 1.0, N)
    np.testing.assert_allclose(T[k], stats.binom.pmf(KS, N, (2.0 + k - 1) / (13.0 - 2)))
    p = 5.0 / 13.0
    pt = p**2 / (p**2 + (1 - p) ** 2)
    T = rc.transition_matrix("tempered", 2.0, 1.0, N, tau=0.5)
    np.testing.assert_allclose(T[k], stats.binom.pmf(KS, N, pt))
    # tau = 1 is the posterior-mean learner
    np.testing.assert_allclose(
        rc.transition_matrix("tempered", 2.0, 1.0, N, tau=1.0), rc.transition_matrix("pm", 2.0, 1.0, N), atol=1e-12
    )


def test_map_and_greedy_edge_rules() -> None:
    # a = alpha + k, b = beta + n - k
    p = rc.learner_probability("map", 0.5, 0.5, 1, [0, 1])  # (a,b) = (0.5,1.5) -> 0 ; (1.5,0.5) -> 1
    np.testing.assert_allclose(p, [0.0, 1.0])
    p = rc.learner_probability("map", 1.0, 1.0, 2, [1])  # Beta(2,2) interior mode 1/2
    np.testing.assert_allclose(p, [0.5])
    p = rc.learner_probability("map", 0.5, 0.5, 1, [0.0])  # sanity with float k
    assert p[0] == 0.0
    p = rc.learner_probability("map", 0.2, 0.3, 1, [0])  # (0.2, 1.3): a<1<b -> 0
    assert p[0] == 0.0
    g = rc.learner_probability("greedy", 1.0, 1.0, 4, [0, 2, 3])
    np.testing.assert_allclose(g, [0.0, 0.5, 1.0])


def test_sampler_stationary_is_prior_predictive() -> None:
    for alpha, beta in [(2.0, 1.0), (0.5, 0.5), (3.0, 7.0)]:
        chain = rc.run_reference_chain("sampler", alpha, beta, N, 5, 0)
        assert chain.stationary_kind == "unique"
        np.testing.assert_allclose(chain.stationary, stats.betabinom.pmf(KS, N, alpha, beta), atol=1e-8)
        assert chain.stationary_mean == pytest.approx(alpha / (alpha + beta), abs=1e-10)


def test_map_collapses_to_prior_mode() -> None:
    chain = rc.run_reference_chain("map", 2.0, 1.0, N, 200, 0)
    want = np.zeros(N + 1)
    want[N] = 1.0
    np.testing.assert_allclose(chain.stationary, want, atol=1e-12)
    assert chain.stationary_mean == pytest.approx(1.0)
    assert chain.mean[-1] == pytest.approx(1.0, abs=1e-6)
    # symmetric case: two absorbing states, limit depends on the start
    lo = rc.run_reference_chain("greedy", 1.0, 1.0, 3, 10, 1)
    assert lo.stationary_kind == "limit_from_init"
    assert lo.stationary[0] == pytest.approx(1.0)
    mid = rc.run_reference_chain("greedy", 1.0, 1.0, 4, 10, 2)
    np.testing.assert_allclose(mid.stationary[[0, 4]], [0.5, 0.5])


def test_reference_chain_basic_fields() -> None:
    chain = rc.run_reference_chain("pm", 2.0, 1.0, N, 30, 3)
    assert chain.dist.shape == (31, N + 1)
    assert chain.mean[0] == pytest.approx(0.3)
    assert chain.entropy[0] == 0.0
    np.testing.assert_allclose(chain.dist.sum(axis=1), 1.0)
    # iterating long enough reaches the stationary distribution
    long = rc.run_reference_chain("pm", 2.0, 1.0, N, 2000, 3)
    np.testing.assert_allclose(long.dist[-1], chain.stationary, atol=1e-8)


def test_filter_restricts_and_errors() -> None:
    mask = KS >= N // 2
    T = rc.transition_matrix("pm", 1.0, 1.0, N, accept=mask)
    assert np.all(T[:, ~mask] == 0)
    np.testing.assert_allclose(T.sum(axis=1), 1.0)
    T2 = rc.transition_matrix("pm", 1.0, 1.0, N, accept=lambda k: k >= N // 2)
    np.testing.assert_allclose(T, T2)
    # element-wise predicate fallback
    T3 = rc.transition_matrix("pm", 1.0, 1.0, N, accept=lambda k: bool(k >= N // 2) and True)
    np.testing.assert_allclose(T, T3)
    # greedy from k=0 produces 0 heads with certainty -> filter can never pass
    with pytest.raises(ValueError, match="zero acceptance"):
        rc.transition_matrix("greedy", 1.0, 2.0, N, accept=mask)


@pytest.mark.parametrize(
    "learner,alpha,beta,tau,accept",
    [
        ("sampler", 2.0, 1.0, None, None),
        ("pm", 1.0, 3.0, None, None),
        ("map", 2.0, 1.5, None, None),
        ("tempered", 1.0, 1.0, 0.5, None),
        ("sampler", 1.0, 2.0, None, KS >= N // 2),
        ("pm", 1.0, 1.0, None, KS >= N // 2),
    ],
)
def test_reference_matches_monte_carlo(learner, alpha, beta, tau, accept) -> None:
    G, chains = 20, 20000
    ref = rc.run_reference_chain(learner, alpha, beta, N, G, 2, tau=tau, accept=accept)
    counts = rc.simulate_chain_mc(learner, alpha, beta, N, G, 2, chains, seed=123, tau=tau, accept=accept)
    assert counts.shape == (chains, G + 1)
    assert np.all(counts[:, 0] == 2)
    if accept is not None:
        assert np.all(accept[counts[:, 1:]])
    props = counts / N
    var = ref.dist @ (KS / N) ** 2 - ref.mean**2
    se = np.sqrt(np.maximum(var, 0) / chains)
    diff = np.abs(props.mean(axis=0) - ref.mean)
    assert np.all(diff <= np.maximum(5 * se, 1e-12)), (diff / np.maximum(se, 1e-12)).max()
    assert diff.max() < 0.01
    # full distribution at the last generation
    emp = np.bincount(counts[:, -1], minlength=N + 1) / chains
    assert 0.5 * np.abs(emp - ref.dist[-1]).sum() < 0.02


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="allowed values: sampler, pm, map, tempered, greedy"):
        rc.transition_matrix("bogus", 1.0, 1.0, N)
    with pytest.raises(ValueError, match="tau"):
        rc.transition_matrix("tempered", 1.0, 1.0, N)
    with pytest.raises(ValueError, match="alpha"):
        rc.transition_matrix("pm", 0.0, 1.0, N)
    with pytest.raises(ValueError, match="n must"):
        rc.transition_matrix("pm", 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="init_heads"):
        rc.run_reference_chain("pm", 1.0, 1.0, N, 3, N + 1)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--learner", "sampler", "--alpha", "2", "--beta", "1", "--n", "10", "--generations", "50",
            "--init-heads", "3", "--json"]
    assert rc.main(argv) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1
    obj = json.loads(lines[0])
    for key in ("mean", "entropy", "stationary_mean", "stationary", "learner", "alpha", "beta", "n", "generations"):
        assert key in obj
    assert obj["learner"] == "sampler" and obj["n"] == 10 and obj["generations"] == 50
    assert len(obj["mean"]) == 51 and len(obj["entropy"]) == 51 and len(obj["stationary"]) == 11
    assert obj["mean"][0] == pytest.approx(3 / 10)
    assert obj["stationary_mean"] == pytest.approx(2 / 3)


def test_cli_filter_and_tempered(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--learner", "tempered", "--tau", "0.5", "--n", "10", "--generations", "5", "--min-heads", "5", "--json"]
    assert rc.main(argv) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["mean"][0] == 0.0
    assert min(obj["mean"][1:]) >= 0.5
    assert sum(obj["stationary"][:5]) == pytest.approx(0.0, abs=1e-15)


def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert rc.main(["--learner", "pm", "--n", "4", "--generations", "3"]) == 0
    out = capsys.readouterr().out
    assert "gen" in out and "stationary" in out


def test_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert rc.main(["--learner", "bogus", "--n", "10", "--generations", "5"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "sampler" in err and "greedy" in err
    assert rc.main(["--learner", "tempered", "--n", "10", "--generations", "5"]) == 2
    assert "tau > 0" in capsys.readouterr().err
    assert rc.main(["--learner", "pm", "--alpha", "-1", "--n", "10", "--generations", "5"]) == 2
    assert "alpha must be" in capsys.readouterr().err
    assert rc.main(["--learner", "pm", "--n", "10", "--generations", "5", "--min-heads", "11"]) == 2
    assert "--min-heads" in capsys.readouterr().err
