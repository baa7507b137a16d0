"""One generation of the ``acronym`` family: the clean pool-and-filter chain and the original notebook.

All state (kept pairs, the pool) is read back from the arrays, so resume equals an
uninterrupted run. See :mod:`.acronym` and :mod:`.acronym_paper`.
"""

from __future__ import annotations

import numpy as np

from ..prompts import encode_prompt
from . import acronym_paper as AP
from .acronym_words import format_pair, paper_d0, parse_pair, pool_filter, rank, word_stats
from .generational import GenState


# ---------------------------------------------------------------------------- clean
def clean_init(fam, s: GenState) -> None:
    p, arr = s.p, s.arr
    init = [parse_pair(x, p.length) for x in p.init_pairs]
    sc, mr, mz = word_stats(init, p.common_zipf, p.rank_top)  # type: ignore[arg-type]
    for i in range(len(s.cells)):
        arr["kept"][i, 0, : len(init)] = [format_pair(*x) for x in init]  # type: ignore[misc]
        arr["n_valid"][i, 0] = len(init)
        for pre in ("", "prod_"):
            arr[pre + "share_common"][i, 0], arr[pre + "mean_rank"][i, 0], arr[pre + "mean_zipf"][i, 0] = sc, mr, mz


def clean_step(fam, s: GenState, g: int) -> None:
    p, arr, rngs, tok = s.p, s.arr, s.rngs, s.ctx.tokenizer
    prompts, seeds = [], []
    for i in range(len(s.cells)):
        prev = [x for x in arr["kept"][i, g - 1] if x]
        for _ in range(p.pool):
            shown = [prev[j] for j in rngs[i].choice(len(prev), size=min(p.shots, len(prev)), replace=False)]
            prompts.append(encode_prompt(tok, fam.prompt(p, shown, s.ctx.model_kind)))
            seeds.append(int(rngs[i].integers(0, 2**62)))
    outs = s.ctx.scorer.generate(prompts, p.max_new_tokens, seeds, temperature=p.temperature, stop_strings=["\n"])
    for i, c in enumerate(s.cells):
        texts = [tok.decode(o, skip_special_tokens=True) for o in outs[i * p.pool: (i + 1) * p.pool]]
        arr["replies"][i, g] = [t.split("\n", 1)[0] for t in texts]
        valid = [x for x in (parse_pair(t, p.length) for t in texts) if x is not None]
        arr["n_valid"][i, g] = len(valid)
        if not valid:
            kept = [parse_pair(x, p.length) for x in arr["kept"][i, g - 1] if x]
            arr["carried"][i, g] = True
        else:
            kept = pool_filter(c["filter"], valid, p.keep, rngs[i])
        arr["kept"][i, g, : len(kept)] = [format_pair(*x) for x in kept]  # type: ignore[misc]
        for pre, pairs in (("", kept), ("prod_", valid)):
            st = word_stats(pairs, p.common_zipf, p.rank_top)  # type: ignore[arg-type]
            arr[pre + "share_common"][i, g], arr[pre + "mean_rank"][i, g], arr[pre + "mean_zipf"][i, g] = st


# ---------------------------------------------------------------------------- paper
def _set_data(p, arr, i: int, g: int, chosen: list[tuple[str, str, int, int]]) -> None:
    for k, (o, inp, r, gen) in enumerate(chosen):
        arr["data_output"][i, g, k], arr["data_input"][i, g, k] = o, inp
        arr["data_rank"][i, g, k], arr["data_generation"][i, g, k] = r, gen
    ranks = np.array([x[2] for x in chosen], dtype=float)
    arr["mean_rank"][i, g] = ranks.mean() if len(ranks) else np.nan
    arr["share_top"][i, g] = (ranks <= p.rank_top).mean() if len(ranks) else np.nan
    arr["mean_len"][i, g] = np.mean([len(x[0]) for x in chosen]) if chosen else np.nan


