"""Families F (Markov chains) and G (attention mass): sampling, one-pass curves, attention sums."""

import numpy as np
import pytest
import torch

from bayesflip.config import load_experiment
from bayesflip.engine import Scorer
from bayesflip.errors import ConfigError
from bayesflip.experiments import get_family
from bayesflip.experiments.base import RunContext
from bayesflip.experiments.markov import sample_trajectory, stationary, transition_matrix, true_rows
from conftest import plain_choice_logprob

TOL = 1e-4


def _ctx(lm, kind=None, seed=7):
    return RunContext(scorer=Scorer(lm), model_kind=kind or lm.spec.kind, model_name=lm.spec.name, seed=seed)


def _attn_impl(lm):
    m = getattr(lm.model, "module", lm.model)
    return m.config._attn_implementation


# ---------------------------------------------------------------- pure: Markov sampling
@pytest.mark.parametrize("kind", ["uniform", "sticky", "random"])
def test_markov_trajectories_follow_their_matrix(kind):
    m = transition_matrix(kind, 4, sticky_prob=0.7, alpha=1.0, seed=3)
    assert np.allclose(m.sum(1), 1.0) and (m >= 0).all()
    if kind == "sticky":
        assert np.allclose(np.diag(m), 0.7) and np.allclose(m[0, 1:], 0.1)
    pi = stationary(m)
    assert np.allclose(pi @ m, pi, atol=1e-10) and abs(pi.sum() - 1) < 1e-12
    x = sample_trajectory(m, pi, 40000, np.random.default_rng(0))
    counts = np.zeros((4, 4))
    np.add.at(counts, (x[:-1], x[1:]), 1)
    emp = counts / counts.sum(1, keepdims=True)
    assert np.abs(emp - m).max() < 0.025, (emp, m)          # ≥ ~4000 transitions per row: SE ≤ 0.008
    assert np.abs(np.bincount(x, minlength=4) / len(x) - pi).max() < 0.02
    rows = true_rows(m, pi, x[:5])
    assert np.allclose(rows[0], pi) and np.allclose(rows[1:], m[x[:5]])


def test_markov_cells_and_matrices_are_deterministic():
    exp = load_experiment("markov", {"params": {"samples": 2, "random_matrices": 2, "n_steps": 10}})
    fam = get_family("markov")
    cells = fam.cells(exp.params)
    assert [c["kind"] for c in cells] == ["uniform"] * 2 + ["sticky"] * 2 + ["random"] * 4
    r = [c for c in cells if c["kind"] == "random"]
    m00, m01, m10 = (fam.matrix(exp.params, c, 5) for c in r[:3])
    assert np.array_equal(m00, m01) and not np.allclose(m00, m10)  # samples share their matrix index
    a, b = fam.trajectory(exp.params, r[0], 5)[2], fam.trajectory(exp.params, r[1], 5)[2]
    assert np.array_equal(a, fam.trajectory(exp.params, r[0], 5)[2]) and not np.array_equal(a, b)
    # the identity chain (sticky_prob = 1) has no unique stationary law: the documented choice is uniform
    assert np.allclose(stationary(transition_matrix("sticky", 4, 1.0)), 0.25)


@pytest.mark.parametrize("override, key, allowed", [
    ({"kinds": ["uniform", "zigzag"]}, "params.kinds.1", "'uniform', 'sticky' or 'random'"),
    ({"sticky_prob": 1.3}, "params.sticky_prob", "[0, 1]"),
    ({"sticky_prob": -0.2}, "params.sticky_prob", "[0, 1]"),
    ({"init": "first"}, "params.init", "'stationary', 'uniform' or 'start'"),
])
def test_markov_bad_config_names_key_and_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as ei:
        load_experiment("markov", {"params": override})
    assert f"'{key}'" in str(ei.value) and allowed in str(ei.value)


