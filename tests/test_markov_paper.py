"""Family F under protocol paper: the study's Markov metric, matrices and trajectories.

* the reducer's ``tvd_paper`` equals the notebook's aggregation (``analysis/explore_mdp.ipynb`` cell 4,
  re-implemented below in pandas) on a synthetic store;
* ``matrices: paper`` regenerates the ten committed ``configs/exps/mdp/non_uniform_mdp_{u}.yaml`` of
  the coin-flip study exactly (their numbers are held below, copied from those files);
* ``trajectories: paper`` equals ``mdp.py``'s draw loop (``np.random.seed(42)``, ``np.random.choice``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import synthetic_store

from bayesflip.config import load_experiment
from bayesflip.errors import ConfigError
from bayesflip.experiments import get_family
from bayesflip.experiments.markov import NAMED, paper_non_uniform_matrices, paper_trajectories
from bayesflip.reduce import reduce_sweep

MODEL = "synthetic-model"

# rcorona/llm-coin-flips @ cc05196, configs/exps/mdp/non_uniform_mdp_{u}.yaml, transition_matrix rows 1..4
# (non_uniform_mdp_0.0.yaml: every entry 0.25)
COMMITTED = {
    0.1: [[0.2410864818980377, 0.2555727754290495, 0.30278995950149806, 0.20055078317141475], [0.3155386794489297, 0.3163210613903409, 0.1700177976455271, 0.19812246151520244], [0.16062406158560133, 0.28575480522487673, 0.31755490015232285, 0.23606623303719926], [0.2224711503076852, 0.32181266763988464, 0.15650395851172927, 0.2992122235407008]],
    0.2: [[0.1562574070145061, 0.33510457896528434, 0.3047827373756494, 0.20385527664456007], [0.2946316345947294, 0.46455877350493296, 0.13837712381078696, 0.10243246808955056], [0.20312799019577277, 0.20662220071775692, 0.33680276407284615, 0.2534470450136242], [0.3872682943900931, 0.35169682153133747, 0.1131058238579892, 0.14792906022058033]],
    0.3: [[0.03669630106837091, 0.19791876367882036, 0.5074306339334607, 0.25795430131934816], [0.10132496421290525, 0.16750417110369875, 0.4379991985164507, 0.29317166616694534], [0.04425526664051888, 0.2589642265199948, 0.528876764614572, 0.16790374222491442], [0.23794374872836246, 0.23777720139869765, 0.2286718564593836, 0.2956071934135563]],
    0.4: [[0.0, 0.49273981836319136, 0.009633371491305418, 0.49762681014550325], [0.14164314515034876, 0.2747405794895988, 0.29821619084485396, 0.28540008451519855], [0.1951929999340151, 0.38952647442034927, 0.3320238476006197, 0.08325667804501602], [0.34784126064659365, 0.2091977428981394, 0.02967484697003753, 0.4132861494852294]],
    0.5: [[0.0, 0.3524938830169421, 0.3955469094296703, 0.25195920755338763], [0.12497818351793402, 0.2871654989406822, 0.2573173523086202, 0.33053896523276366], [0.45887439250786255, 0.0, 0.0, 0.5411256074921375], [0.0, 0.0, 0.0, 1.0]],
    0.6: [[0.09771146492954468, 0.13838745914877998, 0.3086261942805485, 0.4552748816411269], [0.0, 1.0, 0.0, 0.0], [0.934253584074276, 0.06574641592572399, 0.0, 0.0], [0.42662894865215817, 0.24312092344528605, 0.0, 0.3302501279025558]],
    0.7: [[0.6227259533621642, 0.0, 0.0, 0.3772740466378359], [0.0, 0.3508074563617888, 0.0, 0.6491925436382112], [0.5081471427397801, 0.049761196297812074, 0.04368866670757407, 0.3984029942548337], [0.0, 0.39925237356964627, 0.004825832330698749, 0.595921794099655]],
    0.8: [[0.3680561953862303, 0.08987037160791422, 0.3302424683155606, 0.211830964690295], [0.21067466347977903, 0.11801665280160499, 0.3486420642021116, 0.3226666195165044], [0.3342007873777453, 0.05764630440986974, 0.3548658354539686, 0.2532870727584163], [0.23494879022068138, 0.10176164881649927, 0.6632895609628194, 0.0]],
    0.9: [[0.0, 0.685870047535356, 0.0, 0.314129952464644], [0.40111738808485414, 0.13478304191730853, 0.15861350747849853, 0.3054860625193387], [0.2315949607049471, 0.25614725883304573, 0.0, 0.5122577804620073], [0.457170433904609, 0.5428295660953909, 0.0, 0.0]],
    1.0: [[0.0, 0.37880518196547946, 0.6211948180345205, 0.0], [0.0, 0.7641544172845948, 0.23584558271540523, 0.0], [0.0, 0.0, 0.23543496730339344, 0.7645650326966066], [0.2532523570135851, 0.5570967030512884, 0.0, 0.18965093993512638]],
}


# ---------------------------------------------------------------------------- matrices
def test_paper_matrices_equal_the_committed_ones():
    got = paper_non_uniform_matrices()
    assert sorted(got) == [round(0.1 * i, 1) for i in range(11)]
    assert np.array_equal(got[0.0], np.full((4, 4), 0.25))
    for u, rows in COMMITTED.items():
        assert np.array_equal(got[u], np.asarray(rows)), u          # bit for bit
    fam = get_family("markov")
    p = load_experiment("paper_markov", {"params": {}}).params
    assert p.matrices == "paper"
    cells = {c["matrix_name"]: c for c in fam.cells(p) if c["sample"] == 0}
    for u, rows in COMMITTED.items():
        assert np.array_equal(fam.matrix(p, cells[f"non_uniform_{u:.1f}"], 1234), np.asarray(rows))
    # the study's named matrices (configs/exps/mdp/simple_mdp.yaml)
    assert np.array_equal(fam.matrix(p, cells["simple_mdp"], 0), np.asarray(NAMED["simple_mdp"]))
    # bayesflip's own seeded draws remain available and differ
    ps = load_experiment("paper_markov", {"params": {"matrices": "seeded"}}).params
    assert not np.allclose(fam.matrix(ps, cells["non_uniform_0.3"], 1234), np.asarray(COMMITTED[0.3]))


def test_paper_matrices_refuse_other_u_and_state_counts(tiny):
    with pytest.raises(ConfigError, match=r"params\.non_uniformity.*0\.15.*allowed: 0\.0, 0\.1"):
        load_experiment("paper_markov", {"params": {"non_uniformity": [0.15]}})
    p = load_experiment("paper_markov", {"params": {"non_uniformity": [0.15], "matrices": "seeded"}}).params
    assert p.non_uniformity == [0.15]
    fam = get_family("markov")
    p3 = fam.Params(protocol="paper", named=[], non_uniformity=[0.3], states=["1", "2", "3"])
    with pytest.raises(ConfigError, match=r"params\.matrices"):
        fam.validate(p3, tiny.tokenizer, "std")


# ---------------------------------------------------------------------------- trajectories
def mdp_py_draws(rows, start: int, n_traj: int, length: int) -> np.ndarray:
    """mdp.py's create_mdp_dataset after np.random.seed(42), written out (states 1..4 → indices)."""
    transition_matrix = {i + 1: list(r) for i, r in enumerate(rows)}
    states = sorted(transition_matrix)
    np.random.seed(42)
    out = []
    for _ in range(n_traj):
        current_state = start
        trajectory = [start]
        for _ in range(length - 1):
            state = np.random.choice(states, p=transition_matrix[current_state])
            trajectory.append(int(state))
            current_state = state
        out.append(trajectory)
    return np.asarray(out) - 1


