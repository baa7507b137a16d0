"""The iterated-learning study's paper protocol (Ren et al.): rule game and acronym chains, and the
generational base every chain family runs on."""

import numpy as np
import pytest

from bayesflip.config import load_experiment
from bayesflip.engine import Scorer
from bayesflip.errors import ConfigError
from bayesflip.experiments import get_family
from bayesflip.experiments import acronym_paper as AP
from bayesflip.experiments import rules_paper as RP
from bayesflip.experiments.base import ArraySpec, Params, RunContext
from bayesflip.experiments.checkpoint import INTERRUPT_ENV, ChainInterrupted
from bayesflip.experiments.generational import GenerationalFamily
from bayesflip.experiments.rules import feasible_rules, hypotheses, output_table, subsets
from bayesflip.experiments.rules_run import paper_rule_prompt, rounds
from bayesflip.prompts import encode_prompt, render
from conftest import plain_choice_logprob

# ---------------------------------------------------------------------------- the templates, literally
GAME_STRONG = ('Let us play a rule following game. You need to generate a rule that maps the following inputs to '
               'their corresponding outputs, or generate examples following a given rule. Each example is an '
               'input-output pair. The input is a list of objects. If any objects with status on in the input, the '
               'output should be on. If all objects in the input are off, the output is off. If only objects with '
               'off and und in the list, the output should be undetermined (und for short). The output is either '
               '"on", "off", or "und", indicating the state of the light. For each object, determine whether it '
               'triggers the light to turn on, does not trigger it, or if it is undetermined. We only have 5 objects '
               "in this game: ['A', 'B', 'C', 'D', 'screen']. Turn off the screen after the experiment.\n")
FORMAT_WEAK_END = ('Rule: {"object 1": <"on"/"off"/"und">, "object 2": <"on"/"off"/"und">, ...}\n'
                   'John will close the screen after the experiment.')


def hd_text(data: str, fmt: str) -> str:
    return ("You now have more examples, generate a rule that maps the all the inputs (including those in previous "
            "rounds) to their corresponding outputs.\n\n" + data + "Please format your rule in the following format.\n"
            + fmt + '\nWe only have five objects, they are ["A", "B", "C", "D", "screen"].\n'
            "Please ONLY return the rule!\nPlease ONLY return the rule!\nPlease ONLY return the rule!\n")


def test_rule_game_templates_char_for_char():
    assert RP.game_prompt(RP.BIAS_SENTENCES["strong"]) == GAME_STRONG
    assert RP.game_prompt("").endswith("['A', 'B', 'C', 'D', 'screen']. \n")
    assert RP.rule_format(RP.BIAS_SENTENCES["weak"]) == FORMAT_WEAK_END
    assert RP.rule_format("") == 'Rule: {"object 1": <"on"/"off"/"und">, "object 2": <"on"/"off"/"und">, ...}'
    assert RP.bias_parts(RP.BIAS_SENTENCES, "medium", "end") == ("", "John will turn off the screen after the "
                                                                      "experiment.")
    data = "Input: A, B\nOutput: on\nInput: screen\nOutput: off\n"
    assert RP.hd_prompt(data, FORMAT_WEAK_END) == hd_text(data, FORMAT_WEAK_END)
    h = ("on", "off", "und", "off", "on")
    assert RP.rule_repr(h, False) == "{'A': 'on', 'B': 'off', 'C': 'und', 'D': 'off', 'screen': 'on'}"
    assert RP.rule_json(h) == '{"A": "on", "B": "off", "C": "und", "D": "off", "screen": "on"}'
    assert RP.dh_prompt(4, RP.rule_repr(h, False)) == (
        "The rule you provided is {'A': 'on', 'B': 'off', 'C': 'und', 'D': 'off', 'screen': 'on'}. Based on this "
        "rule, can you give 4 more examples? Remember the input is a list of objects. If any objects with status on "
        "in the input, the output should be on. If all objects in the input are off, the output is off. If only "
        "objects with off and und in the list, the output should be undetermined (und for short). Please ONLY "
        "return the input-output pairs strictly following this format:\n\nInput: obj1, obj2, ...\nOutput: "
        "on/off/und\n\nInput: obj1, obj2, ...\nOutput: on/off/und\n")
    assert RP.search_prompt(h, data, FORMAT_WEAK_END) == (
        "The rule you give is {'A': 'on', 'B': 'off', 'C': 'und', 'D': 'off', 'screen': 'on'}. Please verify "
        "whether it can explain the following examples. If not, refine your rule to make sure it applies to all "
        "the examples. If yes, return the correct rule.\n\n" + data + '\nWe only have five objects, they are ["A", '
        '"B", "C", "D", "screen"].\nPlease ONLY return a JSON following this format:\n-reason: str, how you refine '
        'your rule\n-Rule: str, in the format {"object 1": <"on"/"off"/"und">, "object 2": <"on"/"off"/"und">, ...}'
        "\nJohn will close the screen after the experiment.")
    subs = subsets(RP.OBJECTS)
    k = hypotheses().index(h)
    ins = [subs.index(("A", "B")), subs.index(("screen",))]
    fb, need = RP.refine_prompt(h, subs, ins, [0, 1], output_table()[k], FORMAT_WEAK_END)
    assert need and fb == (
        "The rule you give is {'A': 'on', 'B': 'off', 'C': 'und', 'D': 'off', 'screen': 'on'}. Applying it to the "
        "following inputs does not produce the expected outputs.\n\nInput: screen\nPredict output: on\nGround truth "
        "output: off\n\nPlease refine your rule based on the above feedback to make sure it applies to all the "
        "examples.\nPlease format your rule in the following format.\n" + FORMAT_WEAK_END + "\nPlease only return "
        "the rule without any explanations.")
    ok, need = RP.refine_prompt(h, subs, ins[:1], [0], output_table()[k], FORMAT_WEAK_END)
    assert not need and ok.endswith(", which fits all examples, well done!")