def test_attention_bad_config_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"params\.key_groups\.0.*'outcomes', 'by_choice'"):
        load_experiment("attention_coin", {"params": {"key_groups": ["keys"]}})
    exp = load_experiment("attention_coin", {"params": {"layer_sets": {"rev": [0.8, 0.2]}}})
    with pytest.raises(ConfigError, match=r"params\.layer_sets\.rev.*0 <= lo < hi <= 1"):
        get_family("attention").validate(exp.params, None, "std")
    with pytest.raises(ConfigError, match=r"params\.layer_sets\.thin.*no layer of a 30-layer"):
        get_family("attention").resolve_layers(
            load_experiment("attention_coin", {"params": {"layer_sets": {"thin": [0.51, 0.52]}}}).params, 30)


# ---------------------------------------------------------------- real model
@pytest.mark.integration
@pytest.mark.parametrize("variant", ["instruct", "base"])
def test_markov_curve_equals_per_prefix_prompts(smol, variant):
    exp = load_experiment("markov", {"params": {"kinds": ["random"], "random_matrices": 1, "samples": 1,
                                                "n_steps": 8, "variant": variant}})
    fam = get_family("markov")
    p = exp.params
    fam.validate(p, smol.tokenizer, smol.spec.kind)
    cells = fam.cells(p)
    out = fam.run(p, cells, _ctx(smol))
    assert out["logprobs"].shape == (1, 9, 4) and out["matrix"].shape == (1, 4, 4)
    m, init, x = fam.trajectory(p, cells[0], 7)
    assert np.array_equal(out["states"][0], x) and np.allclose(out["matrix"][0], m, atol=1e-7)
    assert np.allclose(out["true_row"][0], true_rows(m, init, x), atol=1e-7)
    head = fam.head(p, smol.spec.kind)
    assert head.is_chat == (variant == "instruct")
    for i in ([0, 8] if variant == "instruct" else [5]):
        text = head.text + "".join(p.states[o] + p.separator for o in x[:i])  # base prompt / chat prefill
        ks = sorted({int(x[i]) if i < len(x) else 0, 3})                      # the true next state and ' D'
        ref = [plain_choice_logprob(smol, text, p.states[k], chat_messages=head.messages) for k in ks]
        assert np.abs(out["logprobs"][0, i, ks] - ref).max() <= TOL, (i, out["logprobs"][0, i], ref)


@pytest.mark.integration
def test_attention_mass_matches_plain_eager_and_restores_impl(smol):
    sc = Scorer(smol)
    before = _attn_impl(smol)
    ids = smol.tokenizer("I tossed a coin and it landed on heads, then tails, then").input_ids
    T = len(ids)
    groups = {"all": range(T), "first": [0], "upto5": range(6), "future": range(6, T), "empty": []}
    res = sc.attention_mass(ids, [T - 1, 5], groups, layers=[2, 17])
    assert _attn_impl(smol) == before
    assert np.abs(res["all"] - 1).max() < TOL and np.abs(res["upto5"][1] - 1) < TOL
    assert res["future"][1] == 0.0 and np.all(res["empty"] == 0.0)
    # reference: a plain eager forward with output_attentions (no engine code)
    m = getattr(smol.model, "module", smol.model)
    m.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = m(torch.tensor([ids]), output_attentions=True).attentions
    finally:
        m.set_attn_implementation(before)
    ref = np.mean([att[layer][0, :, T - 1, 0].float().mean().item() for layer in (2, 17)])
    assert abs(res["first"][0] - ref) < 1e-5
    # the paper's metric (get_attention_weight_icl.py): max over heads, then max over layers, per key
    st = sc.attention_stats(ids, [T - 1, 5], groups, layers=[2, 17])
    assert all(np.array_equal(st["mean"][k], res[k]) for k in groups)
    per_key = torch.stack([att[layer][0, :, T - 1, :].float().amax(0) for layer in (2, 17)]).amax(0)  # (T,)
    assert abs(st["max"]["first"][0] - per_key[0].item()) < 1e-6
    assert abs(st["max"]["upto5"][0] - per_key[:6].sum().item()) < 1e-5
    assert st["max"]["future"][1] == 0.0 and (st["max"]["all"] >= st["mean"]["all"] - 1e-6).all()
    with pytest.raises(IndexError):                      # an error inside still restores the implementation
        sc.attention_mass(ids, [T - 1], {"all": range(T)}, layers=[999])
    assert _attn_impl(smol) == before