@pytest.mark.parametrize("name", ["simple_mdp", "non_uniform_0.6"])
def test_paper_trajectories_equal_mdp_py(name):
    fam = get_family("markov")
    p = load_experiment("paper_markov", {"params": {"trajectories": "paper", "n_steps": 40, "samples": 6,
                                                    "named": ["simple_mdp"], "non_uniformity": [0.6]}}).params
    cells = [c for c in fam.cells(p) if c["matrix_name"] == name]
    m = fam.matrix(p, cells[0], 0)
    want = mdp_py_draws(m, 1, 6, 40)
    assert np.array_equal(paper_trajectories(m, 0, 40, 6), want)
    for c in cells[::-1]:                  # any cell alone (any shard) gets its row of the one stream
        assert np.array_equal(fam.trajectory(p, c, 99)[2], want[c["sample"]])
    with pytest.raises(ConfigError, match=r"params\.trajectories.*init start"):
        load_experiment("markov", {"params": {"trajectories": "paper"}})


# ---------------------------------------------------------------------------- the study's metric
PAPER = {"protocol": "paper", "named": ["simple_mdp"], "non_uniformity": [0.3, 0.6], "n_steps": 25, "samples": 8}


def random_model_arrays(p, cells, seed):
    """Trajectories of the real family; the 'model' predicts a random distribution at every read
    (10% of the mass off the state tokens)."""
    fam = get_family("markov")
    trajs = [fam.trajectory(p, c, seed) for c in cells]
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(4), size=(len(cells), p.n_steps + 1))
    return {"logprobs": np.log(0.9 * probs).astype(np.float32), "states": np.stack([x for _, _, x in trajs]),
            "true_row": np.stack([np.vstack([i[None], m[x]]) for m, i, x in trajs]).astype(np.float32),
            "matrix": np.stack([m for m, _, _ in trajs]).astype(np.float32)}