def test_rule_examples_parse_robustly():
    subs = subsets(RP.OBJECTS)
    text = ("Sure! Here are 4 examples:\n\nInput: A, C\nOutput: on\n\n**Input:** [\"screen\"]\n**Output:** off\n"
            "Input: B, Z\nOutput: on\nInput: D, d\nOutput: und\nInput: screen, B\nOutput: maybe\nInput: C\n")
    ex, bad = RP.parse_examples(text, subs)
    assert ex == [(subs.index(("A", "C")), 0), (subs.index(("screen",)), 1)]
    assert bad == 4          # unknown object Z, repeated D, output 'maybe', and an Input with no Output


# ---------------------------------------------------------------------------- rendering
PAPER_RULES = dict(protocol="paper", biases=["strong"], positions=["start"], interactions=["none"], h_indices=[33],
                   temperatures=[1.0], d0_seeds=[42], chains=1, generations=1, look_back=0, max_new_tokens=40,
                   max_redraws=1)


def _expected_rule_text(p, cell, lm, seed):
    from bayesflip.experiments.rules import paper_d0

    ins, outs = paper_d0(p, cell, seed)
    data = "".join(f"Input: {', '.join(subsets(RP.OBJECTS)[i])}\nOutput: {RP.VALUES[o]}\n" for i, o in zip(ins, outs))
    user = hd_text(data, 'Rule: {"object 1": <"on"/"off"/"und">, "object 2": <"on"/"off"/"und">, ...}')
    if lm.spec.kind == "instruct":
        return lm.tokenizer.apply_chat_template([{"role": "system", "content": GAME_STRONG},
                                                 {"role": "user", "content": user}], tokenize=False,
                                                add_generation_prompt=True) + "Rule:"
    return GAME_STRONG + "\n" + user + "\n\n" + "Rule:"


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_paper_rule_prompt_renders_exactly(which, request):
    lm = request.getfixturevalue(which)
    fam = get_family("rules")
    p = fam.Params(**PAPER_RULES)
    c = fam.cells(p)[0]
    r = fam.render(p, [c], lm.tokenizer, lm.spec.kind, 5)[0]
    assert r.text == _expected_rule_text(p, c, lm, 5)
    assert len(r.choices) == 243 and r.choices[0] == ' {"A": "on", "B": "on", "C": "on", "D": "on", "screen": "on"}'
    fam.validate(p, lm.tokenizer, lm.spec.kind)