@pytest.mark.integration
def test_attention_family_masses_and_logprobs(smol):
    n = 6
    fam = get_family("attention")
    # built directly: a sweep override of layer_sets would be deep-merged into the YAML's four sets
    p = fam.Params(thetas=[0.5], samples=1, n_flips=n, recent_k=2,
                   key_groups=["outcomes", "by_choice", "recent", "prompt", "separators", "all"],
                   layer_sets={"all": (0.0, 1.0), "late": (0.5, 1.0)})
    fam.validate(p, smol.tokenizer, smol.spec.kind)
    cells = fam.cells(p)
    ctx = _ctx(smol, seed=1001)
    before = _attn_impl(smol)
    out = fam.run(p, cells, ctx)
    assert _attn_impl(smol) == before
    g = {name: i for i, name in enumerate(fam.coords(p)["group"])}
    assert list(g) == ["outcomes", "heads_outcomes", "tails_outcomes", "recent_2", "prompt", "separators", "all"]
    mass, per = out["mass"][0].astype(np.float64), out["mass_outcome"][0].astype(np.float64)
    assert mass.shape == (2, n + 1, 7) and per.shape == (2, n + 1, n)
    assert (mass >= 0).all() and (mass <= 1 + 1e-6).all() and (per >= 0).all()
    assert np.abs(mass[..., g["all"]] - 1).max() < TOL                       # all keys ≤ query: sums to 1
    parts = mass[..., g["prompt"]] + mass[..., g["outcomes"]] + mass[..., g["separators"]]
    assert np.abs(parts - 1).max() < TOL
    assert np.abs(mass[..., g["heads_outcomes"]] + mass[..., g["tails_outcomes"]] - mass[..., g["outcomes"]]).max() < 1e-5
    assert np.abs(per.sum(-1) - mass[..., g["outcomes"]]).max() < 1e-5
    amax, amax_o = out["attn_max"][0].astype(np.float64), out["attn_max_outcome"][0].astype(np.float64)
    assert amax.shape == mass.shape and amax_o.shape == per.shape
    assert (amax >= mass - 1e-6).all() and np.abs(amax_o.sum(-1) - amax[..., g["outcomes"]]).max() < 1e-5
    future = np.arange(n)[None, :] >= np.arange(n + 1)[:, None]               # outcome j ≥ read i
    assert np.all(per[:, future] == 0) and per[:, ~future].min() > 0           # causal mask: exactly 0
    for i in range(n + 1):
        assert np.allclose(mass[:, i, g["recent_2"]], per[:, i, max(0, i - 2):i].sum(-1), atol=1e-6)
    assert mass[0, 0, g["prompt"]] == pytest.approx(1.0, abs=TOL)             # read 0 sees only the prompt
    assert out["layer_range"][0].tolist() == [[0, 30], [15, 30]]
    # the choice log-probs are icl's at the same positions (same seed -> same sequence)
    icl = get_family("icl")
    ref = icl.run(p, cells, ctx)
    assert np.array_equal(out["outcomes"], ref["outcomes"])
    assert np.abs(out["logprobs"] - ref["logprobs"]).max() < 1e-5
    assert np.allclose(out["p_true"], 0.5)


def _eager_per_key_max(lm, ids):
    """get_attention_weight_icl.py's numbers, with no engine code: the attentions of the prompt's forward
    (its generate(max_new_tokens=1) step), max over heads, then over layers, at the last query: (T,)."""
    m = getattr(lm.model, "module", lm.model)
    before = m.config._attn_implementation
    m.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = m(torch.tensor([ids]), output_attentions=True).attentions
    finally:
        m.set_attn_implementation(before)
    return torch.stack([a[0, :, -1, :].float().amax(0) for a in att]).amax(0).numpy()