def _data(arr, i: int, g: int) -> list[tuple[str, str, int, int]]:
    return [(str(o), str(inp), int(r), int(gen)) for o, inp, r, gen in
            zip(arr["data_output"][i, g], arr["data_input"][i, g], arr["data_rank"][i, g],
                arr["data_generation"][i, g]) if o]


def paper_init(fam, s: GenState) -> None:
    p = s.p
    for i, c in enumerate(s.cells):
        d0 = [(o, inp, rank(o, p.rank_top), 0) for o, inp in paper_d0(p, c, s.ctx.seed)]
        _set_data(p, s.arr, i, 0, d0)
        s.arr["n_parsed"][i, 0] = len(d0)


def pool(arr, i: int, g: int) -> list[tuple[str, str, int, int]]:
    """d⁰ followed by every parsed pair of generations 1..g (the original's ``data_pool``)."""
    out = _data(arr, i, 0)
    for k in range(1, g + 1):
        out += [(str(o), str(inp), int(r), k) for o, inp, r in
                zip(arr["produced_output"][i, k], arr["produced_input"][i, k], arr["produced_rank"][i, k]) if o]
    return out


def paper_step(fam, s: GenState, g: int) -> None:
    p, arr, ctx = s.p, s.arr, s.ctx
    agent = 1 if (g - 1) % 2 == 0 else 2
    temps = {i: c["temperature"] * (1.0 if agent == 1 else 0.5) for i, c in enumerate(s.cells)}
    ids = {i: encode_prompt(ctx.tokenizer, fam.paper_prompt(p, c, [(o, inp) for o, inp, _, _ in _data(arr, i, g - 1)],
                                                            ctx.model_kind))
           for i, c in enumerate(s.cells)}
    tries = {i: 0 for i in ids}
    todo = list(ids)
    while todo:
        seeds = {i: int(s.rngs[i].integers(0, 2**62)) for i in todo}
        replies: dict[int, str] = {}
        for T in sorted({temps[i] for i in todo}):
            group = [i for i in todo if temps[i] == T]
            outs = ctx.scorer.generate([ids[i] for i in group], p.reply_tokens, [seeds[i] for i in group],
                                       **p.sampling_kwargs(T, ctx.scorer))
            replies.update({i: ctx.tokenizer.decode(o, skip_special_tokens=True) for i, o in zip(group, outs)})
        again = []
        for i in todo:
            pairs, bad = AP.parse_reply(replies[i])
            if not pairs and tries[i] < p.max_redraws:
                tries[i] += 1
                again.append(i)
                continue
            _record(p, arr, i, g, pairs, bad, replies[i], tries[i], agent, temps[i])
        todo = again
    for i, c in enumerate(s.cells):
        chosen = AP.select(c["bias_type"], pool(arr, i, g), p.pairs, g, p.rank_top + 1, s.rngs[i])
        if not chosen:                               # imitation with nothing parsed: keep the data
            chosen = _data(arr, i, g - 1)
            arr["carried"][i, g] = True
        _set_data(p, arr, i, g, chosen)


def _record(p, arr, i: int, g: int, pairs, bad: int, reply: str, tries: int, agent: int, T: float) -> None:
    kept = pairs[: arr["produced_output"].shape[2]]
    for k, pr in enumerate(kept):
        arr["produced_output"][i, g, k], arr["produced_input"][i, g, k] = pr
        arr["produced_rank"][i, g, k] = rank(pr[0], p.rank_top)
        arr["produced_spelled"][i, g, k] = AP.spelled(pr)
    arr["prod_mean_rank"][i, g] = np.mean([rank(o, p.rank_top) for o, _ in kept]) if kept else np.nan
    arr["n_parsed"][i, g], arr["n_invalid"][i, g] = len(pairs), bad
    arr["n_spelled"][i, g] = sum(AP.spelled(x) for x in pairs)
    arr["redraws"][i, g], arr["agent"][i, g], arr["temperature_used"][i, g] = tries, agent, T
    arr["reply"][i, g] = reply
