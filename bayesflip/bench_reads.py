"""Every-position reads benchmark (``every_position``): the Markov families' shape.

8 rows × 1,000 tokens (a 4-state chain written as single tokens after a short head), every position
read, 4 one-token choices. The engine (:meth:`bayesflip.engine.Scorer.score_curves`) against the
bare minimum that computes the same numbers: one batched forward with all logits, a float32
log-softmax and one gather of the 4 choice ids (``model(ids).logits.float().log_softmax(-1)[..., choices]``).

Reports the efficiency (bare seconds / engine seconds; fastest of ``repeats`` alternating runs each),
the largest |Δ log p| between the two, and the engine's host syncs and host↔device copies per forward
pass (:class:`bayesflip.bench_generate.SyncCounter`: every blocking tensor call, wherever made, plus
the copies the engine issues). On a GPU each of those stalls the device; the goal is ≤ 3 per forward.
"""

from __future__ import annotations

import numpy as np
import torch

from .bench_generate import SyncCounter, _now

STATES = (" A", " B", " C", " D")


def chain_rows(tok, n_rows: int = 8, n_tokens: int = 1000, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """``n_rows`` token sequences of exactly ``n_tokens``: a head, then a random 4-state chain (sticky
    transitions), one token per state; and the 4 state token ids."""
    from .prompts import encode_piece, encode_prompt

    ids = [encode_piece(tok, s) for s in STATES]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"every_position: the states {STATES} must be single tokens of this tokenizer")
    states = [i[0] for i in ids]
    head = encode_prompt(tok, "Here is a sequence of states of a random process:")
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n_rows):
        chain: list[int]
        s, chain = int(rng.integers(4)), []
        while len(head) + len(chain) < n_tokens:
            s = s if rng.random() < 0.5 + 0.05 * r else int(rng.integers(4))
            chain.append(states[s])
        rows.append(head + chain)
    return rows, states


def bare_every_position(model, rows: list[list[int]], choices: list[int], pad_id: int, device) -> np.ndarray:
    """One batched forward, float32 log-softmax of all logits, one gather of the choice ids: (R, T, K)."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out = logits.float().log_softmax(-1)[..., torch.tensor(choices, device=logits.device)]
    return out.cpu().numpy()


def bench_every_position(lm, n_rows: int = 8, n_tokens: int = 1000, repeats: int = 2) -> dict:
    from .engine import CurveRequest, Scorer

    tok = lm.tokenizer
    rows, states = chain_rows(tok, n_rows, n_tokens)
    choices = [[s] for s in states]
    reqs = [CurveRequest(r, list(range(len(r))), choices) for r in rows]
    sc = Scorer(lm, batch_tokens=n_rows * n_tokens, max_batch=n_rows, max_padding=1.0)
    model = getattr(lm.model, "module", lm.model)
    counter = SyncCounter()
    t_eng: list[float] = []
    t_bare: list[float] = []
    got = ref = None

    def engine():
        calls0 = sc.stats.forward_calls
        t = _now()
        with counter.patch():
            res = sc.score_curves(reqs)
        t_eng.append(_now() - t)
        return res, sc.stats.forward_calls - calls0

    def bare():
        t = _now()
        res = bare_every_position(model, rows, states, sc.pad_id, lm.device)
        t_bare.append(_now() - t)
        return res

    sc.score_curves([CurveRequest(r[:64], list(range(64)), choices) for r in rows])     # warm-up (short rows)
    bare_every_position(model, [r[:64] for r in rows], states, sc.pad_id, lm.device)
    forwards = 0
    for r in range(repeats):
        if r % 2 == 0:
            (got, n), ref = engine(), bare()
        else:
            ref, (got, n) = bare(), engine()
        forwards += n
    assert got is not None and ref is not None   # set by the repeats
    diff = max(float(np.abs(g - ref[i, : len(rows[i])]).max()) for i, g in enumerate(got))
    per = counter.per(forwards)
    te, tb = min(t_eng), min(t_bare)
    return {"rows": n_rows, "tokens_per_row": n_tokens, "reads": n_rows * n_tokens, "choices": len(states),
            "efficiency": tb / te, "engine_s": te, "bare_s": tb, "engine_s_repeats": t_eng, "bare_s_repeats": t_bare,
            "max_abs_diff": diff, "forward_calls": forwards // repeats,
            "syncs_and_copies_per_forward": per["syncs_and_copies"], "host_syncs_per_forward": per["host_syncs"],
            "engine_host_syncs_per_forward": per["engine_host_syncs"],
            "engine_transfers_per_forward": per["engine_transfers"],
            "syncs_by_method_per_forward": {k: v / max(1, forwards) for k, v in counter.by_method.items()},
            "note": "bare = one batched forward + float32 log-softmax of all logits + one gather of the choices; "
                    "syncs: every blocking tensor call during score_curves (engine and model code); copies: "
                    "host->device copies the engine issues (free on the CPU, one each on a GPU)"}
