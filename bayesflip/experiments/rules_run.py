"""One generation of the ``rules`` family: the clean chain and the original game (``protocol: paper``).

Everything a step needs is read back from the arrays (data, stated/passed rules, replies), so
the chat history of the paper protocol is rebuilt, not kept, and a resumed shard equals an
uninterrupted one. See :mod:`.rules` for the protocols (its ``CleanRules`` / ``PaperRules`` call
``clean_step`` / ``paper_step``), :mod:`.rules_world` for the game's pure helpers and
:mod:`.rules_paper` for the templates.
"""

from __future__ import annotations

import numpy as np

from ..prompts import Prompt, encode_prompt
from . import rules_paper as RP
from .base import use_chat
from .generational import GenState
from .rules_world import (OBJECTS, accuracy, hypotheses, metrics, next_examples, output_table, subsets,
                          tempered_pick, _init_data)

SCREEN = len(OBJECTS) - 1          # paper: the fifth object, 'screen'


def _normalise(w: np.ndarray) -> np.ndarray:
    return w / w.sum()


def _beliefs(fam, s: GenState, prompt: Prompt, self_check: bool):
    lp, yes = fam.read_beliefs(s.p, s.ctx, encode_prompt(s.ctx.tokenizer, prompt), self_check)
    P = np.exp(lp - lp.max())
    return lp, P / P.sum(), yes


# ---------------------------------------------------------------------------- clean
def clean_step(fam, s: GenState, g: int) -> None:
    p, arr = s.p, s.arr
    screen = OBJECTS.index(p.screen)
    ins0, outs0 = _init_data(p)
    acc0 = accuracy(ins0, outs0)
    consistent0 = (acc0 == 1.0).astype(float)
    for i, c in enumerate(s.cells):
        m = p.examples if g > 0 else len(ins0)
        ins, outs = arr["inputs"][i, g, :m], arr["outputs"][i, g, :m]
        lp, P, yes = _beliefs(fam, s, fam.prompt(p, c["bias"], ins, outs, s.ctx.model_kind),
                              c["interaction"] == "self_check")
        if c["interaction"] == "self_check":
            w = P * yes
            arr["check_yes"][i, g] = yes
        elif c["interaction"] == "refine":
            w = P * consistent0
        else:
            w = P
        eff = _normalise(w)
        arr["probs"][i, g] = P
        arr["on_mass"][i, g] = float(np.exp(lp).sum())
        for pre, dist in (("", P), ("eff_", eff)):
            for k, v in metrics(dist, acc0, screen).items():
                arr[pre + k][i, g] = v
        h = tempered_pick(eff, 1.0, s.rngs[i])
        arr["rule"][i, g] = h
        if g < p.generations:
            new_in, new_out = next_examples(h, p.examples, s.rngs[i])
            arr["inputs"][i, g + 1, : p.examples] = new_in
            arr["outputs"][i, g + 1, : p.examples] = new_out


# ---------------------------------------------------------------------------- paper
def conversation(system: str, turns: list[tuple[str, str]], prefill: str, chat: bool) -> Prompt:
    """Chat: system + turns + assistant prefill. Base models (the original has none): the contents
    one after another — system, then each turn separated by a blank line — then the prefill."""
    if chat:
        return Prompt(text=prefill, messages=(("system", system), *turns))
    return Prompt(text=system + "\n" + "\n\n".join(t for _, t in turns) + "\n\n" + prefill)


def _fmt(p, cell) -> tuple[str, str]:
    start, end = RP.bias_parts(p.bias_sentences, cell["bias"], cell["position"])
    return RP.game_prompt(start), RP.rule_format(end)