def notebook_metric(lp: np.ndarray, states: np.ndarray, matrix: np.ndarray, names: list[str]) -> pd.DataFrame:
    """explore_mdp.ipynb cell 4 in pandas: the (state, transition) pairs of every trajectory
    (transition = the softmax over the four state logits after the state), grouped by (state, local
    index), transitions averaged, one TVD against the true row of the state, per matrix."""
    rows = []
    for c, name in enumerate(names):
        p = np.exp(lp[c].astype(np.float64))
        p = p / p.sum(axis=1, keepdims=True)
        for k, s in enumerate(states[c]):              # pair k: state x_k and the read after it
            rows.append({"matrix_name": name, "state": str(s + 1), "local_idx": k, **{f"p{j}": p[k + 1, j]
                                                                                     for j in range(4)}})
    df = pd.DataFrame(rows)
    mean = df.groupby(["matrix_name", "state", "local_idx"])[[f"p{j}" for j in range(4)]].mean().reset_index()
    true = {n: matrix[names.index(n)].astype(np.float64) for n in set(names)}     # true_transition
    rows_true = np.stack([true[n][int(s) - 1] for n, s in zip(mean["matrix_name"], mean["state"])])
    mean["tvd"] = 0.5 * np.abs(mean[[f"p{j}" for j in range(4)]].to_numpy(float) - rows_true).sum(axis=1)
    return mean


@pytest.fixture(scope="module")
def paper_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mdp")
    st, fam, p, cells = synthetic_store(root, "syn", "paper_markov", "markov", PAPER, 5, 3, MODEL)
    arrays = random_model_arrays(p, cells, 3)
    for s in range(st.n_shards):
        sl = st.shard_slice(s)
        st.write_shard(s, {k: v[sl] for k, v in arrays.items()})
    report = reduce_sweep("syn", results_dir=root, strict=True)
    return arrays, cells, report.parent / "tables"


def test_paper_metric_equals_the_notebook(paper_store):
    arrays, cells, t = paper_store
    got = pd.read_parquet(t / "markov_paper_curves.parquet")
    want = notebook_metric(arrays["logprobs"], arrays["states"], arrays["matrix"], [c["matrix_name"] for c in cells])
    want["position"] = want["local_idx"] + 1
    m = got.merge(want, on=["matrix_name", "state", "position"], how="outer", indicator=True)
    assert (m["_merge"] == "both").all() and len(m) == len(want) > 3 * 25
    assert np.abs(m["tvd_paper"] - m["tvd"]).max() <= 1e-9
    # averaging first is not the per-trajectory mean, except for groups of one trajectory
    one = m["n_traj"] == 1
    assert np.abs(m.loc[one, "tvd_paper"] - m.loc[one, "tvd_traj"]).max() <= 1e-9
    gap = m.loc[~one, "tvd_traj"] - m.loc[~one, "tvd_paper"]
    assert (gap >= -1e-12).all() and gap.mean() > 0.02                      # Jensen: TVD of the mean ≤ mean TVD
    # position 1 holds only the start state, with every trajectory
    first = m[m["position"] == 1]
    assert set(first["state"]) == {"1"} and (first["n_traj"] == 8).all()
    # summary: the mean over states per position, then over the window (N = 25 → positions 1..6, 20..25)
    summ = pd.read_csv(t / "markov_summary.csv").set_index("kind")
    for kind in ("simple_mdp", "non_uniform_0.3"):
        g = m[(m["matrix_name"] == kind) & m["position"].between(20, 25)]
        assert summ.loc[kind, "tvd_paper_late"] == pytest.approx(g.groupby("position")["tvd"].mean().mean(), abs=1e-9)
    pos = pd.read_csv(t / "markov_by_position.csv")
    row = pos[(pos["kind"] == "non_uniform_0.6") & (pos["position"] == 7)].iloc[0]
    assert row["tvd_paper"] == pytest.approx(m[(m["matrix_name"] == "non_uniform_0.6") & (m["position"] == 7)]["tvd"].mean(),
                                             abs=1e-9)