def test_paper_d0_is_consistent_with_h_star_and_h_bar():
    fam = get_family("rules")
    p = fam.Params(**{**PAPER_RULES, "h_indices": [0, 33, 132], "d0_seeds": [1, 2], "d0_size": 8})
    from bayesflip.experiments.rules import paper_d0

    for c in fam.cells(p):
        h = feasible_rules()[c["h_index"]]
        bar = hypotheses().index(hypotheses()[h][:4] + ("off",))
        ins, outs = paper_d0(p, c, 9)
        assert len(set(ins.tolist())) == 8
        assert (output_table()[h, ins] == outs).all() and (output_table()[bar, ins] == outs).all()
    assert hypotheses()[feasible_rules()[33]] == ("on", "off", "und", "off", "und")   # the notebooks' h033


def _acronym_expected(p, data, persona):
    d = "".join(f"Output: {o}\nInput: {i}\n\n" for o, i in data)
    return ("Here are some input-output pairs. The input is a list of words. The output is the concatenation of the "
            "first letter of each word in the input, i.e., its acronym. For example:\n\n" + d + f"Please provide "
            f"{p.pairs} different examples following this pattern, where the output comes first.\n{persona}\nPlease "
            'return examples strictly following this format:\n{"Output": "acronym", "Input": "word1, word2, ..."}\n'
            '{"Output": "acronym", "Input": "word1, word2, ..."}')


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_paper_acronym_prompt_renders_exactly(which, request):
    from bayesflip.experiments.acronym import paper_d0

    lm = request.getfixturevalue(which)
    fam = get_family("acronym")
    p = load_experiment("paper_acronym").params
    cells = [c for c in fam.cells(p) if c["bias_type"] in ("hard", "easyshort")][:2]
    for c, r in zip(cells, fam.render(p, cells, lm.tokenizer, lm.spec.kind, 3)):
        persona = {"hard": "You favor rare words.", "easyshort": "You favor short words a lot."}[c["bias_type"]]
        user = _acronym_expected(p, paper_d0(p, c, 3), persona)
        if lm.spec.kind == "instruct":
            want = lm.tokenizer.apply_chat_template([{"role": "system", "content": persona},
                                                     {"role": "user", "content": user}], tokenize=False,
                                                    add_generation_prompt=True)
        else:
            want = persona + "\n" + user + "\n\n"
        assert r.text == want and r.generation["temperature"] == 1.0
    d0 = paper_d0(p, cells[0], 3)
    from bayesflip.experiments.acronym import rank

    assert len(d0) == 20 and sum(rank(o, 60000) <= 60000 for o, _ in d0) == 10    # easy half / hard half


def test_acronym_personas_and_reply_parsing():
    assert AP.PERSONAS == {"easy": "You favor common words.", "hard": "You favor rare words.",
                           "easylong": "You favor long words.", "easyshort": "You favor short words a lot.",
                           "random": "You favor common words.", "imitation": "You favor common words."}
    reply = ('Here you go:\n{"Output": "CAB", "Input": "cold, apple, bread"}\n{"output": "dog", "input": "dry, old"}\n'
             '{"Output": "RAT", "Input": "red, ant, tea"},\n{"Output": "A B", "Input": "x"}\n{broken\n')
    pairs, bad = AP.parse_reply(reply)
    assert pairs == [("CAB", "cold, apple, bread"), ("DOG", "dry, old"), ("RAT", "red, ant, tea")]
    assert bad == 2 and AP.spelled(pairs[0]) and not AP.spelled(pairs[1])
    assert AP.parse_reply("Output: CAT\nInput: cold, apple, tea\n\nOutput: X1\nInput: y\n") == (
        [("CAT", "cold, apple, tea")], 0)
    assert AP.seed_pair("EPISODE\texalted preteen impeded") == ("EPISODE", "exalted, preteen, impeded")


# ---------------------------------------------------------------------------- runs with fixed replies
class FixedReplies:
    """The real engine for reads; generate() returns the given reply texts (in turn, the last one repeats)."""

    def __init__(self, scorer, texts):
        self.s, self.texts, self.calls = scorer, list(texts), []

    @property
    def tokenizer(self):
        return self.s.tokenizer

    def score_choices(self, reqs):
        return self.s.score_choices(reqs)

    def generate(self, prompts, max_new_tokens, seeds, temperature=1.0, **kw):
        self.calls.append((list(prompts), list(seeds), temperature))
        text = self.texts.pop(0) if len(self.texts) > 1 else self.texts[0]
        return [self.s.tokenizer(text, add_special_tokens=False).input_ids for _ in prompts]


@pytest.fixture(scope="module")
def tiny_scorer(tiny):
    return Scorer(tiny)