def _data(arr, i: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    n = int(arr["n_examples"][i, g])
    return arr["inputs"][i, g, :n], arr["outputs"][i, g, :n]


def rounds(p, arr, i: int, cell: dict, g: int, with_hd: bool) -> list[tuple[str, str]]:
    """The chat history (user/assistant turns) before a call at generation g: the rule request and
    the example request of every earlier generation (+ generation g's rule request when ``with_hd``),
    as the original's ``multi_turn_chatgpt`` keeps them, cut to the last ``look_back`` rounds."""
    _, fmt = _fmt(p, cell)
    subs = subsets(RP.OBJECTS)
    out: list[tuple[tuple[str, str], tuple[str, str]]] = []
    for k in range(g + (1 if with_hd else 0)):
        ins, outs = _data(arr, i, k)
        out.append((("user", RP.hd_prompt(RP.data_text(subs, ins, outs), fmt)),
                    ("assistant", "Rule: " + RP.rule_json(hypotheses()[int(arr["rule"][i, k])]))))
        if k < g:
            rule = RP.rule_repr(hypotheses()[int(arr["rule_passed"][i, k])], bool(arr["refined"][i, k]))
            out.append((("user", RP.dh_prompt(p.examples, rule)), ("assistant", str(arr["reply"][i, k]))))
    keep = out[len(out) - p.look_back:] if p.look_back else []
    return [t for r in keep for t in r]


def paper_rule_prompt(p, cell: dict, history: list, inputs, outputs, model_kind: str) -> Prompt:
    """The rule request of a generation whose data are (inputs, outputs)."""
    system, fmt = _fmt(p, cell)
    user = RP.hd_prompt(RP.data_text(subsets(RP.OBJECTS), inputs, outputs), fmt)
    return conversation(system, [*history, ("user", user)], p.prefill, use_chat(p.variant, model_kind))


def paper_step(fam, s: GenState, g: int) -> None:
    p, arr, cells, ctx = s.p, s.arr, s.cells, s.ctx
    chat = use_chat(p.variant, ctx.model_kind)
    subs, tab = subsets(RP.OBJECTS), output_table()
    pending: list[tuple[int, Prompt]] = []
    for i, c in enumerate(cells):
        system, fmt = _fmt(p, c)
        d0_in, d0_out = _data(arr, i, 0)
        acc0 = accuracy(d0_in, d0_out)
        ins, outs = _data(arr, i, g)
        hist = rounds(p, arr, i, c, g, with_hd=False)
        lp, P, yes = _beliefs(fam, s, paper_rule_prompt(p, c, hist, ins, outs, ctx.model_kind),
                              c["interaction"] == "self_check")
        arr["probs"][i, g] = P
        arr["on_mass"][i, g] = float(np.exp(lp).sum())
        w = P * yes if c["interaction"] == "self_check" else P * (acc0 == 1.0) if c["interaction"] == "refine" else P
        if yes is not None:
            arr["check_yes"][i, g] = yes
        T = c["temperature"]
        h = tempered_pick(w, T, s.rngs[i])
        arr["rule"][i, g] = h
        passed, refined, eff = h, False, _normalise(w)
        if c["interaction"] in ("self", "hypothesis"):
            if c["interaction"] == "self":
                turn, need = RP.search_prompt(hypotheses()[h], RP.data_text(subs, d0_in, d0_out), fmt), True
            else:
                turn, need = RP.refine_prompt(hypotheses()[h], subs, d0_in, d0_out, tab[h], fmt)
            if need:
                turns = rounds(p, arr, i, c, g, with_hd=True) + [("user", turn)]
                _, P2, _ = _beliefs(fam, s, conversation(system, turns, p.prefill, chat), False)
                arr["probs_refined"][i, g] = P2
                passed, refined, eff = tempered_pick(P2, T, s.rngs[i]), True, P2
        arr["rule_passed"][i, g], arr["refined"][i, g] = passed, refined
        for pre, dist in (("", P), ("eff_", eff)):
            for k, v in metrics(dist, acc0, SCREEN).items():
                arr[pre + k][i, g] = v
        if g < p.generations:
            user = RP.dh_prompt(p.examples, RP.rule_repr(hypotheses()[passed], refined))
            pending.append((i, conversation(system, rounds(p, arr, i, c, g, with_hd=True) + [("user", user)], "",
                                            chat)))
    if pending:
        write_examples(s, g, pending)


def write_examples(s: GenState, g: int, pending: list[tuple[int, Prompt]]) -> None:
    """d^{g+1}: each chain's model writes its examples (one seeded reply per try, redrawn while fewer
    than M parse, at most ``max_redraws`` times); the first M valid ones become the next data."""
    p, arr, ctx = s.p, s.arr, s.ctx
    subs, tab = subsets(RP.OBJECTS), output_table()
    ids = {i: encode_prompt(ctx.tokenizer, pr) for i, pr in pending}
    tries = {i: 0 for i, _ in pending}
    todo = [i for i, _ in pending]
    while todo:
        seeds = {i: int(s.rngs[i].integers(0, 2 ** 62)) for i in todo}
        replies: dict[int, str] = {}
        for T in sorted({s.cells[i]["temperature"] for i in todo}):
            group = [i for i in todo if s.cells[i]["temperature"] == T]
            outs = ctx.scorer.generate([ids[i] for i in group], p.max_new_tokens, [seeds[i] for i in group],
                                       **p.sampling_kwargs(T, ctx.scorer))
            replies.update({i: ctx.tokenizer.decode(o, skip_special_tokens=True) for i, o in zip(group, outs)})
        again = []
        for i in todo:
            ex, bad = RP.parse_examples(replies[i], subs)
            if len(ex) < p.examples and tries[i] < p.max_redraws:
                tries[i] += 1
                again.append(i)
                continue
            ex = ex[: p.examples]
            arr["reply"][i, g] = replies[i]
            arr["n_invalid"][i, g] = bad
            arr["redraws"][i, g] = tries[i]
            if ex:
                ins = np.array([e[0] for e in ex]), np.array([e[1] for e in ex])
                arr["n_consistent"][i, g] = int((tab[int(arr["rule_passed"][i, g]), ins[0]] == ins[1]).sum())
            else:                                   # nothing parsed: the chain keeps its data
                ins = _data(arr, i, g)
                arr["carried"][i, g + 1] = True
            arr["inputs"][i, g + 1, : len(ins[0])] = ins[0]
            arr["outputs"][i, g + 1, : len(ins[1])] = ins[1]
            arr["n_examples"][i, g + 1] = len(ins[0])
        todo = again
