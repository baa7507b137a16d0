"""Family G: where the read position attends in an ICL coin/die prompt.

Sequences, prompts and read positions are those of the ``icl`` family (its cells,
``sample_outcomes`` and :func:`~bayesflip.experiments.seq.build_curve` are reused, so with the
same seed the sequences equal the ``icl`` experiment's). At read position ``q_i`` (the
prediction of outcome i, after outcomes 0..i−1) the attention mass on a set of keys K is

    mass(i, K) = mean_{l ∈ layer set} mean_{h} Σ_{k ∈ K} A[l, h, q_i, k]

(:meth:`~bayesflip.engine.Scorer.attention_mass`, eager attention; only these reduced numbers
are stored, never attention tensors). Causal masking makes A[·, ·, q, k] = 0 for k > q, so a
group can list positions past the query. Key groups (``key_groups``):

* ``outcomes``: the tokens of outcomes 0..i−1;  ``by_choice``: one group ``<label>_outcomes``
  per choice (``heads_outcomes``, ``tails_outcomes``) = the tokens of past outcomes equal to it;
* ``recent``: ``recent_<k>`` = the tokens of outcomes max(0, i−k)..i−1;
* ``prompt``: the head's tokens (BOS / chat template / query text);
* ``separators``: separator tokens up to and including q_i itself;
* ``all``: every position ≤ q_i (= 1 up to rounding; prompt + outcomes + separators = all).

Layer sets (``layer_sets``) are relative depth ranges ``[lo, hi)`` so one config fits models
of any depth: layer l of L belongs to a set if ``lo·L ≤ l < hi·L`` (``hi = 1`` includes the
last layer). Each set costs one eager forward pass.

The coin-flip study's metric (``get_attention_weight_icl.py``: attention from the last position to
every input token, maximum over heads, then maximum over layers) is stored next to the mean, from
the same pass: ``attn_max(i, K) = Σ_{k ∈ K} max_{l ∈ layer set} max_h A[l, h, q_i, k]`` (the
study's per-token values summed over the group; the read at q_i is the last position of the
prefix prompt of i outcomes, since causal attention at q_i ignores later tokens).

Arrays per cell: ``mass`` (layer_set, position, group); ``attn_max`` (layer_set, position,
group); ``mass_outcome`` / ``attn_max_outcome`` (layer_set, position, flip) = mean / max mass on
outcome j's tokens (if ``per_outcome``); ``logprobs`` (position,
choice) choice log-probs at the same read positions (``score_curves``), ``outcomes`` (flip,),
``p_true`` (position, choice) as in ``icl``, and ``layer_range`` (layer_set, bound) = the
[first, last+1) layer indices used for this model.

``protocol`` (``clean`` | ``paper``) selects the ICL family's prompts: the sequences and heads are
built by :class:`~bayesflip.experiments.icl.ICLFamily` (``cell_head``, ``sample_outcomes``,
``build_curve``), so ``paper`` gives the study's statement + query paraphrase per cell, the one
shared sequence per θ, and every (instruct prompt, query) pair. Permutations are not scored here.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from ..engine import CurveRequest
from ..errors import ConfigError
from ..prompts import encode_piece, encode_prompt
from . import register
from .base import ArraySpec, RunContext
from .icl import ICLFamily, ICLParams, _spec, per_flip_probs
from .seq import build_curve

Frac = Annotated[float, Field(ge=0.0, le=1.0)]
GROUPS = ("outcomes", "by_choice", "recent", "prompt", "separators", "all")


class AttentionParams(ICLParams):
    key_groups: list[Literal["outcomes", "by_choice", "recent", "prompt", "separators", "all"]] = Field(
        default_factory=lambda: ["outcomes", "by_choice", "recent", "prompt", "separators"], min_length=1)
    recent_k: int = Field(5, ge=1)
    layer_sets: dict[str, tuple[Frac, Frac]] = Field(default_factory=lambda: {"all": (0.0, 1.0)}, min_length=1)
    read_stride: int = Field(1, ge=1)   # read positions 0, s, 2s, ... ≤ n_flips
    per_outcome: bool = True


def read_indices(p: AttentionParams) -> list[int]:
    return list(range(0, p.n_flips + 1, p.read_stride))


def group_names(p: AttentionParams) -> list[str]:
    out = []
    for g in p.key_groups:
        if g == "by_choice":
            out += [f"{c.strip()}_outcomes" for c in _spec(p)["choices"]]
        elif g == "recent":
            out.append(f"recent_{p.recent_k}")
        else:
            out.append(g)
    return out


def layer_indices(lo: float, hi: float, n_layers: int) -> list[int]:
    """Layers l with lo·L ≤ l < hi·L (hi = 1 includes the last)."""
    return [layer for layer in range(n_layers) if lo * n_layers <= layer and (layer < hi * n_layers or hi >= 1.0)]


def token_spans(head_len: int, choice_lens: list[int], sep_len: int, outcomes) -> tuple[list[range], list[range]]:
    """Token positions of every outcome and every separator in a build_curve sequence."""
    outs, seps, pos = [], [], head_len
    for o in outcomes:
        outs.append(range(pos, pos + choice_lens[o]))
        pos += choice_lens[o]
        seps.append(range(pos, pos + sep_len))
        pos += sep_len
    return outs, seps


@register
class AttentionFamily(ICLFamily):
    name = "attention"
    Params = AttentionParams
    requires = frozenset({"attention_mass"})

    def arrays(self, p: AttentionParams) -> dict[str, ArraySpec]:
        k, n, r, ls = len(_spec(p)["choices"]), p.n_flips, len(read_indices(p)), len(p.layer_sets)
        out = {"mass": ArraySpec(("layer_set", "position", "group"), (ls, r, len(group_names(p)))),
               "attn_max": ArraySpec(("layer_set", "position", "group"), (ls, r, len(group_names(p)))),
               "logprobs": ArraySpec(("position", "choice"), (r, k)),
               "outcomes": ArraySpec(("flip",), (n,), "int32"),
               "p_true": ArraySpec(("position", "choice"), (r, k)),
               "layer_range": ArraySpec(("layer_set", "bound"), (ls, 2), "int32")}
        if p.per_outcome:
            out["mass_outcome"] = ArraySpec(("layer_set", "position", "flip"), (ls, r, n))
            out["attn_max_outcome"] = ArraySpec(("layer_set", "position", "flip"), (ls, r, n))
        return out

    def coords(self, p: AttentionParams) -> dict[str, list]:
        return {"choice": _spec(p)["choices"], "position": read_indices(p), "flip": list(range(p.n_flips)),
                "group": group_names(p), "layer_set": list(p.layer_sets), "bound": ["first", "stop"]}

    def validate(self, p: AttentionParams, tokenizer, model_kind: str) -> None:
        for name, (lo, hi) in p.layer_sets.items():
            if not lo < hi:
                raise ConfigError(f"params.layer_sets.{name}", f"range [{lo}, {hi}) is empty",
                                  allowed=["[lo, hi) with 0 <= lo < hi <= 1"])
        super().validate(p, tokenizer, model_kind)

    def resolve_layers(self, p: AttentionParams, n_layers: int) -> dict[str, list[int]]:
        out = {}
        for name, (lo, hi) in p.layer_sets.items():
            idx = layer_indices(lo, hi, n_layers)
            if not idx:
                raise ConfigError(f"params.layer_sets.{name}", f"[{lo}, {hi}) holds no layer of a {n_layers}-layer model",
                                  allowed=[f"a range containing some l/{n_layers}"])
            out[name] = idx
        return out

    def run(self, p: AttentionParams, cells: list[dict], ctx: RunContext) -> dict[str, np.ndarray]:
        tok = ctx.tokenizer
        choices = _spec(p)["choices"]
        sets = self.resolve_layers(p, ctx.scorer.n_layers)
        ridx = read_indices(p)
        names = group_names(p)
        reqs, outs, head_lens = [], [], []
        for c in cells:  # clean: one head for all cells; paper: the statement + query of the cell
            head = self.cell_head(p, c, ctx.model_kind)
            o = self.sample_outcomes(p, c, ctx.seed)
            r = build_curve(tok, head, choices, o, p.separator)
            reqs.append(CurveRequest(ids=r.ids, positions=[r.positions[i] for i in ridx], choices=r.choices))
            outs.append(o)
            head_lens.append(len(encode_prompt(tok, head)))
        curves = ctx.scorer.score_curves(reqs)
        sep_len = len(encode_piece(tok, p.separator))
        clens = [len(encode_piece(tok, c)) for c in choices]
        shape = (len(cells), len(sets), len(ridx), len(names))
        shape_o = (len(cells), len(sets), len(ridx), p.n_flips)
        red = {"mean": (np.zeros(shape), np.zeros(shape_o)), "max": (np.zeros(shape), np.zeros(shape_o))}
        for ci, (r, o, head_len) in enumerate(zip(reqs, outs, head_lens)):
            ospans, sspans = token_spans(head_len, clens, sep_len, o)
            groups = {"prompt": range(head_len), "all": range(len(r.ids)),
                      "outcomes": [t for s in ospans for t in s], "separators": [t for s in sspans for t in s]}
            for k, label in enumerate(choices):
                groups[f"{label.strip()}_outcomes"] = [t for j, s in enumerate(ospans) if o[j] == k for t in s]
            need_per = p.per_outcome or "recent" in p.key_groups
            fixed = {g: groups[g] for g in names if g in groups}
            per = {f"o{j}": s for j, s in enumerate(ospans)} if need_per else {}
            for li, idx in enumerate(sets.values()):
                stats = ctx.scorer.attention_stats(r.ids, r.positions, {**fixed, **per}, layers=idx)
                for how, (mass, mass_o) in red.items():
                    res = stats[how]
                    for gi, g in enumerate(names):
                        if g in fixed:
                            mass[ci, li, :, gi] = res[g]
                    if need_per:
                        po = np.stack([res[f"o{j}"] for j in range(p.n_flips)], axis=1)  # (position, flip)
                        mass_o[ci, li] = po
                        if "recent" in p.key_groups:
                            gi = names.index(f"recent_{p.recent_k}")
                            for pi, i in enumerate(ridx):
                                mass[ci, li, pi, gi] = po[pi, max(0, i - p.recent_k): i].sum()
        p_true = []
        for c in cells:
            rows = per_flip_probs(p, c)
            p_true.append(np.vstack([rows, rows[-1:]])[ridx])
        lr = np.array([[idx[0], idx[-1] + 1] for idx in sets.values()], dtype=np.int32)
        out = {"mass": red["mean"][0].astype(np.float32), "attn_max": red["max"][0].astype(np.float32),
               "logprobs": np.stack(curves).astype(np.float32),
               "outcomes": np.stack(outs), "p_true": np.stack(p_true).astype(np.float32),
               "layer_range": np.repeat(lr[None], len(cells), axis=0)}
        if p.per_outcome:
            out["mass_outcome"] = red["mean"][1].astype(np.float32)
            out["attn_max_outcome"] = red["max"][1].astype(np.float32)
        return out
