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

**Read suffix.** With ``read_suffix: ""`` (clean default) every prefix is read from one pass of the
whole sequence at the separator ending it (causal attention at q_i ignores later tokens). With a
non-empty ``read_suffix`` (paper default ``"  "``) the read of prefix i is the **last token of the
prefix followed by the suffix**, as ``get_attention_weight_icl.py`` read ``f"{input_prompt[0]} "``:
its prompt ends ``"…, then "`` and the appended space makes the last token a double space (``'ĠĠ'``
on GPT-2-style tokenizers), which bayesflip's rendering (``…, then`` + ``"  "``) reproduces. A
suffix token is not in the full sequence, so **every read index costs its own pass** per layer set
(prefix ids + suffix ids; the prefix ids are the one-pass sequence's, and the suffix must join the
prefix text cleanly: validated for the head and the separator). The suffix tokens count in the
``separators`` group (they end at q_i as the separator does without a suffix), so prompt + outcomes +
separators still = all. ``logprobs`` stay the ICL read at the separator (one pass, no suffix: a
suffix would change how the next outcome tokenizes). The study itself read only N = 100 (its
``icl_100`` configs); per-N reads with the suffix are that read applied to each prefix.

**Paper defaults**: ``variant: base`` — raw text for every model, instruct models included (the
original encodes the bare prompt with ``tokenizer.encode`` for all ten models; ``variant: instruct``
renders the chat template explicitly; the instruct prompts are then unused) — and ``read_suffix: "  "``.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Mapping

import numpy as np
from pydantic import Field

from ..engine import CurveRequest
from ..errors import ChoiceError, ConfigError
from ..prompts import check_boundary, encode_piece, encode_prompt, render
from . import register
from .base import ArraySpec, RenderedCell, RunContext
from .icl import CleanICL, ICLFamily, ICLParams, PaperICL, _spec, per_flip_probs
from .protocol import ProtocolStrategy
from .seq import build_curve, sequence_text

Frac = Annotated[float, Field(ge=0.0, le=1.0)]
GROUPS = ("outcomes", "by_choice", "recent", "prompt", "separators", "all")


class PaperAttention(PaperICL):
    """The ICL paper protocol with the attention script's defaults: raw text for every model, the read suffix."""

    def defaults(self, data: dict) -> dict:
        return {"variant": "base", "read_suffix": "  "}


class AttentionParams(ICLParams):
    key_groups: list[Literal["outcomes", "by_choice", "recent", "prompt", "separators", "all"]] = Field(
        default_factory=lambda: ["outcomes", "by_choice", "recent", "prompt", "separators"], min_length=1)  # type: ignore[arg-type]  # mypy types a lambda in Field's union context as list[str]
    recent_k: int = Field(5, ge=1)
    layer_sets: dict[str, tuple[Frac, Frac]] = Field(default_factory=lambda: {"all": (0.0, 1.0)}, min_length=1)
    read_stride: int = Field(1, ge=1)   # read positions 0, s, 2s, ... ≤ n_flips
    per_outcome: bool = True
    read_suffix: str = ""               # appended to each prefix before its read (a pass per read when set)

    PROTOCOLS: ClassVar[Mapping[str, ProtocolStrategy]] = {"clean": CleanICL(), "paper": PaperAttention()}


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