def _ctx(scorer, lm, seed=4, workdir=None):
    return RunContext(scorer=scorer, model_kind=lm.spec.kind, model_name=lm.spec.name, seed=seed, workdir=workdir)


RULE_REPLY = "Input: A, C\nOutput: on\n\nInput: screen\nOutput: off\nInput: B, Z\nOutput: on\nInput: D\nOutput: und\n" \
             "Input: A, B, C\nOutput: on\nInput: C\nOutput: off\n"


@pytest.mark.integration
def test_paper_rules_written_examples_feed_the_next_generation(tiny, tiny_scorer):
    fam = get_family("rules")
    p = fam.Params(**PAPER_RULES)
    cells = fam.cells(p)
    sc = FixedReplies(tiny_scorer, ["no examples here", RULE_REPLY])
    a = fam.run(p, cells, _ctx(sc, tiny))
    subs = subsets(RP.OBJECTS)
    want_in = [subs.index(x) for x in (("A", "C"), ("screen",), ("D",), ("A", "B", "C"))]
    assert a["inputs"][0, 1].tolist() == want_in and a["outputs"][0, 1].tolist() == [0, 1, 2, 0]
    assert a["n_examples"][0].tolist() == [4, 4] and a["redraws"][0, 0] == 1 and a["n_invalid"][0, 0] == 1
    assert a["reply"][0, 0] == RULE_REPLY and not a["carried"][0, 1]
    assert len(sc.calls) == 2 and sc.calls[0][2] == 1.0
    # generation 1's belief is read after exactly the parsed examples
    pr = paper_rule_prompt(p, cells[0], [], a["inputs"][0, 1], a["outputs"][0, 1], tiny.spec.kind)
    lp, _ = fam.read_beliefs(p, _ctx(tiny_scorer, tiny), encode_prompt(tiny.tokenizer, pr), False)
    np.testing.assert_allclose(a["probs"][0, 1], np.exp(lp - lp.max()) / np.exp(lp - lp.max()).sum(), rtol=1e-6)
    np.testing.assert_allclose(a["on_mass"][0, 1], np.exp(lp).sum(), rtol=1e-6)
    # the exact read agrees with plain forwards for a few rules
    text = render(pr, tiny.tokenizer)
    for h in (0, 121, 242):
        ref = plain_choice_logprob(tiny, text, fam.rule_texts(p)[h])
        assert abs(np.log(a["probs"][0, 1, h] * a["on_mass"][0, 1]) - ref) < 2e-3
    n_cons = int((output_table()[a["rule_passed"][0, 0], want_in] == [0, 1, 2, 0]).sum())
    assert a["n_consistent"][0, 0] == n_cons