@pytest.mark.integration
def test_attention_paper_reads_the_original_raw_prompt(smol):
    """paper on an instruct model: raw text (no chat template), each read = the prefix + two spaces
    (the original's f"{input_prompt[0]} " of a prompt ending "then "), last token 'ĠĠ'; attn_max equals
    the per-token max over heads then layers of a plain forward of tokenizer.encode(that text)."""
    tok = smol.tokenizer
    fam = get_family("attention")
    p = load_experiment("paper_attention_coin", {"params": {"thetas": [0.3], "n_flips": 5}}).params
    assert p.variant == "base" and p.read_suffix == "  " and p.layer_sets == {"all": (0.0, 1.0)}
    fam.validate(p, tok, "instruct")
    cells = fam.cells(p)
    assert len(cells) == 1
    ctx = _ctx(smol, seed=1101)
    o = fam.sample_outcomes(p, cells[0], ctx.seed)
    words = [("heads", "tails")[k] for k in o]

    def original(n):  # the study's prompt for n flips: query + "heads, then tails, then " ... + " "
        return p.queries[0] + "".join(f"{w}, then " for w in words[:n]) + " "

    listed = [r for r in fam.render(p, cells, tok, "instruct", ctx.seed) if r.cell["read"] == "attention"]
    assert [r.cell["n"] for r in listed] == [0, 1, 3, 5]
    for r in listed:
        assert r.text == original(r.cell["n"]) and r.text.endswith("  ") and "<|im_start|>" not in r.text
        assert tok.convert_ids_to_tokens(tok.encode(r.text))[-1] == "\u0120\u0120"       # 'ĠĠ'
        assert r.choices is None
    out = fam.run(p, cells, ctx)
    g = {name: i for i, name in enumerate(fam.coords(p)["group"])}
    amax, amax_o = out["attn_max"][0, 0].astype(np.float64), out["attn_max_outcome"][0, 0].astype(np.float64)
    for n in (0, 3, 5):
        ids = tok.encode(original(n))
        per_key = _eager_per_key_max(smol, ids)
        toks = tok.convert_ids_to_tokens(ids)
        outcome = [i for i, t in enumerate(toks) if t in ("\u0120heads", "\u0120tails")]
        assert len(outcome) == n
        assert amax[n, g["outcomes"]] == pytest.approx(per_key[outcome].sum(), abs=1e-5)
        assert amax[n, g["prompt"]] == pytest.approx(per_key[:8].sum(), abs=1e-5)        # "I tossed … landed on"
        assert amax[n, g["separators"]] == pytest.approx(per_key.sum() - per_key[:8].sum() - per_key[outcome].sum(),
                                                         abs=1e-5)                        # ", then" … + 'ĠĠ'
        for j, i in enumerate(outcome):
            assert amax_o[n, j] == pytest.approx(per_key[i], abs=1e-5)
    # the choice log-probs stay the ICL read at the separator (no suffix)
    assert np.abs(out["logprobs"] - get_family("icl").run(p, cells, ctx)["logprobs"]).max() < 1e-5
    # the chat rendering stays available explicitly
    pc = load_experiment("paper_attention_coin", {"params": {"variant": "instruct", "n_flips": 5}}).params
    r = fam.render(pc, fam.cells(pc)[:1], tok, "instruct", 0)[0]
    assert r.text.startswith("<|im_start|>") and r.text.endswith("landed on  ")


def test_attention_read_suffix_must_tokenize_apart(tiny):
    fam = get_family("attention")
    p = load_experiment("paper_attention_coin", {"params": {"read_suffix": "ly"}}).params   # "on" + "ly" merges
    with pytest.raises(ConfigError, match=r"params\.read_suffix"):
        fam.validate(p, tiny.tokenizer, "std")


def test_markov_clean_render_is_the_scored_sequence(tiny):
    from bayesflip.experiments.seq import build_curve
    from bayesflip.prompts import encode_text

    fam = get_family("markov")
    p = fam.Params(kinds=["sticky"], samples=1, n_steps=5)
    cells = fam.cells(p)
    assert cells == [{"kind": "sticky", "matrix_name": "sticky", "sample": 0}]
    r = fam.render(p, cells, tiny.tokenizer, "std", 4)[0]
    x = fam.trajectory(p, cells[0], 4)[2]
    assert r.text == "Here is a sequence of states visited by a Markov chain over the states A, B, C and D:" + "".join(
        p.states[s] + "," for s in x)
    assert encode_text(tiny.tokenizer, r.text) == build_curve(tiny.tokenizer, fam.head(p, "std"), p.states, x, ",").ids