def key_groups(p: AttentionParams, outcomes, head_len: int, choice_lens: list[int], sep_len: int, prefix_len: int,
               suffix: range) -> dict[str, list[int]]:
    """Key positions of every stored group (and ``o<j>`` per outcome when needed) for a pass whose
    ids are the first ``prefix_len`` ids of the build_curve sequence followed by the ``suffix`` positions."""
    ospans, sspans = token_spans(head_len, choice_lens, sep_len, outcomes)

    def cut(spans) -> list[int]:
        return [t for sp in spans for t in sp if t < prefix_len]

    g = {"prompt": list(range(min(head_len, prefix_len))), "all": list(range(prefix_len)) + list(suffix),
         "outcomes": cut(ospans), "separators": cut(sspans) + list(suffix)}
    for k, label in enumerate(_spec(p)["choices"]):
        g[f"{label.strip()}_outcomes"] = cut(s for j, s in enumerate(ospans) if outcomes[j] == k)
    out = {name: g[name] for name in group_names(p) if name in g}
    if p.per_outcome or "recent" in p.key_groups:
        out.update({f"o{j}": cut([s]) for j, s in enumerate(ospans)})
    return out


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
class AttentionFamily(ICLFamily[AttentionParams]):
    name = "attention"
    Params = AttentionParams
    requires = frozenset({"attention_mass"})

    def arrays(self, p: AttentionParams) -> dict[str, ArraySpec]:
        k, n, r, ls = len(_spec(p)["choices"]), p.n_flips, len(read_indices(p)), len(p.layer_sets)
        out = {"mass": ArraySpec(("layer_set", "position", "group"), (ls, r, len(group_names(p)))),
               "attn_max": ArraySpec(("layer_set", "position", "group"), (ls, r, len(group_names(p)))),
               "logprobs": ArraySpec(("position", "choice"), (r, k), finite="cell"),
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
        if p.read_suffix:  # the suffix must join the head (N = 0) and every separator cleanly
            heads = {render(self.cell_head(p, c, model_kind), tokenizer) for c in self.cells(p)}
            try:
                for text in sorted(heads) + ["x" + p.separator]:
                    check_boundary(tokenizer, text, p.read_suffix)
            except ChoiceError as e:
                raise ConfigError("params.read_suffix", f"{p.read_suffix!r} does not tokenize on its own after the "
                                  f"prompt: {e}", allowed=["whitespace that forms its own tokens, e.g. '  '", "''"]) from None

    def render(self, p: AttentionParams, cells: list[dict], tokenizer, model_kind: str, seed: int) -> list[RenderedCell]:
        """The reads listed by the ICL family's ``read_ns`` (among the read indices); the read position
        is the text's last token. With a read suffix each n gives two items: ``read: attention`` (the
        text with the suffix, where attention is read) and ``read: logprobs`` (the text scored for the
        choices, without it)."""
        choices = _spec(p)["choices"]
        ns = [n for n in self.read_ns(p) if n in set(read_indices(p))]
        out = []
        for c in cells:
            head = self.cell_head(p, c, model_kind)
            o = self.sample_outcomes(p, c, seed)
            for n in ns:
                text = sequence_text(tokenizer, head, choices, o[:n], p.separator)
                if p.read_suffix:
                    out.append(RenderedCell(cell={**c, "n": n, "read": "attention"}, text=text + p.read_suffix))
                    out.append(RenderedCell(cell={**c, "n": n, "read": "logprobs"}, text=text, choices=list(choices)))
                else:
                    out.append(RenderedCell(cell={**c, "n": n}, text=text, choices=list(choices)))
        return out

    def requests(self, p: AttentionParams, cells: list[dict], tokenizer, model_kind: str, seed: int):
        """Per cell: (curve request at the read indices, outcomes, head length, attention passes); a pass
        is (ids, read positions, key groups) — one for the whole sequence, or one per read with a suffix."""
        choices = _spec(p)["choices"]
        ridx = read_indices(p)
        sep_len = len(encode_piece(tokenizer, p.separator))
        clens = [len(encode_piece(tokenizer, c)) for c in choices]
        suffix = encode_piece(tokenizer, p.read_suffix) if p.read_suffix else []
        out = []
        for c in cells:  # clean: one head for all cells; paper: the statement + query of the cell
            head = self.cell_head(p, c, model_kind)
            o = self.sample_outcomes(p, c, seed)
            r = build_curve(tokenizer, head, choices, o, p.separator)
            head_len = len(encode_prompt(tokenizer, head))
            req = CurveRequest(ids=r.ids, positions=[r.positions[i] for i in ridx], choices=r.choices)
            if not suffix:
                passes = [(r.ids, req.positions,
                           key_groups(p, o, head_len, clens, sep_len, len(r.ids), range(0)))]
            else:
                passes = []
                for i in ridx:
                    end = r.positions[i] + 1
                    ids = r.ids[:end] + suffix
                    passes.append((ids, [len(ids) - 1],
                                   key_groups(p, o, head_len, clens, sep_len, end, range(end, len(ids)))))
            out.append((req, o, passes))
        return out

    def count_tokens(self, p: AttentionParams, cells: list[dict], tokenizer, model_kind: str, seed: int):
        """The run's forwards: one curve pass per cell, then every attention pass once per layer set."""
        from .tokens import TokenCount

        n = 0
        for req, _, passes in self.requests(p, cells, tokenizer, model_kind, seed):
            n += len(req.ids) + len(p.layer_sets) * sum(len(ids) for ids, _, _ in passes)
        return TokenCount(prompt=n)

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
        sets = self.resolve_layers(p, ctx.scorer.n_layers)
        ridx = read_indices(p)
        names = group_names(p)
        built = self.requests(p, cells, ctx.tokenizer, ctx.model_kind, ctx.seed)
        curves = ctx.scorer.score_curves([req for req, _, _ in built])
        need_per = p.per_outcome or "recent" in p.key_groups
        shape = (len(cells), len(sets), len(ridx), len(names))
        shape_o = (len(cells), len(sets), len(ridx), p.n_flips)
        red = {"mean": (np.zeros(shape), np.zeros(shape_o)), "max": (np.zeros(shape), np.zeros(shape_o))}
        for ci, (_, _, passes) in enumerate(built):
            for li, idx in enumerate(sets.values()):
                row = 0  # read slots filled so far: all of them from one pass, or one per pass
                for ids, qpos, groups in passes:
                    stats = ctx.scorer.attention_stats(ids, qpos, groups, layers=idx)
                    sl = slice(row, row + len(qpos))
                    for how, (mass, mass_o) in red.items():
                        res = stats[how]
                        for gi, g in enumerate(names):
                            if g in res:
                                mass[ci, li, sl, gi] = res[g]
                        if need_per:
                            mass_o[ci, li, sl] = np.stack([res[f"o{j}"] for j in range(p.n_flips)], axis=1)
                    row += len(qpos)
                if "recent" in p.key_groups:
                    gi = names.index(f"recent_{p.recent_k}")
                    for mass, mass_o in red.values():
                        for pi, i in enumerate(ridx):
                            mass[ci, li, pi, gi] = mass_o[ci, li, pi, max(0, i - p.recent_k): i].sum()
        p_true = []
        for c in cells:
            rows = per_flip_probs(p, c)
            p_true.append(np.vstack([rows, rows[-1:]])[ridx])
        lr = np.array([[idx[0], idx[-1] + 1] for idx in sets.values()], dtype=np.int32)
        out = {"mass": red["mean"][0].astype(np.float32), "attn_max": red["max"][0].astype(np.float32),
               "logprobs": np.stack(curves).astype(np.float32),
               "outcomes": np.stack([o for _, o, _ in built]), "p_true": np.stack(p_true).astype(np.float32),
               "layer_range": np.repeat(lr[None], len(cells), axis=0)}
        if p.per_outcome:
            out["mass_outcome"] = red["mean"][1].astype(np.float32)
            out["attn_max_outcome"] = red["max"][1].astype(np.float32)
        return out