def test_paper_rules_history_is_the_last_rounds():
    fam = get_family("rules")
    p = fam.Params(**{**PAPER_RULES, "look_back": 2, "generations": 2})
    c = fam.cells(p)[0]
    arr = {k: np.full((1, *s.shape), s.fill, dtype=object if s.dtype == "str" else s.dtype)
           for k, s in fam.arrays(p).items()}
    arr["inputs"][0, :, :1], arr["outputs"][0, :, :1], arr["n_examples"][0] = 0, 0, 1
    arr["rule"][0], arr["rule_passed"][0], arr["refined"][0] = [5, 6, 7], [5, 8, 7], [False, True, False]
    arr["reply"][0] = ["reply 0", "reply 1", ""]
    turns = rounds(p, arr, 0, c, 2, with_hd=False)          # the rule request of generation 2 sees generation 1
    assert [r for r, _ in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[1][1] == "Rule: " + RP.rule_json(hypotheses()[6]) and turns[3][1] == "reply 1"
    assert turns[2][1] == RP.dh_prompt(4, RP.rule_json(hypotheses()[8]))   # refined: the JSON string
    turns = rounds(p, arr, 0, c, 1, with_hd=True)            # example request of generation 1: dh 0, hd 1
    assert turns[1][1] == "reply 0" and turns[2][1].startswith("You now have more examples")
    assert turns[0][1] == RP.dh_prompt(4, "{'A': 'on', 'B': 'on', 'C': 'on', 'D': 'off', 'screen': 'und'}")


@pytest.mark.integration
def test_paper_rules_resume_equals_uninterrupted(tiny, tiny_scorer, tmp_path, monkeypatch):
    fam = get_family("rules")
    p = fam.Params(**{**PAPER_RULES, "interactions": ["hypothesis"], "temperatures": [0.5]})
    cells = fam.cells(p)
    full = fam.run(p, cells, _ctx(FixedReplies(tiny_scorer, [RULE_REPLY]), tiny))
    monkeypatch.setenv(INTERRUPT_ENV, "0")
    with pytest.raises(ChainInterrupted):
        fam.run(p, cells, _ctx(FixedReplies(tiny_scorer, [RULE_REPLY]), tiny, workdir=tmp_path))
    monkeypatch.delenv(INTERRUPT_ENV)
    resumed = fam.run(p, cells, _ctx(FixedReplies(tiny_scorer, [RULE_REPLY]), tiny, workdir=tmp_path))
    for k in full:
        np.testing.assert_array_equal(full[k], resumed[k], err_msg=k)


ACRONYM_REPLY = ('{"Output": "THE", "Input": "tiny, happy, eel"}\n{"Output": "ZYZZYVA", "Input": "z, y, z, z, y, v, a"}\n'
                 '{"Output": "HOUSE", "Input": "ham, owl, ukulele, sea, egg"}\n{"Output": "QXJW", "Input": "q, x, j"}\n')


@pytest.mark.integration
def test_paper_acronym_file_seed_set_pool_and_filter(tiny, tiny_scorer, tmp_path):
    easy = tmp_path / "easy.txt"      # the original's format: ACRONYM<TAB>words separated by spaces
    easy.write_text("GARDEN\tgreat apple river desk east night\nPEOPLE\tpaint ear open pear lamp egg\n"
                    "NUMBER\tnose under moon bell east rain\n")
    hard = tmp_path / "hard.yaml"
    hard.write_text("- 'QUINCES: quiet, unit, ink, nail, cup, egg, sun'\n- 'ZITHERS: zoo, ice, tea, hat, ear, rod, sky'\n")
    fam = get_family("acronym")
    p = fam.Params(protocol="paper", bias_types=["easy", "hard"], easy_set=f"file:{easy}", hard_set=f"file:{hard}",
                   pairs=4, m_easy=[2], d0_seeds=[1], chains=1, generations=2, reply_tokens=40)
    fam.validate(p, tiny.tokenizer, tiny.spec.kind)
    cells = fam.cells(p)
    sc = FixedReplies(tiny_scorer, [ACRONYM_REPLY])
    a = fam.run(p, cells, _ctx(sc, tiny))
    assert a["agent"][0].tolist() == [-1, 1, 2] and a["temperature_used"][0, 1:].tolist() == [1.0, 0.5]
    assert [c[2] for c in sc.calls] == [1.0, 0.5]
    assert a["n_parsed"][0, 1:].tolist() == [4, 4] and a["n_spelled"][0, 1] == 3
    easy_i = [i for i, c in enumerate(cells) if c["bias_type"] == "easy"][0]
    hard_i = 1 - easy_i
    # easy keeps the 4 best-ranked acronym words of the pool (d0 + replies), hard the 4 worst
    from bayesflip.experiments.acronym import rank

    pool = [str(o) for o in a["data_output"][easy_i, 0]] + ["THE", "ZYZZYVA", "HOUSE", "QXJW"]
    assert list(a["data_output"][easy_i, 1]) == sorted(pool, key=lambda w: rank(w, 60000))[:4]
    assert a["data_generation"][easy_i, 1, 0] == 1 and a["data_output"][easy_i, 1, 0] == "THE"
    assert set(a["data_rank"][hard_i, 1].tolist()) == {60001}
    assert a["data_rank"][easy_i, 1].tolist() == sorted(a["data_rank"][easy_i, 1].tolist())
    assert a["mean_rank"][easy_i, 2] <= a["mean_rank"][easy_i, 0]
    # generation 2's request shows exactly generation 1's accepted pairs
    shown = [(o, i) for o, i in zip(a["data_output"][easy_i, 1], a["data_input"][easy_i, 1])]
    prompt = fam.paper_prompt(p, cells[easy_i], shown, tiny.spec.kind)
    assert sc.calls[1][0][easy_i] == encode_prompt(tiny.tokenizer, prompt)


def test_paper_config_errors():
    fam = get_family("rules")
    with pytest.raises(ConfigError, match="interactions"):
        fam.validate(fam.Params(interactions=["self"]), None, "std")
    with pytest.raises(ConfigError, match="d0_size"):
        fam.validate(fam.Params(**{**PAPER_RULES, "d0_size": 28}), None, "std")
    ac = get_family("acronym")
    with pytest.raises(ConfigError, match="easy_set"):
        ac.validate(ac.Params(protocol="paper", easy_set=["no separator here"]), None, "std")
    with pytest.raises(ConfigError, match="m_easy"):
        ac.validate(ac.Params(protocol="paper", m_easy=[19]), None, "std")
    with pytest.raises(ConfigError, match="bias_types"):
        load_experiment("paper_acronym", {"params": {"bias_types": ["common"]}})
    for name in ("paper_rules", "paper_rules_interaction", "paper_acronym"):
        e = load_experiment(name)
        assert e.params.protocol == "paper"
    assert load_experiment("paper_acronym").params.rank_top == 60000


# ---------------------------------------------------------------------------- the generational base
class _ToyParams(Params):
    generations: int = 4


class _Toy(GenerationalFamily):
    """A random walk per cell: x[g] = x[g-1] + a uniform draw."""
    name = "toy"
    Params = _ToyParams
    first_step = 1

    def cells(self, p):
        return [{"sample": s} for s in range(3)]

    def arrays(self, p):
        return {"x": ArraySpec(("generation",), (p.generations + 1,), "float64"),
                "tag": ArraySpec(("generation",), (p.generations + 1,), "str")}

    def rng_key(self, p, cell):
        return ("toy", cell["sample"])

    def last_generation(self, p):
        return p.generations

    def init(self, s):
        s.arr["x"][:, 0] = 0.0
        s.arr["tag"][:, 0] = "start"

    def step(self, s, g):
        for i in range(len(s.cells)):
            s.arr["x"][i, g] = s.arr["x"][i, g - 1] + s.rngs[i].random()
            s.arr["tag"][i, g] = f"g{g}"


@pytest.mark.parametrize("at", [1, 3])
def test_generational_base_resume_equals_uninterrupted(tmp_path, monkeypatch, at):
    fam, p = _Toy(), _ToyParams()
    cells = fam.cells(p)
    ctx = RunContext(scorer=None, model_kind="std", model_name="m", seed=1, workdir=tmp_path)
    full = fam.run(p, cells, RunContext(scorer=None, model_kind="std", model_name="m", seed=1))
    monkeypatch.setenv(INTERRUPT_ENV, str(at))
    with pytest.raises(ChainInterrupted):
        fam.run(p, cells, ctx)
    monkeypatch.delenv(INTERRUPT_ENV)
    calls = []
    orig = fam.step
    fam.step = lambda s, g: (calls.append(g), orig(s, g))[1]
    resumed = fam.run(p, cells, ctx)
    assert calls == list(range(at + 1, p.generations + 1))
    np.testing.assert_array_equal(full["x"], resumed["x"])
    assert full["tag"].tolist() == resumed["tag"].tolist() and full["tag"].dtype.kind == "U"


# ---------------------------------------------------------------------------- reducers on paper stores
@pytest.mark.integration
def test_reducers_on_paper_and_clean_stores(tiny, tiny_scorer, tmp_path):
    import pandas as pd
    from conftest import synthetic_store
    from bayesflip.reduce import reduce_sweep

    runs = {"paper_rules": ("rules", {**PAPER_RULES, "biases": ["strong", "none"], "temperatures": [0.0, 1.0]},
                            [RULE_REPLY]),
            "rules_clean": ("rules", dict(biases=["none"], interactions=["none"], chains=2, generations=1,
                                          variant="base"), [""]),
            "paper_acronym": ("acronym", dict(protocol="paper", bias_types=["easy", "hard"], pairs=4, m_easy=[2],
                                              d0_seeds=[1, 2], chains=1, generations=2, reply_tokens=40),
                              [ACRONYM_REPLY])}
    arrays = {}
    for exp, (family, params, replies) in runs.items():
        st, fam, p, cells = synthetic_store(tmp_path, "il", exp, family, params, shard_size=len(
            get_family(family).cells(get_family(family).Params(**params))), seed=4, model="tiny-random")
        a = fam.run(p, cells, _ctx(FixedReplies(tiny_scorer, replies), tiny))
        st.write_shard(0, a)
        arrays[exp] = (cells, a)
    report = reduce_sweep("il", results_dir=tmp_path, strict=True)
    tables = report.parent / "tables"
    rp = pd.read_parquet(tables / "rules_paper_by_generation.parquet")
    cells, a = arrays["paper_rules"]
    off = np.array([h[4] == "off" for h in hypotheses()])
    for i, c in enumerate(cells):
        row = rp[(rp["bias"] == c["bias"]) & (rp["temperature"] == c["temperature"]) & (rp["generation"] == 1)]
        assert row["p_screen_off"].iloc[0] == pytest.approx(a["probs"][i, 1] @ off)
        assert row["passed_screen_off"].iloc[0] == float(off[a["rule_passed"][i, 1]])
        assert row["consistent_rate"].isna().all()          # generation 1 wrote nothing (last generation)
    assert set(rp["position"]) == {"start", "none"}
    assert len(pd.read_parquet(tables / "rules_by_generation.parquet")) == 2        # the clean store, 2 generations
    ap = pd.read_parquet(tables / "acronym_paper_by_generation.parquet")
    cells, a = arrays["paper_acronym"]
    for b in ("easy", "hard"):
        idx = [i for i, c in enumerate(cells) if c["bias_type"] == b]
        rows = ap[ap["bias_type"] == b].sort_values("generation")
        assert rows["mean_rank"].to_numpy() == pytest.approx(a["mean_rank"][idx].mean(0))
        assert rows["n_chains"].tolist() == [2, 2, 2]
    md = report.read_text()
    assert "the original rule game (protocol paper)" in md and "the original acronym chains (protocol paper)" in md


@pytest.mark.integration
def test_paper_rules_real_sampling_unparsable_reply_is_redrawn_then_carried(tiny, tiny_scorer):
    """tiny-random writes noise: every reply is redrawn max_redraws times, then the chain keeps its data."""
    fam = get_family("rules")
    p = fam.Params(**{**PAPER_RULES, "max_new_tokens": 12, "max_redraws": 2})
    a = fam.run(p, fam.cells(p), _ctx(tiny_scorer, tiny))
    assert a["redraws"][0, 0] == 2 and a["carried"][0, 1] and a["n_examples"][0].tolist() == [4, 4]
    np.testing.assert_array_equal(a["inputs"][0, 1], a["inputs"][0, 0])
    assert isinstance(a["reply"][0, 0], str) and a["reply"][0, 0] != ""
    np.testing.assert_allclose(a["probs"][0, 1], a["probs"][0, 0])   # same data, no history: same belief


def test_chain_render_is_the_first_read(tiny):
    from bayesflip.experiments.base import cell_seed
    from bayesflip.experiments.chains import ChainParams, initial_outcomes

    fam = get_family("chains")
    p = ChainParams(learners=["pm"], n=[6], inits=[2], chains=2, generations=1, variant="base")
    cells = fam.cells(p)
    for c, r in zip(cells, fam.render(p, cells, tiny.tokenizer, tiny.spec.kind, 11)):
        seq = initial_outcomes(2, 6, 2, 0, np.random.default_rng(cell_seed(11, *fam.rng_key(p, c))))
        want = render(fam.head(p, tiny.spec.kind), tiny.tokenizer)
        want += "".join([" heads", " tails"][int(o)] + ", then" for o in seq)
        assert r.text == want and r.choices == [" heads", " tails"] and r.cell["generation"] == 0


@pytest.mark.integration
def test_paper_acronym_resume_equals_uninterrupted(tiny, tiny_scorer, tmp_path, monkeypatch):
    fam = get_family("acronym")
    p = fam.Params(protocol="paper", bias_types=["random"], pairs=4, m_easy=[2], d0_seeds=[3], chains=2,
                   generations=2, reply_tokens=40)
    cells = fam.cells(p)
    full = fam.run(p, cells, _ctx(FixedReplies(tiny_scorer, [ACRONYM_REPLY]), tiny))
    monkeypatch.setenv(INTERRUPT_ENV, "1")
    with pytest.raises(ChainInterrupted):
        fam.run(p, cells, _ctx(FixedReplies(tiny_scorer, [ACRONYM_REPLY]), tiny, workdir=tmp_path))
    monkeypatch.delenv(INTERRUPT_ENV)
    sc = FixedReplies(tiny_scorer, [ACRONYM_REPLY])
    resumed = fam.run(p, cells, _ctx(sc, tiny, workdir=tmp_path))
    assert len(sc.calls) == 1                                   # only generation 2 ran again
    for k in full:
        np.testing.assert_array_equal(full[k], resumed[k], err_msg=k)
